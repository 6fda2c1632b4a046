"""The builder: instruct pairs, raw text and conversations -> one packed, loss-masked token stream.

`mixed_dataset` (what a config's `dataset._component_` names): the options checked, the packs built (_build) or
loaded from the store (_store) under the ranks' protocol, aligned to whole optimizer steps and shuffled; `MixedDataset`
serves them as torchtune's packed format."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE
from torchtune.modules.transforms.tokenizers import ModelTokenizer
from torchtune.utils import get_logger

from custom_datasets import _store as store
from custom_datasets._build import _build
from custom_datasets._duplicates import Dups, _dedup_problems
from custom_datasets._held_out import _need_held_out_dir
from custom_datasets._pack import split_to_multiple
from custom_datasets._spec import BAD_ROWS, DatasetError, did_you_mean, parse_sources, print_dataset_errors_plainly
from custom_datasets._stats import DataStats
from custom_datasets._store import Packs, fingerprint, input_files

log = get_logger("INFO")


class MixedDataset(Dataset):
    """Packs served from flat int32 arrays (memory-mapped when they come from the cache), each item
    built as torchtune expects it.

    Packed items follow torchtune's `PackedDataset` format exactly (`tokens`, `labels`, `input_pos`,
    `seq_lens`, padded to max_seq_len, padding as its own last sequence), so the stock
    `padded_collate_packed` builds the block-causal mask. Unpacked items are `tokens`/`labels` lists
    for `padded_collate_sft`.
    """

    def __init__(self, packs: Packs, *, max_seq_len: int, pad_id: int, packed: bool, stats: DataStats,
                 order: np.ndarray | None = None):
        self.packed = packed
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        self.stats = stats
        self._packs = packs
        self._order = order  # item i is pack order[i] (None: pack i)

    def __len__(self) -> int:
        return len(self._packs.group_off) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self._packs
        if self._order is not None:
            index = int(self._order[index])
        first, last = int(p.group_off[index]), int(p.group_off[index + 1])
        spans = [(int(s), int(s) + int(n)) for s, n in zip(p.seq_start[first:last], p.seq_lens[first:last])]
        tokens = torch.from_numpy(np.concatenate([p.tokens[a:b] for a, b in spans]).astype(np.int64))
        labels = torch.from_numpy(np.concatenate([p.labels[a:b] for a, b in spans]).astype(np.int64))
        if not self.packed:
            return {"tokens": tokens.tolist(), "labels": labels.tolist()}
        seq_lens = torch.from_numpy(p.seq_lens[first:last].astype(np.int64))
        input_pos = torch.cat([torch.arange(int(n)) for n in seq_lens])
        pad = self.max_seq_len - len(tokens)
        if pad > 0:
            tokens = torch.cat([tokens, torch.full((pad,), self.pad_id, dtype=torch.long)])
            labels = torch.cat([labels, torch.full((pad,), IGNORE, dtype=torch.long)])
            seq_lens = torch.cat([seq_lens, torch.tensor([pad])])
            tail = torch.arange(int(input_pos[-1]) + 1, int(input_pos[-1]) + pad + 1).clamp(max=self.max_seq_len - 1)
            input_pos = torch.cat([input_pos, tail])
        return {"tokens": tokens, "labels": labels, "input_pos": input_pos, "seq_lens": seq_lens}


def unknown_keys(keys) -> list[str]:
    """A problem line, with a did-you-mean, for each key of the dataset section that mixed_dataset does not take."""
    import inspect

    known = [n for n, p in inspect.signature(mixed_dataset).parameters.items()
             if n != "tokenizer" and p.kind is not p.VAR_KEYWORD]
    return [f"dataset.{key}: unknown key{did_you_mean(key, known)} (known: {', '.join(known)})"
            for key in sorted(k for k in keys if k not in known)]


def _check_options(unknown: dict, max_seq_len, bad_rows, dedup, dedup_threshold, held_out_dedup, shuffle_seed) -> None:
    """DatasetError for the first kind of problem found among the builder's own options."""
    if unknown:
        raise DatasetError(unknown_keys(unknown))
    if not max_seq_len:
        raise DatasetError(["No sequence length: set tokenizer.max_seq_len (e.g. 2048) or dataset.max_seq_len."])
    if bad_rows not in BAD_ROWS:
        raise DatasetError([f"dataset.bad_rows: unknown value {bad_rows!r}; expected one of {list(BAD_ROWS)}."])
    problems = _dedup_problems(dedup, dedup_threshold, held_out_dedup) + _shuffle_problems(shuffle_seed)
    if problems:
        raise DatasetError(problems)


