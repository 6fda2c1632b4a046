"""Crash and resume: a run killed with SIGKILL in epoch 2 and restarted with resume_from_checkpoint=True
reproduces the uninterrupted run's losses for the rest of training (stock recipe, tiny model, CPU)."""

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import CONFIG, REPO, TUNE, tiny_overrides, training_overrides, tune_run

STEPS_PER_EPOCH = 7  # 13 packs of the sample data with pairs weighted 2, one split (14), batch 2


def losses(log: Path) -> list[float]:
    return [float(x) for x in re.findall(r"loss:([0-9.]+)", log.read_text())]


@pytest.mark.e2e
def test_sigkill_in_epoch_2_then_resume_reproduces_the_losses(tmp_path, tiny_checkpoint):
    args = training_overrides("qlora") + ["epochs=2"]
    whole = tmp_path / "whole"
    tune_run(CONFIG, tiny_overrides(tiny_checkpoint, whole) + args)
    (log,) = (whole / "logs").glob("log_*.txt")
    expected = losses(log)
    assert len(expected) == 2 * STEPS_PER_EPOCH

    crashed = tmp_path / "crashed"
    cmd = [TUNE, "run", "lora_finetune_single_device", "--config", CONFIG, *tiny_overrides(tiny_checkpoint, crashed), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        logs = list((crashed / "logs").glob("log_*.txt")) if (crashed / "logs").is_dir() else []
        if logs and len(losses(logs[0])) >= STEPS_PER_EPOCH + 2:  # two steps into epoch 2
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed in epoch 2"
    assert (crashed / "epoch_0" / "adapter_model.pt").is_file() and not (crashed / "epoch_1").exists()

    time.sleep(1.1)  # DiskLogger names its file by the second
    tune_run(CONFIG, tiny_overrides(tiny_checkpoint, crashed) + args + ["resume_from_checkpoint=True"])
    resumed_log = max((crashed / "logs").glob("log_*.txt"), key=lambda p: p.stat().st_mtime)
    resumed = losses(resumed_log)
    assert len(resumed) == STEPS_PER_EPOCH
    assert resumed == pytest.approx(expected[STEPS_PER_EPOCH:], abs=1e-5)
    assert (crashed / "epoch_1" / "adapter_model.pt").is_file()
