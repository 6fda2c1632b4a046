"""Composes configs/layers/ into the flat configs stock `tune run` runs as they are.

    python recipes/compose_configs.py            # every preset in configs/layers/presets.yaml (make configs)
    python recipes/compose_configs.py --check    # exit 1 if a committed config differs from its layers
    python recipes/compose_configs.py --layers model/llama3_2_3b method/dora data/pairs_text base/train \
        hardware/gpu_24gb --out my.yaml          # your own mix (make config MODEL=... METHOD=... HW=... OUT=...)

Layers merge with OmegaConf.merge, later layers winning. Comments travel with the keys they sit on
(the last layer that sets a key owns its trailing comment), so the flat files keep their explanations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from tuned.fit import summary

REPO = Path(__file__).resolve().parents[1]
LAYERS = REPO / "configs" / "layers"
KEY = re.compile(r"^(\s*)([A-Za-z_]\w*):(.*)$")
TRACED = LAYERS / "traced.json"  # traced peaks by a digest of what they depend on: make configs traces each once
TRACE_KEYS = ("model", "batch_size", "gradient_accumulation_steps", "enable_activation_checkpointing", "dtype", "loss",
              "optimizer", "tokenizer.max_seq_len", "dataset.max_seq_len")


def traced_figure(cfg, record: bool):
    """The config's traced step (tuned.memory), from configs/layers/traced.json when the keys it
    depends on and the tracer are unchanged; traced (about a minute for 8B) and, with record, stored otherwise."""
    from types import SimpleNamespace

    from tuned import memory

    parts = {k: OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, k)}), resolve=True)["v"] for k in TRACE_KEYS}
    digest = hashlib.sha256(json.dumps([memory.TRACER_VERSION, parts], sort_keys=True, default=str).encode()).hexdigest()[:16]
    store = json.loads(TRACED.read_text()) if TRACED.is_file() else {}
    if digest not in store:
        t = memory.trace_step(cfg)
        store[digest] = {"peak": t.peak, "peak_phase": t.peak_phase, "sizes": t.sizes}
        if record:
            TRACED.write_text(json.dumps(dict(sorted(store.items())), indent=1) + "\n")
    entry = store[digest]
    trace = memory.Trace(peak=entry["peak"], peak_phase=entry["peak_phase"], sizes=entry["sizes"])
    return SimpleNamespace(peak=trace.peak, total=trace.total, sizes=trace.sizes)


def layer_path(name: str) -> Path:
    path = LAYERS / f"{name}.yaml"
    if not path.is_file():
        kinds = sorted(p.relative_to(LAYERS).with_suffix("").as_posix() for p in LAYERS.glob("*/*.yaml"))
        raise SystemExit(f"Unknown layer {name!r}; expected one of {kinds}")
    return path


def comments(text: str) -> tuple[dict[str, list[str]], dict[str, str | None]]:
    """Maps dotted key paths to the comment lines above them and to their trailing comment (or None)."""
    above: dict[str, list[str]] = {}
    trailing: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped)
            continue
        match = KEY.match(line)
        if not match:
            pending = []
            continue
        indent, key, rest = len(match[1]), match[2], match[3]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        if pending:
            above[path], pending = pending, []
        trailing[path] = "#" + rest.split(" #", 1)[1] if " #" in rest else None
    return above, trailing


def _scalar(value: Any) -> str:
    return yaml.safe_dump([value], default_flow_style=True, width=10**6, allow_unicode=True).strip()[1:-1]


def _emit(node: dict, prefix: str, indent: int, above: dict, trailing: dict, out: list[str]) -> None:
    pad = " " * indent
    for key, value in node.items():
        path = f"{prefix}{key}"
        if path in above and out and out[-1]:
            out.append("")  # a blank line before each commented section
        out += [pad + c for c in above.get(path, [])]
        tail = f"  {trailing[path]}" if trailing.get(path) else ""
        if isinstance(value, dict) and value:
            out.append(f"{pad}{key}:{tail}")
            _emit(value, path + ".", indent + 2, above, trailing, out)
        else:
            text = _scalar(value) if not isinstance(value, list) else yaml.safe_dump(
                value, default_flow_style=True, width=10**6).strip()
            out.append(f"{pad}{key}: {text}{tail}")


def compose(name: str, layers: list[str], recipe: str, about: str, nproc: int | None = None,
            config_path: str | None = None, record: bool = False) -> str:
    """Returns the text of the flat config composed from `layers`; its header's launch line names config_path
    (default: configs/<name>.yaml, where `make configs` writes the presets)."""
    above: dict[str, list[str]] = {}
    trailing: dict[str, str | None] = {}
    texts = [layer_path(layer).read_text() for layer in layers]
    for text in texts:
        a, t = comments(text)
        for path, lines in a.items():
            above.setdefault(path, [])
            above[path] += [c for c in lines if c not in above[path]]
        trailing.update(t)
    merged = OmegaConf.merge(OmegaConf.create({"output_dir": f"runs/{name}"}), *map(OmegaConf.create, texts))
    fit = summary(merged, traced_figure(merged, record), nproc)
    launch = f"tune run --nproc_per_node {nproc} {recipe}" if nproc else f"tune run {recipe}"
    head = [
        f"# {about}",
        "#",
        f"#   {launch} --config {config_path or f'configs/{name}.yaml'}",
        "#",
        f"# Composed by `make configs` from configs/layers/ ({', '.join(layers)}); later layers win.",
        "# Edit the layers, not this file. Any key can be overridden on the command line (key=value).",
        f"# Peak GPU memory (make fit, traced): {fit}.",
        "",
    ]
    trailing["output_dir"] = ("# adapters, merged model, logs and the held-out split go here")
    body: list[str] = []
    _emit(OmegaConf.to_container(merged, resolve=False), "", 0, above, trailing, body)
    return "\n".join(head + body) + "\n"


def presets() -> dict[str, dict]:
    return yaml.safe_load((LAYERS / "presets.yaml").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed config differs from its layers")
    parser.add_argument("--layers", nargs="+", help="compose these layers (e.g. model/llama3_1_8b) instead of the presets")
    parser.add_argument("--out", type=Path, help="with --layers: the file to write")
    parser.add_argument("--recipe", default="lora_finetune_single_device")
    args = parser.parse_args()
    if args.layers:
        if not args.out:
            parser.error("--layers needs --out")
        args.out.write_text(compose(args.out.stem, args.layers, args.recipe, f"Composed from {' + '.join(args.layers)}.",
                                     config_path=str(args.out)))
        print(f"Wrote {args.out}")
        return 0
    stale = []
    for name, p in presets().items():
        text = compose(name, p["layers"], p["recipe"], p["about"], p.get("nproc"), record=not args.check)
        path = REPO / "configs" / f"{name}.yaml"
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path.relative_to(REPO)))
        elif not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"Wrote {path.relative_to(REPO)}")
    if stale:
        print(f"Out of date with configs/layers/: {stale}. Run `make configs`.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
