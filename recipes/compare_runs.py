"""Several runs side by side: the config keys that differ, held-out loss per source, generation scores, lm-eval,
training tokens/s and wall time per stage, one column a run; also as markdown, with every run's curves on one plot.

    python recipes/compare_runs.py runs/a runs/b [...] [--out runs/compare.md]      (make compare RUNS="runs/a runs/b")
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logging.getLogger("torchao").setLevel(logging.ERROR)  # its import warning about C++ kernels (none used here)

from tuned import compare  # noqa: E402
from tuned.files import write_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="output_dir folders of trained runs")
    parser.add_argument("--out", default="runs/compare.md", help="the markdown file; its curves go beside it (.png)")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error(f"make compare needs two runs or more, got {len(args.runs)}: "
                     "make compare RUNS=\"runs/lr_a runs/lr_b\" (each the output_dir a run trained into)")
    try:
        runs = [compare.load_run(folder) for folder in args.runs]
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    out = Path(args.out)
    curves = out.with_suffix(".png")
    drew = compare.plot(runs, curves)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, compare.markdown(runs, curves.name if drew else None))
    print(compare.console(runs))
    print(f"Wrote {out}" + (f" and {curves}" if drew else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
