"""Shared fixtures: the real Llama 3 tokenizer (from llama-models) and small files written per test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torchtune.models.llama3 import llama3_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "recipes"))

from make_tiny_checkpoint import llama3_tokenizer_path, write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The real Llama 3 tokenizer, max_seq_len 256."""
    return llama3_tokenizer(str(llama3_tokenizer_path()), max_seq_len=256)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def write_jsonl(path: Path, rows: list) -> Path:
    """Writes rows (dicts, or raw strings written as they are) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def pairs(n: int, prefix: str = "q") -> list[dict]:
    return [{"prompt": f"{prefix} question number {i}?", "completion": f"answer {i} " * (1 + i % 5)} for i in range(n)]
