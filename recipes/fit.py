"""Will it fit? Peak GPU memory of a training config: its real training step traced on fake tensors.

    PYTHONPATH=. tune run recipes/fit.py --config configs/llama3_1_8b_qlora.yaml [key=value ...] [--search]
    (or: make fit CONFIG=... [ARGS=...] [SEARCH=1])

The stock recipe's step is built from the config and run under FakeTensorMode with every allocation counted
(tuned/memory.py): peak allocated, by phase and by kind, plus the CUDA context and the allocator's
slack as stated constants, against the config's `gpu_memory_gb`. Exits 1 when it does not fit. --search: the
longest max_seq_len (multiple of 256) and the largest batch_size at the config's length that fit, by bisection
over traced steps. The hand formulas (`tuned.fit.estimate`) are kept as a cross-check line.
"""

from __future__ import annotations

import sys

from tuned.config import load
from tuned.fit import report, search, traced


def main(argv: list[str]) -> int:
    wants_search = "--search" in argv
    cfg = load([a for a in argv if a != "--search"], __doc__.splitlines()[0])
    trace = traced(cfg)
    text, fits = report(cfg, trace)
    print(text, flush=True)
    if wants_search:
        print("Search (bisection over traced steps):", flush=True)
        print(search(cfg))
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
