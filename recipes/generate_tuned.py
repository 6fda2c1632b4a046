"""The tuned model completes your prompts, in the same template its training data used.

    python recipes/generate_tuned.py --config configs/llama3_1_8b_qlora.yaml --prompt "Name a colour." [key=value ...]
    python recipes/generate_tuned.py --config ... --prompts-file prompts.txt     # one prompt per line, or .jsonl with "prompt"
    python recipes/generate_tuned.py --config ... --source chats --prompts-file chats.jsonl  # .jsonl with "messages"
    (or: make generate CONFIG=... PROMPT="..." | PROMPTS=file [SOURCE=name])

For a chat source (type: chat) a prompt is the user's message, or a .jsonl line's "messages": the conversation so
far (OpenAI style), which the model continues with the assistant's next turn.

Options: --source NAME (whose template; default the first instruct or chat source), --base (no adapter),
eval.checkpoint=DIR (default: the latest epoch under output_dir), eval.max_new_tokens=N.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tuned import TunedModel, latest_adapter
from tuned.config import load
from tuned.sections import EvalOptions, section


def read_prompts(path: Path) -> list[str | list[dict]]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [(row := json.loads(line)).get("messages", row.get("prompt")) for line in lines]
    return lines


def main(argv: list[str]) -> int:
    ours = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    ours.add_argument("--prompt", action="append", default=[])
    ours.add_argument("--prompts-file", type=Path)
    ours.add_argument("--source")
    ours.add_argument("--base", action="store_true", help="generate with the base model (no adapter)")
    args, rest = ours.parse_known_args(argv)
    cfg = load(rest)
    prompts = args.prompt + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise SystemExit("No prompt: pass --prompt TEXT (PROMPT=... with make) or --prompts-file FILE (PROMPTS=...).")
    tuned = TunedModel(cfg)
    specs = tuned.instruct_specs()
    if not specs or (args.source and args.source not in specs):
        raise SystemExit(f"--source {args.source!r}: expected one of the instruct or chat sources {sorted(specs)}")
    spec = specs[args.source] if args.source else next(iter(specs.values()))
    section(cfg, "eval", EvalOptions)  # checked as make eval checks it; make generate's own defaults below
    evals = cfg.get("eval", {}) or {}
    if not args.base:
        tuned.load_adapter(evals.get("checkpoint") or latest_adapter(cfg.output_dir))
    print(f"# model: {', '.join(tuned.base_files)} + {tuned.adapter or 'no adapter (base)'}; template: {getattr(spec, 'template', 'chat')} ({spec.name})")
    new = int(evals.get("max_new_tokens", 128))
    completions = tuned.complete_many([tuned.prompt_ids(spec, p, new) for p in prompts], new,
                                      batch_size=int(evals.get("batch_size", 8)))
    for prompt, completion in zip(prompts, completions):
        print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
