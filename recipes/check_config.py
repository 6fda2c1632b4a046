"""Checks a config's keys before a run: every top-level key one the recipes read or our layers define, every
`dataset.` key one the builder takes; a typo gets a did-you-mean (see custom_datasets/config_check.py).

    python recipes/check_config.py --config configs/llama3_1_8b_qlora.yaml [key=value ...]   (every Make target that runs a config calls it first)
"""

from __future__ import annotations

import sys

from torchtune.config._parse import TuneRecipeArgumentParser, _merge_yaml_and_cli_args

from custom_datasets.config_check import check_config


def main(argv: list[str]) -> int:
    path = argv[argv.index("--config") + 1] if "--config" in argv else None
    parser = TuneRecipeArgumentParser(description=__doc__.splitlines()[0])
    try:
        cfg = _merge_yaml_and_cli_args(*parser.parse_known_args(argv))
    except ValueError as err:  # e.g. ~key for a key the config does not have
        print(f"{path}: {err}", file=sys.stderr)
        return 2
    problems = check_config(cfg, path)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("Fix or remove the key(s) and run again.", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
