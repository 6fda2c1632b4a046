"""The evaluation report: report.json, report.md and curves.png, rewritten after every phase so that a
crash or Ctrl-C later leaves what was already computed on disk."""

from __future__ import annotations

import json
import re
from pathlib import Path

from custom_datasets._tables import cell, markdown_table, text_table
from tuned.files import write_atomic
from tuned.logs import read_steps


def training_losses(log_dir: str | Path, since: float | None = None) -> list[float]:
    """The recipe's logged training loss per step, from torchtune's DiskLogger files (`log_*.txt`),
    oldest file first (a resumed run adds a file); `since`: only the current training's files (tuned.logs)."""
    return [row["loss"] for row in read_steps(log_dir, since) if "loss" in row]


def rows(report: dict) -> list[tuple[str, float | None, float | None]]:
    """(metric, base, tuned) for the table: held-out loss per source, generation scores, lm-eval."""
    base, tuned = report["base"], report.get("tuned") or {}
    out = []
    for source, b in base["held_out"].items():
        t = tuned.get("held_out", {}).get(source, {})
        out.append((f"{source}: held-out loss ({b['tokens']:,} tokens)", b["loss"], t.get("loss")))
        out.append((f"{source}: held-out perplexity", b["perplexity"], t.get("perplexity")))
    for metric, value in base.get("text_scores", {}).items():
        out.append((f"generations: {metric}", value, tuned.get("text_scores", {}).get(metric)))
    for task, metrics in base.get("lm_eval", {}).items():
        for metric, value in metrics.items():
            if "stderr" not in metric:
                out.append((f"lm-eval {task}: {metric}", value, tuned.get("lm_eval", {}).get(task, {}).get(metric)))
    return out


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _change(b: float | None, t: float | None) -> str:
    return "-" if b is None or t is None else f"{t - b:+.4g}"


def console_table(report: dict) -> str:
    return "\n".join(text_table([["metric", "base", "tuned", "change"],
                                 *([r, _num(b), _num(t), _change(b, t)] for r, b, t in rows(report))]))


def fence(text: str) -> str:
    """`text` as a fenced markdown block that nothing inside it can close or break."""
    ticks = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{ticks}text\n{text}\n{ticks}"


def markdown(report: dict) -> str:
    lines = ["# Evaluation: base vs tuned", "",
             f"- status: **{report['status']}**",
             f"- config: `{report['config']}` (sha256 {report['config_sha256'][:12]})",
             f"- base: `{', '.join(report['base_checkpoint'])}`"
             + (f" (its column reused: scored {report['base_reused']['scored']} for `{report['base_reused']['run']}`)"
                if report.get("base_reused") else ""),
             f"- tuned adapter: `{(report.get('tuned') or {}).get('adapter') or '-'}`", ""]
    if report.get("held_out_rows"):
        lines += markdown_table([["source", "held-out rows", "scored", "truncated", "dropped"],
                                 *([source, f"{c['rows']:,}", f"{c['scored']:,}", f"{c['truncated']:,}", f"{c['dropped']:,}"]
                                   for source, c in report["held_out_rows"].items())])
        lines += ["", "Rows longer than max_seq_len are cut (`too_long: truncate`) or left out (`too_long: drop`) "
                  "exactly as training treats them.", ""]
    lines += markdown_table([["metric", "base", "tuned", "change"],
                             *([r, _num(b), _num(t), _change(b, t)] for r, b, t in rows(report))])
    if len(report["phases"]) > 1 or report.get("curves"):
        sources = list(report["base"]["held_out"])
        lines += ["", "## Held-out loss per epoch", "",
                  *markdown_table([["phase", "epochs trained", *sources],
                                   *([p["name"], str(p["epochs_trained"]),
                                      *(_num(p["held_out"].get(s, {}).get("loss")) for s in sources)]
                                     for p in report["phases"])])]
    if report.get("curves"):
        lines += ["", f"![training and held-out loss]({report['curves']})"]
    if report.get("generations"):
        lines += ["", "## Generations (greedy, held-out prompts)", ""]
        for i, g in enumerate(report["generations"], 1):
            lines += [f"### {i}. {cell(g['source'])}: `{cell(g['where'])}`", ""]
            for part in ("prompt", "reference", "base", "tuned"):
                if g.get(part) is not None:
                    lines += [f"{part}:", "", fence(g[part]), ""]
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: Path) -> None:
    """report.json and report.md, each replaced atomically (a reader never sees half a file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out_dir / "report.md", markdown(report))


def steps_per_epoch(report: dict, train_losses: list[float]) -> float:
    """Logged training steps per epoch (1.0 without a log): where an epoch's held-out point sits on the step axis."""
    return len(train_losses) / report["epochs_logged"] if train_losses and report.get("epochs_logged") else 1.0


def held_out_points(report: dict, source: str, per_epoch: float) -> list[tuple[float, float]]:
    """(optimizer step, held-out loss of `source`) at each evaluated phase's end, the base model at step 0."""
    return [(p["epochs_trained"] * per_epoch, p["held_out"][source]["loss"]) for p in report["phases"]
            if p["held_out"].get(source, {}).get("loss") is not None]


def plot_curves(report: dict, train_losses: list[float], path: Path) -> None:
    """Training loss per step (from the recipe's log) and held-out loss per source at each evaluated
    epoch's end (the base model at step 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_epoch = steps_per_epoch(report, train_losses)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train_losses:
        ax.plot(range(1, len(train_losses) + 1), train_losses, color="0.6", linewidth=1, label="training loss (per step)")
    for source in report["base"]["held_out"]:
        points = held_out_points(report, source, per_epoch)
        if points:
            ax.plot(*zip(*points), marker="o", linewidth=2, label=f"held-out loss: {source}")
    ax.set_xlabel("optimizer step" + (f" ({per_epoch:g} per epoch; base model at 0)" if train_losses else ""))
    ax.set_ylabel("loss (nats per supervised token)")
    ax.set_title("Training and held-out loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
