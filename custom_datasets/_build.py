"""The build: pass 1 checks every source (all problems at once, before the long part); then each source is
tokenized (its held-out rows written, its removed copies left out), weighted, and every sample packed together."""

from __future__ import annotations

import multiprocessing

import numpy as np
from tqdm import tqdm

from custom_datasets import _store as store
from custom_datasets._chat import chat_overhead
from custom_datasets._dedup import Index
from custom_datasets._duplicates import (
    _Beside,
    _row_duplicate_counts,
    _row_duplicates,
    _seen_windows,
    _window_duplicates,
)
from custom_datasets._format import Cut, template_overhead
from custom_datasets._held_out import _held_out_windows, _holding_out, _need_held_out_dir
from custom_datasets._items import _documents, _no_usable, _rows_of
from custom_datasets._mix import apply_weight, held_out_count, held_out_ids
from custom_datasets._pack import best_fit_decreasing
from custom_datasets._read import BadRow, read_documents
from custom_datasets._spec import ChatSpec, DatasetError, InstructSpec
from custom_datasets._stats import DataStats, SourceStats
from custom_datasets._tokenize import TokenFiles, default_workers, item_size, tokenize

HIST_BINS = 32


def _check(tokenizer, spec, max_seq_len, bad_rows, problems, progress) -> tuple[SourceStats, int, int]:
    """Pass 1: reads a source without tokenizing it, so that every problem in every source is
    reported at once, before the long part. Returns its stats so far and its usable items' number
    and characters."""
    stats = SourceStats(spec.name, spec.type, spec.weight)
    bad: list[BadRow] = []
    count = chars = 0
    if isinstance(spec, (InstructSpec, ChatSpec)):
        try:
            overhead = template_overhead(tokenizer, spec) if isinstance(spec, InstructSpec) else chat_overhead(tokenizer, spec)
        except ValueError as e:  # e.g. a tokenizer with no chat format
            problems.append(str(e))
            return stats, 0, 0
        if max_seq_len < overhead + 2:
            problems.append(
                f"dataset.sources.{spec.name}.template: {getattr(spec, 'template', 'chat')} needs {overhead} tokens of markup, "
                f"so max_seq_len={max_seq_len} leaves no room for text. Raise tokenizer.max_seq_len."
            )
            return stats, 0, 0
        for item in _counted(_rows_of(spec, problems, bad), spec, progress):
            count += 1
            chars += item_size(item)
        stats.rows = count
        stats.held_out = held_out_count(count, spec.val_fraction, spec.val_size)
    else:
        for doc in _counted(read_documents(spec, problems, bad), spec, progress):
            usable = bool(doc.text.strip())
            count += usable
            chars += len(doc.text) * usable
            stats.empty_documents += not usable
        stats.rows = count
    if bad_rows == "error":
        problems += [f"dataset.sources.{spec.name}: {b.where}: {b.reason}: {b.detail}" for b in bad]
    else:
        stats.skipped.update(b.reason for b in bad)
    if not count and not any(p.startswith(f"dataset.sources.{spec.name}") for p in problems):
        problems.append(_no_usable(spec))
    return stats, count, chars


def _counted(items, spec, progress: bool):
    return tqdm(items, desc=f"Checking {spec.name}", unit={"instruct": " rows", "chat": " conversations"}.get(spec.type, " documents"),
                disable=not progress, leave=False)


