"""The held-out split as eval sees it: the training config's sources (list prompts included), rows
longer than max_seq_len treated as training treats them, and a loss equal to a plain forward pass."""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from support import tiny_config

from custom_datasets import InstructSpec, TextSpec, parse_sources
from tuned import TunedModel
from tuned.heldout import held_out_loss, held_out_samples, perplexity

IGNORE = -100


def test_a_list_prompt_from_the_recipe_config_parses():
    """The recipe hands over OmegaConf nodes: a list prompt arrives as a ListConfig."""
    node = OmegaConf.create({"pairs": {"type": "instruct", "path": "x.jsonl", "prompt": ["instruction", "input"]}})
    (spec,) = parse_sources(node, 256)
    assert spec.prompt == ("instruction", "input")


def _record(prompt, completion):
    return {"prompt": prompt, "completion": completion, "where": "f.jsonl:1"}


@pytest.mark.parametrize("too_long", ["truncate", "drop"])
def test_long_rows_are_cut_or_left_out_as_training_does_and_counted(tokenizer, too_long):
    spec = InstructSpec(name="pairs", path="x", too_long=too_long, train_on_input=True)
    long_completion = " ".join(f"w{i}" for i in range(400))
    records = [_record("Say hi.", "hi"), _record("Count.", long_completion)]
    # Independent count: BOS + prompt + separator + completion + EOS, straight from the tokenizer.
    full = 1 + len(tokenizer.encode("Count.\n", add_bos=False, add_eos=False)) + len(
        tokenizer.encode(long_completion, add_bos=False, add_eos=False)) + 1
    assert full > 256
    held = held_out_samples(tokenizer, spec, records, 256)
    short = held.samples[0]
    n_prompt = 1 + len(tokenizer.encode("Say hi.\n", add_bos=False, add_eos=False))
    assert short["labels"][:n_prompt] == [IGNORE] * n_prompt  # the prompt never scores, even with train_on_input
    assert short["labels"][n_prompt:] == short["tokens"][n_prompt:]
    if too_long == "truncate":
        assert held.counts() == {"rows": 2, "scored": 2, "truncated": 1, "dropped": 0}
        assert len(held.samples[1]["tokens"]) == 256
    else:
        assert held.counts() == {"rows": 2, "scored": 1, "truncated": 0, "dropped": 1}


def test_text_windows_score_only_their_new_tokens(tokenizer):
    spec = TextSpec(name="text", path="x")
    held = held_out_samples(tokenizer, spec, [{"context": "Four score", "text": " and seven years ago", "where": "t"}], 256)
    (s,) = held.samples
    n_ctx = 1 + len(tokenizer.encode("Four score", add_bos=False, add_eos=False))
    assert s["labels"][:n_ctx] == [IGNORE] * n_ctx and all(x != IGNORE for x in s["labels"][n_ctx:])


def test_perplexity_never_overflows():
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert math.isfinite(perplexity(5000.0))


@pytest.fixture(scope="module")
def tuned(tiny_checkpoint, tmp_path_factory):
    return TunedModel(tiny_config(tiny_checkpoint, tmp_path_factory.mktemp("run")))


def test_held_out_loss_equals_a_plain_forward_pass(tuned, tokenizer):
    """Oracle: each sample alone through the whole model (every position projected), cross-entropy of
    the shifted labels; summed over samples and divided by the supervised tokens."""
    spec = InstructSpec(name="pairs", path="x")
    records = [_record(f"Question {i}: " + "why " * (i * 7), "Because " * (1 + i * 5)) for i in range(7)]
    held = held_out_samples(tokenizer, spec, records, 256)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in held.samples:
            logits = tuned.model(torch.tensor([s["tokens"]]))[0]
            labels = torch.tensor(s["labels"][1:])
            total += F.cross_entropy(logits[:-1], labels, ignore_index=IGNORE, reduction="sum").item()
            count += int((labels != IGNORE).sum())
    got = held_out_loss(tuned, held, batch_size=3, desc="test")
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)


def test_eval_scores_what_training_would_train_on_the_same_rows(tmp_path, tokenizer):
    """Oracle (tests/oracle.py): a held-out pair is scored on its completion alone even where training uses
    train_on_input (the question is whether the model learned to answer); a held-out text window on its new
    tokens, never on its stride context (the document's EOS is not in the record's text: not scored)."""
    import oracle
    from support import write_jsonl

    from custom_datasets import mixed_dataset
    from tuned.heldout import read_held_out

    words = "apple river house green table water light stone music paper".split()
    (tmp_path / "t.txt").write_text(" ".join(words[i * 7 % 10] for i in range(600)))
    rows = [{"prompt": f"Question {i}: name a {words[i % 10]} thing?", "completion": f"A {words[(i + 3) % 10]} one."} for i in range(20)]
    sources = {"pairs": {"type": "instruct", "path": str(write_jsonl(tmp_path / "p.jsonl", rows)), "train_on_input": True,
                         "val_size": 5},
               "text": {"type": "text", "path": str(tmp_path / "t.txt"), "stride": 16, "val_fraction": 0.5}}
    specs = {s.name: s for s in parse_sources(sources, 128)}
    mixed_dataset(tokenizer, sources=sources, max_seq_len=128, held_out_dir=str(tmp_path / "held"))
    held = read_held_out(tmp_path / "held", list(sources))
    want = {s.name: {u.key: u for u in s.units}
            for s in oracle.expected({**sources, "pairs": {**sources["pairs"], "train_on_input": False}}, 128)}
    assert any(r["context"] for r in held["text"])  # some held-out window has a stride context
    for name, records in held.items():
        samples = held_out_samples(tokenizer, specs[name], records, 128).samples
        assert len(samples) == len(records) > 1
        for s in samples:
            r = s["record"]
            unit = want[name][(r["prompt"], r["completion"]) if name == "pairs" else (r["context"], r["text"])]
            tokens, labels = list(unit.tokens), list(unit.labels)
            if name == "text" and tokens[-1] == tokenizer.eos_id:
                tokens, labels = tokens[:-1], labels[:-1]
            assert (s["tokens"], s["labels"]) == (tokens, labels), name
