"""Plants duplicates in a pairs file, for trying `make data`'s duplicate columns on real data (docs/data.md):

    python bench/plant_copies.py ../shared/data/alpaca_8k.jsonl /tmp/planted/alpaca_8k_planted.jsonl [--copies 150]

Appends --copies exact copies of random rows (prompt upper-cased, completion with its full stops turned into " !":
the same words) and --copies near copies of other random rows (a sentence more at the end of the completion), in a
random order. Prints how many of the near copies are at word 3-gram Jaccard >= --threshold with their original by
brute force (the definition in docs/data.md, computed here without the builder's code): the LSH should find about
that many.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

EXTRA = "I hope this helps."


def grams(text: str) -> set[str]:
    w = re.findall(r"[^\W_]+", text.lower())
    return {" ".join(w[i:i + 3]) for i in range(max(1, len(w) - 2))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--copies", type=int, default=150)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.source.read_text().splitlines() if line.strip()]
    rng = random.Random(args.seed)
    picked = rng.sample(range(len(rows)), 2 * args.copies)
    exact = [{"prompt": rows[i]["prompt"].upper(), "completion": rows[i]["completion"].replace(".", " !")} for i in picked[:args.copies]]
    near = [{"prompt": rows[i]["prompt"], "completion": rows[i]["completion"] + " " + EXTRA} for i in picked[args.copies:]]
    planted = exact + near
    rng.shuffle(planted)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows + planted))
    close = 0
    for i, copy in zip(picked[args.copies:], near):
        a, b = grams(rows[i]["prompt"] + "\n" + rows[i]["completion"]), grams(copy["prompt"] + "\n" + copy["completion"])
        close += len(a & b) / len(a | b) >= args.threshold
    print(f"wrote {args.out}: {len(rows)} rows + {len(exact)} exact copies + {len(near)} near copies "
          f"({close} of them at 3-gram Jaccard >= {args.threshold} by brute force)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
