"""`make bench-train` cannot rot: a 2-step miniature of both sides (the stock recipe fed by our builder, TRL's
SFTTrainer + peft in its own venv) on the repo's sample data, through the real make target (no timing asserted)."""

import json
import subprocess

from support import RECIPE_ENV, REPO


def test_a_two_step_miniature_trains_both_sides_and_scores_them_with_one_checked_scorer(tmp_path):
    out = tmp_path / "train.json"
    done = subprocess.run(["make", "--no-print-directory", "bench-train", "DATA=data", f"OUT={out}",
                           f"BENCH_ARGS=--steps 2 --repeats 1 --held-out-limit 3 --held-out-windows 1 --work {tmp_path / 'work'}"],
                          cwd=REPO, env=RECIPE_ENV, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    r = json.loads(out.read_text())
    assert r["trl_versions"]["trl"] == "1.16.0"  # the version the Makefile pins, and docs/benchmarks.md names
    for side in ("ours", "trl"):
        run = r[side]["runs"][0]
        assert run["supervised_tokens_per_s"] > 0 and run["timed_steps"] == 1 and run["peak_rss_mb"] > 100
        assert len(run["losses"]) == 2
    # TRL's own packs (counted in its venv, from its train_dataset) hold every supervised token our builder made:
    # the two sides train the same tokens with the same mask
    assert r["trl"]["runs"][0]["packed_supervised_tokens"] == r["data"]["supervised_tokens"] > 0
    # the one scorer (transformers + peft) agrees with make eval's held_out_loss on the base and on our adapter
    assert set(r["scorer_checks"]) == {"base / pairs", "base / text", "ours seed 0 / pairs", "ours seed 0 / text"}
    assert all(abs(c["ours"] - c["scorer"]) < 2e-3 for c in r["scorer_checks"].values())
    # two steps at the demo's learning rate move the held-out loss off the base model's, on both sides
    assert r["ours"]["held_out_loss"] != r["base_held_out_loss"] != r["trl"]["held_out_loss"]
    for row in ("supervised tokens/s", "wall s (whole run)", "peak RSS MB", "held-out loss (mean of seeds)"):
        assert row in done.stdout
    assert f"{r['ratio_supervised_tokens_per_s']:.2f}x" in done.stdout
