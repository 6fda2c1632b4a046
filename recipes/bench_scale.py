"""Scale benchmark for data preparation (not a test): the data mixture replicated 1x, 10x, 100x.

    python recipes/bench_scale.py [--data ../shared/data] [--scales 1,10,100]   (or: make bench-scale)

For each scale it writes the pairs file N times over and N copies of each text file, then runs
`recipes/prepare_data.py` with the default config twice in a fresh process each: cold (tokenize,
pack, store) and warm (load the stored packs). It prints preparation time and peak RSS (the process
and its tokenizer workers) and writes runs/bench/scale.json.

Then the duplicate search alone (custom_datasets/_dedup.py, as the builder runs it over pairs) on --dedup-rows
distinct synthetic rows (60 words drawn from 50,000, one in 20 a near copy of one of the last 1,000 rows: 1 word changed, Jaccard >= 0.9),
each size in a fresh process: time and peak RSS, so that the growth with the row count shows; and the same rows
through datasketch's MinHashLSH (same shingles, hash, bands and threshold), the peer, in the same run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path("recipes/prepare_data.py", run_name="__main__")
except SystemExit:
    pass
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def replicate(data: Path, out: Path, n: int) -> tuple[Path, Path]:
    pairs_src = next(data.glob("*.jsonl"))
    text_src = sorted(data.glob("*.txt"))
    out.mkdir(parents=True)
    pairs = out / "pairs.jsonl"
    body = pairs_src.read_bytes()
    with pairs.open("wb") as f:
        for _ in range(n):
            f.write(body)
    (out / "text").mkdir()
    for i in range(n):
        for t in text_src:
            shutil.copyfile(t, out / "text" / f"{t.stem}_{i:04d}{t.suffix}")
    return pairs, out / "text"


def prepare(pairs: Path, text: Path, work: Path, tokenizer: Path) -> dict:
    args = [sys.executable, "-c", CHILD, "recipes/prepare_data.py", "--config", "configs/llama3_1_8b_qlora.yaml",
            f"tokenizer.path={tokenizer}", f"dataset.sources.pairs.path={pairs}", f"dataset.sources.text.path={text}",
            "dataset.bad_rows=skip", f"output_dir={work}/run", f"dataset.cache_dir={work}/cache"]
    run = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if run.returncode != 0 or "MAXRSS_KB" not in run.stdout:
        raise SystemExit(run.stdout[-2000:] + run.stderr[-4000:])
    seconds = float(re.search(r"Prepared in ([0-9.]+) s", run.stdout)[1])
    own, children = map(int, re.search(r"MAXRSS_KB (\d+) (\d+)", run.stdout).groups())
    return {"seconds": seconds, "peak_rss_mb": own / 1024, "workers_peak_rss_mb": children / 1024}


DEDUP_ROWS = """
import random, resource, sys, time
from custom_datasets._dedup import LSH_WEIGHTS, NUM_PERM, Index, _hash32, scan, text_item
n = int(sys.argv[1])
rng = random.Random(0)
vocab = [f"w{i}" for i in range(50000)]
def rows():
    recent = []
    for i in range(n):
        if recent and i % 20 == 0:
            words = list(rng.choice(recent))
            for j in rng.sample(range(60), 1):
                words[j] = rng.choice(vocab)
        else:
            words = [rng.choice(vocab) for _ in range(60)]
            recent = (recent + [words])[-1000:]
        yield i, *text_item(" ".join(words))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