def _build(folder, tokenizer, specs, max_seq_len, seed, bad_rows, packed, num_workers, held_out_dir, dups, progress) -> DataStats:
    """Reads, formats, mixes and packs every source into `folder`: the token files, the pack arrays
    and the held-out splits. Returns the stats. Memory holds per-sample numbers only, never text."""
    problems: list[str] = []
    checked = [(spec, *_check(tokenizer, spec, max_seq_len, bad_rows, problems, progress)) for spec in specs]
    per_source = [stats for _, stats, _, _ in checked]
    _need_held_out_dir(per_source, held_out_dir, problems)
    if problems:
        raise DatasetError(problems)
    workers = num_workers or default_workers()
    held_rows = {spec.name: set(held_out_ids(count, stats.held_out, seed, spec.name).tolist())
                 for spec, stats, count, _ in checked if isinstance(spec, (InstructSpec, ChatSpec))}
    beside = None
    if dups.mode == "off" and not dups.held_out and held_rows and "fork" in multiprocessing.get_all_start_methods():
        # Counted only (nothing removed): tokenizing needs nothing from it, so it runs in a process beside.
        beside = _Beside(_row_duplicate_counts, checked, held_rows, dups)
        row_dups = {name: (set(), set()) for name in held_rows}
    else:
        row_dups = _row_duplicates(checked, held_rows, dups, progress)
    text_index = Index(dups.threshold)
    out = TokenFiles(folder)
    tables, texts_held = [], []
    for source, (spec, stats, count, chars) in enumerate(checked):
        held_path = folder / "held_out" / f"{spec.name}.jsonl"
        if isinstance(spec, (InstructSpec, ChatSpec)):
            drop, seen = row_dups[spec.name]
            table, train = _tokenized_rows(spec, stats, count, chars, held_rows[spec.name], drop, seen, held_path,
                                           tokenizer, max_seq_len, workers, progress, out)
        else:
            table = tokenize(tokenizer, spec, _documents(spec), count, chars, max_seq_len, workers, progress, out)
            stats.doc_tokens, stats.kept_tokens, stats.windows = table.doc_tokens, table.kept_tokens, len(table.lengths)
            n = len(table.lengths)
            windows = held_out_ids(n, held_out_count(n, spec.val_fraction, spec.val_size), seed, spec.name)
            stats.held_out = len(windows)
            train = np.setdiff1d(np.arange(n), windows)
            train = _window_duplicates(source, stats, table, train, out, text_index, dups)
            texts_held.append((source, spec, stats, table, windows, held_path))
        tables.append((table, _weighted(spec, stats, table, train, seed, max_seq_len, problems)))
    out.close()
    if beside is not None:
        for (spec, stats, _, _), counts in zip(checked, beside.result()):
            if spec.name in held_rows:
                for field, value in counts.items():
                    setattr(stats, field, value)
    _need_held_out_dir(per_source, held_out_dir, problems)
    if problems:
        raise DatasetError(problems)
    for source, spec, stats, table, windows, path in texts_held:
        windows, seen = _seen_windows(source, stats, table, windows, out, text_index, dups)
        for ids, target in ((windows, path), (seen, path.with_suffix(".seen.jsonl"))):
            if len(ids):
                _held_out_windows(tokenizer, spec, table, ids, out, target)
    return _packed_all(folder, tables, per_source, max_seq_len, packed, dups, progress)


def _tokenized_rows(spec, stats, count, chars, held, drop, seen, held_path, tokenizer, max_seq_len, workers, progress, out):
    """A pair or chat source tokenized, its held-out rows written on the way and its removed copies left out: (its
    table, the training samples' ids), its cuts counted in `stats`."""
    table = tokenize(tokenizer, spec, _holding_out(spec, held, held_path, drop, seen), count - len(held) - len(drop),
                     chars, max_seq_len, workers, progress, out)
    stats.prompt_cut = int(((table.flags & Cut.PROMPT) > 0).sum())
    stats.completion_cut = int(((table.flags & Cut.COMPLETION) > 0).sum())
    stats.truncated = int(((table.flags & (Cut.PROMPT | Cut.COMPLETION)) > 0).sum())
    stats.dropped = int((table.flags == Cut.DROPPED).sum())
    train = np.flatnonzero(table.flags != Cut.DROPPED)
    if isinstance(spec, ChatSpec):
        stats.turns, stats.windows = table.doc_tokens, len(train)
        stats.split = int((np.bincount(table.owner[train]) > 1).sum()) if len(train) else 0
    return table, train


def _weighted(spec, stats, table, train, seed, max_seq_len, problems) -> np.ndarray:
    """The source's samples for this epoch (its weight applied to its training samples), counted in `stats`."""
    weighted = apply_weight(train, spec.weight, seed, spec.name)
    if not len(train):
        problems.append(_no_usable(spec))
    elif not len(weighted):
        problems.append(f"dataset.sources.{spec.name}.weight: {spec.weight} of {len(train)} samples leaves none; raise the weight.")
    stats.samples = len(weighted)
    stats.tokens = int(table.lengths[weighted].sum())
    stats.supervised = int(table.supervised[weighted].sum())
    stats.trainable = int(table.supervised[train].sum())
    stats.never_trained = int(table.supervised[np.setdiff1d(train, weighted)].sum())
    if isinstance(spec, ChatSpec):
        stats.turns_placed = int(table.turns[train].sum())
        stats.turns_trained = int(table.turns[weighted].sum())
    stats.length_hist = np.histogram(table.lengths[train], bins=HIST_BINS, range=(0, max_seq_len))[0].tolist()
    return weighted


def _packed_all(folder, tables, per_source, max_seq_len, packed, dups, progress) -> DataStats:
    """One packing over every source's samples, written to `folder`; the whole build's stats."""
    starts = np.concatenate([t.starts[w] for t, w in tables])
    lengths = np.concatenate([t.lengths[w] for t, w in tables])
    stats = DataStats(max_seq_len=max_seq_len, packed=packed, sources=per_source, dedup=dups.mode, held_out_dedup=dups.held_out,
                      hist_edges=np.linspace(0, max_seq_len, HIST_BINS + 1).tolist())
    if packed:
        order, group_off = best_fit_decreasing(lengths, max_seq_len, progress)
        stats.packs = len(group_off) - 1
        stats.pad_tokens = stats.packs * max_seq_len - stats.tokens
    else:
        order, group_off = np.arange(len(lengths)), np.arange(len(lengths) + 1, dtype=np.int64)
    store.write_arrays(folder, {"seq_start": starts[order], "seq_lens": lengths[order].astype(np.int32),
                                "group_off": group_off})
    return stats
