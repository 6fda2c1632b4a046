"""MinHash signatures and exact keys of rows for the duplicate search (`_dedup`): exact copies (after normalising case, punctuation and whitespace) and near copies (MinHash LSH over
word n-grams), among the training rows and between held-out and training rows.

Rows are looked at in order (sources in config order, rows in file order); the first of a set of copies is the one
kept, each later one is a copy of an earlier kept row. Near copies: each row's shingles (NGRAM-word n-grams of a
pair or chat row, TOKEN_NGRAM-id n-grams of the tokens a text window trains) are hashed to 64 bits, for a batch of
rows at once with no Python call per word or shingle; the signature is one permutation hashing with optimal
densification (`_one_permutation`: one hash a shingle, where datasketch's MinHash computes NUM_PERM), which agrees
between two rows at a value with probability their Jaccard similarity, as NUM_PERM permutations do. The LSH bands
are the ones datasketch's MinHashLSH chooses for `threshold` (b bands of r values); two rows sharing a band are
candidates, and a candidate counts when the two signatures agree on at least `threshold` of their NUM_PERM values
(the estimated Jaccard similarity of the two rows' n-gram sets). Of several, the most similar kept row is named
(ties: the earliest). The LSH misses some pairs just over the threshold and the estimate has a standard error of
about sqrt(J (1 - J) / NUM_PERM) (0.035 at J = 0.8): test_dedup.py measures both against brute-force Jaccard, and
checks the vectorised signatures against their definition written out one shingle at a time.
"""

from __future__ import annotations

import re

import numpy as np

