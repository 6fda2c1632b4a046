"""Tokenizing in bounded tasks, streamed to disk: what keeps a cold build's memory flat as data grows."""

import numpy as np
import pytest
from support import pairs, write_jsonl

from custom_datasets import DatasetError, Pair, mixed_dataset
from custom_datasets import _tokenize as tk
from custom_datasets._read import Document
from custom_datasets._spec import InstructSpec


def test_tasks_are_bounded_in_items_and_characters_and_keep_every_item_in_order(monkeypatch):
    monkeypatch.setattr(tk, "CHUNK", 5)
    monkeypatch.setattr(tk, "CHUNK_CHARS", 100)
    docs = [Document("x" * n, f"d{i}") for i, n in enumerate([10, 30, 250, 1, 1, 1, 1, 1, 1, 1, 60, 60, 0])]
    tasks = list(tk._tasks(docs))
    assert [d for _, items in tasks for d in items] == docs
    assert [first for first, _ in tasks] == list(np.cumsum([0] + [len(items) for _, items in tasks])[:-1])
    for _, items in tasks:
        assert len(items) <= 5
        assert len(items) == 1 or sum(len(d.text) for d in items) <= 100  # one over-long document goes alone


def test_the_reader_is_never_far_ahead_of_what_is_written(tmp_path, tokenizer, monkeypatch):
    """Backpressure: with a worker pool, at most IN_FLIGHT tasks per worker are read but not yet written."""
    monkeypatch.setattr(tk, "CHUNK", 4)
    read = []

    def rows():
        for i in range(400):
            read.append(i)
            yield Pair(f"question {i}", f"answer {i}", f"f:{i}")

    class Recording(tk.TokenFiles):
        def __init__(self, folder):
            super().__init__(folder)
            self.ahead = []

        def append(self, tokens, labels):
            super().append(tokens, labels)
            self.ahead.append(len(read) - 4 * len(self.ahead) - 4)  # items read but not yet written

    out = Recording(tmp_path)
    table = tk.tokenize(tokenizer, InstructSpec("p", "x"), rows(), 400, 0, 64, 2, False, out)
    out.close()
    assert len(table.lengths) == 400 and len(out.ahead) == 100
    assert max(out.ahead) <= 2 * 2 * 4  # 2 tasks per worker (docs/data.md's bound) x 2 workers x 4 rows; unbounded: all 400
    written = np.fromfile(out.paths[0], np.int32)
    assert len(written) == int(table.lengths.sum()) and written[table.starts[7]] == tokenizer.bos_id


def test_every_source_is_checked_before_any_is_tokenized(tmp_path, tokenizer, monkeypatch):
    good = write_jsonl(tmp_path / "good.jsonl", pairs(20))
    bad = write_jsonl(tmp_path / "bad.jsonl", pairs(3) + [{"prompt": "x", "completion": " "}])

    def tokenize(*args, **kwargs):
        raise AssertionError("tokenized before every source was checked")

    monkeypatch.setattr("custom_datasets._build.tokenize", tokenize)
    with pytest.raises(DatasetError) as info:
        mixed_dataset(tokenizer, sources={"good": {"type": "instruct", "path": str(good)},
                                          "bad": {"type": "instruct", "path": str(bad)}})
    (problem,) = info.value.problems
    assert problem.startswith(f"dataset.sources.bad: {bad}:4: empty completion")
