"""The packed stream against an independent oracle (tests/oracle.py): over random sources, lengths, templates, strides,
weights, held-out splits and `too_long`, every sample the oracle expects is served exactly as often as its weight
says, with exactly the oracle's labels, and nothing else is; the data table's counts are the oracle's."""

import math

import oracle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import SHARED_DATA, write_jsonl

from custom_datasets import DatasetError, mixed_dataset

WEIGHTS = [1, 2, 3, 0.5, 0.3, 1.5, 2.25]
HELD = [{}, {"val_fraction": 0.2}, {"val_size": 1}, {"val_size": 1000}]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pair_words=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 60)), min_size=1, max_size=25),
    doc_words=st.lists(st.integers(0, 300), min_size=1, max_size=3),
    max_seq_len=st.integers(40, 96),
    stride_share=st.floats(0, 0.8),
    weights=st.tuples(st.sampled_from(WEIGHTS), st.sampled_from(WEIGHTS)),
    held=st.tuples(st.sampled_from(HELD), st.sampled_from(HELD)),
    train_on_input=st.booleans(),
    template=st.sampled_from(["completion", "chat"]),
    system_prompt=st.sampled_from([None, "Answer in one line."]),
    too_long=st.sampled_from(["truncate", "drop"]),
    packed=st.booleans(),
)
def test_the_stream_is_what_the_oracle_expects(tmp_path_factory, tokenizer, pair_words, doc_words, max_seq_len, stride_share,
                                               weights, held, train_on_input, template, system_prompt, too_long, packed):
    tmp = tmp_path_factory.mktemp("prop")
    rows = [{"prompt": " ".join(f"p{i}x{j}" for j in range(a)), "completion": " ".join(f"c{i}x{j}" for j in range(b))}
            for i, (a, b) in enumerate(pair_words)]
    (tmp / "docs").mkdir()
    for k, n in enumerate(doc_words):  # 0 words: an empty document, counted and skipped
        (tmp / "docs" / f"{k}.txt").write_text(" ".join(f"d{k}x{i}" for i in range(n)) or " \n")
    pair_opts = {"type": "instruct", "path": str(write_jsonl(tmp / "p.jsonl", rows)), "train_on_input": train_on_input,
                 "template": template, "too_long": too_long, "weight": weights[0], **held[0]}
    if system_prompt:
        pair_opts["system_prompt"] = system_prompt
    sources = {"pairs": pair_opts,
               "docs": {"type": "text", "path": str(tmp / "docs"), "stride": int(stride_share * (max_seq_len - 2)),
                        "weight": weights[1], **held[1]}}
    held_dir = str(tmp / "held")
    try:
        ds = mixed_dataset(tokenizer, sources=sources, max_seq_len=max_seq_len, packed=packed, held_out_dir=held_dir)
    except DatasetError as e:  # only when a source has no sample left: never an empty source, never silently
        assert any(_may_be_left_empty(s, sources[s.name]) for s in oracle.expected(sources, max_seq_len)), e
        return
    counts = oracle.check(ds, sources, max_seq_len, held_dir)
    assert sum(sum(c.values()) for c in counts.values()) > 0


def _may_be_left_empty(src: oracle.Source, opts: dict) -> bool:
    """Whether the source can end with no training sample: no unit, every unit dropped or held out, or a weight
    under 1 that rounds its share to nothing (the held-out units are drawn at random: both bounds are tried)."""
    kept = sum("dropped" not in u.cut for u in src.units)
    held = oracle._held_out_count(len(src.units), opts)
    weight = opts.get("weight", 1)
    return any(n <= 0 or (weight < 1 and round(weight * n) == 0) for n in range(kept - held, min(kept, len(src.units) - held) + 1))


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is not present")
def test_real_data_at_2048_is_what_the_oracle_expects(tmp_path, tokenizer):
    """The shared Alpaca 8k pairs (5 empty completions skipped) and Tiny Shakespeare, 5% held out, weights 1.5 and 2."""
    sources = {"alpaca": {"type": "instruct", "path": str(SHARED_DATA / "alpaca_8k.jsonl"), "val_fraction": 0.05,
                          "weight": 1.5},
               "shakespeare": {"type": "text", "path": str(SHARED_DATA / "tinyshakespeare.txt"), "val_fraction": 0.05,
                               "weight": 2, "stride": 64}}
    ds = mixed_dataset(tokenizer, sources=sources, max_seq_len=2048, bad_rows="skip", held_out_dir=str(tmp_path / "held"))
    counts = oracle.check(ds, sources, 2048, str(tmp_path / "held"))
    alpaca = ds.stats.sources[0]
    assert (alpaca.rows, alpaca.held_out, sum(alpaca.skipped.values())) == (7995, math.ceil(7995 * 0.05), 5)
    assert sorted(set(counts["alpaca"].values())) == [0, 1, 2]
