"""`make bench`: our data layer against the stock torchtune 0.6.1 path, measured in the same run.

    python recipes/bench.py [--data DIR] [--steps 12] [--repeats 3]      (or: make bench DATA=../shared/data)

Stock path = what a torchtune user configures today: `instruct_dataset(packed=True)` for the pairs and
`text_completion_dataset(packed=True)` for the text (one row per line, torchtune's default for
`source: text`, and one row per file with `sample_by: document`). Every case runs in a fresh process.
Data side: preparation time (ours cold and warm), peak RSS, pack fill, supervised-token share and the
share of raw-text tokens trained. Training side: the stock `lora_finetune_single_device` recipe on the
tiny checkpoint (CPU), same steps and seed, each case repeated and interleaved: supervised tokens per
second (total over the steps after the first / their total time) and seconds per step, median run.
Writes bench/results.json and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))
from make_tiny_checkpoint import llama3_tokenizer_path  # noqa: E402
from torchtune.training.metric_logging import DiskLogger  # noqa: E402

IGNORE = -100


def _inputs(data: Path) -> tuple[Path, list[Path]]:
    pairs = sorted(data.glob("*.jsonl"))
    texts = (sorted(p for p in (data / "text").rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
             if (data / "text").is_dir() else sorted(data.glob("*.txt")))
    if not pairs or not texts:
        raise SystemExit(f"--data {data}: needs a .jsonl of prompt/completion pairs and .txt files (or a text/ folder)")
    return pairs[0], texts


def worker(kind: str, data: Path, max_seq_len: int, cache: Path) -> dict:
    """One data-side case, in this (fresh) process."""
    import resource

    from torchtune.models.llama3 import llama3_tokenizer

    import custom_datasets  # noqa: F401  (imports are not preparation)
    from torchtune.datasets import instruct_dataset, text_completion_dataset

    pairs, texts = _inputs(data)
    tok = llama3_tokenizer(str(llama3_tokenizer_path()), max_seq_len=max_seq_len)
    doc_tokens = sum(len(tok.encode(t.read_text(encoding="utf-8"), add_bos=False, add_eos=False)) + 1 for t in texts)
    start = time.perf_counter()
    if kind.startswith("ours"):
        ds = custom_datasets.mixed_dataset(tok, sources={
            "pairs": {"type": "instruct", "path": str(pairs)},
            "text": {"type": "text", "path": str(texts[0] if len(texts) == 1 else texts[0].parent)}},
            bad_rows="skip", cache_dir=str(cache))
        seconds = time.perf_counter() - start
        text_trained = ds.stats.sources[1].samples and ds.stats.sources[1].kept_tokens
        packs = [ds[i] for i in range(len(ds))]
        truncated = ds.stats.sources[0].truncated
        real = ds.stats.tokens
    else:
        inst = instruct_dataset(tok, source="json", data_files=str(pairs), split="train", packed=True,
                                column_map={"input": "prompt", "output": "completion"}, train_on_input=False)
        extra = {"sample_by": "document"} if kind == "stock-documents" else {}
        text = text_completion_dataset(tok, source="text", data_files=[str(t) for t in texts], column="text",
                                       split="train", packed=True, **extra)
        seconds = time.perf_counter() - start
        packs = [inst[i] for i in range(len(inst))] + [text[i] for i in range(len(text))]
        text_trained = sum(int((text[i]["labels"] != IGNORE).sum()) for i in range(len(text)))
        truncated = None  # the stock path truncates long pairs silently: not counted
        # PackedDataset pads with id 0 (a real token), so count the unpacked samples it packed
        real = sum(len(x["tokens"]) for d in (inst, text) for x in d.ds)
    supervised = sum(int((p["labels"] != IGNORE).sum()) for p in packs)
    return {"seconds": seconds, "packs": len(packs), "fill": real / (len(packs) * max_seq_len),
            "supervised_share": supervised / real, "text_kept": min(text_trained / doc_tokens, 1.0),
            "truncated_pairs_counted": truncated, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_worker(kind: str, data: Path, max_seq_len: int, cache: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--data", str(data), "--max-seq-len", str(max_seq_len),
                          "--cache", str(cache)], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def data_side(data: Path, max_seq_len: int, tmp: Path) -> dict:
    cache = tmp / f"cache{max_seq_len}"
    return {"ours (cold)": run_worker("ours", data, max_seq_len, cache),
            "ours (warm)": run_worker("ours", data, max_seq_len, cache),
            "stock, text by line": run_worker("stock-lines", data, max_seq_len, cache),
            "stock, text by document": run_worker("stock-documents", data, max_seq_len, cache)}


def train_side(data: Path, steps: int, repeats: int, tmp: Path) -> dict:
    """Same tiny model, steps and seed through the stock recipe; only the dataset section differs.
    Each case runs `repeats` times, interleaved; the table gives the median run."""
    from omegaconf import OmegaConf

    ckpt = REPO / "checkpoints" / "tiny"
    pairs, texts = _inputs(data)
    base = OmegaConf.load(REPO / "configs" / "tiny_qlora_cpu.yaml")
    stock = lambda packed: [  # noqa: E731
        {"_component_": "torchtune.datasets.instruct_dataset", "source": "json", "data_files": str(pairs), "split": "train",
         "column_map": {"input": "prompt", "output": "completion"}, "train_on_input": False, "packed": packed},
        {"_component_": "torchtune.datasets.text_completion_dataset", "source": "text", "column": "text",
         "data_files": [str(t) for t in texts], "split": "train", "packed": packed}]
    ours = OmegaConf.to_container(base.dataset)
    ours["sources"]["pairs"]["path"] = str(pairs)
    ours["sources"]["text"]["path"] = str(texts[0] if len(texts) == 1 else texts[0].parent)
    ours.update(bad_rows="skip", cache_dir=str(tmp / "train_cache"))
    for source in ours["sources"].values():
        source["val_fraction"] = 0.0
    runs: dict[str, list[dict]] = {}
    cases = (("ours (packed)", ours), ("stock unpacked", stock(False)), ("stock packed", stock(True)))
    for repeat in range(repeats):  # interleaved, so a slow spell of the machine hits every case alike
        for name, dataset in cases:
            runs.setdefault(name, []).append(_train(base, ckpt, dataset, steps, tmp / f"{name.replace(' ', '_')}_{repeat}"))
    results = {}
    for name, rs in runs.items():
        results[name] = {"steps": steps, "repeats": repeats,
                         "supervised_tokens_per_s": statistics.median(r["supervised_tokens_per_s"] for r in rs),
                         "s_per_step": statistics.median(r["s_per_step"] for r in rs),
                         "runs": rs}
    return results


def _train(base, ckpt: Path, dataset, steps: int, out: Path) -> dict:
    """One stock-recipe run: supervised tokens per second over its steps after the first (warm-up), as
    total supervised tokens / total step time, and the mean seconds per step."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(base, {"checkpointer": {"checkpoint_dir": str(ckpt)}, "tokenizer": {"path": str(ckpt / "original" / "tokenizer.model")},
                                 "output_dir": str(out), "epochs": 1, "max_steps_per_epoch": steps, "shuffle": True,
                                 "metric_logger": {"_component_": "bench.StampedDiskLogger"}})
    cfg.dataset = dataset
    path = out.with_suffix(".yaml")
    OmegaConf.save(cfg, path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "recipes"), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([str(Path(sys.executable).parent / "tune"), "run", "lora_finetune_single_device", "--config", str(path)],
                         cwd=REPO, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(run.stderr[-4000:])
    (log,) = (out / "logs").glob("log_*.txt")
    rows = re.findall(r"tokens_per_second_per_gpu:([0-9.]+) .*?stamp:([0-9.]+)", log.read_text())
    tps, stamps = [float(r[0]) for r in rows], [float(r[1]) for r in rows]
    seconds = [b - a for a, b in zip(stamps, stamps[1:])]  # step i's time: from step i-1's log line to step i's
    return {"supervised_tokens_per_s": sum(r * t for r, t in zip(tps[1:], seconds)) / sum(seconds),
            "s_per_step": sum(seconds) / len(seconds)}


class StampedDiskLogger(DiskLogger):
    """torchtune's DiskLogger, with a clock stamp on each step's line: the recipe logs supervised tokens
    per second of each step, and the stamps give each step's time, so tokens add up over the run."""

    def log_dict(self, payload, step: int) -> None:
        super().log_dict({**payload, "stamp": time.perf_counter()}, step)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data")
    parser.add_argument("--steps", type=int, default=12)  # stock unpacked crashes at step 14 on ../shared/data (a batch of blank lines)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--cache", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.max_seq_len, args.cache)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "machine": f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores ({platform.platform()})",
            "date": date.today().isoformat(), "command": f"make bench DATA={args.data}", "data": str(args.data),
            "data_side": {f"max_seq_len {n}": data_side(args.data, n, Path(tmp)) for n in (2048, 256)},
            "train_side": train_side(args.data, args.steps, args.repeats, Path(tmp)),
            "gpu_side": "not yet measured (no GPU was available to this project)",
        }
    out = REPO / "bench" / "results.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"Wrote {out}")
    return 0


