"""Readers accept the awkward-but-valid inputs real data comes in, in every supported format."""

import json

import pytest
from support import pairs, write_jsonl

from custom_datasets import mixed_dataset


def build(tokenizer, **sources):
    return mixed_dataset(tokenizer, sources=sources, packed=False)


def decoded(tokenizer, ds):
    return [tokenizer.decode(ds[i]["tokens"], truncate_at_eos=False, skip_special_tokens=False) for i in range(len(ds))]


def test_jsonl_with_bom_crlf_blank_lines_and_no_final_newline(tmp_path, tokenizer):
    rows = [json.dumps({"prompt": "Café?", "completion": "Oui — très bien."}), json.dumps({"prompt": "2+2?", "completion": "4"})]
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + ("\r\n\r\n".join(rows)).encode("utf-8"))  # BOM, CRLF, a blank line, no final newline
    ds = build(tokenizer, p={"type": "instruct", "path": str(path)})
    assert ds.stats.sources[0].rows == 2
    texts = sorted(decoded(tokenizer, ds))
    assert "Café?\nOui — très bien." in texts[1] or "Café?\nOui — très bien." in texts[0]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_tabular_formats_read_through_datasets(tmp_path, tokenizer, suffix):
    import pandas as pd

    frame = pd.DataFrame(pairs(6)).assign(extra_unused=range(6))
    path = tmp_path / f"p{suffix}"
    {".csv": lambda: frame.to_csv(path, index=False), ".parquet": lambda: frame.to_parquet(path),
     ".json": lambda: path.write_text(json.dumps(frame.to_dict("records")))}[suffix]()
    ds = build(tokenizer, p={"type": "instruct", "path": str(path)})
    assert ds.stats.sources[0].rows == 6
    assert any("q question number 3?\nanswer 3" in t for t in decoded(tokenizer, ds))


def test_prompt_composed_from_several_columns_skips_empty_ones(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a colour.", "input": "", "output": "Red"},
    ])
    spec = {"type": "instruct", "path": str(path), "prompt": ["instruction", "input"], "completion": "output"}
    texts = sorted(decoded(tokenizer, build(tokenizer, a=spec)))
    assert texts == ["<|begin_of_text|>Add the numbers.\n\n2 and 3\n5<|end_of_text|>",
                     "<|begin_of_text|>Name a colour.\nRed<|end_of_text|>"]


def test_text_folder_is_read_recursively_and_in_sorted_order(tmp_path, tokenizer):
    (tmp_path / "t" / "sub").mkdir(parents=True)
    (tmp_path / "t" / "b.md").write_text("# Second\n")
    (tmp_path / "t" / "a.txt").write_text("First file.\r\n")
    (tmp_path / "t" / "sub" / "c.txt").write_text("Third, in a subfolder. Ünïcödé.")
    (tmp_path / "t" / "ignored.csv").write_text("x,y\n")
    ds = build(tokenizer, t={"type": "text", "path": str(tmp_path / "t")})
    assert decoded(tokenizer, ds) == [
        "<|begin_of_text|>First file.\n<|end_of_text|>",
        "<|begin_of_text|># Second\n<|end_of_text|>",
        "<|begin_of_text|>Third, in a subfolder. Ünïcödé.<|end_of_text|>",
    ]


def test_text_from_a_jsonl_column(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "notes.jsonl", [{"body": "one note", "id": 1}, {"body": "another", "id": 2}])
    ds = build(tokenizer, n={"type": "text", "path": str(path), "column": "body"})
    assert decoded(tokenizer, ds) == ["<|begin_of_text|>one note<|end_of_text|>", "<|begin_of_text|>another<|end_of_text|>"]


def test_empty_documents_are_counted_not_silently_dropped(tmp_path, tokenizer):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("text")
    (tmp_path / "t" / "empty.txt").write_text("  \n")
    ds = build(tokenizer, t={"type": "text", "path": str(tmp_path / "t")})
    assert ds.stats.sources[0].empty_documents == 1
    assert "1 empty document(s)" in ds.stats.table()


def test_a_folder_of_pair_files_loads_through_datasets_like_a_hub_id(tmp_path, tokenizer):
    """The code path a Hugging Face dataset id takes (load_dataset(path, split=...)), offline."""
    write_jsonl(tmp_path / "hub" / "train.jsonl", pairs(4))
    write_jsonl(tmp_path / "hub" / "test.jsonl", pairs(2, prefix="t"))
    ds = build(tokenizer, p={"type": "instruct", "path": str(tmp_path / "hub"), "split": "test"})
    assert ds.stats.sources[0].rows == 2 and "t question number 1?" in decoded(tokenizer, ds)[1]
