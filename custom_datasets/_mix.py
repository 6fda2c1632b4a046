"""Mixing: the held-out split and per-source weights, both deterministic by seed and source name."""

from __future__ import annotations

import math
import random
from typing import TypeVar

T = TypeVar("T")


def _rng(seed: int, name: str, purpose: str) -> random.Random:
    # A string seed is hashed with SHA-512, so this is stable across processes and machines.
    return random.Random(f"{seed}/{name}/{purpose}")


def held_out_count(n: int, val_fraction: float, val_size: int | None) -> int:
    """How many of n units a source holds out; at least one unit stays for training."""
    want = val_size if val_size is not None else math.ceil(n * val_fraction)
    return min(want, max(n - 1, 0))


def split_held_out(items: list[T], count: int, seed: int, name: str) -> tuple[list[T], list[T]]:
    """Returns (train, held_out), each in the original order; `count` items are held out."""
    chosen = set(_rng(seed, name, "held_out").sample(range(len(items)), count))
    train = [x for i, x in enumerate(items) if i not in chosen]
    held = [x for i, x in enumerate(items) if i in chosen]
    return train, held


def apply_weight(items: list[T], weight: float, seed: int, name: str) -> list[T]:
    """`weight` 2 repeats every item twice; 0.25 keeps a deterministic quarter; 1.5 = all + a half."""
    whole = math.floor(weight)
    part = round((weight - whole) * len(items))
    picked = sorted(_rng(seed, name, "weight").sample(range(len(items)), part))
    return items * whole + [items[i] for i in picked]