def print_table(r: dict) -> None:
    for size, cases in r["data_side"].items():
        print(f"\nData side, {size} ({r['data']}):")
        print(f"  {'case':<26}{'prep s':>9}{'peak RSS MB':>13}{'packs':>8}{'fill':>9}{'supervised':>12}{'text kept':>11}"
              f"{'long pairs':>12}")
        for name, c in cases.items():
            long = "uncounted" if c["truncated_pairs_counted"] is None else f"{c['truncated_pairs_counted']} cut"
            print(f"  {name:<26}{c['seconds']:>9.3f}{c['peak_rss_mb']:>13.0f}{c['packs']:>8}{100 * c['fill']:>8.2f}%"
                  f"{100 * c['supervised_share']:>11.1f}%{100 * c['text_kept']:>10.1f}%{long:>12}")
        ours, warm, line, doc = (cases[k] for k in ("ours (cold)", "ours (warm)", "stock, text by line", "stock, text by document"))
        print(f"  ratios: cold time {ours['seconds'] / line['seconds']:.2f}x stock, warm {warm['seconds'] / line['seconds']:.3f}x stock; "
              f"fill {100 * ours['fill']:.2f}% vs {100 * line['fill']:.2f}%; text kept {100 * ours['text_kept']:.1f}% vs "
              f"{100 * doc['text_kept']:.1f}% (whole documents)")
    t = r["train_side"]
    print("\nTraining side (tiny Llama 3.1, CPU, stock lora_finetune_single_device, same steps and seed; median run):")
    for name, c in t.items():
        each = ", ".join(f"{r['supervised_tokens_per_s']:.1f}" for r in c.get("runs", []))
        print(f"  {name:<16} {c['supervised_tokens_per_s']:>9.1f} supervised tokens/s  {c['s_per_step'] or float('nan'):>6.2f} s/step"
              f"  (runs: {each})")
    ours = t["ours (packed)"]["supervised_tokens_per_s"]
    print(f"  ratios: {ours / t['stock unpacked']['supervised_tokens_per_s']:.2f}x stock unpacked, "
          f"{ours / t['stock packed']['supervised_tokens_per_s']:.2f}x stock packed")
    d = r["data_side"]["max_seq_len 256"]
    per_pack = {k: d[k]["fill"] * d[k]["supervised_share"] for k in ("ours (cold)", "stock, text by line")}
    print(f"  (same shapes per step, so from the data alone: {per_pack['ours (cold)'] / per_pack['stock, text by line']:.2f}x "
          "the supervised tokens per packed step; CPU step times vary by a few tens of percent between runs)")
    print(f"\nGPU side: {r['gpu_side']}")


if __name__ == "__main__":
    sys.exit(main())
