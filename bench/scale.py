"""Scale benchmark for data preparation (not a test): the data mixture replicated 1x, 10x, 100x.

    python -m bench.scale [--data ../shared/data] [--scales 1,10,100]   (or: make bench-scale)

For each scale it writes the pairs file N times over and N copies of each text file, then runs
`recipes/prepare_data.py` with the default config twice in a fresh process each: cold (tokenize,
pack, store) and warm (load the stored packs). It prints preparation time and peak RSS (the process
and its tokenizer workers) and writes runs/bench/scale.json.

Then, against the peers (--peers, default on when .venv-trl exists; `make bench-scale` makes it), on the 1x data,
--repeats times alternating, each in a fresh process: our cold build (as above), the bare tokenizer pass over the
same strings (tiktoken's encode_ordinary_batch over every prompt, completion and text file, as they are: the
tokenizer's own cost) and TRL's own preparation of the same data (bench/trl_prep.py in .venv-trl: SFTTrainer._prepare_dataset,
bfd packing); medians and ratios. And where a cold build's time goes: one build with its stages timed.

Then the duplicate search alone (custom_datasets/_dedup.py, as the builder runs it over pairs) on --dedup-rows
distinct synthetic rows (60 words drawn from 50,000, one in 20 a near copy of one of the last 1,000 rows: 1 word changed, Jaccard >= 0.9),
made before the clock starts, each size in a fresh process: time and peak RSS over what the process held before, so
that the growth with the row count shows; and the same rows through datasketch's MinHashLSH as its documentation
uses it (same 3-word shingles, bands and threshold; its own hash), the peer, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import results

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


def prepare(pairs: Path, text: Path, work: Path, tokenizer: Path, child: str = CHILD) -> dict:
    args = [sys.executable, "-c", child, "recipes/prepare_data.py", "--config", "configs/llama3_1_8b_qlora.yaml",
            f"tokenizer.path={tokenizer}", f"dataset.sources.pairs.path={pairs}", f"dataset.sources.text.path={text}",
            "dataset.bad_rows=skip", f"output_dir={work}/run", f"dataset.cache_dir={work}/cache"]
    run = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if run.returncode != 0 or "MAXRSS_KB" not in run.stdout:
        raise SystemExit(run.stdout[-2000:] + run.stderr[-4000:])
    seconds = float(re.search(r"Prepared in ([0-9.]+) s", run.stdout)[1])
    own, children = map(int, re.search(r"MAXRSS_KB (\d+) (\d+)", run.stdout).groups())
    return {"seconds": seconds, "peak_rss_mb": own / 1024, "workers_peak_rss_mb": children / 1024}


DEDUP_ROWS = """
import random, sys, time
from custom_datasets._dedup import LSH_WEIGHTS, NUM_PERM, Index, scan
n = int(sys.argv[1])
rng = random.Random(0)
vocab = [f"w{i}" for i in range(50000)]
def make_rows():
    recent = []
    for i in range(n):
        if recent and i % 20 == 0:
            words = list(rng.choice(recent))
            for j in rng.sample(range(60), 1):
                words[j] = rng.choice(vocab)
        else:
            words = [rng.choice(vocab) for _ in range(60)]
            recent = (recent + [words])[-1000:]
        yield i, " ".join(words)
texts = list(make_rows())  # made before the clock starts: it times the search, not the making of the rows
def rows():
    return iter(texts)
def status(key):  # this process's own memory (ru_maxrss would carry the parent's peak over fork and exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
before = status("VmRSS")
start = time.perf_counter()
"""
DEDUP_OURS = DEDUP_ROWS + """
found = sum(v.copy_of is not None for _, v in scan(rows(), Index(threshold=0.8)))
print("DEDUP", time.perf_counter() - start, found, before, status("VmHWM"))
"""
# The peer: datasketch's MinHashLSH as its documentation uses it (a MinHash a row over its shingles' bytes, query,
# then insert the new ones), at its fastest (MinHash.bulk over batches, its default hash, LeanMinHash kept for the
# check), with the same 3-word shingles, bands, threshold, and exact keys (the words joined, in a dict).
DEDUP_PEER = DEDUP_ROWS + """
from datasketch import LeanMinHash, MinHash, MinHashLSH
lsh, kept, exact, found, batch = MinHashLSH(threshold=0.8, num_perm=NUM_PERM, weights=LSH_WEIGHTS), {}, {}, 0, []
def shingles(text):
    w = text.split()
    return {" ".join(w[i:i + 3]).encode() for i in range(max(1, len(w) - 2))}
