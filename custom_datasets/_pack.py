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
