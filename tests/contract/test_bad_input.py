"""More bad input (the rest is in tests/custom_datasets/test_errors.py), nothing left behind by a
failed build, and awkward-but-valid input read correctly, large documents included."""

import json
import os
import subprocess
import sys

import pytest
from support import REPO, pairs, write_jsonl

from custom_datasets import DatasetError, _tokenize, mixed_dataset


def problems(tokenizer, sources, **kw) -> list[str]:
    with pytest.raises(DatasetError) as info:
        mixed_dataset(tokenizer, sources=sources, **kw)
    return info.value.problems


def test_renamed_column_suggests_the_name_the_file_uses(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completions": "b"}])
    (msg,) = problems(tokenizer, {"p": {"type": "instruct", "path": str(path)}})
    assert "no column(s) ['completion']" in msg and "(renamed? 'completion' -> 'completions'?)" in msg


def test_symlink_loops_and_symlinked_folders_are_reported(tmp_path, tokenizer):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ok.txt").write_text("fine")
    os.symlink(docs / "b.txt", docs / "a.txt")
    os.symlink(docs / "a.txt", docs / "b.txt")
    os.symlink(docs, docs / "self")
    found = problems(tokenizer, {"t": {"type": "text", "path": str(docs)}})
    assert any("a.txt is a broken or looping symlink" in p for p in found)
    assert any("b.txt is a broken or looping symlink" in p for p in found)
    assert any("self is a symlinked folder, which is not followed" in p for p in found)
    os.symlink(tmp_path / "loop2.jsonl", tmp_path / "loop1.jsonl")
    os.symlink(tmp_path / "loop1.jsonl", tmp_path / "loop2.jsonl")
    (msg,) = problems(tokenizer, {"p": {"type": "instruct", "path": str(tmp_path / "loop1.jsonl")}})
    assert "loop1.jsonl is a broken or looping symlink" in msg


def test_a_file_that_changes_while_it_is_prepared_is_refused(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(10))
    real = _tokenize.tokenize

    def tokenize_while_someone_appends(*args, **kwargs):
        with path.open("a") as f:
            f.write(json.dumps({"prompt": "late", "completion": "row"}) + "\n")
        return real(*args, **kwargs)

    monkeypatch.setattr("custom_datasets._build.tokenize", tokenize_while_someone_appends)
    (msg,) = problems(tokenizer, {"p": {"type": "instruct", "path": str(path)}}, cache_dir=str(tmp_path / "cache"),
                      held_out_dir=str(tmp_path / "held"))
    assert msg.startswith("dataset.sources.p: ") and "changed while it was being prepared" in msg
    assert not (tmp_path / "held").exists() and not any((tmp_path / "cache").glob("[!.]*"))


def test_a_failed_build_leaves_no_partial_output(tmp_path, tokenizer):
    good = write_jsonl(tmp_path / "good.jsonl", pairs(20))
    bad = write_jsonl(tmp_path / "bad.jsonl", pairs(5) + [{"prompt": "x", "completion": ""}])
    problems(tokenizer, {"good": {"type": "instruct", "path": str(good), "val_size": 2},
                         "bad": {"type": "instruct", "path": str(bad)}},
             held_out_dir=str(tmp_path / "held"), cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "held").exists()
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_duplicate_source_names_are_refused_when_the_config_is_read(tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("dataset:\n  sources:\n    pairs: {type: instruct, path: a.jsonl}\n    pairs: {type: text, path: b}\n")
    run = subprocess.run([sys.executable, "recipes/prepare_data.py", "--config", str(config)], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode != 0 and "found duplicate key pairs" in run.stderr and "dup.yaml\", line 4" in run.stderr


def test_a_50_mb_document_is_read_whole_and_every_token_kept(tmp_path, tokenizer):
    words = [f"w{i % 9973}" for i in range(100_000)]
    chunk = (" ".join(words) + "\n").encode()
    with (tmp_path / "big.txt").open("wb") as f:
        for _ in range(50 * 2**20 // len(chunk) + 1):
            f.write(chunk)
    assert (tmp_path / "big.txt").stat().st_size >= 50 * 2**20
    ds = mixed_dataset(tokenizer, sources={"big": {"type": "text", "path": str(tmp_path / "big.txt")}}, max_seq_len=2048)
    (big,) = ds.stats.sources
    assert big.rows == 1 and big.kept_tokens == big.doc_tokens > 10_000_000
    assert big.windows == -(-big.doc_tokens // 2047) and ds.stats.fill > 0.9999
