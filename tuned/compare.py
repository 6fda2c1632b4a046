"""Several runs side by side (`make compare RUNS="runs/a runs/b"`): the config keys that differ and each run's
figures, as a console table and as markdown, and the training curves of all of them on one plot.

What a run folder holds and where each figure comes from (nothing is recomputed; every figure is one the run wrote):
- the config: `torchtune_config.yaml` (the recipe's own copy, resolved), then the keys each stage's record
  (`stages/<stage>.json`) says it was made from (an `eval.*` changed after training is the eval record's);
- held-out loss per source, generation scores and lm-eval: `eval/report.json` (the tuned phase, and the base's
  loss per source);
- training loss and tokens/s: the recipe's DiskLogger files (`metric_logger.log_dir`, else `<run>/logs`), those of
  the current training only (written since the train record's start; all of them for a resumed run);
- wall time per stage: the stage records (`seconds`); a stage run by hand outside make has none ("-").
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from custom_datasets._tables import markdown_table, text_table
from tuned.logs import read_steps, training_since
from tuned.report import held_out_points, steps_per_epoch
from tuned.stages import STAGES, flat_keys, read_record_in

# Keys that name the run's own folders: they differ between any two runs and say nothing about how they differ.
_PER_RUN = ("output_dir",)


@dataclass
class RunFigures:
    folder: Path
    keys: dict
    report: dict | None
    steps: list[dict] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


def _config_keys(folder: Path, records: dict) -> dict:
    keys = {}
    saved = folder / "torchtune_config.yaml"
    if saved.is_file():
        keys.update(flat_keys(OmegaConf.load(saved)))
    for record in records.values():
        keys.update(record.get("made_from", {}).get("keys", {}))
    return keys


def load_run(folder: str | Path) -> RunFigures:
    """What `folder` (a run's output_dir) recorded; a folder with none of it is an error that says what a run is."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"make compare: {folder} is not a folder. RUNS takes output_dir folders of trained "
                                "runs, e.g. RUNS=\"runs/lr_a runs/lr_b\"")
    records = {stage.name: r for stage in STAGES if (r := read_record_in(folder / "stages", stage.name)) is not None}
    keys = _config_keys(folder, records)
    report_path = folder / "eval" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    if not keys and report is None:
        raise FileNotFoundError(f"make compare: {folder} holds no run: no torchtune_config.yaml, no stages/*.json, no "
                                "eval/report.json. Pass the output_dir of a run that make train (or tune run) wrote")
    log_dir = keys.get("metric_logger.log_dir")
    log_dir = Path(log_dir) if log_dir and Path(log_dir).is_dir() else folder / "logs"
    seconds = {name: r["seconds"] for name, r in records.items() if "seconds" in r}
    steps = read_steps(log_dir, training_since(records.get("train"))) if log_dir.is_dir() else []
    return RunFigures(folder, keys, report, steps, seconds)


def names(runs: list[RunFigures]) -> list[str]:
    """Each run's folder name, or its whole path where two runs share a name."""
    short = [r.folder.name for r in runs]
    return [n if short.count(n) == 1 else str(r.folder) for n, r in zip(short, runs)]


def _comparable(run: RunFigures) -> dict:
    """The run's keys with its own output_dir written as `${output_dir}` (so log_dir etc. compare equal)."""
    own = str(run.keys.get("output_dir", run.folder))
    return {k: (v.replace(own, "${output_dir}") if isinstance(v, str) else v)
            for k, v in run.keys.items() if k not in _PER_RUN}


def differing_keys(runs: list[RunFigures]) -> list[tuple[str, list]]:
    """[(key, value per run)] for every key whose value is not the same in all runs ("(unset)" where absent)."""
    flat = [_comparable(r) for r in runs]
    out = []
    for key in sorted(set().union(*flat)):
        values = [f.get(key, "(unset)") for f in flat]
        if any(v != values[0] for v in values[1:]):
            out.append((key, values))
    return out


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    text = x if isinstance(x, str) else json.dumps(x)
    return text if len(text) <= 40 else text[:37] + "..."


