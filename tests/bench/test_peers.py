"""`make bench` measures what it claims: its data-side worker on the repo's sample (no timing asserted)."""

import sys

from support import REPO

from bench.peers import run_worker


def test_bench_worker_measures_ours_and_the_stock_path_on_the_same_data(tmp_path):
    ours = run_worker("ours", REPO / "data", 256, tmp_path / "cache")
    warm = run_worker("ours", REPO / "data", 256, tmp_path / "cache")
    documents = run_worker("stock-documents", REPO / "data", 256, tmp_path / "cache")
    assert ours["text_kept"] == 1.0 and documents["text_kept"] < 0.9  # stock truncates each document to one window
    assert ours["fill"] > documents["fill"] and ours["packs"] <= documents["packs"]
    assert {k: v for k, v in warm.items() if k not in ("seconds", "peak_rss_mb")} == \
           {k: v for k, v in ours.items() if k not in ("seconds", "peak_rss_mb")}


def test_a_case_that_crashes_is_recorded_and_the_others_run(tiny_checkpoint, small_checkpoint, tmp_path):
    """Text of blank lines: the stock unpacked path (one sample per line) gets an all-empty batch and dies
    (`cannot reshape tensor of 0 elements`). The bench records it in results.json and its table and
    measures the other cases."""
    import json
    import subprocess

    from support import RECIPE_ENV

    data = tmp_path / "data"
    (data / "text").mkdir(parents=True)
    (data / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"Question {i}: how many planks make a bench?",
                                                          "completion": f"Answer {i}: " + "four planks and glue " * 6}) + "\n"
                                              for i in range(80)))
    (data / "text" / "blank.txt").write_text("\n" * 40 + "one line of text\n" + "\n" * 40)
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "bench.peers", "--data", str(data), "--steps", "3", "--repeats", "1",
                           "--out", str(out), "--checkpoint", str(tiny_checkpoint),
                           "--generation-checkpoint", str(small_checkpoint), "--generation-tokens", "8"],
                          cwd=REPO, env=RECIPE_ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["status"] == "finished"
    crashed = results["train_side"]["stock unpacked"]
    assert crashed["failed"] and crashed["step"] == 1 and "reshape" in crashed["error"]
    assert results["train_side"]["ours (packed)"]["supervised_tokens_per_s"] > 0
    assert "stock unpacked   FAILED at step 1 of 3" in done.stdout
    generation = results["generation"]  # ours vs transformers' generate, same prompts, in one process
    assert generation["ours_tokens_per_s"] > 0 and generation["transformers_tokens_per_s"] > 0
    assert f"ratio {generation['ratio']:.2f}x" in done.stdout
    assert set(results["data_side"]["max_seq_len 256"]) == {"ours (cold)", "ours (warm)", "stock, text by line",
                                                            "stock, text by document"}
