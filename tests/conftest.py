"""Shared fixtures: the real Llama 3 tokenizer (from llama-models), the tiny checkpoint, one trained run."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import CONFIG, tiny_overrides, training_overrides, tune_run
from torchtune.models.llama3 import llama3_tokenizer

from make_tiny_checkpoint import llama3_tokenizer_path, write_tiny_checkpoint  # noqa: E402  (recipes/ is on sys.path)


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