def flush():
    global found
    for (i, text), m in zip(batch, MinHash.bulk([shingles(b[1]) for b in batch], num_perm=NUM_PERM)):
        m = LeanMinHash(m)
        if text in exact or any(m.jaccard(kept[k]) >= 0.8 for k in lsh.query(m)):
            found += 1
        else:
            exact[text], kept[i] = i, m
            lsh.insert(i, m, check_duplication=False)
    batch.clear()
for item in rows():
    batch.append(item)
    if len(batch) == 4096:
        flush()
flush()
print("DEDUP", time.perf_counter() - start, found, before, status("VmHWM"))
"""


def dedup(n: int, child: str = DEDUP_OURS) -> dict:
    run = subprocess.run([sys.executable, "-c", child, str(n)], cwd=REPO, capture_output=True, text=True)
    if run.returncode != 0 or "DEDUP" not in run.stdout:
        raise SystemExit(run.stdout[-2000:] + run.stderr[-4000:])
    seconds, found, before, peak = run.stdout.split("DEDUP", 1)[1].split()
    return {"rows": n, "seconds": float(seconds), "copies_found": int(found), "planted": n // 20 - 1,
            "rss_before_mb": int(before) / 1024, "peak_rss_mb": int(peak) / 1024}


BARE = """
import json, sys, time
from pathlib import Path
from torchtune.models.llama3 import llama3_tokenizer
encoding = llama3_tokenizer(sys.argv[1]).tt_model.tt_model
rows = [json.loads(line) for line in open(sys.argv[2], encoding="utf-8") if line.strip()]
strings = [r["prompt"] for r in rows] + [r["completion"] for r in rows]
strings += [p.read_text(encoding="utf-8") for p in sorted(Path(sys.argv[3]).rglob("*.txt"))]
start = time.perf_counter()
tokens = sum(map(len, encoding.encode_ordinary_batch(strings)))
print("BARE", time.perf_counter() - start, tokens)
"""
# Where a cold build's time goes: these functions of the builder timed, where they are called, (perf_counter, no profiler), each
# call's seconds summed; _row_duplicates runs in the process beside the build (its seconds come back in a file), and
# "waiting" is what the build waits for it after tokenizing.
STAGES = {"_check": "check (read, validate every row)", "_row_duplicates": "duplicates of pairs and chats (beside)",
          "tokenize": "tokenize (+ write tokens, held-out rows)", "_window_duplicates": "duplicates of text windows",
          "_seen_windows": "held-out text windows seen in training", "_held_out_windows": "held-out text windows written",
          "best_fit_decreasing": "pack", "result": "waiting for the duplicate count", "_build": "the whole build"}
TIMED = """
import functools, json, os, time
import custom_datasets._build as build
import custom_datasets._duplicates as duplicates
import custom_datasets._mixed as mixed
spent = {}
def timed(owner, name):
    f = getattr(owner, name)
    @functools.wraps(f)
    def g(*a, **k):
        start = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start
            if name == "_row_duplicates":  # in the process beside: its own file
                with open(os.environ["STAGES_OUT"] + f".{os.getpid()}", "w") as out:
                    json.dump(spent, out)
    setattr(owner, name, g)
CALLED_IN = {"result": [duplicates._Beside], "_row_duplicates": [build, duplicates], "_build": [mixed]}  # others: _build
for name in STAGE_NAMES:
    for owner in CALLED_IN.get(name, [build]):
        timed(owner, name)
