"""`make data`'s recipe builds the data of a config exactly as training will, overrides included."""

import json
import subprocess

from support import RECIPE_ENV, REPO, our_recipe
from make_tiny_checkpoint import llama3_tokenizer_path


def prepare(tmp_path):
    run = subprocess.run(
        [*our_recipe("prepare_data"), "--config", "configs/llama3_1_8b_qlora.yaml",
         f"tokenizer.path={llama3_tokenizer_path()}", "tokenizer.max_seq_len=512", f"output_dir={tmp_path}",
         f"dataset.cache_dir={tmp_path}/cache", "dataset.sources.text.weight=3", "batch_size=1", "gradient_accumulation_steps=2"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=RECIPE_ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_prepare_data_writes_the_report_of_the_training_config(tmp_path):
    run = prepare(tmp_path)
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    pairs, text = report["sources"]
    assert (pairs["name"], pairs["rows"], pairs["held_out"]) == ("pairs", 48, 3)
    assert (text["name"], text["weight"], text["samples"]) == ("text", 3, 3)  # 2 documents, 1 held out, x3
    assert report["steps_per_epoch"] == report["packs"] // 2 and report["tokens_per_step"] == 1024
    assert "Data table (max_seq_len=512)" in run.stderr + run.stdout
    assert (tmp_path / "held_out" / "pairs.jsonl").is_file()
    assert abs(sum(m["share"] for m in report["mixture"]) - 1) < 1e-9
    assert report["mixture"][1]["tokens"] == text["tokens"] and sum(pairs["length_hist"]) == 45
    md = (tmp_path / "data" / "report.md").read_text()
    assert "| pairs | instruct | 1 | 48 | 3 |" in md and "![token lengths](token_lengths.png)" in md
    assert (tmp_path / "data" / "token_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Prepared in" in run.stdout and "(built " in run.stdout
    assert "(loaded " in prepare(tmp_path).stdout  # the second run reads the stored packs


def test_report_md_has_the_console_tables_columns_and_notes(tmp_path):
    """report.md and the logged data table name the same columns, and report.md carries the table's notes
    (what was cut, dropped, skipped, never trained): checked against the console output of the same run."""
    run = prepare(tmp_path)
    console = run.stderr + run.stdout
    header = next(line for line in console.splitlines() if line.lstrip().startswith("source ") and "prompt cut" in line)
    columns = [c for c in header.split("  ") if c.strip()]
    md = (tmp_path / "data" / "report.md").read_text()
    md_header = next(line for line in md.splitlines() if line.startswith("| source"))
    assert [c.strip() for c in md_header.strip("|").split("|")][: len(columns)] == [c.strip() for c in columns]
    note = next(line for line in console.splitlines() if "document tokens cut into" in line)
    assert note.split("text: ", 1)[1] in md
