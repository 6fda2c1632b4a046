"""The held-out split as eval sees it: the training config's sources (list prompts included), rows
longer than max_seq_len treated as training treats them, and a loss equal to a plain forward pass."""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from support import tiny_config

from custom_datasets import InstructSpec, TextSpec, parse_sources
from custom_datasets.tuned import TunedModel
from custom_datasets.tuned.heldout import held_out_loss, held_out_samples, perplexity

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
