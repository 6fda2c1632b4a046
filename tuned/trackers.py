"""Metrics to the trackers users already watch (TensorBoard, MLflow), beside the disk log that make eval and make
compare read: the training loss through torchtune's own logger components, then the data table's totals and the eval
report's figures logged into the same run by make eval.

A config layer (`configs/layers/trackers/*.yaml`, `make config ... TRACKERS="tensorboard mlflow"`) sets

    metric_logger:
      _component_: tuned.trackers.Trackers
      log_dir: ${output_dir}/logs                 # torchtune's DiskLogger, always (the curves, make compare)
      tensorboard: {_component_: torchtune.training.metric_logging.TensorBoardLogger, log_dir: ..., organize_logs: false}
      mlflow: {_component_: torchtune.training.metric_logging.MLFlowLogger, tracking_uri: sqlite:///..., ...}

Each entry besides `log_dir` is a torchtune logger component, instantiated as the recipe would instantiate it alone;
every call the recipe makes goes to all of them. "The same run": TensorBoard's is its folder (`organize_logs: false`);
MLflow's is the newest run of the experiment whose name (`run_name`) is the output_dir.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torchtune import config as tt_config
from torchtune.training.metric_logging import DiskLogger

TENSORBOARD = "torchtune.training.metric_logging.TensorBoardLogger"
MLFLOW = "torchtune.training.metric_logging.MLFlowLogger"


def _plain(spec) -> dict:
    return OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec)


def _prepare_mlflow(spec: dict) -> dict:
    """The tracking store and experiment made ready (its artifacts where `artifact_location` says, not the cwd's
    ./mlruns); returns the MLFlowLogger's own arguments."""
    import mlflow

    spec = dict(spec)
    artifacts = spec.pop("artifact_location", None)
    uri = spec.get("tracking_uri")
    if uri and uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if uri:
        mlflow.set_tracking_uri(uri)
    name = spec.get("experiment_name")
    if name and mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=Path(artifacts).resolve().as_uri() if artifacts else None)
    return spec


class Trackers:
    """torchtune's DiskLogger at `log_dir` plus every torchtune logger given as a keyword (`name: {_component_: ...}`)."""

    def __init__(self, log_dir: str, **trackers):
        self.loggers = [DiskLogger(log_dir=log_dir)]
        for name, spec in trackers.items():
            spec = _plain(spec)
            if "_component_" not in spec:
                raise ValueError(f"metric_logger.{name}: expected a torchtune logger, {{_component_: ..., its "
                                 f"arguments}}; got {spec}. See configs/layers/trackers/ for the ones tested here")
            if spec["_component_"] == MLFLOW:
                spec = {"_component_": MLFLOW, **_prepare_mlflow({k: v for k, v in spec.items() if k != "_component_"})}
            self.loggers.append(tt_config.instantiate(OmegaConf.create(spec)))

    def log(self, name: str, data, step: int) -> None:
        for logger in self.loggers:
            logger.log(name, data, step)

    def log_dict(self, payload: Mapping, step: int) -> None:
        for logger in self.loggers:
            logger.log_dict(payload, step)

    def log_config(self, config: DictConfig) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def eval_metrics(report: dict, data: dict | None) -> dict[str, float]:
    """The eval report's figures (tuned, and the base's held-out loss) and the data table's totals, as tracker
    metric names (letters, digits, `_ - . / :` only)."""
    out = {}
    base, tuned = report.get("base") or {}, report.get("tuned") or {}
    for source, b in base.get("held_out", {}).items():
        out[f"eval/{source}/held_out_loss_base"] = b["loss"]
        if tuned.get("held_out", {}).get(source):
            out[f"eval/{source}/held_out_loss"] = tuned["held_out"][source]["loss"]
    for metric, value in tuned.get("text_scores", {}).items():
        out[f"eval/generations/{metric}"] = value
    for task, metrics in tuned.get("lm_eval", {}).items():
        for metric, value in metrics.items():
            if "stderr" not in metric and isinstance(value, (int, float)):
                out[f"eval/lm_eval/{task}/{metric.replace(',', '_')}"] = value
    for source in (data or {}).get("sources", []):
        for key in ("rows", "held_out", "samples", "tokens", "supervised", "truncated", "dropped"):
            out[f"data/{source['name']}/{key}"] = source[key]
    for key in ("tokens", "supervised", "packs", "pad_tokens", "steps_per_epoch"):
        if isinstance((data or {}).get(key), (int, float)):
            out[f"data/total/{key}"] = data[key]
    return {k: float(v) for k, v in out.items() if v is not None}


def _mlflow_run(spec: dict):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(spec.get("tracking_uri"))
    experiment = client.get_experiment_by_name(spec.get("experiment_name") or "Default")
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.runName` = '{spec.get('run_name')}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return client, (runs[0].info.run_id if runs else None)


def log_after_training(cfg: DictConfig, metrics: dict[str, float], step: int) -> list[str]:
    """`metrics` at `step` into each tracker of the config's metric_logger, in the training's own run; returns one
    line a tracker saying where (or why not)."""
    spec = cfg.get("metric_logger") or {}
    if spec.get("_component_") != f"{Trackers.__module__}.Trackers" or not metrics:
        return []
    said = []
    for name, sub in spec.items():
        if name in ("_component_", "log_dir"):
            continue
        sub = _plain(sub)
        if sub.get("_component_") == TENSORBOARD:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=sub["log_dir"])
            for key, value in metrics.items():
                writer.add_scalar(key, value, global_step=step, new_style=True)
            writer.close()
            said.append(f"{name}: {len(metrics)} figures at step {step} in {sub['log_dir']}")
        elif sub.get("_component_") == MLFLOW:
            from mlflow.entities import Metric

            client, run_id = _mlflow_run(sub)
            if run_id is None:
                said.append(f"{name}: no MLflow run named {sub.get('run_name')!r} in {sub.get('tracking_uri')} "
                            "(train with this config first); figures not logged")
                continue
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
            said.append(f"{name}: {len(metrics)} figures at step {step} in run {run_id} ({sub.get('tracking_uri')})")
        else:
            said.append(f"{name}: {sub.get('_component_')} is not one make eval logs to; its figures are in "
                        "eval/report.json")
    return said
