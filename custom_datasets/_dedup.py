"""Duplicates: the kept rows' tables, and the search of a batch of rows among them (exact keys and MinHash LSH
bands of `_minhash` signatures); the first of a set of copies is the one kept.

Memory is flat arrays, no text and no Python object per row: a kept row costs its signature (NUM_PERM x 4 bytes),
its id (8), a band entry per band (a 4-byte band hash and a 4-byte slot: 96 bytes for the default 12 bands) and an
exact-key entry (8 + 8): about 630 bytes (docs/benchmarks.md, `make bench-scale`, measures it at a million rows).
Tables are sorted runs, merged like a binary counter (a lookup searches log2(rows / BATCH) runs). Exact keys are 64
bits (a polynomial over the words' 64-bit hashes, `_units_keys`): two different texts share one with probability
about rows^2 / 2^65 (3e-8 at a million rows); band hashes are 32 bits, and a colliding pair is only an extra
candidate the signature check then rejects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from custom_datasets._minhash import NUM_PERM, lsh_bands, text_signatures, token_signatures

BATCH = 4096  # rows looked up together
DEDUP = ("off", "exact", "near")
CHUNK = 1 << 16  # kept rows per signature block (blocks are allocated whole, filled as rows are kept)


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

    @staticmethod
    def _groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One band's keys in a batch: (rows in key order, earlier first; the sorted keys; for each row, whether an
        earlier row has its key)."""
        order = np.argsort(keys, kind="stable")
        ordered = keys[order]
        later = np.zeros(len(keys), bool)
        later[order[1:][ordered[1:] == ordered[:-1]]] = True
        return order, ordered, later

    @staticmethod
    def _earlier(groups: list, row_keys: np.ndarray, f: int, kept: np.ndarray) -> list[int]:
        """The kept rows of the batch before row f that share a band with it, in order."""
        cands: set[int] = set()
        for (order, ordered, _), h in zip(groups, row_keys.tolist()):
            members = order[np.searchsorted(ordered, h, "left"):np.searchsorted(ordered, h, "right")]
            cands.update(members[members < f].tolist())
        return [c for c in sorted(cands) if kept[c]]

    def lookup(self, ids: np.ndarray, keys: np.ndarray, sigs: np.ndarray | None, add: bool):
        """(row_id, Verdict) for each row of a batch (ids, exact keys, signatures), in order; with `add`, keeps the
        new rows (and compares each row with the ones kept before it in the batch)."""
        n = len(ids)
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
            sigs = sigs[fresh]
            band_keys = self._band_keys(sigs)
            best_slot, best_j = self._stored_best(sigs, band_keys)
            stored = best_slot >= 0
            near_of[fresh[stored]] = self._slot_ids(best_slot[stored]) if stored.any() else []
            kept = ~stored  # positions in `fresh` kept in this batch (so far)
            if add:  # a row of the batch that shares a band with an earlier one: compared with the kept ones of those
                groups = [self._groups(band_keys[:, j]) for j in range(self.bands)]
                for f in np.flatnonzero(np.any([g[2] for g in groups], axis=0)).tolist():
                    cands = self._earlier(groups, band_keys[f], f, kept)
                    if cands:
                        j = (sigs[cands] == sigs[f]).mean(axis=1)
                        k = int(np.argmax(j))  # the first of the most similar
                        if j[k] >= self.threshold and j[k] > best_j[f]:
                            near_of[fresh[f]] = ids[fresh[cands[k]]]
                            kept[f] = False
                kept = np.flatnonzero(kept)
                if len(kept):
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
    exact keys and signatures, not as text: about 660 bytes a row. `verdicts(index)` compares them."""

    def __init__(self):
        self._blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._batch: list = []

    def add(self, row_id: int, text: str) -> None:
        self._batch.append((row_id, text))
        if len(self._batch) == BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            ids = np.fromiter((b[0] for b in self._batch), np.int64, len(self._batch))
            self._blocks.append((ids, *text_signatures([b[1] for b in self._batch])))
            self._batch = []

    def verdicts(self, index: Index):
        """(row_id, Verdict) of each row against the index's kept rows (none are added)."""
        self._flush()
        for ids, keys, sigs in self._blocks:
            yield from index.lookup(ids, keys, sigs if index.near else None, add=False)


def scan(items, index: Index, *, add: bool = True, tokens: bool = False):
    """For (row_id, text) items in order (row ids: ints; with `tokens`, (row_id, token ids)): yields (row_id,
    Verdict) of each. With `add`, a row that copies no kept row is kept (training rows); without, rows are only
    compared (held-out rows)."""
    sign = token_signatures if tokens else text_signatures

    def look(batch):
        ids = np.fromiter((b[0] for b in batch), np.int64, len(batch))
        return index.lookup(ids, *sign([b[1] for b in batch], index.near), add)

    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == BATCH:
            yield from look(batch)
            batch = []
    if batch:
        yield from look(batch)
