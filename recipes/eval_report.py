"""Did fine-tuning help? Base vs tuned on the held-out split of the SAME config training used.

    PYTHONPATH=. tune run recipes/eval_report.py --config configs/llama3_1_8b_qlora.yaml [eval.checkpoint=runs/x/epoch_1] [eval.tasks=[hellaswag]]
    (or: make eval CONFIG=... [TASKS=hellaswag,arc_easy])

Phases: the base model (its column reused from `eval.base_cache` when an earlier run scored the same base
checkpoint on the same held-out split with the same settings: tuned/base_scores.py), then every trained
epoch under output_dir (`eval.epochs`). Each phase gives the held-out loss per source (completion tokens
of pairs, the windows of text, masked and cut as in training); the base and the last epoch also give
greedy generations (exact match, chrF, ROUGE-L) and lm-eval (a local task per instruct source, plus
`eval.tasks`). report.json, report.md and curves.png under <output_dir>/eval are rewritten after every
phase; with the tracker layers, its figures also go to TensorBoard / MLflow (tuned/trackers.py).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torchtune import config
from tqdm import tqdm

from custom_datasets import ChatSpec, InstructSpec
from tuned import report as rep
from tuned.base_scores import BaseScores
from tuned.heldout import held_out_loss, held_out_samples, read_held_out
from tuned.logs import training_since
from tuned.model import TunedModel, epoch_adapters, epoch_number, latest_adapter
from tuned.sections import EvalOptions, section
from tuned.stages import read_record
from tuned.trackers import eval_metrics, log_after_training


def options(cfg: DictConfig) -> dict:
    """eval.* checked against its declared type (tuned/sections.py), every default filled in."""
    return section(cfg, "eval", EvalOptions)


def phases(cfg: DictConfig, opts: dict) -> tuple[list[tuple[str, int, Path | None]], int]:
    """[(name, epochs trained, adapter folder or None)], base first; and how many epochs the run trained."""
    found = epoch_adapters(cfg.output_dir)
    if opts["checkpoint"]:
        folder = Path(opts["checkpoint"])
        number = epoch_number(folder)
        chosen = [(folder.name, (number + 1) if number is not None else 1, folder)]
    else:
        if not found:
            latest_adapter(cfg.output_dir)  # raises the error that says what to do
        wanted = found if opts["epochs"] == "all" else found[-1:] if opts["epochs"] == "last" else [
            (n, p) for n, p in found if n in set(opts["epochs"])]
        missing = [] if not isinstance(opts["epochs"], list) else sorted(set(opts["epochs"]) - {n for n, _ in found})
        if missing:
            raise FileNotFoundError(f"eval.epochs: no adapter for epoch(s) {missing} under {cfg.output_dir}; "
                                    f"found {[n for n, _ in found]}")
        chosen = [(p.name, n + 1, p) for n, p in wanted]
    return [("base", 0, None)] + chosen, (found[-1][0] + 1 if found else 1)


def text_scores(predictions: list[str], references: list[str]) -> dict:
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    n = max(len(references), 1)
    return {
        "exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / n,
        "chrf": CHRF().corpus_score(predictions, [references]).score,
        "rougeL": sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / n,
    }


def evaluate_phase(tuned: TunedModel, held: dict, prompts: list, opts: dict, tasks: list, name: str, full: bool) -> dict:
    result = {"held_out": {s: held_out_loss(tuned, h, opts["batch_size"], f"{name}: held-out loss ({s})")
                           for s, h in held.items()}}
    if full:
        print(f"{name}: generating {len(prompts)} completions (KV cache, batches of {opts['batch_size']})", flush=True)
        ids = [tuned.prompt_ids(spec, r["messages"][:-1] if "messages" in r else r["prompt"], opts["max_new_tokens"])
               for spec, r in prompts]
        gens = tuned.complete_many(ids, opts["max_new_tokens"], batch_size=opts["batch_size"])
        result["generations"] = gens
        result["text_scores"] = text_scores(gens, [r["completion"] for _, r in prompts]) if prompts else {}
        if tasks:
            from tuned.harness import run_lm_eval

            result["lm_eval"] = run_lm_eval(tuned, tasks, opts["limit"], opts["batch_size"])
    return result


@config.parse
def main(cfg: DictConfig) -> int:
    opts = options(cfg)
    start = time.time()
    plan, epochs_logged = phases(cfg, opts)
    tuned = TunedModel(cfg)
    specs = tuned.specs()
    held = {s: held_out_samples(tuned.tokenizer, specs[s], recs, tuned.max_seq_len)
            for s, recs in read_held_out(cfg.dataset.held_out_dir, list(specs)).items()}
    prompts = [(specs[s], h_s["record"]) for s, h in held.items() if isinstance(specs[s], (InstructSpec, ChatSpec))
               for h_s in h.samples][: opts["num_generations"]]
    out_dir = Path(cfg.output_dir) / "eval"
    tasks = []
    if opts["local_task"]:
        from tuned.harness import local_tasks

        tasks += local_tasks(tuned, held, out_dir / "tasks")
    tasks += list(opts["tasks"])
    report = {
        "status": "running",
        "config": sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else None,
        "overrides": [a for a in sys.argv[1:] if "=" in a],
        "config_sha256": hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=True).encode()).hexdigest(),
        "base_checkpoint": tuned.base_files, "eval": opts, "epochs_logged": epochs_logged,
        "held_out_rows": {s: h.counts() for s, h in held.items()},
        "phases": [], "base": None, "tuned": None, "generations": [], "curves": None, "seconds": 0,
    }
    cache = BaseScores(cfg, opts, cfg.dataset.held_out_dir) if opts["base_cache"] else None
    train_losses = rep.training_losses(cfg.metric_logger.get("log_dir", Path(cfg.output_dir) / "logs"),
                                       training_since(read_record(cfg, "train")))
    last = plan[-1][0]
    try:
        for name, epochs_trained, folder in tqdm(plan, desc="Evaluating", unit="phase"):
            report["status"] = f"running: {name}"
            if folder is not None:
                tuned.load_adapter(folder)
            full = name in ("base", last) or opts["full"] == "all"
            kept = cache.load(list(held), len(prompts)) if cache and name == "base" else None
            if kept:
                print(f"base: reused, scored {kept['scored']} for {kept['run']} ({cache.path}): the same base "
                      "checkpoint, held-out split and eval settings", flush=True)
                result, gens = dict(kept["phase"]), kept["generations"]
                report["base_reused"] = {"entry": str(cache.path), "scored": kept["scored"], "run": kept["run"]}
            else:
                result = evaluate_phase(tuned, held, prompts, opts, tasks, name, full)
                gens = result.pop("generations", None)
                if cache and name == "base":
                    cache.save(result, gens or [], str(cfg.output_dir))
            phase = {"name": name, "epochs_trained": epochs_trained, "adapter": tuned.adapter if folder else None, **result}
            report["phases"].append(phase)
            if name == "base":
                report["base"] = phase
                report["generations"] = [{"source": spec.name, "where": r["where"], "prompt": r["prompt"],
                                          "reference": r["completion"], "base": g, "tuned": None}
                                         for (spec, r), g in zip(prompts, gens or [])]
            elif name == last:
                report["tuned"] = phase
                for g, text in zip(report["generations"], gens or []):
                    g["tuned"] = text
            if len(report["phases"]) > 1:
                rep.plot_curves(report, train_losses, out_dir / "curves.png")
                report["curves"] = "curves.png"
            report["seconds"] = round(time.time() - start, 1)
            rep.write(report, out_dir)
        report["status"] = "complete"
    except BaseException as e:  # a crash or Ctrl-C: keep what was computed, say where it stopped
        report["status"] = f"stopped during {report['status'].removeprefix('running: ')}: {type(e).__name__}: {e}"
        report["seconds"] = round(time.time() - start, 1)
        if report["base"] is not None:
            rep.write(report, out_dir)
        raise
    rep.write(report, out_dir)
    data = Path(cfg.output_dir) / "data" / "report.json"
    for line in log_after_training(cfg, eval_metrics(report, json.loads(data.read_text()) if data.is_file() else None),
                                   len(train_losses)):
        print(line)
    print(rep.console_table(report))
    print(f"Wrote {out_dir / 'report.json'}, report.md" + (", curves.png" if report["curves"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