"""


def hf_tokenizer(tokenizer: Path, folder: Path) -> Path:
    """The Llama 3 tokenizer as transformers loads it (tokenizer.json by transformers' own tiktoken converter)."""
    from types import SimpleNamespace

    from torchtune.models.llama3 import llama3_tokenizer

    from tuned.export import write_tokenizer_files

    folder.mkdir(parents=True, exist_ok=True)
    cfg = SimpleNamespace(checkpointer=SimpleNamespace(checkpoint_dir=str(folder / "none")), tokenizer=SimpleNamespace(path=str(tokenizer)))
    write_tokenizer_files(folder, cfg, llama3_tokenizer(str(tokenizer)))
    return folder


def peers(pairs: Path, text: Path, work: Path, tokenizer: Path, trl_python: Path, repeats: int) -> dict:
    """Ours cold, the bare tokenizer pass and TRL's preparation, alternating, each in a fresh process."""
    hf = hf_tokenizer(tokenizer, work / "hf_tokenizer")
    times: dict[str, list[float]] = {"ours": [], "bare": [], "trl": []}
    for _ in range(repeats):
        shutil.rmtree(work / "cache", ignore_errors=True)
        times["ours"].append(prepare(pairs, text, work, tokenizer)["seconds"])
        bare = subprocess.run([sys.executable, "-c", BARE, str(tokenizer), str(pairs), str(text)], cwd=REPO,
                              capture_output=True, text=True)
        if "BARE" not in bare.stdout:
            raise SystemExit(bare.stdout[-2000:] + bare.stderr[-4000:])
        times["bare"].append(float(bare.stdout.split("BARE", 1)[1].split()[0]))
        trl = subprocess.run([str(trl_python), "bench/trl_prep.py", "--tokenizer", str(hf), "--pairs", str(pairs),
                              "--text", str(text)], cwd=REPO, capture_output=True, text=True)
        if trl.returncode != 0:
            raise SystemExit(trl.stdout[-2000:] + trl.stderr[-4000:])
        times["trl"].append(json.loads(trl.stdout.strip().splitlines()[-1])["seconds"])
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"repeats": repeats, "seconds": times, "median": median,
            "ours_over_bare": median["ours"] / median["bare"], "trl_over_ours": median["trl"] / median["ours"]}


def stage_times(pairs: Path, text: Path, work: Path, tokenizer: Path) -> dict:
    """One cold build with its stages timed (STAGES): seconds each."""
    shutil.rmtree(work / "cache", ignore_errors=True)
    out = work / "stages.json"
    child = CHILD.replace("try:\n", TIMED.replace("STAGE_NAMES", repr(list(STAGES))) + "try:\n", 1)
    child = child.replace('print("MAXRSS_KB"', f'import json; open({str(out)!r}, "w").write(json.dumps(spent)); print("MAXRSS_KB"', 1)
    os.environ["STAGES_OUT"] = str(out)
    prepare(pairs, text, work, tokenizer, child)
    spent = json.loads(out.read_text())
    for beside in work.glob("stages.json.*"):
        spent.update(json.loads(beside.read_text()))
        beside.unlink()
    return {STAGES[name]: spent.get(name, 0.0) for name in STAGES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--scales", default="1,10,100")
    parser.add_argument("--dedup-rows", default="100000,1000000", help="sizes of the duplicate-search line ('' = none)")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                        help="cold build vs the bare tokenizer pass and TRL's preparation (default: when --trl-python exists)")
    parser.add_argument("--trl-python", type=Path, default=REPO / ".venv-trl" / "bin" / "python")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from tools.make_tiny_checkpoint import llama3_tokenizer_path

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
    result = {**results.stamp(), "prepare": rows}
    if args.peers or (args.peers is None and args.trl_python.exists()):
        with tempfile.TemporaryDirectory() as tmp:
            pairs, text = replicate(args.data, Path(tmp) / "data", 1)
            p = result["peers"] = peers(pairs, text, Path(tmp), llama3_tokenizer_path(), args.trl_python, args.repeats)
            m = p["median"]
            print(f"cold build, 1x, median of {args.repeats}: ours {m['ours']:.2f} s | bare tokenizer pass {m['bare']:.2f} s "
                  f"(ours / bare {p['ours_over_bare']:.2f}x) | TRL {m['trl']:.2f} s (TRL / ours {p['trl_over_ours']:.2f}x)", flush=True)
            stages = result["stages"] = stage_times(pairs, text, Path(tmp), llama3_tokenizer_path())
            build = stages["the whole build"]
            print("where a cold build's time goes (1x): " + "; ".join(
                f"{stage} {s:.3f} s ({100 * s / build:.0f}%)" for stage, s in stages.items()), flush=True)
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
              f"{(peer['peak_rss_mb'] - peer['rss_before_mb']) / max(1, ours['peak_rss_mb'] - ours['rss_before_mb']):.1f}x less added memory",
              flush=True)
    out = REPO / "runs" / "bench" / "scale.json"
    result["dedup"] = dedups
    results.save(out, result)
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
