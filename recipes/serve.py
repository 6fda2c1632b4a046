"""Serves the exported model on an OpenAI-compatible API: llama.cpp's server, with the data's prompt template.

    python recipes/serve.py --config configs/llama3_1_8b_qlora.yaml [key=value ...]   (or: make serve CONFIG=... PORT=8000)

Needs `make export` first (it serves <output_dir>/export/model-<type>.gguf). Then, from any OpenAI client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="<name>", prompt="Your raw prompt", max_tokens=128, temperature=0)

Options (serve.*): host (127.0.0.1), port (8000), model_name (the name clients pass as `model`; null = the
name of output_dir), gguf (which exported GGUF: f16, q8_0, ...; null = the first), n_ctx (null = the training
max_seq_len), n_threads (null = llama.cpp's default), chat_format (null = the GGUF's own chat template),
kv_cache (f16, llama.cpp's default | f32: the attention cache unrounded, for answers equal to make generate's).
"""

from __future__ import annotations

import sys
from pathlib import Path

from torchtune.config._parse import TuneRecipeArgumentParser, _merge_yaml_and_cli_args

DEFAULTS = {"host": "127.0.0.1", "port": 8000, "model_name": None, "gguf": None, "n_ctx": None, "n_threads": None,
            "chat_format": None, "kv_cache": "f16"}


def main(argv: list[str]) -> int:
    parser = TuneRecipeArgumentParser(description=__doc__.splitlines()[0])
    cfg = _merge_yaml_and_cli_args(*parser.parse_known_args(argv))
    opts = {**DEFAULTS, **(cfg.get("serve") or {})}
    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise SystemExit(f"serve: unknown key(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    import uvicorn

    from custom_datasets.tuned.serve import create_app

    name = opts["model_name"] or Path(cfg.output_dir).name
    export_dir = Path(cfg.output_dir) / "export"
    try:
        app = create_app(export_dir, name, n_ctx=opts["n_ctx"], gguf=opts["gguf"], n_threads=opts["n_threads"],
                         chat_format=opts["chat_format"], kv_cache=opts["kv_cache"])
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    print(f"serving {export_dir} as model {name!r} on http://{opts['host']}:{opts['port']}/v1 "
          "(/v1/completions, /v1/chat/completions, /v1/models)", flush=True)
    uvicorn.run(app, host=opts["host"], port=int(opts["port"]), log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