"""
DEDUP_OURS = DEDUP_ROWS + """
found = sum(v.copy_of is not None for _, v in scan(rows(), Index(threshold=0.8)))
print("DEDUP", time.perf_counter() - start, found, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
# The peer: datasketch's MinHashLSH as its documentation uses it (a MinHash a row, query, then insert the new ones),
# at its fastest (MinHash.bulk over batches, LeanMinHash kept for the check), with the same shingles, hash, bands,
# threshold and exact keys: what this builder ran before its own tables (2026-12-02).
DEDUP_PEER = DEDUP_ROWS + """
from datasketch import LeanMinHash, MinHash, MinHashLSH
lsh, kept, exact, found, batch = MinHashLSH(threshold=0.8, num_perm=NUM_PERM, weights=LSH_WEIGHTS), {}, {}, 0, []
def flush():
    global found
    for (i, key, _), m in zip(batch, MinHash.bulk([b[2] for b in batch], num_perm=NUM_PERM, hashfunc=_hash32)):
        m = LeanMinHash(m)
        if key in exact or any(m.jaccard(kept[k]) >= 0.8 for k in lsh.query(m)):
            found += 1
        else:
            exact[key], kept[i] = i, m
            lsh.insert(i, m, check_duplication=False)
    batch.clear()
for item in rows():
    batch.append(item)
    if len(batch) == 4096:
        flush()
flush()
print("DEDUP", time.perf_counter() - start, found, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def dedup(n: int, child: str = DEDUP_OURS) -> dict:
    run = subprocess.run([sys.executable, "-c", child, str(n)], cwd=REPO, capture_output=True, text=True)
    if run.returncode != 0 or "DEDUP" not in run.stdout:
        raise SystemExit(run.stdout[-2000:] + run.stderr[-4000:])
    seconds, found, before, peak = run.stdout.split("DEDUP", 1)[1].split()
    return {"rows": n, "seconds": float(seconds), "copies_found": int(found), "planted": n // 20 - 1,
            "rss_before_mb": int(before) / 1024, "peak_rss_mb": int(peak) / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--scales", default="1,10,100")
    parser.add_argument("--dedup-rows", default="100000,1000000", help="sizes of the duplicate-search line ('' = none)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "recipes"))
    from make_tiny_checkpoint import llama3_tokenizer_path

    rows = []
    for n in (int(x) for x in args.scales.split(",") if x):
        with tempfile.TemporaryDirectory() as tmp:
            pairs, text = replicate(args.data, Path(tmp) / "data", n)
            cold = prepare(pairs, text, Path(tmp), llama3_tokenizer_path())
            warm = prepare(pairs, text, Path(tmp), llama3_tokenizer_path())
            report = json.loads((Path(tmp) / "run" / "data" / "report.json").read_text())
        rows.append({"scale": n, "tokens": report["tokens"], "packs": report["packs"], "cold": cold, "warm": warm})
        r = rows[-1]
        print(f"{n:>5}x  {r['tokens']:>12,} tokens  {r['packs']:>8,} packs  cold {cold['seconds']:8.2f} s "
              f"({1e6 * cold['seconds'] / r['tokens']:.2f} s/M tokens), peak RSS {cold['peak_rss_mb']:7.0f} MB "
              f"(+ workers {cold['workers_peak_rss_mb']:.0f} MB)  |  warm {warm['seconds']:6.3f} s, peak RSS {warm['peak_rss_mb']:6.0f} MB",
              flush=True)
    dedups = []
    for n in (int(x) for x in args.dedup_rows.split(",") if x):
        for side, child in (("ours", DEDUP_OURS), ("datasketch MinHashLSH", DEDUP_PEER)):
            d = {"side": side, **dedup(n, child)}
            dedups.append(d)
            print(f"dedup {n:>9,} rows, {side:21}: {d['seconds']:7.1f} s ({1e6 * d['seconds'] / n:.0f} us a row), "
                  f"{d['copies_found']:,} copies found of {d['planted']:,} planted, peak RSS {d['peak_rss_mb']:6.0f} MB "
                  f"(+{d['peak_rss_mb'] - d['rss_before_mb']:.0f} MB over the {d['rss_before_mb']:.0f} before)", flush=True)
        ours, peer = dedups[-2:]
        print(f"dedup {n:>9,} rows, ours / datasketch: {peer['seconds'] / ours['seconds']:.2f}x faster, "
              f"{(peer['peak_rss_mb'] - peer['rss_before_mb']) / (ours['peak_rss_mb'] - ours['rss_before_mb']):.1f}x less added memory",
              flush=True)
    out = REPO / "runs" / "bench" / "scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prepare": rows, "dedup": dedups}, indent=2) + "\n")
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
