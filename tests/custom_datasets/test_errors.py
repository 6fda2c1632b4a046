"""Bad input: one ValueError that names the config key, the file, the line or row, and the fix."""

import json

import pytest
from support import pairs, write_jsonl

from custom_datasets import DatasetError, mixed_dataset


def problems(tokenizer, sources, **kwargs) -> list[str]:
    with pytest.raises(ValueError) as info:
        mixed_dataset(tokenizer, sources=sources, **kwargs)
    assert isinstance(info.value, DatasetError)
    return info.value.problems


def one_problem(tokenizer, sources, **kwargs) -> str:
    found = problems(tokenizer, sources, **kwargs)
    assert len(found) == 1, found
    return found[0]


def instruct(path, **kw):
    return {"type": "instruct", "path": str(path), **kw}


def test_missing_file(tmp_path, tokenizer):
    msg = one_problem(tokenizer, {"pairs": instruct(tmp_path / "nope.jsonl")})
    assert "dataset.sources.pairs.path" in msg and "nope.jsonl does not exist" in msg


def test_missing_column_names_the_columns_found_and_the_key_to_set(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "a", "answer": "b"}])
    msg = one_problem(tokenizer, {"pairs": instruct(path)})
    assert "p.jsonl:1" in msg and "'completion'" in msg and "['answer', 'question']" in msg
    assert "dataset.sources.pairs.prompt / .completion" in msg


@pytest.mark.parametrize("completion, reason", [("", "empty completion"), ("   \n", "empty completion"),
                                                (None, "null completion"), (7, "non-string completion")])
def test_bad_completion_is_listed_with_its_line(tmp_path, tokenizer, completion, reason):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(3) + [{"prompt": "x", "completion": completion}])
    msg = one_problem(tokenizer, {"pairs": instruct(path)})
    assert f"p.jsonl:4: {reason}" in msg and "dataset.bad_rows=skip" in msg


