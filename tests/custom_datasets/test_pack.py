"""Best-fit decreasing, and packs in exactly the format the stock collator expects."""

import random

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import pairs, write_jsonl
from torchtune.data import padded_collate_packed
from torchtune.datasets import PackedDataset

from custom_datasets import mixed_dataset
from custom_datasets._pack import best_fit_decreasing as bfd


def best_fit_decreasing(lengths, capacity) -> list[list[int]]:
    """The packs as lists of sample indices."""
    order, group_off = bfd(lengths, capacity)
    return [order[a:b].tolist() for a, b in zip(group_off[:-1], group_off[1:])]


def next_fit(lengths, capacity):
    bins, room = 0, 0
    for n in lengths:
        if n > room:
            bins, room = bins + 1, capacity
        room -= n
    return bins


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=200), capacity=st.integers(64, 128))
def test_every_sample_lands_in_exactly_one_bin_within_capacity(lengths, capacity):
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert len(bins) <= next_fit(lengths, capacity)
    assert bins == best_fit_decreasing(list(lengths), capacity)  # deterministic


def test_best_fit_beats_next_fit_where_order_is_unlucky():
    lengths = [6, 5, 4, 5, 4, 6] * 10
    assert next_fit(lengths, 10) == 40
    assert len(best_fit_decreasing(lengths, 10)) == 30  # every bin exactly full: 6+4 and 5+5


def test_each_sample_goes_to_the_open_pack_it_fills_most_tightly():
    """Worked by hand, capacity 10, lengths 6 5 4 3 2: 6 opens A (room 4), 5 opens B (room 5), 4 fills A exactly (best
    fit; worst fit would put it in B), 3 goes to B (room 2), 2 fills B. Two packs; worst fit needs three."""
    assert best_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    assert best_fit_decreasing([2, 3, 4, 5, 6], 10) == [[4, 2], [3, 1, 0]]  # longest first, whatever the input order


def test_bfd_fill_on_realistic_lengths():
    rng = random.Random(0)
    lengths = [min(2048, int(rng.lognormvariate(4.2, 0.6))) for _ in range(5000)]
    bins = best_fit_decreasing(lengths, 2048)
    assert len(bins) == -(-sum(lengths) // 2048)  # the fewest bins the token count allows


def test_packs_match_stock_packed_dataset_and_collator(tmp_path, tokenizer):
    """One pack of ours equals what stock PackedDataset makes of the same samples in the same order."""
    path = write_jsonl(tmp_path / "p.jsonl", pairs(5))
    ours = mixed_dataset(tokenizer, sources={"p": {"type": "instruct", "path": str(path)}}, max_seq_len=256)
    assert len(ours) == 1
    unpacked = mixed_dataset(tokenizer, sources={"p": {"type": "instruct", "path": str(path)}}, max_seq_len=256, packed=False)
    order = sorted(range(5), key=lambda i: -len(unpacked[i]["tokens"]))  # BFD places longest first
    stock = PackedDataset([unpacked[i] for i in order], max_seq_len=256, padding_idx=tokenizer.pad_id)
    for key in ("tokens", "labels", "input_pos", "seq_lens"):
        assert torch.equal(ours[0][key], stock[0][key]), key
    batch = padded_collate_packed([ours[0], ours[0]])
    mask = batch["mask"][0]
    lens = ours[0]["seq_lens"].tolist()
    starts = [sum(lens[:k]) for k in range(len(lens))]
    for s, n in zip(starts, lens):  # block-causal: each sample sees only itself
        assert mask[s:s + n, s:s + n].equal(torch.ones(n, n, dtype=torch.bool).tril())
        assert not mask[s:s + n, :s].any()


def test_first_label_of_every_sample_in_a_pack_is_ignored(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(40))
    spec = {"type": "instruct", "path": str(path), "train_on_input": True}  # every other label is set
    ds = mixed_dataset(tokenizer, sources={"p": spec, "t": {"type": "text", "path": str(path), "column": "completion"}}, max_seq_len=128)
    for item in ds:
        lens = item["seq_lens"].tolist()
        starts = [sum(lens[:k]) for k in range(len(lens))]
        assert all(item["labels"][s] == -100 for s in starts)
        assert all(item["input_pos"][s] == 0 for s in starts[:-1])


def _drawn_per_epoch(packs: int, ranks: int, batch: int, accumulation: int) -> list[int]:
    """The oracle: the packs the stock recipes' own sampler and loader hand to the optimizer steps of one epoch,
    across the ranks: torchdata's StatefulDistributedSampler per rank (as both recipes make it), the DataLoader with
    drop_last=True, and only whole accumulations (the recipes step every `accumulation` batches)."""
    from torch.utils.data import DataLoader
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

    drawn = []
    for rank in range(ranks):
        sampler = StatefulDistributedSampler(range(packs), num_replicas=ranks, rank=rank, shuffle=True)
        batches = list(DataLoader(range(packs), batch_size=batch, sampler=sampler, drop_last=True))
        stepped = batches[: len(batches) - len(batches) % accumulation]
        drawn += [int(i) for b in stepped for i in b]
    return drawn


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=120), ranks=st.integers(1, 4),
       batch=st.integers(1, 4), accumulation=st.integers(1, 3))
