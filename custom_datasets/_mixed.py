"""The builder: instruct pairs and raw text -> one packed, loss-masked token stream."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE
from torchtune.modules.transforms.tokenizers import ModelTokenizer
from torchtune.utils import get_logger

from custom_datasets import _store as store
from custom_datasets._format import template_overhead
from custom_datasets._mix import apply_weight, held_out_count, split_held_out
from custom_datasets._pack import best_fit_decreasing
from custom_datasets._read import BadRow, read_documents, read_pairs
from custom_datasets._spec import BAD_ROWS, DatasetError, InstructSpec, parse_sources
from custom_datasets._stats import DataStats, SourceStats
from custom_datasets._store import Packs, fingerprint, input_files
from custom_datasets._tokenize import Table, default_workers, tokenize

HIST_BINS = 32

log = get_logger("INFO")


class MixedDataset(Dataset):
    """Packs served from flat int32 arrays (memory-mapped when they come from the cache), each item
    built as torchtune expects it.

    Packed items follow torchtune's `PackedDataset` format exactly (`tokens`, `labels`, `input_pos`,
    `seq_lens`, padded to max_seq_len, padding as its own last sequence), so the stock
    `padded_collate_packed` builds the block-causal mask. Unpacked items are `tokens`/`labels` lists
    for `padded_collate_sft`.
    """

    def __init__(self, packs: Packs, *, max_seq_len: int, pad_id: int, packed: bool, stats: DataStats):
        self.packed = packed
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        self.stats = stats
        self._packs = packs
        self._sample_off = np.concatenate([[0], np.cumsum(packs.seq_lens, dtype=np.int64)])

    def __len__(self) -> int:
        return len(self._packs.group_off) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        first, last = int(self._packs.group_off[index]), int(self._packs.group_off[index + 1])
        start, end = self._sample_off[first], self._sample_off[last]
        tokens = torch.from_numpy(self._packs.tokens[start:end].astype(np.int64))
        labels = torch.from_numpy(self._packs.labels[start:end].astype(np.int64))
        if not self.packed:
            return {"tokens": tokens.tolist(), "labels": labels.tolist()}
        seq_lens = torch.from_numpy(self._packs.seq_lens[first:last].astype(np.int64))
        input_pos = torch.cat([torch.arange(int(n)) for n in seq_lens])
        pad = self.max_seq_len - len(tokens)
        if pad > 0:
            tokens = torch.cat([tokens, torch.full((pad,), self.pad_id, dtype=torch.long)])
            labels = torch.cat([labels, torch.full((pad,), IGNORE, dtype=torch.long)])
            seq_lens = torch.cat([seq_lens, torch.tensor([pad])])
            tail = torch.arange(int(input_pos[-1]) + 1, int(input_pos[-1]) + pad + 1).clamp(max=self.max_seq_len - 1)
            input_pos = torch.cat([input_pos, tail])
        return {"tokens": tokens, "labels": labels, "input_pos": input_pos, "seq_lens": seq_lens}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_held_out(held_out: dict[str, list[dict]], held_out_dir: str | None) -> dict[str, Path]:
    """Writes each source's held-out records to <held_out_dir>/<source>.jsonl; returns the paths."""
    paths = {}
    for name, records in held_out.items():
        if records and held_out_dir:
            paths[name] = Path(held_out_dir) / f"{name}.jsonl"
            _write_jsonl(paths[name], records)
    return paths


