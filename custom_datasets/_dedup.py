"""Duplicates: exact copies (after normalising case, punctuation and whitespace) and near copies (MinHash LSH over
word n-grams), among the training rows and between held-out and training rows.

Rows are looked at in order (sources in config order, rows in file order); the first of a set of copies is the one
kept, each later one is a copy of an earlier kept row. Near copies: the signatures are datasketch's MinHash (its
permutations and formula, computed for a batch of rows at once: tests/custom_datasets/test_dedup.py checks them
against datasketch's own); the LSH bands are the ones datasketch's MinHashLSH chooses for `threshold` (b bands of r
values); two rows sharing a band are candidates, and a candidate counts when the two signatures agree on at least
`threshold` of their NUM_PERM values (the estimated Jaccard similarity of the two rows' n-gram sets). Of several,
the most similar kept row is named (ties: the earliest). The LSH misses some pairs just over the threshold and the
estimate has a standard error of about sqrt(J (1 - J) / NUM_PERM) (0.035 at J = 0.8): test_dedup.py measures both
against brute-force Jaccard.

Memory is flat arrays, no text and no Python object per row: a kept row costs its signature (NUM_PERM x 4 bytes),
its id (8), a band entry per band (a 4-byte band hash and a 4-byte slot: 96 bytes for the default 12 bands) and an
exact-key entry (8 + 8): about 630 bytes (docs/benchmarks.md, `make bench-scale`, measures it at a million rows).
Tables are sorted runs, merged like a binary counter (a lookup searches log2(rows / BATCH) runs). Exact keys are 64
bits of a blake2b digest: two different texts share one with probability about rows^2 / 2^65 (1e-8 at a million
rows); band hashes are 32 bits, and a colliding pair is only an extra candidate the signature check then rejects.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

NUM_PERM = 128
NGRAM = 3  # words per shingle; a row of fewer words is one shingle
TOKEN_NGRAM = 5  # token ids per shingle, for text windows (compared as the tokens they train)
BATCH = 4096  # rows looked up together
LSH_WEIGHTS = (0.2, 0.8)  # (false positive, false negative): bands that miss few pairs; the signature check removes the extra candidates
DEDUP = ("off", "exact", "near")
CHUNK = 1 << 16  # kept rows per signature block (blocks are allocated whole, filled as rows are kept)
_SIG_ROWS = 32  # rows whose shingles are permuted in one array (about 60 shingles x NUM_PERM x 8 bytes a row)
_NON_WORD = re.compile(r"[\W_]+")
_MERSENNE = np.uint64((1 << 61) - 1)  # datasketch's _mersenne_prime and _max_hash
_MAX_HASH = np.uint64((1 << 32) - 1)


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


def _permutations() -> tuple[np.ndarray, np.ndarray]:
    """datasketch's MinHash permutations for NUM_PERM and its default seed (1): (a, b), NUM_PERM uint64 each."""
    gen = np.random.RandomState(1)
    ab = np.array([(gen.randint(1, _MERSENNE, dtype=np.uint64), gen.randint(0, _MERSENNE, dtype=np.uint64))
                   for _ in range(NUM_PERM)], dtype=np.uint64)
    return ab[:, 0].copy(), ab[:, 1].copy()


_PERM_A, _PERM_B = _permutations()


def signatures(shingle_lists: list[list[bytes]]) -> np.ndarray:
    """One MinHash signature a row (rows x NUM_PERM uint32): datasketch's MinHash.bulk(shingle_lists,
    num_perm=NUM_PERM, hashfunc=_hash32) hashvalues, computed for many rows at once in small blocks (they stay in
    cache: about 5 ns a shingle and permutation). A row without shingles gets datasketch's empty signature (every
    value the maximum)."""
    out = np.full((len(shingle_lists), NUM_PERM), _MAX_HASH, dtype=np.uint32)
    a, b = _PERM_A[:, None], _PERM_B[:, None]
    for lo in range(0, len(shingle_lists), _SIG_ROWS):
        part = shingle_lists[lo:lo + _SIG_ROWS]
        sizes = np.fromiter(map(len, part), np.int64, len(part))
        hv = np.fromiter((_hash32(g) for grams in part for g in grams), np.uint64, int(sizes.sum()))
        if not len(hv):
            continue
        x = a * hv  # NUM_PERM x shingles; uint64 wraps as in datasketch
        x += b
        high = x >> np.uint64(61)
        x &= _MERSENNE
        x += high  # x % (2**61 - 1) without a division: at most one subtraction left
        np.subtract(x, _MERSENNE, out=x, where=x >= _MERSENNE)
        have = np.flatnonzero(sizes)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])[have]
        out[lo + have] = np.minimum.reduceat(x.astype(np.uint32), starts, axis=1).T  # & _MAX_HASH, then each row's min
    return out


