"""Shared fixtures: the real Llama 3 tokenizer (from llama-models), the tiny checkpoint, one trained run; the real
small model (SmolLM2-135M) and the demo trained on it.

`make test` runs the suite in 2 pytest-xdist workers. A session fixture that costs a training run is built once for
both (`_once`: under a file lock, in the run's shared temporary folder); the tests on the demo run (the server's,
whose timings a second engine beside them would disturb) stay in one worker (`xdist_group("demo")`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock
from support import CONFIG, REPO, export, tiny_overrides, training_overrides, tune_run
from torchtune.models.llama3 import llama3_tokenizer

from tools.make_small_checkpoint import write_small_checkpoint
from tools.make_tiny_checkpoint import llama3_tokenizer_path, write_tiny_checkpoint


@pytest.fixture(scope="session")
def tokenizer():
    """The real Llama 3 tokenizer, max_seq_len 256."""
    return llama3_tokenizer(str(llama3_tokenizer_path()), max_seq_len=256)


def _once(tmp_path_factory, name: str, build: Callable[[Path], object]):
    """`build(folder)` run once for the whole test run: alone, in a fresh folder; under xdist, by the first worker
    to ask (under a file lock, in the folder every worker shares), the others reading its JSON-able result."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent
    folder, done = shared / name, shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.is_file():
            folder.mkdir(exist_ok=True)
            done.write_text(json.dumps(build(folder), default=str))
        return json.loads(done.read_text())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return Path(_once(tmp_path_factory, "ckpt", lambda folder: str(write_tiny_checkpoint(folder / "tiny"))))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_checkpoint) -> tuple[Path, str]:
    """The 8B QLoRA config trained on the tiny checkpoint: (output_dir, what tune run printed)."""
    def build(folder: Path) -> tuple[str, str]:
        out = folder / "run"
        return str(out), tune_run(CONFIG, tiny_overrides(tiny_checkpoint, out) + training_overrides("qlora"))

    out, printed = _once(tmp_path_factory, "trained", build)
    return Path(out), printed


DEMO = "configs/smollm2_135m_lora_cpu.yaml"


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """checkpoints/smollm2_135m as `make small-checkpoint` writes it (make test writes it first)."""
    folder = REPO / "checkpoints" / "smollm2_135m"
    if not (folder / "model.safetensors.index.json").is_file():
        folder = write_small_checkpoint(tmp_path_factory.mktemp("small") / "smollm2_135m")
    return folder


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, small_checkpoint) -> tuple[Path, list[str]]:
    """`make demo`'s training: the SmolLM2 preset through the stock recipe (24 LoRA steps on the sample data).
    Returns (output_dir, the overrides every later command on this run takes)."""
    reuse = os.environ.get("TEST_DEMO_RUN")  # a developer's shortcut: a demo run trained before, kept across sessions
    out = Path(reuse) if reuse else tmp_path_factory.mktemp("demo") / "run"
    args = [f"checkpointer.checkpoint_dir={small_checkpoint}", f"tokenizer.path={small_checkpoint}", f"output_dir={out}",
            f"dataset.cache_dir={out}/cache"]
    if not (reuse and (out / "epoch_5" / "adapter_model.pt").is_file()):
        tune_run(DEMO, args)
    return out, args


@pytest.fixture(scope="session")
def exported(demo_run):
    """make export on the demo run: hf/ (bf16), adapter/, model-f16.gguf and model-f32.gguf, Modelfile."""
    out, args = demo_run
    export(DEMO, args, "export.gguf=[f16,f32]")
    return out / "export"
