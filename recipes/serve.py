"""Serves the exported model on an OpenAI-compatible API: llama.cpp's own server decodes (many requests together),
a thin front (tuned/serve/app.py) applies the data's template and OpenAI's rules.

    python recipes/serve.py --config configs/llama3_1_8b_qlora.yaml [key=value ...]   (or: make serve CONFIG=... PORT=8000)

Needs `make export` first (it serves <output_dir>/export/model-<type>.gguf). Then, from any OpenAI client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="<name>", prompt="Your raw prompt", max_tokens=128, temperature=0)

Options (serve.*, documented in configs/layers/base/eval.yaml): host, port, model_name (a name or a list of
aliases), gguf, n_ctx, parallel, n_threads, kv_cache, template, api_key (else $SERVE_API_KEY), allow_open,
max_restarts. A port already taken stops it at once, before the engine loads.
"""

from __future__ import annotations

import errno
import socket
import sys
from pathlib import Path

from tuned.config import load


def _quoted_host(argv: list[str]) -> list[str]:
    """serve.host=:: (or ::1) as a string: YAML would read `::` as a mapping."""
    return [f"serve.host='{a.split('=', 1)[1]}'" if a.startswith("serve.host=") and ":" in a.split("=", 1)[1]
            and not a.split("=", 1)[1].startswith(("'", '"')) else a for a in argv]


def port_taken(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (None: it can), found by binding it as the server will."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a TIME_WAIT socket is no conflict
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use (another make serve?): use PORT=<another port>"
            return f"cannot listen on {host}:{port}: {err.strerror}"
    return None


def main(argv: list[str]) -> int:
    cfg = load(_quoted_host(argv), __doc__.splitlines()[0])
    import uvicorn

    from tuned.serve.app import Front
    from tuned.serve.engine import LlamaServer, Scorer
    from tuned.serve.options import options, served_gguf

    try:
        opts = options(cfg)
        gguf, manifest = served_gguf(Path(cfg.output_dir) / "export", opts["gguf"])
        taken = port_taken(str(opts["host"]), int(opts["port"]))
        if taken:
            raise ValueError(taken)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    names = opts["model_name"]
    n_ctx = int(opts["n_ctx"] or manifest["max_seq_len"])
    engine = LlamaServer(gguf, n_ctx=n_ctx, parallel=int(opts["parallel"]), n_threads=opts["n_threads"],
                         kv_cache=opts["kv_cache"], name=names[0]).start()
    try:
        server: uvicorn.Server | None = None

        def stop() -> None:
            server.should_exit = True

        front = Front(engine, Scorer(gguf, n_ctx=n_ctx, n_threads=opts["n_threads"], kv_cache=opts["kv_cache"]),
                      names, manifest.get("prompt_prefix", ""), manifest.get("prompt_suffix", ""),
                      template=opts["template"], api_key=opts["api_key"], max_restarts=int(opts["max_restarts"]),
                      on_fatal=stop)
        server = uvicorn.Server(uvicorn.Config(front.app, host=opts["host"], port=int(opts["port"]),
                                               log_level="warning"))
        shown = f"[{opts['host']}]" if ":" in str(opts["host"]) else opts["host"]
        print(f"serving {gguf} as model {names[0]!r}{f' (aliases {names[1:]})' if names[1:] else ''} on "
              f"http://{shown}:{opts['port']}/v1 (/v1/completions, /v1/chat/completions, /v1/models): "
              f"{opts['parallel']} requests decoded together, {n_ctx} tokens each, template {opts['template']}, "
              f"{'a key required' if opts['api_key'] else 'no key'}", flush=True)
        server.run()
    finally:
        engine.stop()
    return front.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