def test_split_packs_are_each_drawn_once_by_the_stock_sampler(lengths, ranks, batch, accumulation):
    """After split_to_multiple, the stock sampler and loader draw every pack exactly once an epoch and every drawn pack
    reaches a step; the split keeps every sample, once, in its order, and each pack within capacity."""
    from custom_datasets._pack import split_to_multiple

    order, group_off = bfd(lengths, 64)
    seq_lens = np.asarray(lengths)[order]
    split, splits, short = split_to_multiple(group_off, seq_lens, ranks * batch * accumulation)
    assert split[0] == 0 and split[-1] == len(order) and (np.diff(split) > 0).all()  # the same entries, in order
    assert set(group_off.tolist()) <= set(split.tolist()) and splits == len(split) - len(group_off)
    packs = len(split) - 1
    if short:  # only when no pack holds two samples
        assert (np.diff(split) == 1).all() and (packs + short) % (ranks * batch * accumulation) == 0
        return
    assert sorted(_drawn_per_epoch(packs, ranks, batch, accumulation)) == list(range(packs))


def test_the_stock_sampler_repeats_and_drops_packs_of_a_count_that_is_not_a_multiple():
    """Why the split is needed (the oracle above; 2 ranks, batch 2): of 15 packs one is drawn twice (the sampler pads
    the ranks to 8 each); of 13, one is never drawn (drop_last); on one device, batch 4 and 2 accumulations, 16 of 23
    reach a step."""
    drawn = _drawn_per_epoch(15, 2, 2, 1)
    assert len(drawn) == 16 and len(set(drawn)) == 15
    drawn = _drawn_per_epoch(13, 2, 2, 1)
    assert len(drawn) == 12 and len(set(drawn)) == 12
    assert len(_drawn_per_epoch(23, 1, 4, 2)) == 16


def test_a_split_cuts_the_pack_with_most_samples_where_the_halves_are_most_equal():
    from custom_datasets._pack import split_to_multiple

    # packs [5 1 1] [2 2] [7]: 3 packs, multiple 4 -> the first (3 samples) is cut after its 5 (5 | 2 tokens)
    split, splits, short = split_to_multiple(np.array([0, 3, 5, 6]), np.array([5, 1, 1, 2, 2, 7]), 4)
    assert split.tolist() == [0, 1, 3, 5, 6] and (splits, short) == (1, 0)
    # multiple 5: then [1 1] and [2 2] hold 2 samples each; the one with more tokens, [2 2], is cut
    split, _, _ = split_to_multiple(np.array([0, 3, 5, 6]), np.array([5, 1, 1, 2, 2, 7]), 5)
    assert split.tolist() == [0, 1, 3, 4, 5, 6]
    # one sample a pack: nothing to split; the count still lacks 1
    assert split_to_multiple(np.array([0, 1, 2, 3]), np.array([4, 4, 4]), 2)[1:] == (0, 1)
