"""`make bench-train`: the same LoRA fine-tuning job run by ours (the stock lora_finetune_single_device recipe fed by
our builder) and by TRL's SFTTrainer + peft, in one run, on the real small model (SmolLM2-135M-Instruct), CPU fp32.

    python -m bench.train --data ../shared/data --trl-python .venv-trl/bin/python [--steps 40] [key=value ...]

One config (CONFIG, default the demo's; key=value overrides as on tune run) sets both sides: model, max_seq_len,
packs per step (batch_size x gradient_accumulation_steps x max_seq_len tokens), LoRA rank, alpha, dropout and target
modules, AdamW (lr, betas, eps, weight decay), the warm-up + cosine schedule, gradient clipping. The data: the
config's pairs and text sources pointed at --data (alpaca_8k + tinyshakespeare), built once by our builder; TRL gets
the very samples it made (token ids + loss labels, one row each, before packing) and packs them itself (bfd,
padding-free, completion-only loss: bench/trl_side.py). Both train `--steps` optimizer steps with each seed
(--repeats seeds, interleaved, alternating which side goes first).

Measured for each run: wall time of the process (start-up, model and data loading, training), supervised tokens
per second over the steps after the first (total supervised tokens / their total time, each step timed from the
previous step's end), peak RSS (the process's own, from wait4), and the held-out loss of the tuned model on the
config's held-out split (the same rows for every run: dataset.seed fixes the split), scored by one scorer for all
(transformers + peft, in TRL's environment). The scorer is checked against ours (torchtune's model, make eval's
held_out_loss) on the base model and on our first adapter: a scorer that disagrees stops the bench.
Writes --out (bench/results/train.json) and prints the table with ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.peers import data_inputs
from bench.results import save, stamp
from tuned.logs import read_steps

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "smollm2_135m_lora_cpu.yaml"
TRL_SIDE = REPO / "bench" / "trl_side.py"
HF_MODULES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
SCORER_TOLERANCE = 2e-3  # loss per token: fp32 transformers vs torchtune differ by summation order only


def compose(config: Path, overrides: list[str], data: Path, work: Path):
    """The config as tune run composes it (file + key=value), pointed at --data, with the bench's run keys."""
    from omegaconf import OmegaConf

    from tuned.config import load

    cfg = load(["--config", config, *overrides])
    sources = cfg.dataset.sources
    if set(sources) != {"pairs", "text"} or sources.pairs.type != "instruct" or sources.text.type != "text":
        raise SystemExit(f"{config}: dataset.sources must be `pairs` (type: instruct) and `text` (type: text), as in "
                         f"{DEMO.relative_to(REPO)}; has {sorted(sources)}")
    pairs, texts = data_inputs(data)
    text = texts[0] if len(texts) == 1 else texts[0].parent  # as make bench points its text source
    OmegaConf.update(cfg, "dataset.sources.pairs.path", str(pairs.resolve()))
    OmegaConf.update(cfg, "dataset.sources.text.path", str(text.resolve()))
    cfg.dataset.cache_dir = str(work / "cache")
    cfg.dataset.held_out_dir = str(work / "held_out")
    cfg.dataset.bad_rows = "skip"  # real data: alpaca_8k has empty completions; skipped and counted, as both sides see it
    return cfg


def export_samples(cfg, work: Path, held_out_limit: int, held_out_windows: int) -> dict:
    """Builds the data as the recipe will (warming the store, so no run pays for it), writes every training sample
    (pack order) and the held-out samples (make eval's formatting) as JSON lines for the TRL side and the scorer."""
    from torchtune import config as tt_config

    from custom_datasets._spec import TextSpec, parse_sources
    from tuned.heldout import held_out_samples, read_held_out

    tok = tt_config.instantiate(cfg.tokenizer)
    ds = tt_config.instantiate(cfg.dataset, tok)
    p = ds._packs
    n_samples, supervised = 0, 0
    with open(work / "samples.jsonl", "w", encoding="utf-8") as f:
        for i in range(len(ds)):
            for s in range(int(p.group_off[i]), int(p.group_off[i + 1])):
                a, b = int(p.seq_start[s]), int(p.seq_start[s]) + int(p.seq_lens[s])
                labels = p.labels[a:b].tolist()
                f.write(json.dumps({"tokens": p.tokens[a:b].tolist(), "labels": labels}) + "\n")
                n_samples += 1
                supervised += sum(x != -100 for x in labels)
    max_len = int(cfg.tokenizer.max_seq_len)
    specs = {s.name: s for s in parse_sources(cfg.dataset.sources, max_len)}
    limit = lambda name: held_out_windows if isinstance(specs[name], TextSpec) else held_out_limit  # noqa: E731
    held = {name: held_out_samples(tok, specs[name], recs[:limit(name)], max_len)
            for name, recs in read_held_out(cfg.dataset.held_out_dir, list(specs)).items()}
    with open(work / "held_out.jsonl", "w", encoding="utf-8") as f:
        for name, h in held.items():
            for s in h.samples:
                f.write(json.dumps({"source": name, "tokens": s["tokens"], "labels": s["labels"]}) + "\n")
    return {"packs": len(ds), "samples": n_samples, "supervised_tokens": supervised,
            "held_out": {name: len(h.samples) for name, h in held.items()}, "_held": held}


