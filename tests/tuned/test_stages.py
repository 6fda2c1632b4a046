"""The stage records (tuned/stages.py) with stand-in commands: each input class makes a stage stale and is named in
the reason; a run killed at any point is never fresh; a failed run leaves no record. (The real stages through make:
tests/recipes/test_make_all.py.)"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from support import REPO

from tuned import stages
from tuned.config import load_file


def _config(tmp_path: Path, **extra) -> Path:
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "tok.model").write_text("tokenizer\n")
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"weights")
    cfg = {"output_dir": str(tmp_path / "run"), "seed": 0, "optimizer": {"lr": 0.001},
           "tokenizer": {"path": str(tmp_path / "tok.model")},
           "checkpointer": {"checkpoint_dir": str(tmp_path / "ckpt"), "checkpoint_files": ["model.safetensors"]},
           "dataset": {"cache_dir": ".cache", "sources": {"pairs": {"type": "instruct", "path": str(tmp_path / "pairs.jsonl")}}},
           "metric_logger": {"log_dir": "x"}, "eval": {"max_new_tokens": 4}, "export": {"dtype": "bf16"}, **extra}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _writer(stage: str, text: str = "out", pause: float = 0.0) -> list[str]:
    """A stand-in for a stage's command: writes its output folder's files (slowly, with `pause`)."""
    folder = {"data": "data", "train": "epoch_0", "eval": "eval", "export": "export"}[stage]
    code = ("import os, sys, time; from omegaconf import OmegaConf; out = OmegaConf.load(sys.argv[1]).output_dir; "
            f"d = os.path.join(out, {folder!r}); os.makedirs(d, exist_ok=True)\n"
            f"for i in range(3):\n open(os.path.join(d, f'f{{i}}'), 'w').write({text!r}); time.sleep({pause})")
    return [sys.executable, "-c", code]


def _run(path: Path, stage: str, *overrides: str, text: str = "out") -> int:
    return stages.run(stages.BY_NAME[stage], load_file(path, overrides), [*_writer(stage, text), str(path)])


def _state(path: Path, stage: str, *overrides: str) -> tuple[str, list[str]]:
    return stages.status(stages.BY_NAME[stage], load_file(path, overrides))


def test_each_input_class_makes_its_stages_stale_and_is_named(tmp_path, monkeypatch):
    path = _config(tmp_path)
    for stage in ("data", "train", "eval", "export"):
        assert _state(path, stage) == ("never run", [])
        assert _run(path, stage) == 0
        assert _state(path, stage)[0] == "fresh"
    # keys: each stage its own; logging-only keys are nobody's
    assert _state(path, "train", "optimizer.lr=0.002") == ("stale", ["optimizer.lr 0.001 → 0.002"])
    assert _state(path, "eval", "optimizer.lr=0.002")[0] == "fresh"
    assert _state(path, "eval", "eval.max_new_tokens=8") == ("stale", ["eval.max_new_tokens 4 → 8"])
    assert _state(path, "train", "eval.max_new_tokens=8")[0] == "fresh"
    assert _state(path, "export", "export.dtype=fp32") == ("stale", ["export.dtype bf16 → fp32"])
    assert _state(path, "data", "dataset.sources.pairs.type=text") == (
        "stale", ["dataset.sources.pairs.type instruct → text"])
    for quiet in ("metric_logger.log_dir=y", "dataset.cache_dir=elsewhere", "serve.port=9"):
        assert {_state(path, s, quiet)[0] for s in ("data", "train", "eval", "export")} == {"fresh"}, quiet
    # files: the bytes, not the mtime
    os.utime(tmp_path / "pairs.jsonl", (1, 1))
    assert _state(path, "train")[0] == "fresh"
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "a", "completion": "c"}\n')
    for stage in ("data", "train"):
        assert _state(path, stage) == ("stale", [f"{tmp_path / 'pairs.jsonl'} changed"])
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"other weights")
    assert f"{tmp_path / 'ckpt' / 'model.safetensors'} changed" in _state(path, "train")[1]
    assert _state(path, "data")[1] == [f"{tmp_path / 'pairs.jsonl'} changed"]  # data does not read the weights
    # the stages before: a re-run of train with other outputs
    assert _run(path, "train", text="new weights") == 0
    assert _state(path, "eval") == ("stale", ["train re-ran"]) and _state(path, "export") == ("stale", ["train re-ran"])
    # outputs changed after the stage finished
    (tmp_path / "run" / "eval" / "f1").write_text("edited")
    assert "its outputs changed since it ran" in _state(path, "eval")[1][-1]
    # packages
    real = stages.metadata.version
    monkeypatch.setattr(stages.metadata, "version", lambda name: "0.7.0" if name == "torchtune" else real(name))
    assert f"package torchtune {real('torchtune')} → 0.7.0" in _state(path, "data")[1]
    monkeypatch.setattr(stages.metadata, "version", real)
    # the project's own code the stage runs
    copy = tmp_path / "repo"
    for part in ("custom_datasets", "tuned", "recipes"):
        shutil.copytree(REPO / part, copy / part)
    monkeypatch.setattr(stages, "REPO", copy)
    assert _run(path, "export") == 0 and _state(path, "export")[0] == "fresh"
    (copy / "tuned" / "export.py").write_text((copy / "tuned" / "export.py").read_text() + "\n# changed\n")
    assert _state(path, "export") == ("stale", ["code of the stage changed (tuned/export.py)"])
    assert not any("code" in why for why in _state(path, "train")[1])  # training does not run tuned/
    # only the code the stage's script imports, at any depth: make compare's module is no part of eval or export
    assert _run(path, "eval") == 0 and _state(path, "eval")[0] == "fresh"
    (copy / "tuned" / "compare.py").write_text((copy / "tuned" / "compare.py").read_text() + "\n# changed\n")
    assert _state(path, "eval")[0] == "fresh"
    assert _state(path, "export") == ("stale", ["code of the stage changed (tuned/export.py)"])
    (copy / "tuned" / "logs.py").write_text((copy / "tuned" / "logs.py").read_text() + "\n# changed\n")  # via report.py
    assert _state(path, "eval") == ("stale", ["code of the stage changed (tuned/logs.py)"])


def test_a_failed_run_leaves_no_record(tmp_path):
    path = _config(tmp_path)
    assert _run(path, "eval") == 0
    cfg = load_file(path, ["eval.max_new_tokens=8"])
    assert stages.run(stages.BY_NAME["eval"], cfg, [sys.executable, "-c", "raise SystemExit(3)"]) == 3
    assert _state(path, "eval") == ("never run", [])  # not the old record: its outputs are no longer current


@pytest.mark.parametrize("seed", range(4))
def test_a_run_killed_at_any_point_is_never_fresh(tmp_path, seed):
    """`recipes/stages.py run` (what every stage's make target runs) killed with SIGKILL at a random point."""
    path = _config(tmp_path)
    assert _run(path, "eval") == 0
    delay = random.Random(seed).uniform(0.0, 3.0)
    cmd = [sys.executable, "recipes/stages.py", "run", "eval", "--config", str(path), "eval.max_new_tokens=8", "--",
           *_writer("eval", "second", pause=0.5), str(path)]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state, why = _state(path, "eval", "eval.max_new_tokens=8")
    assert state in ("incomplete", "stale"), (delay, state, why)  # stale: killed before it began (the old record)
    assert subprocess.call(cmd, cwd=REPO, stdout=subprocess.DEVNULL) == 0
    assert _state(path, "eval", "eval.max_new_tokens=8")[0] == "fresh"
    assert [(tmp_path / "run" / "eval" / f"f{i}").read_text() for i in range(3)] == ["second"] * 3


def test_a_running_stage_says_so(tmp_path):
    path = _config(tmp_path)
    cmd = [sys.executable, "recipes/stages.py", "run", "eval", "--config", str(path), "--",
           *_writer("eval", pause=1.0), str(path)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "run" / "stages" / "eval.running.json").exists() and time.time() < deadline:
            time.sleep(0.1)
        assert _state(path, "eval")[0] == "running"
    finally:
        proc.wait()
    assert _state(path, "eval")[0] == "fresh"
    assert OmegaConf.load(path).output_dir == str(tmp_path / "run")


def test_a_run_with_fewer_epochs_removes_the_older_runs_later_epochs(tmp_path, capsys):
    """make eval picks the newest epoch_N: one left by an earlier, longer run would be scored as this run's."""
    path = _config(tmp_path)
    run = tmp_path / "run"

    def plant():
        for n in (1, 2):
            (run / f"epoch_{n}").mkdir(parents=True, exist_ok=True)
            (run / f"epoch_{n}" / "adapter_model.pt").write_text("old")

    plant()
    cfg = load_file(path, ["epochs=1", "resume_from_checkpoint=True"])  # resuming continues what is there: kept
    assert stages.run(stages.BY_NAME["train"], cfg, [*_writer("train"), str(path)]) == 0
    assert (run / "epoch_2").is_dir()
    cfg = load_file(path, ["epochs=1"])
    assert stages.run(stages.BY_NAME["train"], cfg, [sys.executable, "-c", "raise SystemExit(1)"]) == 1
    assert (run / "epoch_2").is_dir()  # a failed run removes nothing
    assert stages.run(stages.BY_NAME["train"], cfg, [*_writer("train"), str(path)]) == 0
    assert sorted(p.name for p in run.glob("epoch_*")) == ["epoch_0"]
    assert f"train: removed {run / 'epoch_1'}" in capsys.readouterr().out
    assert not any("epoch_1" in p for p in stages.read_record(cfg, "train")["outputs"])
    plant()
    cfg = load_file(path, ["epochs=3"])  # a longer run rewrites them all: nothing to remove
    assert stages.run(stages.BY_NAME["train"], cfg, [*_writer("train"), str(path)]) == 0
    assert sorted(p.name for p in run.glob("epoch_*")) == ["epoch_0", "epoch_1", "epoch_2"]
