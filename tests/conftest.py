"""Shared fixtures: the real Llama 3 tokenizer (from llama-models), the tiny checkpoint, one trained run; the real
small model (SmolLM2-135M) and the demo trained on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import CONFIG, REPO, export, tiny_overrides, training_overrides, tune_run
from torchtune.models.llama3 import llama3_tokenizer

from tools.make_small_checkpoint import write_small_checkpoint
from tools.make_tiny_checkpoint import llama3_tokenizer_path, write_tiny_checkpoint


@pytest.fixture(scope="session")
def tokenizer():
    """The real Llama 3 tokenizer, max_seq_len 256."""
    return llama3_tokenizer(str(llama3_tokenizer_path()), max_seq_len=256)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_checkpoint) -> tuple[Path, str]:
    """The 8B QLoRA config trained on the tiny checkpoint: (output_dir, what tune run printed)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    return out, tune_run(CONFIG, tiny_overrides(tiny_checkpoint, out) + training_overrides("qlora"))


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
