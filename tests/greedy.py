"""Comparing greedy generations across engines, batch shapes or kernels without depending on a near tie.

Two correct engines can part where the model's top two next tokens are within float noise of each other: a
different batch composition, attention kernel or summation order flips the arg max, and from there the texts
differ. So two greedy answers agree when they are equal, or when, at the first token where they part, the
reference's own logits (an engine the caller names, fed the prompt and the common prefix) put the two tokens
within MARGIN of each other. A real bug (a wrong cache, mask or prompt) moves logits by far more than that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

MARGIN = 0.05  # logits (nats); the near ties measured here were 0.005 apart, kernel noise in f32 ~1e-3


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where the two token lists differ (one ending counts as a difference); None if equal."""
    if list(a) == list(b):
        return None
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tie_gap(ours: Sequence[int], theirs: Sequence[int], next_logits: Callable[[list[int]], Sequence[float]],
            end: int) -> float:
    """0 when equal; else |logit(our token) - logit(their token)| under the reference at the first difference,
    `next_logits(prefix)` giving the reference's logits after the prompt + `prefix` (the common part); a list
    that has ended there stands for `end` (the end-of-sequence token)."""
    k = first_difference(ours, theirs)
    if k is None:
        return 0.0
    logits = next_logits(list(ours[:k]))
    pick = [seq[k] if k < len(seq) else end for seq in (ours, theirs)]
    return abs(float(logits[pick[0]]) - float(logits[pick[1]]))


def assert_agree(ours: Sequence[int], theirs: Sequence[int], next_logits: Callable[[list[int]], Sequence[float]],
                 end: int, what: object = "") -> None:
    """Equal, or parted only at a near tie of the reference (see the module's docstring)."""
    gap = tie_gap(ours, theirs, next_logits, end)
    assert gap < MARGIN, (f"greedy answers part at token {first_difference(ours, theirs)} where the reference's logits "
                          f"differ by {gap:.4f} (>= {MARGIN}: not a near tie)", what, list(ours), list(theirs))


def text_tie_gap(text: bytes, oracle: Sequence[int], piece: Callable[[int], bytes], by_piece: dict[bytes, list[int]],
                 rows: Sequence[Sequence[float]], ends: set[int]) -> float:
    """For an engine that returns text, not tokens: 0 when `text` is the oracle's greedy text (or the start of it:
    a smaller max_tokens); else how near a tie the oracle had to be for an engine to have written `text`.

    `oracle` is the reference's own greedy token ids, `rows[k]` its logits before oracle[k] (one row more than
    tokens: after the last). At each position k up to where the texts part, the tokens other than oracle[k]
    whose bytes begin `text` there (an end token where `text` ends there) are the engine's possible other
    choices; the gap is the oracle's logit there minus the best of theirs, the smallest over those positions.
    Tokens, not text, part first: two token sequences can spell the same bytes for a while."""
    pieces = [piece(t) for t in oracle]
    full = b"".join(pieces)
    if full.startswith(text):
        return 0.0
    c = next((i for i, (x, y) in enumerate(zip(text, full)) if x != y), min(len(text), len(full)))
    best, start = float("inf"), 0
    for k in range(len(oracle) + 1):
        row = rows[k]
        chosen = oracle[k] if k < len(oracle) else max(range(len(row)), key=lambda t: row[t])
        rest = text[start:]
        others = set(ends) if not rest else {t for n in range(1, min(len(rest), 64) + 1)
                                            for t in by_piece.get(rest[:n], ())}
        others.discard(chosen)
        if others:
            best = min(best, float(row[chosen]) - max(float(row[t]) for t in others))
        if k == len(oracle) or start + len(pieces[k]) > c:
            break
        start += len(pieces[k])
    return best
