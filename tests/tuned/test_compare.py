"""make compare on two run folders written the way the recipe, torchtune's DiskLogger, make eval and the stage wrapper
write them, with figures planted by hand: the table must show exactly the planted values and exactly the keys that
differ. A real run (trained, scored and exported through make) is compared in tests/recipes/test_make_all.py."""

from __future__ import annotations

import json
import subprocess

from omegaconf import OmegaConf
from support import RECIPE_ENV, REPO
from torchtune.training.metric_logging import DiskLogger


def _plant(folder, lr, rank, losses, speeds, tuned_loss, seconds=None):
    """A run folder: the recipe's config copy, a DiskLogger log, eval/report.json, and stage records."""
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({
        "output_dir": str(folder), "optimizer": {"lr": lr, "weight_decay": 0.01}, "model": {"lora_rank": rank},
        "metric_logger": {"log_dir": f"{folder}/logs"}, "checkpointer": {"output_dir": str(folder)}, "epochs": 2}),
        folder / "torchtune_config.yaml")
    logger = DiskLogger(log_dir=str(folder / "logs"))
    for step, (loss, speed) in enumerate(zip(losses, speeds), 1):
        logger.log_dict({"loss": loss, "lr": lr, "tokens_per_second_per_gpu": speed}, step)
    logger.close()
    base = {"held_out": {"pairs": {"loss": 2.5, "tokens": 10}}, "text_scores": {"chrf": 10.0}}
    tuned = {"held_out": {"pairs": {"loss": tuned_loss, "tokens": 10}}, "text_scores": {"chrf": 30.0},
             "lm_eval": {"heldout_pairs": {"acc": 0.5, "acc_stderr": 0.1}}}
    phases = [{"name": "base", "epochs_trained": 0, **base}, {"name": "epoch_1", "epochs_trained": 2, **tuned}]
    (folder / "eval").mkdir()
    (folder / "eval" / "report.json").write_text(json.dumps(
        {"status": "complete", "base": base, "tuned": tuned, "phases": phases, "epochs_logged": 2}))
    (folder / "stages").mkdir()
    for stage, s in (seconds or {}).items():
        (folder / "stages" / f"{stage}.json").write_text(json.dumps(
            {"stage": stage, "seconds": s, "made_from": {"keys": {"eval.max_new_tokens": 4} if stage == "eval" else {}}}))


def _compare(*runs, out):
    return subprocess.run(["make", "--no-print-directory", "compare", f"RUNS={' '.join(map(str, runs))}", f"OUT={out}"],
                          cwd=REPO, env=RECIPE_ENV, capture_output=True, text=True, timeout=300)


def _rows(markdown: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("| ")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[2:]}  # after the header and the alignment row


def test_compare_shows_the_keys_that_differ_and_each_runs_own_figures(tmp_path):
    _plant(tmp_path / "lr_a", 1e-3, 8, [3.0, 2.0, 1.5], [100.0, 300.0, 200.0], 1.25, {"train": 12.5, "eval": 3.0})
    _plant(tmp_path / "lr_b", 5e-4, 16, [3.0, 2.5, 2.25, 2.0], [50.0, 70.0, 60.0, 90.0], 1.75, {"train": 20.0})
    done = _compare(tmp_path / "lr_a", tmp_path / "lr_b", out=tmp_path / "cmp.md")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _rows((tmp_path / "cmp.md").read_text())
    expected = {  # by hand from what was planted
        "optimizer.lr": ["0.001", "0.0005"], "model.lora_rank": ["8", "16"],
        "eval.max_new_tokens": ["4", "(unset)"],
        "pairs: held-out loss, tuned": ["1.25", "1.75"], "pairs: held-out loss, base": ["2.5", "2.5"],
        "generations: chrf": ["30", "30"], "lm-eval heldout_pairs: acc": ["0.5", "0.5"],
        "training steps": ["3", "4"], "last training loss": ["1.5", "2"],
        "training tokens/s (median step)": ["200", "65"],
        "wall time: train (s)": ["12.5", "20"], "wall time: eval (s)": ["3", "-"],
    }
    assert rows == expected, rows  # the folders' own paths (output_dir, log_dir, ...) are no difference
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "optimizer.lr" in done.stdout and "0.0005" in done.stdout


def test_compare_refuses_one_run_and_a_folder_that_is_no_run(tmp_path):
    _plant(tmp_path / "a", 1e-3, 8, [1.0], [1.0], 1.0)
    (tmp_path / "empty").mkdir()
    one = _compare(tmp_path / "a", out=tmp_path / "x.md")
    assert one.returncode != 0 and "needs two runs or more" in one.stderr
    empty = _compare(tmp_path / "a", tmp_path / "empty", out=tmp_path / "x.md")
    assert empty.returncode != 0 and f"{tmp_path / 'empty'} holds no run" in empty.stderr
    assert not (tmp_path / "x.md").exists()