def _gather(table: Table, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tokens and labels of samples `ids`, concatenated in that order (vectorized)."""
    starts, lens = table.offsets[ids], table.lengths[ids]
    if not len(ids):
        return table.tokens[:0], table.labels[:0]
    shift = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    idx = shift + np.arange(int(lens.sum()))
    return table.tokens[idx], table.labels[idx]


def _build_source(tokenizer, spec, max_seq_len, seed, bad_rows, problems, bad, workers, progress):
    """Returns (sample table, training sample ids before weighting, held-out records, stats)."""
    stats = SourceStats(spec.name, spec.type, spec.weight)
    none = np.zeros(0, np.int64)
    if isinstance(spec, InstructSpec):
        overhead = template_overhead(tokenizer, spec)
        if max_seq_len < overhead + 2:
            problems.append(
                f"dataset.sources.{spec.name}.template: {spec.template} needs {overhead} tokens of markup, "
                f"so max_seq_len={max_seq_len} leaves no room for text. Raise tokenizer.max_seq_len."
            )
            return None, none, [], stats
        pairs = read_pairs(spec, problems, bad)
        stats.rows = len(pairs)
        held_ids = set(split_held_out(list(range(len(pairs))), held_out_count(len(pairs), spec.val_fraction, spec.val_size), seed, spec.name)[1])
        stats.held_out = len(held_ids)
        held = [{"source": spec.name, "where": p.where, "prompt": p.prompt, "completion": p.completion}
                for i, p in enumerate(pairs) if i in held_ids]
        table = tokenize(tokenizer, spec, [p for i, p in enumerate(pairs) if i not in held_ids], max_seq_len, workers, progress)
        stats.truncated = int((table.flags == 1).sum())
        stats.dropped = int((table.flags == 2).sum())
        train = np.flatnonzero(table.flags != 2)
    else:
        docs = read_documents(spec, problems, bad)
        nonempty = [d for d in docs if d.text.strip()]
        stats.empty_documents = len(docs) - len(nonempty)
        stats.rows = len(nonempty)
        table = tokenize(tokenizer, spec, nonempty, max_seq_len, workers, progress)
        stats.doc_tokens, stats.kept_tokens, stats.windows = table.doc_tokens, table.kept_tokens, len(table.lengths)
        train, held_w = split_held_out(list(range(len(table.lengths))), held_out_count(len(table.lengths), spec.val_fraction, spec.val_size), seed, spec.name)
        stats.held_out = len(held_w)
        held = []
        for w in held_w:
            toks, labs = _gather(table, np.array([w]))
            context = int((labs[1:] == IGNORE).sum())
            body = toks[1:].tolist()
            held.append({"source": spec.name, "where": nonempty[table.owner[w]].where,
                         "context": tokenizer.decode(body[:context]), "text": tokenizer.decode(body[context:])})
        train = np.array(train, np.int64)
    if bad_rows == "skip":
        for b in bad:
            stats.skipped[b.reason] += 1
    reported = any(p.startswith(f"dataset.sources.{spec.name}") for p in problems) or (bad and bad_rows == "error")
    if not len(train) and not reported:
        problems.append(f"dataset.sources.{spec.name}: {spec.path} holds no usable rows or text. Check the file, or remove the source.")
    return table, train, held, stats


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
) -> MixedDataset:
    """Builds one training stream from several instruct and text sources, packed together.

    Args:
        tokenizer: the model's tokenizer (the recipe passes it positionally).
        sources: a mapping from a source name to its spec: `type` (instruct or text), `path` and the
            options in the README's "Source options" table (weight, val_fraction, template, ...).
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
            None: build in memory every time.
        num_workers: processes that tokenize a large source (default: the CPUs, at most 8).

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
    if isinstance(sources, DictConfig):
        sources = OmegaConf.to_container(sources, resolve=True)
    max_seq_len = max_seq_len or getattr(tokenizer, "max_seq_len", None)
    if not max_seq_len:
        raise DatasetError(["No sequence length: set tokenizer.max_seq_len (e.g. 2048) or dataset.max_seq_len."])
    if bad_rows not in BAD_ROWS:
        raise DatasetError([f"dataset.bad_rows: unknown value {bad_rows!r}; expected one of {list(BAD_ROWS)}."])
    specs = parse_sources(sources, max_seq_len)
    rank, world = _rank()
    pad_id = getattr(tokenizer, "pad_id", 0)
    built = None
    files = {f: s.name for s in specs for f in input_files(s.path)}
    if cache_dir:
        settings = {"sources": [dataclasses.asdict(s) for s in specs], "packed": packed, "max_seq_len": max_seq_len,
                    "seed": seed, "bad_rows": bad_rows}
        key = fingerprint(tokenizer, settings, list(files))
        loaded = store.load(Path(cache_dir), key) if rank == 0 else None
        if rank == 0 and loaded is None:
            packs, stats, held_out = _build_unchanged(files, tokenizer, specs, max_seq_len, seed, bad_rows, packed,
                                                      num_workers, held_out_dir, True)
            built = _write_held_out(held_out, held_out_dir)
            store.save(Path(cache_dir), key, packs, {"stats": stats.as_dict()}, built)
        if world > 1:
            torch.distributed.barrier()  # the other ranks wait for rank 0's cache, then read it
        if loaded is None:
            loaded = store.load(Path(cache_dir), key)
        if loaded is None:
            raise RuntimeError(f"The data cache {Path(cache_dir) / key} could not be read back after it was written.")
        packs, meta, folder = loaded
        stats = DataStats.from_dict(meta["stats"])
        stats.cache = f"{'built' if built is not None else 'loaded'} {folder}"
        if held_out_dir and rank == 0 and built is None:
            for path in sorted((folder / "held_out").glob("*.jsonl")):
                Path(held_out_dir).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, Path(held_out_dir) / path.name)
    else:
        packs, stats, held_out = _build_unchanged(files, tokenizer, specs, max_seq_len, seed, bad_rows, packed,
                                                  num_workers, held_out_dir, rank == 0)
        stats.cache = "off (set dataset.cache_dir to tokenize once)"
        if rank == 0:
            _write_held_out(held_out, held_out_dir)
    if rank == 0:
        log.info("Data table (max_seq_len=%d):\n%s", max_seq_len, stats.table())
    return MixedDataset(packs, max_seq_len=max_seq_len, pad_id=pad_id, packed=packed, stats=stats)


