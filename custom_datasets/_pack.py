"""Packing: samples -> packs of at most max_seq_len tokens, best-fit decreasing."""

from __future__ import annotations

import bisect


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Groups sample indices into bins of total length <= capacity.

    Samples are placed longest first (ties in input order), each into the open bin it fills most
    tightly, so the result depends only on the lengths: the same input gives the same packs.

    Args:
        lengths: length of each sample; each must be <= capacity.
        capacity: the pack size (max_seq_len).

    Returns:
        One list of sample indices per pack, in the order the packs were opened.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Open bins sorted by (room left, bin number); full bins leave the list.
    open_bins: list[tuple[int, int]] = []
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"sample {i} has {size} tokens, more than the pack size {capacity}")
        at = bisect.bisect_left(open_bins, (size, -1))
        if at < len(open_bins):
            room, b = open_bins.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        room -= size
        if room > 0:
            bisect.insort(open_bins, (room, b))
    return bins
