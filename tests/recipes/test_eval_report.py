"""`make eval` and `make generate` on a real tiny run: base vs tuned on the held-out split, offline."""

import json
import sys

import pytest
from support import CONFIG, our_recipe, run, tiny_overrides

EVAL_ARGS = ["eval.num_generations=3", "eval.max_new_tokens=8", "eval.batch_size=2"]


@pytest.fixture(scope="module")
def report(trained_run, tiny_checkpoint):
    out, _ = trained_run
    printed = run([*our_recipe("eval_report"), "--config", CONFIG,
                   *tiny_overrides(tiny_checkpoint, out), *EVAL_ARGS])
    return json.loads((out / "eval" / "report.json").read_text()), (out / "eval" / "report.md").read_text(), printed, out


@pytest.mark.e2e
def test_report_has_every_field_and_names_both_checkpoints(report, tiny_checkpoint):
    data, md, printed, out = report
    assert set(data) >= {"config", "config_sha256", "base_checkpoint", "tuned_adapter", "eval", "base", "tuned",
                         "generations", "seconds", "overrides"}
    assert data["config"] == CONFIG and len(data["config_sha256"]) == 64
    assert data["base_checkpoint"] == [f"{tiny_checkpoint}/model-00001-of-00001.safetensors"]
    assert data["tuned_adapter"] == f"{out}/epoch_3/adapter_model.pt"  # the latest epoch
    for side in ("base", "tuned"):
        assert set(data[side]["held_out"]) == {"pairs", "text"}
        for source in ("pairs", "text"):
            assert set(data[side]["held_out"][source]) == {"loss", "perplexity", "tokens"}
        assert set(data[side]["text_scores"]) == {"exact_match", "chrf", "rougeL"}
    assert len(data["generations"]) == 3
    assert set(data["generations"][0]) == {"source", "prompt", "reference", "base", "tuned"}
    assert "| metric | base | tuned | change |" in md and "## Generations" in md and "- reference: " in md
    assert "pairs: held-out loss" in printed and "Wrote " in printed


@pytest.mark.e2e
def test_tuned_held_out_loss_is_lower_than_the_base(report):
    data = report[0]
    for source in ("pairs", "text"):
        base, tuned = data["base"]["held_out"][source], data["tuned"]["held_out"][source]
        assert base["tokens"] == tuned["tokens"] > 0
        assert tuned["loss"] < base["loss"] - 0.1, (source, base, tuned)


@pytest.mark.e2e
def test_lm_eval_local_task_runs_offline(report):
    data = report[0]
    for side in ("base", "tuned"):
        task = data[side]["lm_eval"]["heldout_pairs"]
        assert task["perplexity"] > 1 and 0 <= task["acc"] <= 1
    assert data["tuned"]["lm_eval"]["heldout_pairs"]["perplexity"] < data["base"]["lm_eval"]["heldout_pairs"]["perplexity"]


@pytest.mark.e2e
def test_generate_uses_the_tuned_adapter_and_the_data_template(trained_run, tiny_checkpoint, tmp_path):
    out, _ = trained_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Translate to French: Good morning.\nName a colour.\n")
    printed = run([sys.executable, "recipes/generate_tuned.py", "--config", CONFIG, "--prompts-file", str(prompts),
                   *tiny_overrides(tiny_checkpoint, out), "eval.max_new_tokens=4"])
    lines = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in lines] == ["Translate to French: Good morning.", "Name a colour."]
    assert f"+ {out}/epoch_3/adapter_model.pt; template: completion (pairs)" in printed