def lsh_bands(threshold: float) -> tuple[int, int]:
    """(bands, rows a band) that datasketch's MinHashLSH chooses for `threshold`, NUM_PERM and LSH_WEIGHTS."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, weights=LSH_WEIGHTS)
    return lsh.b, lsh.r


class _Runs:
    """A multimap of uint keys to int values, as sorted runs merged like a binary counter: adding n entries costs
    O(n log n) amortised, a lookup searches O(log n) runs; memory is the entries themselves."""

    def __init__(self, key_dtype, value_dtype):
        self.key_dtype, self.value_dtype = key_dtype, value_dtype
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        if not len(keys):
            return
        k, v = keys.astype(self.key_dtype), values.astype(self.value_dtype)
        while self.runs and len(self.runs[-1][0]) <= len(k):
            old_k, old_v = self.runs.pop()
            k, v = np.concatenate([old_k, k]), np.concatenate([old_v, v])  # older entries first: stable sort keeps them first
        order = np.argsort(k, kind="stable")
        self.runs.append((k[order], v[order]))

    def first(self, keys: np.ndarray) -> np.ndarray:
        """The value of each key, -1 where it has none (for keys added once)."""
        out = np.full(len(keys), -1, dtype=np.int64)
        q = keys.astype(self.key_dtype)
        for k, v in self.runs:
            at = np.minimum(np.searchsorted(k, q), len(k) - 1)
            hit = (k[at] == q) & (out < 0)
            out[hit] = v[at[hit]]
        return out

    def matches(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every (position in keys, value) pair whose key matches."""
        q = keys.astype(self.key_dtype)
        found_q, found_v = [], []
        for k, v in self.runs:
            lo, hi = np.searchsorted(k, q, "left"), np.searchsorted(k, q, "right")
            count = hi - lo
            total = int(count.sum())
            if not total:
                continue
            which = np.repeat(np.arange(len(q)), count)
            offset = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
            found_q.append(which)
            found_v.append(v[lo[which] + offset])
        if not found_q:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(found_q), np.concatenate(found_v).astype(np.int64)


@dataclass
class Verdict:
    """What the index found for one row: `copy_of` is the id of the row it copies (None: new), `near` whether the
    copy is near, not exact."""

    copy_of: int | None = None
    near: bool = False


