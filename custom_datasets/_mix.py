"""Mixing: the held-out split and per-source weights, both deterministic by seed and source name."""

from __future__ import annotations

import math
import random

import numpy as np


def _rng(seed: int, name: str, purpose: str) -> random.Random:
    # A string seed is hashed with SHA-512, so this is stable across processes and machines.
    return random.Random(f"{seed}/{name}/{purpose}")


def held_out_count(n: int, val_fraction: float, val_size: int | None) -> int:
    """How many of n units a source holds out; at least one unit stays for training."""
    want = val_size if val_size is not None else math.ceil(n * val_fraction)
    return min(want, max(n - 1, 0))


def held_out_ids(n: int, count: int, seed: int, name: str) -> np.ndarray:
    """Which `count` of the units 0..n-1 a source holds out, sorted."""
    return np.sort(np.fromiter(_rng(seed, name, "held_out").sample(range(n), count), np.int64, count))


def apply_weight(ids: np.ndarray, weight: float, seed: int, name: str) -> np.ndarray:
    """`weight` 2 repeats every id twice; 0.25 keeps a deterministic quarter; 1.5 = all + a half."""
    whole = math.floor(weight)
    part = round((weight - whole) * len(ids))
    picked = np.sort(np.fromiter(_rng(seed, name, "weight").sample(range(len(ids)), part), np.int64, part))
    return np.concatenate([np.tile(ids, whole), ids[picked]]).astype(np.int64)
