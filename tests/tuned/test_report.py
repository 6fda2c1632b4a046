"""report.md renders whatever a model generates; the recipe's training log is read step by step."""

from markdown_it import MarkdownIt

from tuned.report import markdown, training_losses

NASTY = "line one\n- not a list item\n| not | a table |\n```\n## not a heading\n````python\n**bold?**"


def _report(generation: str) -> dict:
    phase = {"name": "base", "epochs_trained": 0, "adapter": None,
             "held_out": {"pairs": {"loss": 2.0, "perplexity": 7.39, "tokens": 10}}, "text_scores": {}, "lm_eval": {}}
    return {"status": "complete", "config": "c.yaml", "config_sha256": "0" * 64, "base_checkpoint": ["m.safetensors"],
            "held_out_rows": {"pairs": {"rows": 1, "scored": 1, "truncated": 0, "dropped": 0}},
            "phases": [phase], "base": phase, "tuned": None, "curves": None,
            "generations": [{"source": "pairs", "where": "f.jsonl:3", "prompt": "P\nQ", "reference": "ref | x",
                             "base": generation, "tuned": generation}]}


def test_generations_survive_markdown_verbatim():
    """Oracle: a CommonMark parser. Every generation, prompt and reference must come back as the exact
    content of one fenced block, and nothing inside may become a heading, list or table."""
    tokens = MarkdownIt("commonmark").enable("table").parse(markdown(_report(NASTY)))
    fences = [t.content.rstrip("\n") for t in tokens if t.type == "fence"]
    assert fences.count(NASTY) == 2 and "P\nQ" in fences and "ref | x" in fences
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert "not a heading" not in headings
    assert sum(t.type == "table_open" for t in tokens) == 2  # the row counts and the metrics, nothing more


def test_training_losses_read_every_step_of_every_log(tmp_path):
    (tmp_path / "log_100.txt").write_text(
        "Step 1 | loss:11.5 lr:0.0003 tokens_per_second_per_gpu:10.0 \nStep 2 | loss:10.25 lr:0.0003 \n")
    (tmp_path / "log_200.txt").write_text("Step 1 | loss:9.0 lr:1e-05 \nStep 2 | loss:8.5e-01 lr:1e-05 \n")
    assert training_losses(tmp_path) == [11.5, 10.25, 9.0, 0.85]
