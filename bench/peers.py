"""`make bench`: our data layer against the stock torchtune 0.6.1 path, measured in the same run.

    python -m bench.peers [--data DIR] [--steps 12] [--repeats 3]      (or: make bench DATA=../shared/data)

Stock path = what a torchtune user configures today: `instruct_dataset(packed=True)` for the pairs and
`text_completion_dataset(packed=True)` for the text (one row per line, torchtune's default for
`source: text`, and one row per file with `sample_by: document`). Every case runs in a fresh process.
Data side: preparation time (ours cold and warm), peak RSS, pack fill, supervised-token share and the
share of raw-text tokens trained. Training side: the stock `lora_finetune_single_device` recipe on the
tiny checkpoint (CPU), same steps and seed, each case repeated and interleaved: supervised tokens per
second (total over the steps after the first / their total time) and seconds per step, median run.
Writes bench/results/peers.json and prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench.results
from bench.results import stamp
from bench.tables import print_table
from tools.make_tiny_checkpoint import llama3_tokenizer_path
from tuned.logs import read_steps

REPO = Path(__file__).resolve().parents[1]

IGNORE = -100


def data_inputs(data: Path) -> tuple[Path, list[Path]]:
    pairs = sorted(data.glob("*.jsonl"))
    texts = (sorted(p for p in (data / "text").rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
             if (data / "text").is_dir() else sorted(data.glob("*.txt")))
    if not pairs or not texts:
        raise SystemExit(f"--data {data}: needs a .jsonl of prompt/completion pairs and .txt files (or a text/ folder)")
    return pairs[0], texts


def worker(kind: str, data: Path, max_seq_len: int, cache: Path) -> dict:
    """One data-side case, in this (fresh) process."""
    import resource

    from torchtune.datasets import instruct_dataset, text_completion_dataset
    from torchtune.models.llama3 import llama3_tokenizer

    import custom_datasets  # noqa: F401  (imports are not preparation)

    pairs, texts = data_inputs(data)
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
    out = subprocess.run([sys.executable, "-m", "bench.peers", "--worker", kind, "--data", str(data), "--max-seq-len", str(max_seq_len),
                          "--cache", str(cache)], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        return {"failed": True, "error": _last_error(out.stderr)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_generation(args) -> dict:
    """The generation case in a fresh process (so neither engine runs on the other's warm caches or threads)."""
    out = subprocess.run([sys.executable, "-m", "bench.peers", "--worker", "generation", "--data", str(args.data), "--repeats",
                          str(args.repeats), "--generation-checkpoint", str(args.generation_checkpoint),
                          "--generation-tokens", str(args.generation_tokens)], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        return {"failed": True, "error": _last_error(out.stderr)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _last_error(stderr: str) -> str:
    """The exception line a failed process ended with (its last line that names an error), else its last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line)]
    return (named or lines or ["no output"])[-1][:500]


DATA_CASES = (("ours (cold)", "ours"), ("ours (warm)", "ours"), ("stock, text by line", "stock-lines"),
              ("stock, text by document", "stock-documents"))


def data_side(data: Path, max_seq_len: int, tmp: Path, results: dict | None = None, done=lambda: None) -> dict:
    """Each case in a fresh process, filling `results`; `done()` after each (the caller writes results.json then)."""
    cache, results = tmp / f"cache{max_seq_len}", {} if results is None else results
    for name, kind in DATA_CASES:
        results[name] = run_worker(kind, data, max_seq_len, cache)
        done()
    return results


def train_side(data: Path, steps: int, repeats: int, tmp: Path, results: dict | None = None, done=lambda: None,
               ckpt: Path = REPO / "checkpoints" / "tiny") -> dict:
    """Same tiny model, steps and seed through the stock recipe; only the dataset section differs.
    Each case runs `repeats` times, interleaved; the table gives the median run. A run that crashes is a
    result: {failed, step, error}; the other cases go on. `results` is filled as runs finish, `done()` after each."""
    from omegaconf import OmegaConf

    pairs, texts = data_inputs(data)
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
    results = {} if results is None else results
    cases = (("ours (packed)", ours), ("stock unpacked", stock(False)), ("stock packed", stock(True)))
    for repeat in range(repeats):  # interleaved, so a slow spell of the machine hits every case alike
        for name, dataset in cases:
            if repeat and any(r.get("failed") for r in runs.get(name, [])):
                continue  # it crashed once on this data; a repeat would crash again
            runs.setdefault(name, []).append(_train(base, ckpt, dataset, steps, tmp / f"{name.replace(' ', '_')}_{repeat}"))
            results[name] = _summary(runs[name], steps, repeats)
            done()
    return results


def _summary(rs: list[dict], steps: int, repeats: int) -> dict:
    ok = [r for r in rs if not r.get("failed")]
    if not ok:
        return {"steps": steps, "repeats": repeats, "failed": True, "step": rs[0]["step"], "error": rs[0]["error"], "runs": rs}
    return {"steps": steps, "repeats": repeats,
            "supervised_tokens_per_s": statistics.median(r["supervised_tokens_per_s"] for r in ok),
            "s_per_step": statistics.median(r["s_per_step"] for r in ok), "runs": rs}


def _train(base, ckpt: Path, dataset, steps: int, out: Path) -> dict:
    """One stock-recipe run: supervised tokens per second over its steps after the first (warm-up), as
    total supervised tokens / total step time, and the mean seconds per step."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(base, {"checkpointer": {"checkpoint_dir": str(ckpt)}, "tokenizer": {"path": str(ckpt / "original" / "tokenizer.model")},
                                 "output_dir": str(out), "epochs": 1, "max_steps_per_epoch": steps, "shuffle": True,
                                 "metric_logger": {"_component_": "tuned.logs.StampedDiskLogger"}})
    cfg.dataset = dataset
    path = out.with_suffix(".yaml")
    OmegaConf.save(cfg, path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "recipes"), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([str(Path(sys.executable).parent / "tune"), "run", "lora_finetune_single_device", "--config", str(path)],
                         cwd=REPO, capture_output=True, text=True, env=env)
    rows = [r for r in read_steps(out / "logs") if "stamp" in r] if (out / "logs").is_dir() else []
    if run.returncode != 0:  # the step it died in: one after the last it logged
        return {"failed": True, "step": len(rows) + 1, "error": _last_error(run.stderr)}
    tps, stamps = [r["tokens_per_second_per_gpu"] for r in rows], [r["stamp"] for r in rows]
    seconds = [b - a for a, b in zip(stamps, stamps[1:])]  # step i's time: from step i-1's log line to step i's
    if not seconds:
        return {"failed": True, "step": len(rows), "error": f"only {len(rows)} step(s) ran: too little data to time a step "
                                                            "after the first; give --data more rows or --steps fewer"}
    return {"supervised_tokens_per_s": sum(r * t for r, t in zip(tps[1:], seconds)) / sum(seconds),
            "s_per_step": sum(seconds) / len(seconds)}


def generation_worker(ckpt: Path, data: Path, new: int, batch_size: int, repeats: int) -> dict:
    """Greedy generation, ours (TunedModel: torchtune's generate with a KV cache, batched) against transformers'
    `generate` (its own KV cache, the same batches left-padded) on the same checkpoint folder, prompts and
    max_new_tokens, fp32 on CPU, in this one process, interleaved after an untimed round of each: generated tokens
    (up to each end-of-turn) per second, median of `repeats`."""
    import torch
    from transformers import AutoModelForCausalLM

    from tuned import TunedModel
    from tuned.config import load

    argv = ["--config", "configs/smollm2_135m_lora_cpu.yaml", f"checkpointer.checkpoint_dir={ckpt}",
            f"tokenizer.path={ckpt}", "dtype=fp32", f"output_dir={tempfile.mkdtemp()}"]
    tuned = TunedModel(load(argv))
    spec = next(iter(tuned.instruct_specs().values()))
    pairs, _ = data_inputs(data)
    rows = [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()][:16]
    prompts = sorted((tuned.prompt_ids(spec, r["prompt"], new) for r in rows), key=len)  # both batch them alike
    hf = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    stop = list(tuned.tokenizer.stop_tokens)

    def theirs() -> int:
        count = 0
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(map(len, chunk))
            x = torch.tensor([[stop[0]] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            with torch.no_grad():
                out = hf.generate(x, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=stop,
                                  pad_token_id=stop[0])
            for row in out[:, width:].tolist():
                count += next((k for k, t in enumerate(row) if t in stop), len(row))
        return count

    def ours() -> int:
        return sum(map(len, tuned.generate_ids(prompts, new, batch_size=batch_size)))

    rates: dict[str, list[float]] = {"ours": [], "transformers": []}
    ours(), theirs()  # one untimed round each: first-call allocations and thread start-up are neither's speed
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("transformers", theirs)):
            start = time.perf_counter()
            tokens = fn()
            rates[name].append(tokens / (time.perf_counter() - start))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"model": str(ckpt), "prompts": len(prompts), "max_new_tokens": new, "batch_size": batch_size,
            "repeats": repeats, "ours_tokens_per_s": med["ours"], "transformers_tokens_per_s": med["transformers"],
            "ratio": med["ours"] / med["transformers"], "runs": rates}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data")
    # stock unpacked crashes on a batch of blank text lines (recorded as its result, the other cases go on)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench" / "results.json",
                        help="where results.json goes (make bench OUT=bench/results/peers.json updates the committed one)")
    parser.add_argument("--checkpoint", type=Path, default=REPO / "checkpoints" / "tiny")
    parser.add_argument("--generation-checkpoint", type=Path, default=REPO / "checkpoints" / "smollm2_135m")
    parser.add_argument("--generation-tokens", type=int, default=48)
    parser.add_argument("--only", choices=["data", "train", "generation"], help="one side alone")
    args = parser.parse_args()
    if args.worker == "generation":
        print(json.dumps(generation_worker(args.generation_checkpoint, args.data, args.generation_tokens, 8, args.repeats)))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.max_seq_len, args.cache)))
        return 0
    out = args.out
    results = {
        **stamp(), "command": f"make bench DATA={args.data}", "data": str(args.data),
        "status": "running", "data_side": {}, "train_side": {}, "generation": {},
        "gpu_side": "not yet measured (no GPU was available to this project)",
    }

    def save() -> None:  # after every case: a crash or Ctrl-C later keeps what was measured
        bench.results.save(out, results)

    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "data"):
            for n in (2048, 256):
                data_side(args.data, n, Path(tmp), results=results["data_side"].setdefault(f"max_seq_len {n}", {}), done=save)
        if args.only in (None, "train"):
            train_side(args.data, args.steps, args.repeats, Path(tmp), results=results["train_side"], done=save,
                       ckpt=args.checkpoint)
        if args.only in (None, "generation"):
            results["generation"] = run_generation(args)
            save()
    results["status"] = "finished"
    save()
    print_table(results)
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