class Index:
    """Kept rows (int ids), by exact key and by MinHash signature. `scan` looks rows up and keeps the new ones."""

    def __init__(self, threshold: float = 0.8, near: bool = True):
        self.threshold, self.near = threshold, near  # near False: exact keys only (no signatures, no LSH)
        self._exact = _Runs(np.uint64, np.int64)  # exact key -> id of the first row with it (kept or a near copy)
        self._n = 0  # kept rows with a signature (slots 0.._n-1)
        self._sigs: list[np.ndarray] = []  # CHUNK x NUM_PERM uint32 blocks, by slot
        self._ids: list[np.ndarray] = []  # CHUNK int64 blocks: slot -> row id
        if near:
            self.bands, self.rows_per_band = lsh_bands(threshold)
            self._band_tables = [_Runs(np.uint32, np.int32) for _ in range(self.bands)]  # band hash -> slot
            self._mix = np.random.RandomState(0).randint(1, 1 << 62, size=self.rows_per_band, dtype=np.int64).astype(np.uint64) | np.uint64(1)

    def _band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """rows x bands: a 32-bit hash of each band's r values (multiply-add with odd constants, folded)."""
        r = self.rows_per_band
        bands = sigs[:, :self.bands * r].astype(np.uint64).reshape(len(sigs), self.bands, r)
        h = (bands * self._mix).sum(axis=2, dtype=np.uint64)
        return ((h >> np.uint64(32)) ^ h).astype(np.uint32)

    def _slot_sigs(self, slots: np.ndarray) -> np.ndarray:
        out = np.empty((len(slots), NUM_PERM), np.uint32)
        block = slots // CHUNK
        for b in np.unique(block):
            at = block == b
            out[at] = self._sigs[b][slots[at] % CHUNK]
        return out

    def _slot_ids(self, slots: np.ndarray) -> np.ndarray:
        out = np.empty(len(slots), np.int64)
        block = slots // CHUNK
        for b in np.unique(block):
            at = block == b
            out[at] = self._ids[b][slots[at] % CHUNK]
        return out

    def _keep(self, sigs: np.ndarray, ids: np.ndarray, band_keys: np.ndarray) -> None:
        slots = np.arange(self._n, self._n + len(ids))
        for j, table in enumerate(self._band_tables):
            table.add(band_keys[:, j], slots)
        done = 0
        while done < len(ids):
            if self._n % CHUNK == 0:
                self._sigs.append(np.empty((CHUNK, NUM_PERM), np.uint32))
                self._ids.append(np.empty(CHUNK, np.int64))
            at, take = self._n % CHUNK, min(CHUNK - self._n % CHUNK, len(ids) - done)
            self._sigs[-1][at:at + take] = sigs[done:done + take]
            self._ids[-1][at:at + take] = ids[done:done + take]
            done, self._n = done + take, self._n + take

    def _stored_best(self, sigs: np.ndarray, band_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row, the kept slot it is most similar to at >= threshold (-1: none) and that similarity."""
        best_slot, best_j = np.full(len(sigs), -1, np.int64), np.full(len(sigs), -1.0)
        if not self._n or not len(sigs):
            return best_slot, best_j
        found = [table.matches(band_keys[:, j]) for j, table in enumerate(self._band_tables)]
        pairs = np.unique(np.concatenate([q << 32 | s for q, s in found]))
        step = 1 << 15  # candidate pairs compared at once
        for lo in range(0, len(pairs), step):
            p = pairs[lo:lo + step]
            q, s = p >> 32, p & 0xFFFFFFFF
            j = (self._slot_sigs(s) == sigs[q]).mean(axis=1)
            ok = j >= self.threshold
            q, s, j = q[ok], s[ok], j[ok]
            order = np.lexsort((s, -j))  # most similar first, then the earliest slot
            q, s, j = q[order], s[order], j[order]
            q, first = np.unique(q, return_index=True)
            better = j[first] > best_j[q]  # pairs come sorted by q, slot: an earlier chunk holds the lower slots
            best_slot[q[better]], best_j[q[better]] = s[first][better], j[first][better]
        return best_slot, best_j

    def lookup(self, batch: list, add: bool):
        """(row_id, Verdict) for each (row_id, exact key, shingles) of a batch, in order; with `add`, keeps the new
        rows (and compares each row with the ones kept before it in the batch)."""
        n = len(batch)
        ids = np.fromiter((item[0] for item in batch), np.int64, n)
        keys = np.fromiter((int.from_bytes(item[1][:8], "little") for item in batch), np.uint64, n)
        copy = self._exact.first(keys)
        if add:  # a repeat of a key seen earlier in the batch copies that row (kept or near, it holds the key)
            first_at: dict[int, int] = {}
            for i, key in enumerate(keys.tolist()):
                if copy[i] < 0:
                    if key in first_at:
                        copy[i] = ids[first_at[key]]
                    else:
                        first_at[key] = i
        fresh = np.flatnonzero(copy < 0)
        near_of = np.full(n, -1, np.int64)  # row id of the near copy's original
        if self.near and len(fresh):
            given = [batch[i][2] for i in fresh]  # shingles, or signatures already made (Pending)
            sigs = np.stack(given) if isinstance(given[0], np.ndarray) else signatures(given)
            band_keys = self._band_keys(sigs)
            best_slot, best_j = self._stored_best(sigs, band_keys)
            kept: list[int] = []  # positions in `fresh` kept in this batch
            buckets = [dict() for _ in range(self.bands)]  # band hash -> positions in `fresh` kept in this batch
            stored = best_slot >= 0
            near_of[fresh[stored]] = self._slot_ids(best_slot[stored]) if stored.any() else []
            for f in range(len(fresh)):
                if add:  # kept rows of this batch: a candidate wins over a stored row only if more similar
                    cands = sorted({c for bucket, h in zip(buckets, band_keys[f].tolist()) for c in bucket.get(h, ())})
                    if cands:
                        j = (sigs[cands] == sigs[f]).mean(axis=1)
                        k = int(np.argmax(j))  # the first of the most similar
                        if j[k] >= self.threshold and j[k] > best_j[f]:
                            near_of[fresh[f]] = ids[fresh[cands[k]]]
                if near_of[fresh[f]] < 0 and add:
                    for bucket, h in zip(buckets, band_keys[f].tolist()):
                        bucket.setdefault(h, []).append(f)
                    kept.append(f)
            if add and kept:
                self._keep(sigs[kept], ids[fresh[kept]], band_keys[kept])
        if add:
            self._exact.add(keys[fresh], ids[fresh])  # kept rows and near copies: a later exact copy names them
        for i in range(n):
            if copy[i] >= 0:
                yield int(ids[i]), Verdict(int(copy[i]), near=False)
            elif near_of[i] >= 0:
                yield int(ids[i]), Verdict(int(near_of[i]), near=True)
            else:
                yield int(ids[i]), Verdict()


class Pending:
    """Rows to compare later (held-out rows, read before the training rows they are compared with), kept as ids,
    exact keys and signatures, not as text or shingles: about 660 bytes a row. `items()` gives them to `scan`."""

    def __init__(self):
        self._blocks: list[tuple[np.ndarray, bytes, np.ndarray]] = []
        self._batch: list = []

    def add(self, row_id: int, key: bytes, shingles: list[bytes]) -> None:
        self._batch.append((row_id, key, shingles))
        if len(self._batch) == BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            ids = np.fromiter((b[0] for b in self._batch), np.int64, len(self._batch))
            keys = b"".join(b[1].ljust(16, b"\0")[:16] for b in self._batch)
            self._blocks.append((ids, keys, signatures([b[2] for b in self._batch])))
            self._batch = []

    def items(self):
        self._flush()
        for ids, keys, sigs in self._blocks:
            for n, row_id in enumerate(ids.tolist()):
                yield row_id, keys[16 * n:16 * n + 16], sigs[n]


def scan(items, index: Index, *, add: bool = True):
    """For (row_id, exact key, shingles) items in order (row ids: ints): yields (row_id, Verdict) of each. With
    `add`, a row that copies no kept row is kept (training rows); without, rows are only compared (held-out rows)."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == BATCH:
            yield from index.lookup(batch, add)
            batch = []
    if batch:
        yield from index.lookup(batch, add)
