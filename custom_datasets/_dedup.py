"""Duplicates: exact copies (after normalising case, punctuation and whitespace) and near copies (MinHash LSH over
word n-grams, datasketch), among the training rows and between held-out and training rows.

Rows are looked at in order (sources in config order, rows in file order); the first of a set of copies is the one
kept, each later one is a copy of an earlier kept row. Near copies: datasketch's MinHashLSH proposes candidates among
the kept rows (its bands are tuned to `threshold`), and a candidate counts when the two signatures agree on at least
`threshold` of their NUM_PERM values (the estimated Jaccard similarity of the two rows' n-gram sets). The LSH misses
some pairs just over the threshold and the estimate has a standard error of about sqrt(J (1 - J) / NUM_PERM) (0.035
at J = 0.8): tests/custom_datasets/test_dedup.py measures both against brute-force Jaccard.

Memory: no text; the kept rows' signatures (NUM_PERM x 4 bytes each, one array a row) and datasketch's band
dictionaries: about 5.4 KB a kept row, measured at a million rows (docs/benchmarks.md, `make bench-scale`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

NUM_PERM = 128
NGRAM = 3  # words per shingle; a row of fewer words is one shingle
TOKEN_NGRAM = 5  # token ids per shingle, for text windows (compared as the tokens they train)
BATCH = 4096  # rows hashed together (datasketch's MinHash.bulk shares one set of permutations)
LSH_WEIGHTS = (0.2, 0.8)  # (false positive, false negative): bands that miss few pairs; the signature check removes the extra candidates
DEDUP = ("off", "exact", "near")
_NON_WORD = re.compile(r"[\W_]+")


def words(text: str) -> list[str]:
    """Case-folded words, punctuation and runs of whitespace removed."""
    return _NON_WORD.sub(" ", text.casefold()).split()


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def text_key(text: str) -> bytes:
    """The exact key of a text: the digest of its normalised words."""
    return _digest(" ".join(words(text)).encode())


def text_item(text: str) -> tuple[bytes, list[bytes]]:
    """(exact key, shingles) of a text: the normalised words' digest and their NGRAM-word n-grams."""
    w = words(text)
    grams = {" ".join(w[i:i + NGRAM]).encode() for i in range(max(1, len(w) - NGRAM + 1))}
    return _digest(" ".join(w).encode()), sorted(grams)


def token_item(tokens: np.ndarray) -> tuple[bytes, list[bytes]]:
    """(exact key, shingles) of a token window: the ids' digest and their TOKEN_NGRAM-id n-grams."""
    t = np.ascontiguousarray(tokens, dtype=np.int32)
    n = min(TOKEN_NGRAM, len(t)) or 1
    grams = {t[i:i + n].tobytes() for i in range(max(1, len(t) - n + 1))}
    return _digest(t.tobytes()), sorted(grams)


def _hash32(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "little")


@dataclass
class Verdict:
    """What the index found for one row: `copy_of` is the kept row it copies (None: new), `near` whether the copy
    is near, not exact."""

    copy_of: object = None
    near: bool = False


@dataclass
class Index:
    """Kept rows, by exact key and by MinHash signature. `check` says whether a row copies one of them;
    `add` keeps a row."""

    threshold: float = 0.8
    near: bool = True  # False: exact keys only (no signatures, no LSH)
    exact: dict = field(default_factory=dict)  # exact key -> kept row's id
    _sigs: list = field(default_factory=list)  # kept rows' signatures, NUM_PERM uint32 each
    _ids: list = field(default_factory=list)

    def __post_init__(self):
        if self.near:
            from datasketch import MinHashLSH

            self._lsh = MinHashLSH(threshold=self.threshold, num_perm=NUM_PERM, weights=LSH_WEIGHTS)

    @staticmethod
    def signatures(shingle_lists: list[list[bytes]]) -> list:
        """One MinHash per row, hashed together with shared permutations."""
        from datasketch import LeanMinHash, MinHash

        return [LeanMinHash(m) for m in MinHash.bulk(shingle_lists, num_perm=NUM_PERM, hashfunc=_hash32)]

    def check(self, key: bytes, sig) -> Verdict:
        if key in self.exact:
            return Verdict(self.exact[key], near=False)
        if not self.near:
            return Verdict()
        values = sig.hashvalues.astype(np.uint32)
        best, best_j = None, -1.0
        for slot in self._lsh.query(sig):
            j = float(np.mean(self._sigs[slot] == values))
            if j >= self.threshold and j > best_j:
                best, best_j = self._ids[slot], j
        return Verdict(best, near=best is not None)

    def add(self, row_id, key: bytes, sig) -> None:
        self.exact.setdefault(key, row_id)
        if self.near:
            slot = len(self._ids)
            self._ids.append(row_id)
            self._sigs.append(sig.hashvalues.astype(np.uint32))
            self._lsh.insert(slot, sig, check_duplication=False)


def scan(items, index: Index, *, add: bool = True):
    """For (row_id, exact key, shingles) items in order: yields (row_id, Verdict) of each. With `add`, a row that
    copies no kept row is kept (training rows); without, rows are only compared (held-out rows)."""
    batch: list = []

    def flush():
        # exact copies first: they need no signature (replicated data costs a digest per row, not a MinHash)
        fresh = [item for item in batch if item[1] not in index.exact] if index.near else []
        sigs = dict(zip((item[0] for item in fresh), Index.signatures([s for _, _, s in fresh]))) if fresh else {}
        for row_id, key, _ in batch:
            sig = sigs.get(row_id)
            verdict = index.check(key, sig)
            if add and verdict.copy_of is None:
                index.add(row_id, key, sig)
            elif add and verdict.near:  # a later exact copy of this row is an exact copy
                index.exact.setdefault(key, row_id)
            yield row_id, verdict
        batch.clear()

    for item in items:
        batch.append(item)
        if len(batch) == BATCH:
            yield from flush()
    if batch:
        yield from flush()
