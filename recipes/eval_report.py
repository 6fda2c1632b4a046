"""Did fine-tuning help? Base vs tuned on the held-out split of the SAME config training used.

    PYTHONPATH=. tune run recipes/eval_report.py --config configs/llama3_1_8b_qlora.yaml [eval.checkpoint=runs/x/epoch_1] [eval.tasks=[hellaswag]]
    (or: make eval CONFIG=... [TASKS=hellaswag,arc_easy])

Per source: mean loss and perplexity on completion tokens (instruct) or on the held-out windows'
tokens (text), masked as in training; greedy generations for `eval.num_generations` held-out prompts,
scored with exact match, chrF (sacrebleu) and ROUGE-L (rouge-score); lm-eval on a local task built
from the held-out split plus any standard `eval.tasks`. Writes <output_dir>/eval/report.json and
report.md and prints a short table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torchtune import config
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE
from torchtune.data import padded_collate_sft

from custom_datasets import Pair, format_pair

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however this recipe is run
from lm_eval_wrapper import run_lm_eval, write_local_tasks  # noqa: E402
from tuned_model import TunedModel, latest_adapter  # noqa: E402

DEFAULTS = {"checkpoint": None, "num_generations": 8, "max_new_tokens": 64, "batch_size": 4, "tasks": [], "limit": None}


def read_held_out(cfg: DictConfig) -> dict[str, list[dict]]:
    held_dir = Path(cfg.dataset.held_out_dir)
    out = {}
    for name in cfg.dataset.sources:
        path = held_dir / f"{name}.jsonl"
        if path.is_file():
            out[str(name)] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if not out:
        raise FileNotFoundError(
            f"No held-out split under {held_dir}. Set dataset.sources.<name>.val_fraction (or val_size) and "
            "build the data (make data, or training) with the same config first.")
    return out


def loss_samples(tuned: TunedModel, specs: dict, source: str, records: list[dict]) -> list[dict]:
    """Held-out records as (tokens, labels): completion tokens only for pairs, the window for text."""
    tok, max_len = tuned.tokenizer, tuned.cfg.tokenizer.max_seq_len
    samples = []
    for r in records:
        if source in specs:
            spec = dataclasses.replace(specs[source], train_on_input=False, too_long="truncate")
            s, _ = format_pair(tok, spec, Pair(r["prompt"], r["completion"], r["where"]), max_len)
            samples.append({"tokens": s.tokens, "labels": s.labels})
        else:
            ctx = tok.encode(r["context"], add_bos=False, add_eos=False)
            body = tok.encode(r["text"], add_bos=False, add_eos=False)
            tokens = ([tok.bos_id] + ctx + body)[:max_len]
            samples.append({"tokens": tokens, "labels": ([IGNORE] * (1 + len(ctx)) + body)[:max_len]})
    return samples


@torch.inference_mode()
def held_out_loss(tuned: TunedModel, samples: list[dict], batch_size: int) -> dict:
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        batch = padded_collate_sft(samples[start : start + batch_size], padding_idx=tuned.tokenizer.pad_id)
        logits = tuned.model(batch["tokens"].to(tuned.device)).float()
        labels = batch["labels"][:, 1:].to(tuned.device)  # the recipe's shift: position i predicts token i+1
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
        total += loss.item()
        count += int((labels != IGNORE).sum())
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


def text_scores(predictions: list[str], references: list[str]) -> dict:
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return {
        "exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(len(references), 1),
        "chrf": CHRF().corpus_score(predictions, [references]).score,
        "rougeL": sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / max(len(references), 1),
    }


def evaluate_model(tuned: TunedModel, samples, prompts, opts, tasks: list[str], task_dir: Path) -> dict:
    result = {"held_out": {s: held_out_loss(tuned, samples[s], opts["batch_size"]) for s in samples}}
    gens = [tuned.generate(spec, r["prompt"], opts["max_new_tokens"]) for spec, r in prompts]
    result["generations"] = gens
    result["text_scores"] = text_scores(gens, [r["completion"] for _, r in prompts]) if prompts else {}
    result["lm_eval"] = run_lm_eval(tuned, tasks, task_dir, opts["limit"], opts["batch_size"]) if tasks else {}
    return result


def report_md(report: dict) -> str:
    lines = ["# Evaluation: base vs tuned", "",
             f"- config: `{report['config']}` (sha256 {report['config_sha256'][:12]})",
             f"- base: `{', '.join(report['base_checkpoint'])}`", f"- tuned adapter: `{report['tuned_adapter']}`", "",
             "| metric | base | tuned | change |", "| --- | ---: | ---: | ---: |"]
    for row, b, t in rows(report):
        lines.append(f"| {row} | {b:.4g} | {t:.4g} | {t - b:+.4g} |")
    lines += ["", "## Generations (greedy, held-out prompts)", ""]
    for g in report["generations"]:
        lines += [f"**[{g['source']}] {g['prompt']}**", "", f"- reference: {g['reference']}", f"- base: {g['base']}",
                  f"- tuned: {g['tuned']}", ""]
    return "\n".join(lines)


def rows(report: dict) -> list[tuple[str, float, float]]:
    out = []
    for source, b in report["base"]["held_out"].items():
        t = report["tuned"]["held_out"][source]
        out += [(f"{source}: held-out loss ({b['tokens']} tokens)", b["loss"], t["loss"]),
                (f"{source}: held-out perplexity", b["perplexity"], t["perplexity"])]
    for metric in report["base"]["text_scores"]:
        out.append((f"generations: {metric}", report["base"]["text_scores"][metric], report["tuned"]["text_scores"][metric]))
    for task, metrics in report["base"]["lm_eval"].items():
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) and "stderr" not in metric:
                out.append((f"lm-eval {task}: {metric}", value, report["tuned"]["lm_eval"][task][metric]))
    return out


@config.parse
def main(cfg: DictConfig) -> int:
    opts = {**DEFAULTS, **OmegaConf.to_container(cfg.get("eval", {}) or {}, resolve=True)}
    unknown = set(opts) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"eval: unknown key(s) {sorted(unknown)}; valid keys are {sorted(DEFAULTS)}")
    start = time.time()
    adapter_dir = Path(opts["checkpoint"]) if opts["checkpoint"] else latest_adapter(cfg.output_dir)
    held_out = read_held_out(cfg)
    out_dir = Path(cfg.output_dir) / "eval"
    tuned = TunedModel(cfg)
    specs = tuned.instruct_specs()
    samples = {s: loss_samples(tuned, specs, s, recs) for s, recs in held_out.items()}
    prompts = [(specs[s], r) for s, recs in held_out.items() if s in specs for r in recs][: opts["num_generations"]]
    tasks = write_local_tasks(held_out, tuned, out_dir / "tasks") + list(opts["tasks"])
    base = evaluate_model(tuned, samples, prompts, opts, tasks, out_dir / "tasks")
    tuned.load_adapter(adapter_dir)
    after = evaluate_model(tuned, samples, prompts, opts, tasks, out_dir / "tasks")
    text = OmegaConf.to_yaml(cfg, resolve=True)
    report = {
        "config": sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else None,
        "overrides": [a for a in sys.argv[1:] if "=" in a],
        "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "base_checkpoint": tuned.base_files, "tuned_adapter": tuned.adapter, "eval": opts,
        "base": {k: v for k, v in base.items() if k != "generations"},
        "tuned": {k: v for k, v in after.items() if k != "generations"},
        "generations": [{"source": spec.name, "prompt": r["prompt"], "reference": r["completion"], "base": b, "tuned": t}
                        for (spec, r), b, t in zip(prompts, base["generations"], after["generations"])],
        "seconds": round(time.time() - start, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "report.md").write_text(report_md(report) + "\n")
    width = max(len(r) for r, _, _ in rows(report))
    print(f"{'':<{width}}  {'base':>10}  {'tuned':>10}")
    for row, b, t in rows(report):
        print(f"{row:<{width}}  {b:>10.4g}  {t:>10.4g}")
    print(f"Wrote {out_dir / 'report.json'} and {out_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