def figures(run: RunFigures) -> dict[str, float | str | None]:
    """{row name: value} of one run, in the order the table shows them."""
    out: dict[str, float | str | None] = {}
    report = run.report or {}
    base, tuned = report.get("base") or {}, report.get("tuned") or {}
    if report and report.get("status") != "complete":
        out["eval status"] = report.get("status")
    for source, b in base.get("held_out", {}).items():
        out[f"{source}: held-out loss, tuned"] = tuned.get("held_out", {}).get(source, {}).get("loss")
        out[f"{source}: held-out loss, base"] = b.get("loss")
    for metric, value in tuned.get("text_scores", {}).items():
        out[f"generations: {metric}"] = value
    for task, metrics in tuned.get("lm_eval", {}).items():
        for metric, value in metrics.items():
            if "stderr" not in metric:
                out[f"lm-eval {task}: {metric}"] = value
    losses = [s["loss"] for s in run.steps if "loss" in s]
    speeds = [s["tokens_per_second_per_gpu"] for s in run.steps if "tokens_per_second_per_gpu" in s]
    out["training steps"] = float(len(losses)) if losses else None
    out["last training loss"] = losses[-1] if losses else None
    out["training tokens/s (median step)"] = statistics.median(speeds) if speeds else None
    for stage in STAGES:
        out[f"wall time: {stage.name} (s)"] = run.seconds.get(stage.name)
    return out


def table(runs: list[RunFigures]) -> list[list[str]]:
    """The comparison as rows of cells (header first): the differing keys, then every figure any run has."""
    rows = [["", *names(runs)]]
    for key, values in differing_keys(runs):
        rows.append([key, *(_fmt(v) for v in values)])
    each = [figures(r) for r in runs]
    order = list(dict.fromkeys(k for f in each for k in f))
    rows += [[k, *(_fmt(f.get(k)) for f in each)] for k in order if any(f.get(k) is not None for f in each)]
    return rows


def markdown(runs: list[RunFigures], curves: str | None) -> str:
    diff = differing_keys(runs)
    lines = ["# Runs compared", "", *(f"- `{n}`: `{r.folder}`" for n, r in zip(names(runs), runs)), "",
             f"{len(diff)} config key(s) differ" + (" (the first rows)." if diff else "."), "",
             *markdown_table(table(runs))]
    if curves:
        lines += ["", f"![training and held-out loss of each run]({curves})"]
    return "\n".join(lines) + "\n"


def console(runs: list[RunFigures]) -> str:
    return "\n".join(text_table(table(runs)))


def plot(runs: list[RunFigures], path: Path) -> bool:
    """Training loss per step of every run, one colour a run; its held-out loss at each evaluated epoch's end as
    points of the same colour (the base at step 0). False when no run logged a loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    drew = False
    for i, (name, run) in enumerate(zip(names(runs), runs)):
        colour = f"C{i % 10}"
        losses = [s["loss"] for s in run.steps if "loss" in s]
        if losses:
            ax.plot(range(1, len(losses) + 1), losses, color=colour, linewidth=1, alpha=0.7, label=f"{name}: training")
            drew = True
        report = run.report or {}
        per_epoch = steps_per_epoch(report, losses)
        for j, source in enumerate((report.get("base") or {}).get("held_out", {})):
            points = held_out_points(report, source, per_epoch)
            if points:
                ax.plot(*zip(*points), color=colour, marker="os^vD"[j % 5], linestyle="--", linewidth=1.5,
                        label=f"{name}: held-out {source}")
                drew = True
    if not drew:
        plt.close(fig)
        return False
    ax.set_xlabel("optimizer step (base model at 0)")
    ax.set_ylabel("loss (nats per supervised token)")
    ax.set_title("Training and held-out loss, run by run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