NUM_PERM = 128
NGRAM = 3  # words per shingle; a row of fewer words is one shingle
TOKEN_NGRAM = 5  # token ids per shingle, for text windows (compared as the tokens they train)
LSH_WEIGHTS = (0.2, 0.8)  # (false positive, false negative): bands that miss few pairs; the signature check removes the extra candidates
_NON_WORD = re.compile(r"[\W_]+")
# Bytes of text made words: an ASCII letter or digit case-folded, other ASCII a space; bytes above 127 kept (a
# non-ASCII row is normalised by `words` before, so its bytes above 127 are letters of its words).
_WORD_BYTES = bytes(ord(chr(c).casefold()) if chr(c).isalnum() else 32 for c in range(128)) + bytes(range(128, 256))
_CHUNK = 1 << 20  # bytes of text hashed at once (the power tables are kept up to this size)
_BIN_BITS = NUM_PERM.bit_length() - 1  # a shingle's bin: the top bits of its hash
assert NUM_PERM == 1 << _BIN_BITS
# Fixed 64-bit constants (changing one changes every signature: bump STORE_VERSION): MurmurHash3's finaliser, FNV's
# prime as the polynomial base of a word's bytes (odd, so invertible mod 2^64), and odd ones drawn once from numpy's
# RandomState(7) for the n-gram weights, the densification probes and the token salt.
_FMIX1, _FMIX2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_BASE = np.uint64(0x100000001B3)
_BASE_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_POWERS = (np.ones(1, np.uint64), np.ones(1, np.uint64))
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_GRAM = np.random.RandomState(7).randint(1, 1 << 62, size=8, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
_PROBE_A, _PROBE_B, _TOKEN_SALT = _GRAM[5], _GRAM[6], _GRAM[7]
_EMPTY = np.uint64(0x5BD1E9955BD1E995)  # the hash of a row without words
_KEY_SALT = np.uint64(0x2545F4914F6CDD1D)
_LOW32 = np.uint64(0xFFFFFFFF)
_PROBES: list[np.ndarray] = [np.zeros(0, np.int32)]  # by attempt (1, 2, ...): each bin's probe


def words(text: str) -> list[str]:
    """Case-folded words, punctuation and runs of whitespace removed."""
    return _NON_WORD.sub(" ", text.casefold()).split()


def _fmix(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place on a uint64 array (every input bit moves every output bit)."""
    x ^= x >> np.uint64(33)
    x *= _FMIX1
    x ^= x >> np.uint64(33)
    x *= _FMIX2
    x ^= x >> np.uint64(33)
    return x


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(B^i, B^-i) mod 2^64 for i < n (at least): the polynomial hash's base and its inverse (kept up to _CHUNK)."""
    global _POWERS
    if len(_POWERS[0]) >= n:
        return _POWERS
    m = 1 << max(10, (n - 1).bit_length())
    tables = []
    for base in (_BASE, _BASE_INV):
        p = np.full(m, base, np.uint64)
        p[0] = 1
        tables.append(np.cumprod(p, dtype=np.uint64))  # wraps mod 2^64
    if m <= _CHUNK:
        _POWERS = (tables[0], tables[1])
    return tables[0], tables[1]


def _word_hashes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The words of `data` (normalised bytes: a word is a run of bytes above b" "): (a 64-bit hash of each word,
    where it starts). The hash is the polynomial sum (byte + 1) * B^(len - 1 - i) mod 2^64 over the word's bytes,
    its length mixed in, then _fmix: for every word at once, from one running sum of (byte + 1) * B^-position."""
    b = np.frombuffer(data, np.uint8)
    edge = np.diff((b > 32).view(np.int8), prepend=0, append=0)
    starts, ends = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
    power, inverse = _powers(len(b) + 1)
    total = np.zeros(len(b) + 1, np.uint64)
    np.cumsum((b + np.uint64(1)) * inverse[:len(b)], out=total[1:])
    h = (total[ends] - total[starts]) * power[ends - 1]
    h ^= (ends - starts).astype(np.uint64) * _GOLDEN
    return _fmix(h), starts


def _units_keys(units: np.ndarray, rows: np.ndarray, n_rows: int) -> np.ndarray:
    """The exact key of each row from its units' hashes (words or token ids, in row order): a polynomial over them
    mod 2^64, their count mixed in, then _fmix (64 bits: two different rows share one with probability about
    2^-64, rows^2 / 2^65 over a data set: 3e-8 at a million rows)."""
    counts = np.bincount(rows, minlength=n_rows)
    ends = np.cumsum(counts)
    place = np.arange(len(units)) - (ends - counts)[rows]
    power, _ = _powers(int(counts.max(initial=0)) + 1)
    total = np.zeros(len(units) + 1, np.uint64)
    np.cumsum(units * power[place], out=total[1:])
    keys = total[ends] - total[ends - counts]
    keys ^= counts.astype(np.uint64) * _GOLDEN + _KEY_SALT
    return _fmix(keys)


def _shingles(units: np.ndarray, rows: np.ndarray, n_rows: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of each row's n-grams of units (words or tokens, as 64-bit hashes, in row order): (row of each
    shingle, its 64-bit hash). A row of fewer than n units is one shingle of them all; a row of none, one empty
    shingle. Repeats within a row are kept (a minimum does not see them)."""
    counts = np.bincount(rows, minlength=n_rows)
    first = np.cumsum(counts) - counts
    if len(units) >= n:
        at = np.flatnonzero(rows[n - 1:] == rows[:len(units) - n + 1])  # n-grams inside one row
        g = np.zeros(len(at), np.uint64)
        for k in range(n):
            g += units[at + k] * _GRAM[k]
        long_rows = rows[at]
    else:
        g, long_rows = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    short = np.flatnonzero(counts < n)
    s = np.zeros(len(short), np.uint64)
    for k in range(n - 1):
        has = counts[short] > k
        s[has] += units[first[short][has] + k] * _GRAM[k]
    s[counts[short] == 0] = _EMPTY
    return np.concatenate([long_rows, short]), _fmix(np.concatenate([g, s]))


def _probes(attempt: int) -> np.ndarray:
    """The bin each bin probes at its `attempt`-th try (1, 2, ...): a fixed hash of (bin, attempt), kept."""
    while len(_PROBES) <= attempt:
        bins = np.arange(NUM_PERM, dtype=np.uint64)
        _PROBES.append((_fmix(bins * _PROBE_A + np.full(NUM_PERM, len(_PROBES), np.uint64) * _PROBE_B)
                        >> np.uint64(64 - _BIN_BITS)).astype(np.int32))
    return _PROBES[attempt]


def _one_permutation(rows: np.ndarray, hashes: np.ndarray, n_rows: int) -> np.ndarray:
    """One MinHash signature a row (n_rows x NUM_PERM uint32) by one permutation hashing with optimal densification
    (Li, Owen & Zhang 2012; Shrivastava 2017): a shingle's hash picks one of NUM_PERM bins (its top bits) and gives
    its value (its low 32 bits); a bin holds the least value that falls in it. An empty bin i takes the value of the
    first filled bin among probe(i, 1), probe(i, 2), ... (a fixed sequence of each bin alone, so two rows agree on
    it exactly when their sets do at the bin it reaches). Two rows agree at a bin with probability their Jaccard
    similarity, as with NUM_PERM permutations, at one hash a shingle instead of NUM_PERM."""
    sig = np.full(n_rows * NUM_PERM, np.iinfo(np.uint32).max, np.uint32)
    filled = np.zeros(n_rows * NUM_PERM, bool)
    at = rows * NUM_PERM + (hashes >> np.uint64(64 - _BIN_BITS)).astype(np.int64)
    np.minimum.at(sig, at, (hashes & _LOW32).astype(np.uint32))
    filled[at] = True
    todo = np.flatnonzero(~filled).astype(np.int32)  # row * NUM_PERM + bin of each empty bin
    attempt = 0
    while len(todo):
        attempt += 1
        source = (todo & np.int32(-NUM_PERM)) | _probes(attempt)[todo & np.int32(NUM_PERM - 1)]
        hit = filled[source]
        sig[todo[hit]] = sig[source[hit]]
        todo = todo[~hit]
    return sig.reshape(n_rows, NUM_PERM)


def text_signatures(texts: list[str], near: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(exact key, signature) of each text: a 64-bit hash of its words (case-folded, punctuation and whitespace
    gone: `words`), and the MinHash signature of its NGRAM-word shingles (None without `near`). Rows are hashed
    in groups of about _CHUNK bytes; no Python call per word (ASCII rows: not even a regex)."""
    encoded = [t.encode() if t.isascii() else " ".join(words(t)).encode() for t in texts]
    units, rows, lo = [], [], 0
    while lo < len(encoded):
        hi, size = lo + 1, len(encoded[lo])
        while hi < len(encoded) and size + len(encoded[hi]) < _CHUNK:
            size += len(encoded[hi]) + 1
            hi += 1
        data = b" ".join(encoded[lo:hi]).translate(_WORD_BYTES)
        h, starts = _word_hashes(data)
        offsets = np.cumsum([len(e) + 1 for e in encoded[lo:hi]])
        units.append(h)
        rows.append(lo + np.searchsorted(offsets, starts, "right"))
        lo = hi
    units = np.concatenate(units) if units else np.zeros(0, np.uint64)
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    keys = _units_keys(units, rows, len(texts))
    if not near:
        return keys, None
    return keys, _one_permutation(*_shingles(units, rows, len(texts), NGRAM), len(texts))


def token_signatures(windows: list[np.ndarray], near: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(exact key, signature) of each token window: a 64-bit hash of its ids, and the MinHash signature of its
    TOKEN_NGRAM-id shingles (None without `near`)."""
    lengths = np.fromiter(map(len, windows), np.int64, len(windows))
    ids = np.concatenate(windows) if len(windows) else np.zeros(0, np.int64)
    units = _fmix(ids.astype(np.int64).astype(np.uint64) + _TOKEN_SALT)
    rows = np.repeat(np.arange(len(windows)), lengths)
    keys = _units_keys(units, rows, len(windows))
    if not near:
        return keys, None
    return keys, _one_permutation(*_shingles(units, rows, len(windows), TOKEN_NGRAM), len(windows))


# datasketch's choice for the default threshold (its optimisation takes 0.2 s and its import more: a cold build
# pays neither); test_dedup.py checks it against datasketch's own.
_BANDS = {0.8: (12, 10)}


def lsh_bands(threshold: float) -> tuple[int, int]:
    """(bands, rows a band) that datasketch's MinHashLSH chooses for `threshold`, NUM_PERM and LSH_WEIGHTS."""
    if threshold in _BANDS:
        return _BANDS[threshold]
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, weights=LSH_WEIGHTS)
    return lsh.b, lsh.r
