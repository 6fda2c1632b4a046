"""`make eval` and `make generate` on real tiny runs: base vs tuned on the held-out split, offline."""

import json
import subprocess
import sys

import pytest
from markdown_it import MarkdownIt
from support import CONFIG, RECIPE_ENV, REPO, logged_losses, our_recipe, run, tiny_overrides, tune_run, write_jsonl

EVAL_ARGS = ["eval.num_generations=3", "eval.max_new_tokens=8", "eval.batch_size=2"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(trained_run, tiny_checkpoint):
    out, _ = trained_run
    printed = run([*our_recipe("eval_report"), "--config", CONFIG,
                   *tiny_overrides(tiny_checkpoint, out), *EVAL_ARGS])
    return json.loads((out / "eval" / "report.json").read_text()), (out / "eval" / "report.md").read_text(), printed, out


@pytest.mark.e2e
def test_report_has_every_field_and_names_both_checkpoints(report, tiny_checkpoint):
    data, md, printed, out = report
    assert set(data) >= {"status", "config", "config_sha256", "base_checkpoint", "eval", "base", "tuned", "phases",
                         "held_out_rows", "generations", "curves", "seconds", "overrides"}
    assert data["status"] == "complete"
    assert data["config"] == CONFIG and len(data["config_sha256"]) == 64
    assert data["base_checkpoint"] == [f"{tiny_checkpoint}/model-00001-of-00001.safetensors"]
    assert data["tuned"]["adapter"] == f"{out}/epoch_3/adapter_model.pt"  # the latest epoch
    for side in ("base", "tuned"):
        assert set(data[side]["held_out"]) == {"pairs", "text"}
        for source in ("pairs", "text"):
            assert set(data[side]["held_out"][source]) >= {"loss", "perplexity", "tokens", "rows", "truncated", "dropped"}
        assert set(data[side]["text_scores"]) == {"exact_match", "chrf", "rougeL"}
    assert len(data["generations"]) == 3
    assert set(data["generations"][0]) == {"source", "where", "prompt", "reference", "base", "tuned"}
    assert "| metric | base | tuned | change |" in md and "## Generations" in md and "![training and held-out loss](curves.png)" in md
    assert "pairs: held-out loss" in printed and "Wrote " in printed
    assert "base: held-out loss (pairs)" in printed and "Evaluating" in printed  # progress bars of each phase


@pytest.mark.e2e
def test_every_epoch_is_evaluated_and_drawn_with_the_training_loss(report):
    data, _, _, out = report
    assert [(p["name"], p["epochs_trained"]) for p in data["phases"]] == [
        ("base", 0), ("epoch_0", 1), ("epoch_1", 2), ("epoch_2", 3), ("epoch_3", 4)]
    assert all(set(p["held_out"]) == {"pairs", "text"} for p in data["phases"])
    assert "lm_eval" not in data["phases"][1] and "lm_eval" in data["phases"][-1]  # full evaluation: base and last only
    assert (out / "eval" / "curves.png").read_bytes()[:8] == PNG
    assert data["epochs_logged"] == 4 and len(logged_losses(out)) >= 20


@pytest.mark.e2e
def test_tuned_held_out_loss_is_lower_than_the_base(report):
    data = report[0]
    for source in ("pairs", "text"):
        base, tuned = data["base"]["held_out"][source], data["tuned"]["held_out"][source]
        assert base["tokens"] == tuned["tokens"] > 0
        assert tuned["loss"] < base["loss"] - 0.1, (source, base, tuned)


@pytest.mark.e2e
def test_lm_eval_local_task_runs_offline_per_token(report):
    data = report[0]
    for side in ("base", "tuned"):
        task = data[side]["lm_eval"]["heldout_pairs"]
        assert task["token_perplexity"] > 1 and 0 <= task["acc"] <= 1
        # Per token, the same quantity as the held-out loss of the same rows (lm-eval's target has no EOS).
        assert abs(task["nll_per_token"] - data[side]["held_out"]["pairs"]["loss"]) < 0.5
    assert data["tuned"]["lm_eval"]["heldout_pairs"]["token_perplexity"] < data["base"]["lm_eval"]["heldout_pairs"]["token_perplexity"]


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


# Alpaca-shaped data as users bring it: the prompt is two columns, and some answers are longer than max_seq_len.
def _alpaca_rows(n: int) -> list[dict]:
    long = " ".join(f"step{j}" for j in range(300))
    return [{"instruction": f"Question {i}: what is {i} plus {i % 9}?",
             "input": "" if i % 2 else f"Context line {i}.\nMore | context.",
             "output": long if i % 25 == 5 else f"Answer {i}: " + "yes " * (1 + i % 7)} for i in range(n)]


def _make(target: str, args: list[str], *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["make", "-s", target, f"CONFIG={CONFIG}", f"ARGS={' '.join(args)}", *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=RECIPE_ENV)
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def alpaca_run(tiny_checkpoint, tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("alpaca")
    rows = _alpaca_rows(400)
    write_jsonl(root / "alpaca.jsonl", rows)
    out = root / "run"
    args = tiny_overrides(tiny_checkpoint, out) + [
        f"dataset.sources.pairs.path={root / 'alpaca.jsonl'}", "dataset.sources.pairs.prompt=[instruction,input]",
        "dataset.sources.pairs.completion=output", "dataset.sources.pairs.val_fraction=0", "dataset.sources.pairs.val_size=150"]
    tune_run(CONFIG, [*args, "epochs=2", "max_steps_per_epoch=2"])
    return root, out, args


@pytest.mark.e2e
def test_eval_and_generate_take_a_list_prompt_and_long_rows(alpaca_run, tokenizer):
    root, out, args = alpaca_run
    _make("eval", args + ["eval.num_generations=2", "eval.max_new_tokens=4", "eval.batch_size=8"])
    data = json.loads((out / "eval" / "report.json").read_text())
    assert data["status"] == "complete"
    # Oracle for the long rows: the held-out rows, tokenized here as BOS + prompt + "\n" + output + EOS.
    held = [json.loads(line) for line in (out / "held_out" / "pairs.jsonl").read_text().splitlines()]
    enc = lambda s: tokenizer.encode(s, add_bos=False, add_eos=False)  # noqa: E731
    too_long = sum(2 + len(enc(r["prompt"] + "\n")) + len(enc(r["completion"])) > 256 for r in held)
    assert len(held) == 150 and too_long >= 3
    assert data["held_out_rows"]["pairs"] == {"rows": 150, "scored": 150, "truncated": too_long, "dropped": 0}
    assert "\n\n" in held[0]["prompt"] or "\n\n" in held[1]["prompt"]  # instruction + input, joined
    md = (out / "eval" / "report.md").read_text()
    fences = [t.content for t in MarkdownIt("commonmark").parse(md) if t.type == "fence"]
    assert any("More | context." in f for f in fences)  # a prompt with newlines and a pipe, fenced whole

    gen = _make("generate", args + ["eval.max_new_tokens=4"], "PROMPT=Say yes.")
    assert '"prompt": "Say yes."' in gen.stdout and "epoch_1/adapter_model.pt; template: completion (pairs)" in gen.stdout


@pytest.mark.e2e
def test_a_crash_in_the_tuned_phase_keeps_the_base_results(alpaca_run):
    root, out, args = alpaca_run
    (out / "epoch_1" / "adapter_model.pt").write_bytes(b"not a checkpoint")  # the last epoch cannot be loaded
    proc = _make("eval", args + ["eval.num_generations=1", "eval.max_new_tokens=2", "eval.local_task=false"], check=False)
    assert proc.returncode != 0
    data = json.loads((out / "eval" / "report.json").read_text())
    assert data["status"].startswith("stopped during epoch_1: "), data["status"]
    assert [p["name"] for p in data["phases"]] == ["base", "epoch_0"]
    assert data["base"]["held_out"]["pairs"]["tokens"] > 0
    assert "lm_eval" not in data["base"]  # eval.local_task=false and no eval.tasks: lm-eval does not run
    assert "stopped during epoch_1" in (out / "eval" / "report.md").read_text()


@pytest.mark.e2e
def test_the_base_column_is_reused_only_for_the_same_base_split_and_settings(trained_run, tiny_checkpoint, tmp_path):
    """Proof of reuse: a sentinel planted in the stored base column shows in the next run's report; every input of
    the base column (eval settings, held-out bytes, base checkpoint bytes) changed alone gives the real loss again,
    and so does a truncated entry."""
    import shutil

    from safetensors.torch import load_file, save_file

    out, _ = trained_run
    cache = tmp_path / "base_eval"
    cheap = ["eval.num_generations=2", "eval.max_new_tokens=4", "eval.epochs=last", "eval.local_task=false",
             f"eval.base_cache={cache}"]

    def evaluate(run_dir, checkpoint=tiny_checkpoint, *extra):
        printed = run([*our_recipe("eval_report"), "--config", CONFIG, *tiny_overrides(checkpoint, run_dir), *cheap,
                       *extra])
        return json.loads((run_dir / "eval" / "report.json").read_text()), printed

    first_dir, second_dir = tmp_path / "lr_a", tmp_path / "lr_b"
    for folder in (first_dir, second_dir):
        shutil.copytree(out, folder, ignore=shutil.ignore_patterns("eval", "cache"))
    first, printed = evaluate(first_dir)
    assert "base: generating" in printed and "base_reused" not in first
    real = first["base"]["held_out"]["pairs"]["loss"]
    (entry,) = [p for p in cache.glob("*.json") if p.name != "files.json"]
    stored = json.loads(entry.read_text())
    assert stored["phase"]["held_out"] == first["base"]["held_out"]
    stored["phase"]["held_out"]["pairs"]["loss"] = 123.0
    entry.write_text(json.dumps(stored))

    second, printed = evaluate(second_dir)  # another run folder, the same base, split and settings: reused
    assert second["base"]["held_out"]["pairs"]["loss"] == 123.0 and "base: reused" in printed
    assert second["base_reused"]["run"] == str(first_dir) and "base: generating" not in printed
    assert second["tuned"]["held_out"]["pairs"]["loss"] != 123.0

    changed, _ = evaluate(second_dir, tiny_checkpoint, "eval.batch_size=3")  # an eval setting
    assert changed["base"]["held_out"]["pairs"]["loss"] == pytest.approx(real, abs=1e-5)

    held = second_dir / "held_out" / "pairs.jsonl"  # the held-out split's bytes
    rows = held.read_text().splitlines(keepends=True)
    held.write_text("".join(rows[:-1]))
    changed, _ = evaluate(second_dir)
    assert changed["base"]["held_out"]["pairs"]["loss"] != 123.0 and changed["base"]["held_out"]["pairs"]["rows"] == len(rows) - 1
    held.write_text("".join(rows))

    other = tmp_path / "other_base"  # the base checkpoint's bytes (same file names, another folder)
    shutil.copytree(tiny_checkpoint, other)
    weights = other / "model-00001-of-00001.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})
    changed, _ = evaluate(second_dir, other)
    assert changed["base"]["held_out"]["pairs"]["loss"] not in (123.0, pytest.approx(real, abs=1e-5))

    # a truncated entry is not trusted (the entry the first settings read, as make eval opens it)
    from support import load_config

    from tuned.base_scores import BaseScores
    from tuned.sections import EvalOptions, section

    cfg = load_config(CONFIG, *tiny_overrides(tiny_checkpoint, second_dir), *cheap)
    scores = BaseScores(cfg, section(cfg, "eval", EvalOptions), cfg.dataset.held_out_dir)
    assert scores.path == entry and scores.load(["pairs", "text"], 2)["phase"]["held_out"]["pairs"]["loss"] == 123.0
    entry.write_text(entry.read_text()[:100])
    assert scores.load(["pairs", "text"], 2) is None
