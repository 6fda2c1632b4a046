"""Metrics to TensorBoard and MLflow, the way a user gets them: `make config ... TRACKERS="tensorboard mlflow"`, then
make data, make train, make eval on that config; read back through each tracker's own client (TensorBoard's event
reader, MLflow's MlflowClient) and checked against the run's own files (the disk log's text, eval/report.json,
data/report.json), not against the code that logged them."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from support import RECIPE_ENV, REPO


def _make(*args: str) -> str:
    done = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=RECIPE_ENV, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


@pytest.mark.e2e
def test_loss_eval_figures_and_data_totals_reach_tensorboard_and_mlflow_in_one_run(tiny_checkpoint, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    config, out, store = tmp_path / "tracked.yaml", tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    _make("config", "MODEL=tiny", "METHOD=qlora", "HW=cpu", "TRACKERS=tensorboard mlflow", f"OUT={config}")
    args = (f"ARGS=checkpointer.checkpoint_dir={tiny_checkpoint} tokenizer.path={tiny_checkpoint}/original/tokenizer.model "
            f"output_dir={out} dataset.cache_dir={tmp_path}/cache epochs=1 eval.num_generations=1 eval.max_new_tokens=4 "
            f"eval.base_cache=null metric_logger.mlflow.tracking_uri={store} "
            f"metric_logger.mlflow.artifact_location={tmp_path}/artifacts")
    for target in ("data", "train"):
        _make(target, f"CONFIG={config}", args)
    printed = _make("eval", f"CONFIG={config}", args)
    assert "tensorboard: " in printed and "mlflow: " in printed

    (log,) = (out / "logs").glob("log_*.txt")  # the disk log is still written: make eval's curves, make compare
    losses = [float(x) for x in re.findall(r"loss:([0-9.e+-]+)", log.read_text())]
    report = json.loads((out / "eval" / "report.json").read_text())
    data = json.loads((out / "data" / "report.json").read_text())
    expected = {f"eval/{s}/held_out_loss": h["loss"] for s, h in report["tuned"]["held_out"].items()}
    expected |= {f"eval/{s}/held_out_loss_base": h["loss"] for s, h in report["base"]["held_out"].items()}
    expected |= {f"eval/generations/{m}": v for m, v in report["tuned"]["text_scores"].items()}
    expected |= {f"data/{s['name']}/{k}": s[k] for s in data["sources"] for k in ("rows", "tokens", "supervised")}
    expected |= {"data/total/tokens": data["tokens"]}
    assert losses and len(expected) > 8

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    scalar = {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
              for tag in events.Tags()["tensors"]}
    assert scalar["loss"] == [(i, pytest.approx(v, rel=1e-6)) for i, v in enumerate(losses, 1)]
    for tag, value in expected.items():
        assert scalar[tag] == [(len(losses), pytest.approx(value, rel=1e-6))], tag

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("tuned").experiment_id])  # one run: training's
    assert run.info.run_name == str(out) and run.data.params["optimizer.lr"] == "0.0003"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (i, pytest.approx(v, rel=1e-9)) for i, v in enumerate(losses, 1)]
    for key, value in expected.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] == [
            (len(losses), pytest.approx(value, rel=1e-9))], key