def _run(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Runs cmd to the end: its wall time and its own peak RSS (wait4), stderr kept in log."""
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=err, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {code}); the end of {log}:\n" + "\n".join(tail))
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def _rate(stamps: list[float], tokens: list[int]) -> dict:
    """Supervised tokens per second over the steps after the first; step i's time is from step i-1's end."""
    seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    if not seconds:
        raise SystemExit("a run logged fewer than 2 steps: nothing to time after the first; give --steps 2 or more")
    timed = sum(tokens[1:len(stamps)])
    return {"supervised_tokens_per_s": timed / sum(seconds), "s_per_step": sum(seconds) / len(seconds), "timed_steps": len(seconds),
            "timed_supervised_tokens": timed}


def run_ours(cfg, steps: int, seed: int, out: Path) -> dict:
    from omegaconf import OmegaConf

    run = OmegaConf.merge(cfg, {"output_dir": str(out), "seed": seed, "epochs": 1, "max_steps_per_epoch": steps,
                                "metric_logger": {"_component_": "tuned.logs.StampedDiskLogger", "log_dir": str(out / "logs")}})
    path = out.with_suffix(".yaml")
    OmegaConf.save(run, path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "recipes"), os.environ.get("PYTHONPATH")]))}
    measured = _run([str(Path(sys.executable).parent / "tune"), "run", "lora_finetune_single_device", "--config", str(path)],
                    out.with_suffix(".log"), env)
    rows = [r for r in read_steps(out / "logs") if "stamp" in r]
    stamps = [r["stamp"] for r in rows]
    tps = [r["tokens_per_second_per_gpu"] for r in rows]
    # the recipe logs each step's supervised tokens / its own time; the stamps time it from the previous step's end
    tokens = [0] + [round(t * (b - a)) for t, a, b in zip(tps[1:], stamps, stamps[1:])]  # step 1: not timed
    rate = _rate(stamps, tokens)
    adapter = out / "epoch_0"
    return {**measured, **rate, "losses": [float(r["loss"]) for r in rows], "adapter": str(adapter)}


def run_trl(cfg, trl_python: str, samples: Path, supervised: int, steps: int, seed: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    model = cfg.model
    targets = [HF_MODULES[m] for m in model.lora_attn_modules] + (["gate_proj", "up_proj", "down_proj"] if model.apply_lora_to_mlp else [])
    opt = cfg.optimizer
    job = {"checkpoint": str(Path(cfg.checkpointer.checkpoint_dir).resolve()), "samples": str(samples),
           "max_seq_len": int(cfg.tokenizer.max_seq_len), "batch_size": int(cfg.batch_size),
           "gradient_accumulation_steps": int(cfg.gradient_accumulation_steps), "steps": steps, "seed": seed,
           "lr": float(opt.lr), "weight_decay": float(opt.get("weight_decay", 0.01)),
           "betas": list(opt.get("betas", (0.9, 0.999))), "eps": float(opt.get("eps", 1e-8)),
           "clip_grad_norm": float(cfg.get("clip_grad_norm") or 0.0),
           "warmup_steps": int(cfg.lr_scheduler.num_warmup_steps), "lora_rank": int(model.lora_rank),
           "lora_alpha": float(model.lora_alpha), "lora_dropout": float(model.lora_dropout), "target_modules": targets,
           "output_dir": str(out), "adapter_dir": str(out / "adapter"), "result": str(out / "result.json")}
    (out / "job.json").write_text(json.dumps(job, indent=1))
    measured = _run([trl_python, str(TRL_SIDE), "train", "--job", str(out / "job.json")], out.with_suffix(".log"))
    r = json.loads((out / "result.json").read_text())
    if r["packed_supervised_tokens"] != supervised:
        raise SystemExit(f"TRL packed {r['packed_supervised_tokens']} supervised tokens from {samples}, which holds {supervised}: "
                         "the two sides would not train the same tokens (TRL dropped or cut samples, or ignored the labels)")
    accum = job["gradient_accumulation_steps"]
    tokens = [sum(r["supervised_tokens"][i:i + accum]) for i in range(0, len(r["supervised_tokens"]), accum)]
    return {**measured, **_rate(r["stamps"], tokens), "losses": r["losses"], "adapter": job["adapter_dir"],
            "versions": r["versions"], "packs": r["packs"], "packed_supervised_tokens": r["packed_supervised_tokens"]}


def score(trl_python: str, cfg, work: Path, models: dict[str, str | None], batch_size: int) -> dict:
    job = {"checkpoint": str(Path(cfg.checkpointer.checkpoint_dir).resolve()), "held_out": str(work / "held_out.jsonl"),
           "models": models, "batch_size": batch_size, "result": str(work / "scores.json")}
    (work / "score_job.json").write_text(json.dumps(job, indent=1))
    _run([trl_python, str(TRL_SIDE), "score", "--job", str(work / "score_job.json")], work / "score.log")
    return json.loads((work / "scores.json").read_text())


def check_scorer(cfg, held: dict, scores: dict, adapter: str, batch_size: int) -> dict:
    """Ours (torchtune's model, make eval's held_out_loss) on the base and on our first adapter, against the
    scorer's figures for the same: a scorer that loads an adapter wrongly, or shifts labels otherwise, shows here."""
    from tuned import TunedModel
    from tuned.heldout import held_out_loss

    tuned = TunedModel(cfg)
    checks = {}
    for name, path in (("base", None), ("ours seed 0", adapter)):
        if path:
            tuned.load_adapter(path)
        for source, h in held.items():
            mine = held_out_loss(tuned, h, batch_size, f"check {name} {source}")["loss"]
            theirs = scores[name][source]["loss"]
            checks[f"{name} / {source}"] = {"ours": mine, "scorer": theirs}
            if abs(mine - theirs) > SCORER_TOLERANCE:
                raise SystemExit(f"the scorer (transformers + peft) gives {theirs:.5f} for {name} on {source}, make eval's "
                                 f"held_out_loss {mine:.5f}: they must agree within {SCORER_TOLERANCE}")
    return checks


def summary(runs: list[dict], scores: dict, name: str) -> dict:
    losses = [scores[f"{name} seed {r['seed']}"]["all"]["loss"] for r in runs]
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    return {"supervised_tokens_per_s": med("supervised_tokens_per_s"), "s_per_step": med("s_per_step"),
            "wall_s": med("wall_s"), "peak_rss_mb": med("peak_rss_mb"),
            "timed_supervised_tokens": med("timed_supervised_tokens"),
            "held_out_loss": statistics.mean(losses), "held_out_loss_min": min(losses), "held_out_loss_max": max(losses),
            "held_out_by_source": {s: statistics.mean(scores[f"{name} seed {r['seed']}"][s]["loss"] for r in runs)
                                   for s in scores[f"{name} seed {runs[0]['seed']}"] if s != "all"},
            "runs": runs}


def print_table(r: dict) -> None:
    o, t = r["ours"], r["trl"]
    print(f"\nmake bench-train: {r['steps']} steps x {r['repeats']} seeds, {r['model']}, {r['machine']}, {r['date']}")
    print(f"data: {r['data']['samples']} samples in {r['data']['packs']} packs ({r['data']['supervised_tokens']} supervised "
          f"tokens); held out: {r['data']['held_out']}")
    rows = [("supervised tokens/s", "supervised_tokens_per_s", "{:.0f}", o["supervised_tokens_per_s"] / t["supervised_tokens_per_s"]),
            ("s per step", "s_per_step", "{:.2f}", None), ("wall s (whole run)", "wall_s", "{:.1f}", t["wall_s"] / o["wall_s"]),
            ("peak RSS MB", "peak_rss_mb", "{:.0f}", t["peak_rss_mb"] / o["peak_rss_mb"]),
            ("supervised tokens (timed steps)", "timed_supervised_tokens", "{:.0f}", None),
            ("held-out loss (mean of seeds)", "held_out_loss", "{:.4f}", None)]
    print(f"{'':34}{'ours':>12}{'TRL ' + r['trl_versions']['trl']:>14}{'ratio':>10}")
    for label, key, fmt, ratio in rows:
        print(f"{label:34}{fmt.format(o[key]):>12}{fmt.format(t[key]):>14}{'' if ratio is None else f'{ratio:.2f}x':>10}")
    print(f"{'held-out loss, seeds min..max':34}{o['held_out_loss_min']:>6.4f}..{o['held_out_loss_max']:.4f}"
          f"{t['held_out_loss_min']:>8.4f}..{t['held_out_loss_max']:.4f}")
    print(f"base model held-out loss {r['base_held_out_loss']:.4f}; ratios are ours/TRL for tokens/s, TRL/ours for time and "
          f"memory (>1: ours is better); {r['verdict']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEMO)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--trl-python", default=str(REPO / ".venv-trl" / "bin" / "python"))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3, help="seeds 0..repeats-1, each run by both sides")
    # scoring costs a forward pass of every held-out token for each of the 2 x repeats + 1 models: ~9k tokens each
    parser.add_argument("--held-out-limit", type=int, default=80, help="held-out rows scored per pair or chat source")
    parser.add_argument("--held-out-windows", type=int, default=16, help="held-out windows scored per text source")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "train.json")
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder)")
    args, overrides = parser.parse_known_args()
    if not Path(args.trl_python).exists():
        raise SystemExit(f"--trl-python {args.trl_python} does not exist: make bench-train installs TRL's venv (.venv-trl)")
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        cfg = compose(args.config, overrides, args.data, work)
        data = export_samples(cfg, work, args.held_out_limit, args.held_out_windows)
        held = data.pop("_held")
        print(f"data: {data}", flush=True)
        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        for seed in range(args.repeats):  # interleaved, the side that goes first alternating
            order = ("ours", "trl") if seed % 2 == 0 else ("trl", "ours")
            for side in order:
                out = work / f"{side}_{seed}"
                r = (run_ours(cfg, args.steps, seed, out) if side == "ours"
                     else run_trl(cfg, args.trl_python, work / "samples.jsonl", data["supervised_tokens"], args.steps, seed, out))
                runs[side].append({"seed": seed, **r})
                print(f"{side} seed {seed}: {r['supervised_tokens_per_s']:.0f} supervised tokens/s, "
                      f"{r['wall_s']:.1f} s, {r['peak_rss_mb']:.0f} MB", flush=True)
        models = {"base": None, **{f"{side} seed {r['seed']}": r["adapter"] for side in runs for r in runs[side]}}
        batch = int(cfg.get("eval", {}).get("batch_size") or 4)
        scores = score(args.trl_python, cfg, work, models, batch)
        checks = check_scorer(cfg, held, scores, runs["ours"][0]["adapter"], batch)
    ours, trl = summary(runs["ours"], scores, "ours"), summary(runs["trl"], scores, "trl")
    noise = max(ours["held_out_loss_max"] - ours["held_out_loss_min"], trl["held_out_loss_max"] - trl["held_out_loss_min"])
    speed = ours["supervised_tokens_per_s"] / trl["supervised_tokens_per_s"]
    loss_ok = ours["held_out_loss"] <= trl["held_out_loss"] + noise
    result = {
        **stamp(), "command": "make bench-train " + " ".join(sys.argv[1:]), "model": str(cfg.checkpointer.checkpoint_dir),
        "config": str(args.config), "overrides": overrides, "steps": args.steps, "repeats": args.repeats,
        "max_seq_len": int(cfg.tokenizer.max_seq_len), "packs_per_step": int(cfg.batch_size) * int(cfg.gradient_accumulation_steps),
        "data": data, "trl_versions": trl["runs"][0]["versions"], "base_held_out_loss": scores["base"]["all"]["loss"],
        "scorer": "transformers + peft in TRL's venv; checked against make eval's held_out_loss", "scorer_checks": checks,
        "ours": ours, "trl": trl, "ratio_supervised_tokens_per_s": speed,
        "held_out_loss_difference": ours["held_out_loss"] - trl["held_out_loss"], "held_out_noise": noise,
        "verdict": (f"tokens/s {'meets' if speed >= 1 else 'misses'} the 1.0x target; held-out loss "
                    f"{'no worse than' if loss_ok else 'worse than'} TRL's within the seeds' spread ({noise:.4f})"),
    }
    save(args.out, result)
    print_table(result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