def mixed_dataset(
    tokenizer: ModelTokenizer,
    *,
    sources: Mapping[str, Any],
    packed: bool = True,
    max_seq_len: int | None = None,
    seed: int = 0,
    bad_rows: str = "error",
    held_out_dir: str | None = None,
    cache_dir: str | None = None,
    num_workers: int | None = None,
    batch_size: int = 1,
    gradient_accumulation_steps: int = 1,
    dedup: str = "off",
    dedup_threshold: float = 0.8,
    held_out_dedup: bool = False,
    shuffle_seed: int | None = None,
    **unknown: Any,
) -> MixedDataset:
    """Builds one training stream from several instruct and text sources, packed together.

    Args:
        tokenizer: the model's tokenizer (the recipe passes it positionally).
        sources: a mapping from a source name to its spec: `type` (instruct or text), `path` and the
            options in docs/data.md's "Source options" table (weight, val_fraction, template, ...).
        packed: pack all sources together into max_seq_len packs (best-fit decreasing). The stock
            recipe picks its collator from `dataset.packed`, so set this key in the config.
        max_seq_len: pack and window size; defaults to `tokenizer.max_seq_len`.
        seed: fixes the held-out split and fractional weights; the same config and seed give
            byte-identical packs.
        bad_rows: `error` (default) stops on bad rows and lists every one with its line; `skip`
            leaves them out and counts them, by reason, in the data table.
        held_out_dir: where each source's held-out split is written as `<source>.jsonl`.
        cache_dir: where packs are stored, keyed by a fingerprint of the inputs (file contents,
            tokenizer, every setting); a later build with the same key loads them memory-mapped.
            None: build every time, in a temporary folder that is removed once the packs are mapped.
        num_workers: processes that tokenize a large source (default: the CPUs, at most 8).
        batch_size, gradient_accumulation_steps: the recipe's (the presets interpolate `${batch_size}` and
            `${gradient_accumulation_steps}`). Packs are split at sample boundaries until their number is a
            multiple of ranks x batch_size x gradient_accumulation_steps, so that every pack is drawn once an
            epoch and every drawn pack reaches an optimizer step: the stock samplers would otherwise repeat
            packs (DistributedSampler evens out the ranks), drop the last short batch, and leave the last short
            accumulation's gradients to no step. Counted in the data table.
        dedup: duplicates are always counted (data table, report.json); `exact` also removes from training every
            row (pair, conversation, text window) that is an exact copy of an earlier one after normalising case,
            punctuation and whitespace; `near` also removes near copies (MinHash estimate of the word 3-gram
            Jaccard similarity >= dedup_threshold). The first copy is kept; removed rows are counted.
        dedup_threshold: the Jaccard similarity from which two rows are near copies (0 < t <= 1).
        held_out_dedup: a held-out row with an exact or near copy among the training rows is not evaluated
            (written to `<held_out_dir>/<source>.seen.jsonl` instead), counted.
        shuffle_seed: the order the packs are served in. None: as stored; then the stock recipes' sampler shuffles
            them with its own seed, which torchtune 0.6.1 fixes at 0 whatever the recipe's `seed`. An int permutes
            them first, so that the data order changes with it (the presets set `${seed}`). Not in the store's key:
            the same stored packs, drawn in another order.

    Returns:
        MixedDataset: a map-style dataset; its `stats` hold the counts of the logged data table.

    Raises:
        DatasetError: a ValueError listing every problem (config key, file, line, fix) at once.

    Example:
        >>> dataset:
        >>>   _component_: custom_datasets.mixed_dataset
        >>>   packed: True
        >>>   held_out_dir: ${output_dir}/held_out
        >>>   cache_dir: .cache/packs
        >>>   sources:
        >>>     pairs: {type: instruct, path: data/pairs.jsonl, val_fraction: 0.05}
        >>>     notes: {type: text, path: data/text, weight: 0.5}
    """
    print_dataset_errors_plainly()
    max_seq_len = max_seq_len or getattr(tokenizer, "max_seq_len", None)
    dedup = "off" if dedup is False else dedup  # YAML and `key=off` on the command line read `off` as false
    _check_options(unknown, max_seq_len, bad_rows, dedup, dedup_threshold, held_out_dedup, shuffle_seed)
    specs = parse_sources(sources, max_seq_len)
    rank, world = _rank()
    pad_id = getattr(tokenizer, "pad_id", 0)
    files = {f: s.name for s in specs for f in input_files(s.path)}
    dups = Dups(dedup, float(dedup_threshold), bool(held_out_dedup))
    build = (files, tokenizer, specs, max_seq_len, seed, bad_rows, packed, num_workers, held_out_dir, dups)
    if cache_dir:
        settings = {"sources": [dataclasses.asdict(s) for s in specs], "packed": packed, "max_seq_len": max_seq_len,
                    "seed": seed, "bad_rows": bad_rows, "dedup": dedup, "dedup_threshold": float(dedup_threshold),
                    "held_out_dedup": bool(held_out_dedup)}
        key = fingerprint(tokenizer, settings, list(files))
        loaded = store.load(Path(cache_dir), key) if rank == 0 else None
        built = rank == 0 and loaded is None
        if built:
            folder = store.begin(Path(cache_dir), key)
            with _removed_on_error(folder):
                stats = _build_unchanged(folder, *build, True)
                meta = {"stats": stats.as_dict()}
                final = store.commit(folder, Path(cache_dir), key, meta, progress=True)
            loaded = store.read(final), meta, final  # checksummed as it was committed: not read through again
        if world > 1:
            torch.distributed.barrier()  # the other ranks wait for rank 0's cache, then read it
        loaded = loaded or store.load(Path(cache_dir), key)
        if loaded is None and rank:
            raise DatasetError([f"dataset.cache_dir: rank {rank} cannot read the packs rank 0 built at {Path(cache_dir) / key}. "
                                "Under several nodes, cache_dir must be a folder every node shares; or run `make data` "
                                "with the same config on each node first, so that every node loads its own copy."])
        if loaded is None:
            raise RuntimeError(f"The data cache {Path(cache_dir) / key} could not be read back after it was written.")
        packs, meta, folder = loaded
        stats = DataStats.from_dict(meta["stats"])
        stats.cache = f"{'built' if built else 'loaded'} {folder}"
        problems = []
        _need_held_out_dir(stats.sources, held_out_dir, problems)  # as a cold build says it (the key has no held_out_dir)
        if problems:
            raise DatasetError(problems)
        if rank == 0:
            _copy_held_out(folder, held_out_dir)
    else:
        folder = Path(tempfile.mkdtemp(prefix="mixed_dataset."))
        try:
            stats = _build_unchanged(folder, *build, rank == 0)
            packs = store.read(folder)
            stats.cache = "off (set dataset.cache_dir to tokenize once)"
            if rank == 0:
                _copy_held_out(folder, held_out_dir)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # (the packs stay mapped: POSIX keeps unlinked files)
    packs = _aligned(packs, stats, world, batch_size, gradient_accumulation_steps)
    order = _shuffled(len(packs.group_off) - 1, shuffle_seed)
    if rank == 0:
        log.info("Data table (max_seq_len=%d):\n%s", max_seq_len, stats.table())
        if stats.unaligned:
            log.warning(stats.alignment_note())
    return MixedDataset(packs, max_seq_len=max_seq_len, pad_id=pad_id, packed=packed, stats=stats, order=order)


