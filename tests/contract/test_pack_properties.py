"""No label crosses a boundary: random sources, lengths, strides and weights through the real builder."""

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import write_jsonl

from custom_datasets import mixed_dataset

IGNORE = -100


def samples_of(ds) -> list[tuple[tuple, tuple]]:
    """Every sample of every pack as (tokens, labels), padding excluded."""
    out = []
    for item in ds:
        lens = item["seq_lens"].tolist()
        start = 0
        for n in lens:
            seg = slice(start, start + n)
            out.append((tuple(item["tokens"][seg].tolist()), tuple(item["labels"][seg].tolist())))
            start += n
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pair_words=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 60)), min_size=1, max_size=25),
    doc_words=st.lists(st.integers(1, 300), min_size=1, max_size=3),
    max_seq_len=st.integers(24, 96),
    stride_share=st.floats(0, 0.8),
    weights=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    train_on_input=st.booleans(),
)
def test_every_pack_is_consistent_and_every_token_lands_once_per_weight(
        tmp_path_factory, tokenizer, pair_words, doc_words, max_seq_len, stride_share, weights, train_on_input):
    tmp = tmp_path_factory.mktemp("prop")
    rows = [{"prompt": " ".join(f"p{i}" for i in range(a)), "completion": " ".join(f"c{i}" for i in range(b))} for a, b in pair_words]
    for k, n in enumerate(doc_words):
        (tmp / "docs").mkdir(exist_ok=True)
        (tmp / "docs" / f"{k}.txt").write_text(" ".join(f"d{k}x{i}" for i in range(n)))
    stride = int(stride_share * (max_seq_len - 2))
    srcs = {"pairs": {"type": "instruct", "path": str(write_jsonl(tmp / "p.jsonl", rows)), "train_on_input": train_on_input},
            "docs": {"type": "text", "path": str(tmp / "docs"), "stride": stride}}
    once = mixed_dataset(tokenizer, sources=srcs, max_seq_len=max_seq_len, packed=False)
    srcs["pairs"]["weight"], srcs["docs"]["weight"] = weights
    ds = mixed_dataset(tokenizer, sources=srcs, max_seq_len=max_seq_len)

    for item in ds:
        tokens, labels, pos, lens = item["tokens"], item["labels"], item["input_pos"], item["seq_lens"].tolist()
        assert len(tokens) == len(labels) == len(pos) == max_seq_len == sum(lens)
        start = 0
        for n in lens:
            assert pos[start : start + n].tolist() == [min(x, max_seq_len - 1) for x in range(pos[start].item(), pos[start].item() + n)]
            assert labels[start] == IGNORE  # no sample learns the previous one's successor
            start += n
        body = sum(lens) - (lens[-1] if tokens[-1] == ds.pad_id and labels[-1] == IGNORE else 0)
        assert (labels[body:] == IGNORE).all()  # padding carries no loss
    for i in range(len(once)):  # each unit's first label is ignored; stride overlaps carry -100
        assert once[i]["labels"][0] == IGNORE

    packed = Counter(samples_of(ds))
    expected = Counter()
    n_pairs = ds.stats.sources[0].samples // weights[0]
    for i in range(len(once)):
        sample = (tuple(once[i]["tokens"]), tuple(once[i]["labels"]))
        expected[sample] += weights[0] if i < n_pairs else weights[1]
    pad_samples = {s: c for s, c in packed.items() if set(s[1]) == {IGNORE} and set(s[0]) == {ds.pad_id}}
    for s in pad_samples:
        del packed[s]
    assert packed == expected  # every sample, hence every token, exactly `weight` times; nothing lost
