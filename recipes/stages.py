"""The pipeline's stages on a config: what is fresh and why not (`status`), running what is not (`all`), and the
wrapper every stage's make target runs its command through (`run`), which leaves the stage's record.

    python recipes/stages.py status --config configs/x.yaml [key=value ...]       (make status)
    python recipes/stages.py all --config configs/x.yaml [key=value ...]          (make all)
    python recipes/stages.py run STAGE --config configs/x.yaml [key=value ...] -- COMMAND ...

The stages and what makes each stale are declared in tuned/stages.py.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time

logging.getLogger("torchao").setLevel(logging.ERROR)  # its import warning about C++ kernels (none used here)

from custom_datasets._tables import text_table  # noqa: E402
from tuned.config import load  # noqa: E402
from tuned.stages import BY_NAME, STAGES, run, status  # noqa: E402


def _split(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(--config and overrides, the overrides alone, the command after `--`)."""
    command: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1:]
    at = argv.index("--config")
    overrides = argv[:at] + argv[at + 2:]
    return ["--config", argv[at + 1], *overrides], overrides, command


def show_status(cfg) -> None:
    table = [["stage", "state", "why"]] + [[stage.name, state, "; ".join(why)]
                                           for stage in STAGES for state, why in [status(stage, cfg)]]
    print("\n".join(text_table(table, left=3)))


def run_all(config_args: list[str], overrides: list[str]) -> int:
    """Each stage in order, run (through its make target) only if it is not fresh; one line a stage."""
    make = os.environ.get("MAKE", "make")  # the make that runs this (the Makefile passes $(MAKE))
    began = time.time()
    for stage in STAGES:
        cfg = load(config_args)  # again: a stage that ran changes what the next is made from
        state, why = status(stage, cfg)
        if state == "fresh":
            print(f"{stage.name}: fresh, skipped ({'; '.join(why)})", flush=True)
            continue
        print(f"{stage.name}: {state}{': ' + '; '.join(why) if why else ''} → make {stage.make}", flush=True)
        code = subprocess.call([make, "--no-print-directory", stage.make, f"CONFIG={config_args[1]}",
                                f"ARGS={shlex.join(overrides)}", "CHECKED=1"])
        if code:
            print(f"{stage.name}: make {stage.make} failed (exit {code}); later stages not run", file=sys.stderr)
            return code
    print(f"all: done in {time.time() - began:.1f} s", flush=True)
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("status", "all", "run"):
        print(__doc__, file=sys.stderr)
        return 2
    what, argv = argv[0], argv[1:]
    name = argv.pop(0) if what == "run" else None
    config_args, overrides, command = _split(argv)
    if what == "all":
        return run_all(config_args, overrides)
    cfg = load(config_args)
    if what == "status":
        show_status(cfg)
        return 0
    if name not in BY_NAME or not command:
        print(f"stages.py run: a stage ({', '.join(BY_NAME)}) and `-- COMMAND` are needed", file=sys.stderr)
        return 2
    return run(BY_NAME[name], cfg, command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