def _shuffle_problems(seed) -> list[str]:
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        return []
    return [f"dataset.shuffle_seed: {seed!r} is not a whole number >= 0 (or null: the stored order); "
            "the presets set it to the recipe's seed (dataset.shuffle_seed: ${seed})."]


def _shuffled(n: int, seed: int | None) -> np.ndarray | None:
    """A permutation of the n packs fixed by seed (None: none)."""
    return None if seed is None else np.random.default_rng([seed, 0x5EED]).permutation(n)


def _aligned(packs: Packs, stats: DataStats, ranks: int, batch_size: int, accumulation: int) -> Packs:
    """The packs, some split in two (counted in `stats`), so that ranks x batch_size x accumulation divides their
    number (see split_to_multiple); the stored packs are left as they are."""
    for key, value in (("batch_size", batch_size), ("gradient_accumulation_steps", accumulation)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DatasetError([f"dataset.{key}: {value!r} is not a positive whole number; it should be the recipe's "
                                f"(dataset.{key}: ${{{key}}})."])
    stats.ranks, stats.step_packs = ranks, ranks * batch_size * accumulation
    stats.batch_size, stats.accumulation = batch_size, accumulation
    group_off, stats.split_packs, stats.unaligned = split_to_multiple(packs.group_off, packs.seq_lens, stats.step_packs)
    if stats.packed:
        stats.packs = len(group_off) - 1
        stats.pad_tokens = stats.packs * stats.max_seq_len - stats.tokens
    return dataclasses.replace(packs, group_off=group_off) if stats.split_packs else packs


@contextlib.contextmanager
def _removed_on_error(folder: Path):
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _copy_held_out(folder: Path, held_out_dir: str | None) -> None:
    """Copies each source's held-out split out of the store, as `<held_out_dir>/<source>.jsonl`."""
    for path in sorted((folder / "held_out").glob("*.jsonl")):
        Path(held_out_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(held_out_dir) / path.name)


def _build_unchanged(folder: Path, files: dict[Path, str], *args) -> DataStats:
    """`_build`, refused if an input file changed meanwhile (its packs would be of neither version)."""
    stamp = lambda f: (f.stat().st_size, f.stat().st_mtime_ns) if f.exists() else None  # noqa: E731
    before = {f: stamp(f) for f in files}
    stats = _build(folder, *args)
    changed = [f for f, was in before.items() if stamp(f) != was]
    if changed:
        raise DatasetError([f"dataset.sources.{files[f]}: {f} changed while it was being prepared, so the packs would mix "
                            "two versions of it. Run again once it is completely written." for f in changed])
    return stats


def _rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
