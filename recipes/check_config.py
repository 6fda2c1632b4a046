"""Checks a config before a run: every top-level key one the recipes read or our layers define, every `dataset.`
key one the builder takes (a typo gets a did-you-mean); then what the target needs (--needs tokenizer,checkpoint,
device): the files, with the preset's `tune download` command, and a CUDA GPU for a cuda config, with the CPU configs
to use instead (see tuned/config.py). Every problem is one line; all are printed, then exit 2.

    python recipes/check_config.py [--needs tokenizer,checkpoint] --config configs/llama3_1_8b_qlora.yaml [key=value ...]
    (every Make target that runs a config calls it first)
"""

from __future__ import annotations

import logging
import sys

# torchao warns at import that its C++ kernels do not match this torch (none are used here): not the user's problem
logging.getLogger("torchao").setLevel(logging.ERROR)

from tuned.config import check_config, check_needs, load  # noqa: E402


def main(argv: list[str]) -> int:
    needs: list[str] = []
    if "--needs" in argv:
        at = argv.index("--needs")
        needs = argv[at + 1].replace(",", " ").split()
        argv = argv[:at] + argv[at + 2:]
    path = argv[argv.index("--config") + 1] if "--config" in argv else None
    try:
        cfg = load(argv)
    except ValueError as err:  # e.g. ~key for a key the config does not have
        print(f"{path}: {err}", file=sys.stderr)
        return 2
    problems = check_config(cfg, path)
    if problems:  # a typo'd key first: the files it names may be the typo's
        print("\n".join(problems + ["Fix or remove the key(s) and run again."]), file=sys.stderr)
        return 2
    problems = check_needs(cfg, path, needs)
    if problems:
        print("\n".join(problems), file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