def _build_unchanged(files: dict[Path, str], *args):
    """`_build`, refused if an input file changed meanwhile (its packs would be of neither version)."""
    stamp = lambda f: (f.stat().st_size, f.stat().st_mtime_ns) if f.exists() else None  # noqa: E731
    before = {f: stamp(f) for f in files}
    result = _build(*args)
    changed = [f for f, was in before.items() if stamp(f) != was]
    if changed:
        raise DatasetError([f"dataset.sources.{files[f]}: {f} changed while it was being prepared, so the packs would mix "
                            "two versions of it. Run again once it is completely written." for f in changed])
    return result


def _rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _build(tokenizer, specs, max_seq_len, seed, bad_rows, packed, num_workers, held_out_dir, progress):
    """Reads, formats, mixes and packs every source: (packs, stats, held-out records by source)."""
    workers = num_workers or default_workers()
    problems: list[str] = []
    tables, chosen, held_out, per_source = [], [], {}, []
    for spec in specs:
        bad: list[BadRow] = []
        table, train, held, stats = _build_source(tokenizer, spec, max_seq_len, seed, bad_rows, problems, bad, workers, progress)
        if bad_rows == "error":
            problems += [f"dataset.sources.{spec.name}: {b.where}: {b.reason}: {b.detail}" for b in bad]
        weighted = np.array(apply_weight(list(train), spec.weight, seed, spec.name), np.int64)
        if len(train) and not len(weighted):
            problems.append(f"dataset.sources.{spec.name}.weight: {spec.weight} of {len(train)} samples leaves none; raise the weight.")
        held_out[spec.name] = held
        per_source.append(stats)
        if table is None:
            continue
        table.labels[table.offsets[table.lengths > 0]] = IGNORE  # never learn the next sample's first token
        cum = np.concatenate([[0], np.cumsum(table.labels != IGNORE)])
        supervised = cum[table.offsets + table.lengths] - cum[table.offsets]
        stats.samples = len(weighted)
        stats.tokens = int(table.lengths[weighted].sum())
        stats.supervised = int(supervised[weighted].sum())
        stats.length_hist = np.histogram(table.lengths[train], bins=HIST_BINS, range=(0, max_seq_len))[0].tolist()
        tables.append(table)
        chosen.append(weighted)
    if any(h for h in held_out.values()) and not held_out_dir:
        problems.append("dataset.held_out_dir is not set but a source holds rows out; set it, e.g. held_out_dir: ${output_dir}/held_out")
    if problems:
        raise DatasetError(problems)
    # One table for all sources, then one packing over all of them.
    base = np.cumsum([0] + [len(t.lengths) for t in tables])
    table = Table(np.concatenate([t.tokens for t in tables]), np.concatenate([t.labels for t in tables]),
                  np.concatenate([t.lengths for t in tables]), np.concatenate([t.flags for t in tables]),
                  np.concatenate([t.owner for t in tables]))
    ids = np.concatenate([c + b for c, b in zip(chosen, base)])
    stats = DataStats(max_seq_len=max_seq_len, packed=packed, sources=per_source,
                      hist_edges=np.linspace(0, max_seq_len, HIST_BINS + 1).tolist())
    if packed:
        groups = best_fit_decreasing(table.lengths[ids].tolist(), max_seq_len)
        stats.packs = len(groups)
        stats.pad_tokens = stats.packs * max_seq_len - stats.tokens
        order = ids[np.fromiter((i for g in groups for i in g), np.int64, len(ids))]
        group_off = np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(np.int64)
    else:
        order, group_off = ids, np.arange(len(ids) + 1, dtype=np.int64)
    tokens, labels = _gather(table, order)
    packs = Packs(tokens, labels, table.lengths[order].astype(np.int32), group_off)
    return packs, stats, held_out
