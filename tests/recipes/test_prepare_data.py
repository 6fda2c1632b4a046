"""`make data`'s recipe builds the data of a config exactly as training will, overrides included."""

import json
import subprocess

from support import RECIPE_ENV, REPO, our_recipe, tiny_overrides, write_jsonl

from tools.make_tiny_checkpoint import llama3_tokenizer_path


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


def test_make_data_reports_planted_copies_and_make_eval_scores_only_clean_held_out_rows(trained_run, tiny_checkpoint, tmp_path):
    """The sample pairs with planted copies: 6 exact (re-cased, re-punctuated) and 4 near (a word more), some of
    which the split holds out while their originals train. `make data` counts them; with dedup=near and
    held_out_dedup=true they leave training and the held-out split, and `make eval` scores the clean rows only:
    its row count is the held-out file's, checked against the held-out rows' own lines."""
    rows = [json.loads(line) for line in (REPO / "data" / "pairs.jsonl").read_text().splitlines() if line.strip()]
    planted = ([{"prompt": r["prompt"].upper(), "completion": r["completion"].replace(".", " !")} for r in rows[:6]] +
               [{"prompt": r["prompt"], "completion": r["completion"] + " Indeed."} for r in rows[6:10]])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows + planted)
    out = tmp_path / "run"
    args = [*tiny_overrides(tiny_checkpoint, out), f"dataset.sources.pairs.path={pairs}", "dataset.sources.pairs.val_fraction=0.25",
            f"dataset.cache_dir={tmp_path}/cache"]

    def make(target, *extra):
        done = subprocess.run(["make", "--no-print-directory", target, "CONFIG=configs/llama3_1_8b_qlora.yaml",
                               "ARGS=" + " ".join([*args, *extra])], cwd=REPO, env=RECIPE_ENV, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return done.stdout + done.stderr

    make("data")
    counted = json.loads((out / "data" / "report.json").read_text())["sources"][0]
    held = [json.loads(line) for line in (out / "held_out" / "pairs.jsonl").read_text().splitlines()]
    held_lines = {int(r["where"].rsplit(":", 1)[1]) for r in held}
    # a planted row (line 49 + k) and its original (line 1 + k): seen if one is held out and the other trained
    twins = [(1 + k, 49 + k) for k in range(10)]
    seen = sum((a in held_lines) != (b in held_lines) for a, b in twins)
    trained_copies = sum(a not in held_lines and b not in held_lines for a, b in twins)
    assert counted["exact_duplicates"] + counted["near_duplicates"] == trained_copies
    assert counted["held_out_seen"] == seen > 0

    printed = make("data", "dataset.dedup=near", "dataset.held_out_dedup=true")
    removed = json.loads((out / "data" / "report.json").read_text())["sources"][0]
    assert removed["deduplicated"] == trained_copies and removed["samples"] == counted["samples"] - trained_copies
    assert f"{seen} held-out row(s) have a copy in training: not evaluated" in printed
    clean = (out / "held_out" / "pairs.jsonl").read_text().splitlines()
    assert len(clean) == len(held) - seen and len((out / "held_out" / "pairs.seen.jsonl").read_text().splitlines()) == seen

    adapter = max((trained_run[0]).glob("epoch_*"))
    make("eval", "dataset.dedup=near", "dataset.held_out_dedup=true", f"eval.checkpoint={adapter}", "eval.num_generations=1",
         "eval.max_new_tokens=4", "eval.local_task=false")
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["held_out_rows"]["pairs"]["rows"] == len(clean)