def test_nested_prompt_is_a_bad_row(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": {"text": "hi"}, "completion": "x"}] + pairs(2))
    assert "p.jsonl:1: non-string prompt" in one_problem(tokenizer, {"pairs": instruct(path)})


def test_malformed_json_and_non_utf8_lines(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    good = json.dumps(pairs(1)[0]).encode()
    path.write_bytes(good + b"\n{\"prompt\": \"a\", \n" + good + b"\n" + b'{"prompt": "\xff", "completion": "x"}\n')
    found = problems(tokenizer, {"pairs": instruct(path)})
    assert len(found) == 2
    assert "p.jsonl:2: malformed JSON" in found[0]
    assert "p.jsonl:4: not UTF-8" in found[1] and "re-encode" in found[1]


def test_json_array_in_a_jsonl_file(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(pairs(2)))
    msg = one_problem(tokenizer, {"pairs": instruct(path)})
    assert "one JSON array, not JSON Lines" in msg and "rename the file to .json" in msg


def test_every_bad_row_is_listed_at_once_across_sources(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x", "completion": ""}] + pairs(2) + [{"prompt": "y", "completion": ""}])
    found = problems(tokenizer, {"a": instruct(a), "b": instruct(tmp_path / "missing.jsonl"),
                                 "c": {"type": "text", "path": str(tmp_path / "nothing_here.txt")}})
    assert len(found) == 4
    assert [f.split(":")[0] for f in found] == ["dataset.sources.a", "dataset.sources.a",
                                                 "dataset.sources.b.path", "dataset.sources.c.path"]


def test_bad_rows_skip_counts_them_by_reason_in_the_table(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(4) + [{"prompt": "x", "completion": ""}, "{broken", {"prompt": "y", "completion": ""}])
    ds = mixed_dataset(tokenizer, sources={"pairs": instruct(path)}, bad_rows="skip")
    assert ds.stats.sources[0].rows == 4
    assert dict(ds.stats.sources[0].skipped) == {"empty completion": 2, "malformed JSON": 1}
    table = ds.stats.table()
    assert "pairs: skipped 2 bad row(s): empty completion" in table
    assert "pairs: skipped 1 bad row(s): malformed JSON" in table


@pytest.mark.parametrize("spec, expected", [
    ({"type": "instuct", "path": "x.jsonl"}, "unknown source type 'instuct'; expected one of ['instruct', 'text', 'chat']"),
    ({"type": "instruct", "path": "x.jsonl", "template": "chatml"}, "unknown value 'chatml'; expected one of ['completion', 'chat', 'llama3_chat']"),
    ({"type": "instruct", "path": "x.jsonl", "too_long": "split"}, "too_long: unknown value 'split'"),
    ({"type": "instruct", "path": "x.jsonl", "wieght": 2}, "unknown key(s) ['wieght'] for a instruct source"),
    ({"type": "instruct", "path": "x.jsonl", "weight": 0}, "weight: 0 is not a positive number"),
    ({"type": "instruct", "path": "x.jsonl", "weight": -1}, "weight: -1 is not a positive number"),
    ({"type": "instruct", "path": "x.jsonl", "weight": "2"}, "weight: '2' is not a positive number"),
    ({"type": "instruct", "path": "x.jsonl", "val_fraction": 1.0}, "val_fraction: 1.0 must be a number in [0, 1)"),
    ({"type": "instruct", "path": "x.jsonl", "val_fraction": 0.1, "val_size": 3}, "set val_fraction or val_size, not both"),
    ({"type": "instruct", "path": "x.jsonl", "prompt": 3}, "prompt: 3 must be a column name or a list"),
    ({"type": "text", "path": "t.txt", "stride": 255}, "stride: 255 leaves no new tokens"),
    ({"type": "text"}, "path is missing"),
])
def test_config_errors_name_the_key_and_the_choices(tokenizer, spec, expected):
    msg = one_problem(tokenizer, {"src": spec})
    assert msg.startswith("dataset.sources.src") and expected in msg


def test_unknown_bad_rows_value_and_empty_sources(tokenizer):
    assert "expected one of ['error', 'skip']" in one_problem(tokenizer, {"a": {}}, bad_rows="ignore")
    assert "dataset.sources must be a non-empty mapping" in one_problem(tokenizer, {})


def test_empty_file_and_folder_without_text(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.csv").write_text("a\n")
    found = problems(tokenizer, {"a": instruct(tmp_path / "empty.jsonl"), "b": {"type": "text", "path": str(tmp_path / "folder")}})
    assert "dataset.sources.a: " in found[0] and "holds no usable rows" in found[0]
    assert "dataset.sources.b.path: folder" in found[1] and "has no ['.txt', '.md'] files" in found[1]


def test_non_utf8_text_file_names_the_line(tmp_path, tokenizer):
    (tmp_path / "t.txt").write_bytes(b"fine\nstill fine\nbad \xe9 byte\n")
    msg = one_problem(tokenizer, {"t": {"type": "text", "path": str(tmp_path / "t.txt")}})
    assert "t.txt:3: byte 20 is not UTF-8" in msg


def test_max_seq_len_too_small_for_the_chat_template(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(2))
    msg = one_problem(tokenizer, {"p": instruct(path, template="llama3_chat")}, max_seq_len=12)
    assert "llama3_chat needs" in msg and "Raise tokenizer.max_seq_len" in msg


def test_no_sequence_length_anywhere(tmp_path, tokenizer):
    from torchtune.models.llama3 import llama3_tokenizer

    from tools.make_tiny_checkpoint import llama3_tokenizer_path

    tok = llama3_tokenizer(str(llama3_tokenizer_path()))
    assert "set tokenizer.max_seq_len" in one_problem(tok, {"p": instruct(tmp_path / "p.jsonl")})


def test_held_out_rows_need_a_directory(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(10))
    assert "dataset.held_out_dir is not set" in one_problem(tokenizer, {"p": instruct(path, val_size=2)})


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_bad_row_of_a_table_file_is_named_by_its_row_number(tmp_path, tokenizer, suffix):
    import pandas as pd

    rows = pairs(5)
    rows[3]["completion"] = " "  # the 4th data row
    frame, path = pd.DataFrame(rows), tmp_path / f"p{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    msg = one_problem(tokenizer, {"pairs": instruct(path)})
    assert msg.startswith(f"dataset.sources.pairs: {path} row 4: empty completion"), msg
