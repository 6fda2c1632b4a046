"""Serves the exported model on an OpenAI-compatible API: llama.cpp's own server decodes (many requests together),
a thin front (custom_datasets/tuned/serve.py) applies the data's template and OpenAI's rules.

    python recipes/serve.py --config configs/llama3_1_8b_qlora.yaml [key=value ...]   (or: make serve CONFIG=... PORT=8000)

Needs `make export` first (it serves <output_dir>/export/model-<type>.gguf). Then, from any OpenAI client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="<name>", prompt="Your raw prompt", max_tokens=128, temperature=0)

Options (serve.*, documented in configs/layers/base/eval.yaml): host, port, model_name, gguf, n_ctx, parallel,
n_threads, kv_cache, template, api_key (else $SERVE_API_KEY), allow_open.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torchtune.config._parse import TuneRecipeArgumentParser, _merge_yaml_and_cli_args


def main(argv: list[str]) -> int:
    parser = TuneRecipeArgumentParser(description=__doc__.splitlines()[0])
    cfg = _merge_yaml_and_cli_args(*parser.parse_known_args(argv))
    import uvicorn

    from custom_datasets.tuned.engine import LlamaServer, Scorer
    from custom_datasets.tuned.serve import Front, options, served_gguf

    try:
        opts = options(cfg)
        gguf, manifest = served_gguf(Path(cfg.output_dir) / "export", opts["gguf"])
    except ValueError as err:
        raise SystemExit(str(err)) from None
    name = opts["model_name"] or Path(cfg.output_dir).name
    n_ctx = int(opts["n_ctx"] or manifest["max_seq_len"])
    engine = LlamaServer(gguf, n_ctx=n_ctx, parallel=int(opts["parallel"]), n_threads=opts["n_threads"],
                         kv_cache=opts["kv_cache"], name=name).start()
    try:
        front = Front(engine, Scorer(gguf, n_ctx=n_ctx, n_threads=opts["n_threads"], kv_cache=opts["kv_cache"]),
                      name, manifest.get("prompt_prefix", ""), manifest.get("prompt_suffix", ""),
                      template=opts["template"], api_key=opts["api_key"])
        print(f"serving {gguf} as model {name!r} on http://{opts['host']}:{opts['port']}/v1 (/v1/completions, "
              f"/v1/chat/completions, /v1/models): {opts['parallel']} requests decoded together, {n_ctx} tokens "
              f"each, template {opts['template']}, {'a key required' if opts['api_key'] else 'no key'}", flush=True)
        uvicorn.run(front.app, host=opts["host"], port=int(opts["port"]), log_level="warning")
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
