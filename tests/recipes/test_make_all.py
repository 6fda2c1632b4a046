"""make all / make status on the tiny config, through make itself: which stages re-ran after each kind of change,
observed from outside (every output file's modification time and bytes), and a make all killed part-way.
The key-to-stage map for every input class, and kills of a stage's run at several points: tests/tuned/test_stages.py."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import RECIPE_ENV, REPO

STAGES = ("data", "train", "eval", "export")


def _outputs(out: Path) -> dict[str, dict[str, tuple[int, str]]]:
    """Per stage, {file: (mtime_ns, sha256)} of what it writes (the oracle: the files, not the records)."""
    roots = {"data": [out / "data"], "train": sorted(out.glob("epoch_*")), "eval": [out / "eval"],
             "export": [out / "export"]}
    seen = {}
    for stage, folders in roots.items():
        files = sorted(p for f in folders for p in ([f] if f.is_file() else f.rglob("*")) if p.is_file())
        seen[stage] = {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}
    return seen


def _rewritten(before: dict, after: dict) -> set[str]:
    """The stages whose output files were written again (a new mtime on any, or files added or gone)."""
    return {s for s in STAGES if not after[s] or {p: m for p, (m, _) in before[s].items()} !=
            {p: m for p, (m, _) in after[s].items()}}


class Run:
    def __init__(self, config: str, model_args: list[str], tmp_path: Path):
        self.config, self.out = config, tmp_path / "run"
        self.pairs = tmp_path / "pairs.jsonl"
        shutil.copy(REPO / "data" / "pairs.jsonl", self.pairs)
        self.args = [*model_args, f"output_dir={self.out}",
                     f"dataset.cache_dir={tmp_path}/cache", f"dataset.sources.pairs.path={self.pairs}", "epochs=1",
                     "eval.num_generations=1", "eval.max_new_tokens=4", "eval.local_task=false", "export.gguf=[]"]

    def command(self, target: str, *extra: str) -> list[str]:
        return ["make", "--no-print-directory", target, f"CONFIG={self.config}", "ARGS=" + " ".join([*self.args, *extra])]

    def make(self, target: str, *extra: str) -> str:
        done = subprocess.run(self.command(target, *extra), cwd=REPO, env=RECIPE_ENV, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        return done.stdout + done.stderr

    def status(self, *extra: str) -> dict[str, str]:
        lines = self.make("status", *extra).splitlines()
        head = next(i for i, line in enumerate(lines) if line.startswith("stage "))
        return {line.split()[0]: line[len(line.split()[0]):].strip() for line in lines[head + 1:head + 5]}

    def all(self, *extra: str) -> tuple[set[str], str]:
        before = _outputs(self.out)
        printed = self.make("all", *extra)
        return _rewritten(before, _outputs(self.out)), printed


def test_make_all_reruns_exactly_the_stages_a_change_touches(tiny_checkpoint, tmp_path):
    _reruns_exactly(Run("configs/tiny_qlora_cpu.yaml", [f"checkpointer.checkpoint_dir={tiny_checkpoint}",
                        f"tokenizer.path={tiny_checkpoint}/original/tokenizer.model"], tmp_path), "0.0003")


@pytest.mark.skipif(not os.environ.get("STAGES_SMOLLM2"), reason="5 min 22 s on 2 cores (2026-12-06): STAGES_SMOLLM2=1 runs it")
def test_make_all_on_the_smollm2_demo_config(small_checkpoint, tmp_path):
    """The same, on the real small model's preset (make demo's): not in make test for its time; run by hand."""
    _reruns_exactly(Run("configs/smollm2_135m_lora_cpu.yaml", [f"checkpointer.checkpoint_dir={small_checkpoint}",
                        f"tokenizer.path={small_checkpoint}"], tmp_path), "0.001")


def _reruns_exactly(run: Run, lr: str) -> None:
    tmp_path = run.out.parent
    assert all(state.startswith("never run") for state in run.status().values())
    began = time.time()
    ran, _ = run.all()
    first = time.time() - began
    assert ran == set(STAGES)
    first_outputs = _outputs(run.out)
    began = time.time()
    ran, printed = run.all()
    again = time.time() - began
    assert ran == set(), printed
    for stage in STAGES:
        assert f"{stage}: fresh, skipped" in printed
    print(f"make all: first {first:.1f} s, again with nothing changed {again:.1f} s ({again / first:.0%})")

    ran, printed = run.all("eval.max_new_tokens=6")
    assert ran == {"eval"}, printed
    assert "eval: stale: eval.max_new_tokens 4 → 6" in printed
    keep = "eval.max_new_tokens=6"
    ran, printed = run.all(keep, "export.dtype=fp32")
    assert ran == {"export"}, printed
    assert "export.dtype bf16 → fp32" in printed
    keep = (keep, "export.dtype=fp32")

    # the data file: a touch that keeps its bytes is nothing; new bytes make data and train stale (and so the rest)
    os.utime(run.pairs)
    states = run.status(*keep)
    assert all(state.startswith("fresh") for state in states.values()), states
    text = run.pairs.read_text()
    run.pairs.write_text(text + text.splitlines()[0] + "\n")
    states = run.status(*keep)
    assert states["data"].startswith("stale") and f"{run.pairs} changed" in states["data"], states
    assert states["train"].startswith("stale") and f"{run.pairs} changed" in states["train"], states
    run.pairs.write_text(text)

    # a training key re-runs train, eval and export (not data)
    began = time.time()
    ran, printed = run.all("optimizer.lr=0.002")
    unbroken = time.time() - began  # how long the killed make all below would take whole
    assert ran == {"train", "eval", "export"}, printed
    assert f"train: stale: optimizer.lr {lr} → 0.002" in printed

    # the first run's settings again (train, eval and export stale), killed at a random point of any of them, then
    # finished: every training output and the export's weights are the first run's, byte for byte
    seed = int(os.environ.get("STAGES_KILL_SEED", random.randrange(1 << 30)))
    delay = random.Random(seed).uniform(1.0, 0.85 * unbroken)  # anywhere in its check, train, eval or export
    proc = subprocess.Popen(run.command("all"), cwd=REPO, env=RECIPE_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    states = run.status()
    assert not all(state.startswith("fresh") for state in states.values()), (seed, delay, states)
    assert not any(state.startswith("running") for state in states.values()), (seed, delay, states)
    print(f"killed after {delay:.1f} s of {unbroken:.1f} (STAGES_KILL_SEED={seed}): {states}")
    ran, printed = run.all()
    assert "data" not in ran, printed
    assert all(state.startswith("fresh") for state in run.status().values())
    after = _outputs(run.out)
    weights = [p for p in first_outputs["export"] if p.endswith(".safetensors")]
    assert weights and all(after["export"][p][1] == first_outputs["export"][p][1] for p in weights)
    assert {p: sha for p, (_, sha) in after["train"].items()} == {p: sha for p, (_, sha) in first_outputs["train"].items()}

    # make compare: this run beside a copy of it with another learning rate in its config; the figures are the ones
    # its own files hold (read here by json and the log's text, not by the code under test)
    copy = tmp_path / "other_lr"
    shutil.copytree(run.out, copy)
    saved = copy / "torchtune_config.yaml"
    saved.write_text(saved.read_text().replace(f"lr: {lr}", "lr: 0.0005", 1))
    record = json.loads((copy / "stages" / "train.json").read_text())
    record["made_from"]["keys"]["optimizer.lr"] = 0.0005
    (copy / "stages" / "train.json").write_text(json.dumps(record))
    printed = subprocess.run(["make", "--no-print-directory", "compare", f"RUNS={run.out} {copy}",
                              f"OUT={tmp_path}/compare.md"], cwd=REPO, env=RECIPE_ENV, capture_output=True,
                             text=True, timeout=300)
    assert printed.returncode == 0, printed.stdout + printed.stderr
    table = (tmp_path / "compare.md").read_text()
    assert f"| optimizer.lr | {lr} | 0.0005 |" in table, table
    report = json.loads((run.out / "eval" / "report.json").read_text())
    for source, held in report["tuned"]["held_out"].items():
        assert f"| {source}: held-out loss, tuned | {held['loss']:.4g} | {held['loss']:.4g} |" in table, table
    # the run trained three times into one output_dir: the figures are the last training's (its log file alone)
    log = max((run.out / "logs").glob("log_*.txt"), key=lambda p: p.stat().st_mtime)
    losses = re.findall(r"loss:([0-9.]+)", log.read_text())
    assert f"| last training loss | {float(losses[-1]):.4g} | {float(losses[-1]):.4g} |" in table, table
    assert f"| training steps | {len(losses)} | {len(losses)} |" in table, table
    assert table.count(" config key(s) differ") == 1 and "1 config key(s) differ" in table
