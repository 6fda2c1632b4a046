"""Packing: samples -> packs of at most max_seq_len tokens, best-fit decreasing."""

from __future__ import annotations

import bisect

import numpy as np
from tqdm import tqdm

BATCH = 1 << 16  # samples turned into Python ints at a time (a million at once would cost ~60 MB)


def best_fit_decreasing(lengths, capacity: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Groups samples into packs of total length <= capacity.

    Samples are placed longest first (ties in input order), each into the open pack it fills most
    tightly, so the result depends only on the lengths: the same input gives the same packs.

    Args:
        lengths: length of each sample (a sequence or array); each must be <= capacity.
        capacity: the pack size (max_seq_len).
        progress: show a progress bar.

    Returns:
        (order, group_off): sample indices in pack order, and int64 offsets into it: pack p holds
        samples order[group_off[p]:group_off[p + 1]], longest first, packs in the order they opened.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    too_long = np.flatnonzero(lengths > capacity)
    if len(too_long):
        i = int(too_long[0])
        raise ValueError(f"sample {i} has {lengths[i]} tokens, more than the pack size {capacity}")
    by_size = np.argsort(-lengths, kind="stable")
    pack_of = np.empty(len(lengths), np.int32)
    packs = 0
    # Open packs sorted by (room left, pack number); full packs leave the list.
    open_packs: list[tuple[int, int]] = []
    for start in tqdm(range(0, len(by_size), BATCH), desc="Packing", unit=" batches", disable=not progress, leave=False):
        ids = by_size[start : start + BATCH]
        placed = []
        for size in lengths[ids].tolist():
            at = bisect.bisect_left(open_packs, (size, -1))
            if at < len(open_packs):
                room, p = open_packs.pop(at)
            else:
                room, p = capacity, packs
                packs += 1
            placed.append(p)
            room -= size
            if room > 0:
                bisect.insort(open_packs, (room, p))
        pack_of[ids] = placed
    order = by_size[np.argsort(pack_of[by_size], kind="stable")]
    group_off = np.concatenate([[0], np.cumsum(np.bincount(pack_of, minlength=packs))]).astype(np.int64)
    return order, group_off


def split_to_multiple(group_off: np.ndarray, seq_lens: np.ndarray, multiple: int) -> tuple[np.ndarray, int, int]:
    """More packs, by splitting some at a sample boundary, until their number is a multiple of `multiple`.

    The stock recipes' samplers deal out packs to ranks and batches: a count that is not a multiple of
    ranks x batch_size x gradient_accumulation_steps makes DistributedSampler repeat packs to even out the
    ranks, the DataLoader drop the last short batch, and the last short accumulation add gradients that no
    step of the epoch applies. Splitting keeps every sample, once: the pack with the most samples (the
    longest first among equals) is cut where its two halves hold the most equal tokens, again until the count
    is a multiple or no pack holds two samples.

    Returns:
        (group_off, splits, short): the new offsets (pack p holds entries group_off[p]:group_off[p + 1],
        the two halves of a split pack next to each other), the packs split, and how many packs the count
        still lacks (0 unless every pack holds one sample).
    """
    group_off = np.asarray(group_off, dtype=np.int64)
    need = (-(len(group_off) - 1)) % max(int(multiple), 1)
    splits = 0
    while need:
        counts = np.diff(group_off)
        if not len(counts) or counts.max() < 2:
            break
        first_most = np.flatnonzero(counts == counts.max())
        tokens = np.add.reduceat(seq_lens.astype(np.int64), group_off[:-1])
        p = int(first_most[np.argmax(tokens[first_most])])
        a, b = int(group_off[p]), int(group_off[p + 1])
        left = np.cumsum(seq_lens[a:b].astype(np.int64))[:-1]  # tokens before each inner boundary
        cut = a + 1 + int(np.argmin(np.abs(2 * left - int(left[-1] + seq_lens[b - 1]))))
        group_off = np.insert(group_off, p + 1, cut)
        splits, need = splits + 1, need - 1
    return group_off, splits, need
