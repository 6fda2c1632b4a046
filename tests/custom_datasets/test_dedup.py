"""Duplicates: the MinHash LSH against brute-force Jaccard, exact counts on literal fixtures, the options'
removals, and the held-out rows that have a copy in training."""

import json
import random
import re

import numpy as np
import pytest
from support import write_jsonl

from custom_datasets import _dedup, _minhash, mixed_dataset
from custom_datasets._dedup import Index, scan
from custom_datasets._spec import DatasetError


def oracle_grams(text: str) -> set[str]:
    """The definition, written out: case-folded words (letters and digits), consecutive word 3-grams."""
    w = re.findall(r"[^\W_]+", text.lower())
    return {" ".join(w[i:i + 3]) for i in range(max(1, len(w) - 2))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def variants(n_bases: int = 150, seed: int = 0) -> list[str]:
    """Bases of 200 random words, each followed by a copy with 0..20 words replaced (3-gram Jaccard 1 down to ~0.5)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20000)]
    rows = []
    for _ in range(n_bases):
        base = [rng.choice(vocab) for _ in range(200)]
        v = list(base)
        for i in rng.sample(range(200), rng.randrange(0, 16)):
            v[i] = rng.choice(vocab)
        rows += [" ".join(base), " ".join(v)]
    return rows


@pytest.mark.parametrize("batch", [4096, 7])  # one batch (rows compared within it); many, copies far apart (the kept tables)
def test_lsh_finds_the_near_copies_brute_force_jaccard_finds(batch, monkeypatch):
    """Brute force over every pair of 300 rows against the index's verdicts (threshold 0.8): each row is compared
    with the rows kept before it. Every pair at J >= 0.9 is found, none below 0.7; in between the estimate decides
    (standard error 0.035 at 0.8, as _minhash.py documents). Measured here, found/rows per band of the true J, both
    batch sizes: 0.7-0.75: 0/21, 0.75-0.8: 2/22, 0.8-0.85: 16/22, 0.85-0.9: 20/20, >= 0.9: 35/35 (with datasketch's
    MinHash until 2026-12-05: 0/21, 8/22, 12/22, 19/20, 35/35)."""
    monkeypatch.setattr(_dedup, "BATCH", batch)
    rows = variants()
    if batch < len(rows):
        random.Random(2).shuffle(rows)
    grams = [oracle_grams(r) for r in rows]
    index = Index(threshold=0.8)
    verdicts = dict(scan(enumerate(rows), index))
    kept = [i for i, v in verdicts.items() if v.copy_of is None]
    found: dict[str, list[bool]] = {"below 0.7": [], "0.85-0.9": [], "at least 0.9": []}
    for i, v in verdicts.items():
        best = max((jaccard(grams[i], grams[k]) for k in kept if k < i), default=0.0)
        band = "below 0.7" if best < 0.7 else "0.85-0.9" if 0.85 <= best < 0.9 else "at least 0.9" if best >= 0.9 else None
        if band:
            found[band].append(v.copy_of is not None)
        if v.copy_of is not None:  # what it names is a real copy, and one kept before it
            assert v.copy_of in kept and v.copy_of < i and jaccard(grams[i], grams[v.copy_of]) >= 0.7
    assert len(found["at least 0.9"]) > 25 and all(found["at least 0.9"])
    assert len(found["below 0.7"]) > 150 and not any(found["below 0.7"])
    assert len(found["0.85-0.9"]) > 10 and sum(found["0.85-0.9"]) >= 0.85 * len(found["0.85-0.9"])


@pytest.mark.parametrize("batch", [4096, 1])
def test_exact_copies_ignore_case_punctuation_and_whitespace(batch, monkeypatch):
    monkeypatch.setattr(_dedup, "BATCH", batch)
    index = Index(threshold=0.8, near=False)
    rows = ["Hello, World!  How are you?", "hello world how are you", "HELLO\tWORLD... how ARE you", "hello world how are we"]
    verdicts = dict(scan(enumerate(rows), index))
    assert [v.copy_of for v in verdicts.values()] == [None, 0, 0, None]


M64 = (1 << 64) - 1


def _fmix(h: int) -> int:
    for mul in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, None):
        h ^= h >> 33
        h = h * mul & M64 if mul else h
    return h


def reference_signature(units: list[int], n: int) -> list[int]:
    """The signature's definition, one shingle and one bin at a time in plain Python integers: n-grams of the
    units' 64-bit hashes (a short row: one gram of them all; none: the empty gram), one permutation hashing into
    NUM_PERM bins (top bits: the bin, low 32 bits: the value, the least kept), each empty bin filled from the first
    filled bin its probe sequence reaches."""
    k, bits = _minhash.NUM_PERM, _minhash.NUM_PERM.bit_length() - 1
    weights = [int(w) for w in _minhash._GRAM]
    grams = [units[i:i + n] for i in range(len(units) - n + 1)] or [units]
    hashes = [_fmix(sum(u * w for u, w in zip(g, weights)) & M64) if g else _fmix(int(_minhash._EMPTY)) for g in grams]
    bins: dict[int, int] = {}
    for h in hashes:
        b, v = h >> (64 - bits), h & 0xFFFFFFFF
        bins[b] = min(v, bins.get(b, v))
    sig = []
    for i in range(k):
        attempt = 0
        j = i
        while j not in bins:
            attempt += 1
            j = _fmix((i * int(_minhash._PROBE_A) + attempt * int(_minhash._PROBE_B)) & M64) >> (64 - bits)
        sig.append(bins[j])
    return sig


def word_hash(word: str) -> int:
    """A word's 64-bit hash by its definition: the polynomial over its UTF-8 bytes (+1), its length mixed in."""
    h = 0
    for c in word.encode():
        h = (h * int(_minhash._BASE) + c + 1) & M64
    return _fmix(h ^ (len(word.encode()) * int(_minhash._GOLDEN) & M64))


def test_signatures_are_their_definition_for_words_and_tokens():
    """The batched, vectorised signatures against the definition written out one shingle at a time (oracle_grams'
    words: case-folded, punctuation gone), for rows of 0 to 80 words, non-ASCII ones included, and token windows of
    0 to 40 ids. A row's place in the batch changes nothing."""
    rng = random.Random(1)
    pool = [f"w{i}" for i in range(300)] + ["Ünïcödé", "日本語", "naïve", "don't", "x_y", "ÉTÉ", "ǅungla"]
    texts = [" ".join(rng.choice(pool) for _ in range(rng.randrange(81))) + rng.choice(["", "!", " ...", "\t\n"])
             for _ in range(200)] + ["", "?!", "one", "two words"]
    _, sigs = _minhash.text_signatures(texts)
    for text, sig in zip(texts, sigs):
        units = [word_hash(w) for w in re.findall(r"[^\W_]+", text.casefold())]
        assert sig.tolist() == reference_signature(units, 3), text
    _, alone = _minhash.text_signatures(texts[7:8])
    assert (alone[0] == sigs[7]).all()
    windows = [np.array([rng.randrange(128000) for _ in range(rng.randrange(41))], np.int64) for _ in range(100)]
    _, sigs = _minhash.token_signatures(windows)
    for ids, sig in zip(windows, sigs):
        units = [_fmix((t + int(_minhash._TOKEN_SALT)) & M64) for t in ids.tolist()]
        assert sig.tolist() == reference_signature(units, 5)


def test_two_rows_agree_at_a_bin_as_often_as_their_jaccard_similarity():
    """The estimator is unbiased: over 400 pairs of rows with true 3-gram Jaccard from 0.2 to 1 (brute force), the
    mean of (share of equal values - J) is within 0.01 and no pair is off by more than 0.2 (128 values: standard
    error about 0.044 at J = 0.5)."""
    rng = random.Random(3)
    vocab = [f"v{i}" for i in range(5000)]
    errors = []
    for _ in range(400):
        base = [rng.choice(vocab) for _ in range(rng.randrange(20, 200))]
        other = list(base)
        for i in rng.sample(range(len(base)), rng.randrange(0, len(base) // 4 + 1)):
            other[i] = rng.choice(vocab)
        a, b = " ".join(base), " ".join(other)
        _, sigs = _minhash.text_signatures([a, b])
        errors.append(float((sigs[0] == sigs[1]).mean()) - jaccard(oracle_grams(a), oracle_grams(b)))
    assert abs(np.mean(errors)) < 0.01 and max(map(abs, errors)) < 0.2


def _pairs(tmp_path, rows, name="pairs.jsonl"):
    return str(write_jsonl(tmp_path / name, [{"prompt": p, "completion": c} for p, c in rows]))


UNIQUE = [(f"Describe animal number {i} in the zoo.", f"Animal {i} is a {['cat', 'dog', 'yak', 'emu'][i % 4]} "
           f"that eats {i * 7} grams of food {['daily', 'weekly'][i % 2]} and sleeps {i % 9} hours.") for i in range(30)]
COPIES = [(UNIQUE[3][0].upper().rstrip("."), UNIQUE[3][1].lower().replace(",", "")),  # case, punctuation
          (UNIQUE[4][0], UNIQUE[4][1].replace(" ", "   ") + "!"),  # whitespace, punctuation
          (UNIQUE[5][0], "Something else entirely, written fresh for this row.")]  # the prompt alone repeats
NEAR = [(UNIQUE[7][0], UNIQUE[7][1] + " Truly.")]  # one word more at the end: 3-gram Jaccard 21/22


@pytest.mark.parametrize("mode, removed", [("off", 0), ("exact", 2), ("near", 3)])
def test_the_data_table_counts_literal_copies_and_the_option_removes_them(tmp_path, tokenizer, mode, removed):
    """30 distinct pairs + 2 exact copies (case/punctuation) + 1 near copy (one word more at the end)
    + 1 row whose prompt alone repeats (4 repeated prompts in all); a second source repeats one pair: a copy across sources."""
    other = _pairs(tmp_path, [UNIQUE[10], ("A question of its own?", "An answer of its own.")], "other.jsonl")
    ds = mixed_dataset(tokenizer, packed=False, dedup=mode, sources={
        "pairs": {"type": "instruct", "path": _pairs(tmp_path, UNIQUE + COPIES + NEAR)},
        "other": {"type": "instruct", "path": other}})
    pairs, second = ds.stats.sources
    assert (pairs.exact_duplicates, pairs.near_duplicates, pairs.prompt_repeats) == (2, 1, 4)  # the near copy repeats its prompt too
    assert (second.exact_duplicates, second.near_duplicates, second.duplicates_across) == (1, 0, 1)
    assert pairs.samples == 34 - removed and second.samples == 2 - (mode != "off")
    assert pairs.deduplicated == removed
    table = ds.stats.table()
    assert "pairs: 2 exact and 1 near copies of earlier training row(s)" in table
    assert ("removed (dedup: " + mode) in table if removed else "kept (dedup: off" in table
    assert "4 prompt(s) repeat an earlier row's prompt" in table


def test_text_windows_are_compared_by_the_tokens_they_train(tmp_path, tokenizer):
    (tmp_path / "text").mkdir()
    para = " ".join(f"token{i}" for i in range(400))
    (tmp_path / "text" / "a.txt").write_text(para)
    (tmp_path / "text" / "b.txt").write_text(para)  # the same document again: every window is an exact copy
    src = {"text": {"type": "text", "path": str(tmp_path / "text")}}
    off = mixed_dataset(tokenizer, packed=False, sources=src, max_seq_len=128)
    (s,) = off.stats.sources
    assert s.windows % 2 == 0 and s.exact_duplicates == s.windows // 2 and s.samples == s.windows
    exact = mixed_dataset(tokenizer, packed=False, sources=src, max_seq_len=128, dedup="exact")
    assert exact.stats.sources[0].samples == s.windows // 2


def test_held_out_rows_with_a_copy_in_training_are_counted_and_with_the_option_not_evaluated(tmp_path, tokenizer):
    """Every pair twice (the second in capitals): a held-out row is seen exactly when its twin is trained.
    The oracle reads which rows the split held out (their file lines) and pairs them with their twins."""
    rows = [r for p, c in UNIQUE for r in ((p, c), (p.upper(), c.upper()))]
    path = _pairs(tmp_path, rows)
    src = {"pairs": {"type": "instruct", "path": path, "val_fraction": 0.3}}
    counted = mixed_dataset(tokenizer, packed=False, sources=src, held_out_dir=str(tmp_path / "a"))
    held_lines = [int(json.loads(line)["where"].rsplit(":", 1)[1]) for line in (tmp_path / "a" / "pairs.jsonl").open()]
    twin = lambda line: line + 1 if line % 2 else line - 1  # noqa: E731  (lines count from 1: 1-2, 3-4, ...)
    seen = [line for line in held_lines if twin(line) not in held_lines]
    (s,) = counted.stats.sources
    assert s.held_out == len(held_lines) == 18 and s.held_out_seen == len(seen) > 0
    assert "have a copy in training: evaluated" in counted.stats.table()

    mixed_dataset(tokenizer, packed=False, sources=src, held_out_dir=str(tmp_path / "b"), held_out_dedup=True)
    clean = [int(json.loads(line)["where"].rsplit(":", 1)[1]) for line in (tmp_path / "b" / "pairs.jsonl").open()]
    apart = [int(json.loads(line)["where"].rsplit(":", 1)[1]) for line in (tmp_path / "b" / "pairs.seen.jsonl").open()]
    assert sorted(apart) == sorted(seen) and sorted(clean) == sorted(set(held_lines) - set(seen))

    from tuned.heldout import read_held_out  # what make eval reads: the clean rows only
    assert len(read_held_out(tmp_path / "b", ["pairs"])["pairs"]) == len(clean)


@pytest.mark.parametrize("kwargs, message", [({"dedup": "nearr"}, "dataset.dedup: unknown value 'nearr'"),
                                             ({"dedup_threshold": 1.5}, "dataset.dedup_threshold: 1.5"),
                                             ({"held_out_dedup": "yes"}, "dataset.held_out_dedup: 'yes'")])
def test_bad_options_name_the_key(tmp_path, tokenizer, kwargs, message):
    with pytest.raises(DatasetError, match=re.escape(message)):
        mixed_dataset(tokenizer, sources={"pairs": {"type": "instruct", "path": _pairs(tmp_path, UNIQUE)}}, **kwargs)


def test_the_bands_kept_for_the_default_threshold_are_datasketchs_choice():
    from datasketch import MinHashLSH

    for threshold, (b, r) in _minhash._BANDS.items():
        lsh = MinHashLSH(threshold=threshold, num_perm=_minhash.NUM_PERM, weights=_minhash.LSH_WEIGHTS)
        assert (lsh.b, lsh.r) == (b, r)


def test_the_count_beside_the_build_hands_back_its_result_its_error_or_its_death():
    """The duplicate count runs in a forked process beside the tokenizer when nothing is removed: its result comes
    back, its error is raised here, and a process that dies without a word is an error, not a count of zero."""
    import os

    from custom_datasets._duplicates import _Beside

    assert _Beside(lambda a, b: a + b, 2, 3).result() == 5

    def bad():
        raise DatasetError(["dataset.sources.pairs: changed while it was read"])

    with pytest.raises(DatasetError, match="changed while"):
        _Beside(bad).result()
    with pytest.raises(RuntimeError, match="exit code 3"):
        _Beside(os._exit, 3).result()
