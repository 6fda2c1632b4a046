"""Tokenizing a source into a flat sample table, in chunks, over several processes when it is large."""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from custom_datasets._format import format_pair, window_document
from custom_datasets._spec import InstructSpec, TextSpec

CHUNK = 2000  # rows (or documents) per task
PARALLEL_FROM = 20_000  # below this many rows a worker pool costs more than it saves


@dataclass
class Table:
    """Samples as flat int32 arrays: sample i spans tokens[offsets[i]:offsets[i] + lengths[i]]."""

    tokens: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray  # int64
    flags: np.ndarray  # int8: 1 truncated, 2 dropped (length 0)
    owner: np.ndarray  # int64: the item (pair or document) each sample came from
    doc_tokens: int = 0  # text: tokens in the documents
    kept_tokens: int = 0  # text: of those, tokens trained in some window

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64) if len(self.lengths) else self.lengths


_STATE: dict = {}


def _init(tokenizer, spec, max_seq_len) -> None:
    _STATE.update(tokenizer=tokenizer, spec=spec, max_seq_len=max_seq_len)


def _chunk(items: list) -> Table:
    tok, spec, max_len = _STATE["tokenizer"], _STATE["spec"], _STATE["max_seq_len"]
    tokens, labels, lengths, flags, owner = [], [], [], [], []
    doc_tokens = kept = 0
    for index, item in enumerate(items):
        if isinstance(spec, InstructSpec):
            sample, truncated = format_pair(tok, spec, item, max_len)
            samples, flag = ([sample], 1 if truncated else 0) if sample is not None else ([], 2)
            if sample is None:
                lengths.append(0)
                flags.append(flag)
                owner.append(index)
        else:
            w = window_document(tok, spec, item, max_len)
            samples, flag = w.samples, 0
            doc_tokens += w.doc_tokens
            kept += w.trained_tokens
        for s in samples:
            tokens += s.tokens
            labels += s.labels
            lengths.append(len(s.tokens))
            flags.append(flag)
            owner.append(index)
    return Table(np.array(tokens, np.int32), np.array(labels, np.int32), np.array(lengths, np.int64),
                 np.array(flags, np.int8), np.array(owner, np.int64), doc_tokens, kept)


def tokenize(tokenizer, spec: InstructSpec | TextSpec, items: list, max_seq_len: int,
             workers: int, progress: bool) -> Table:
    """Formats every item (a Pair, or a Document cut into windows) into one Table, in item order."""
    chunks = [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]
    bar = dict(desc=f"Tokenizing {spec.name}", total=len(chunks), disable=not progress, leave=False)
    if workers > 1 and len(items) >= PARALLEL_FROM and "fork" in multiprocessing.get_all_start_methods():
        # fork: the workers inherit the tokenizer instead of unpickling it; they never touch CUDA.
        with multiprocessing.get_context("fork").Pool(workers, _init, (tokenizer, spec, max_seq_len)) as pool:
            parts = list(tqdm(pool.imap(_chunk, chunks), **bar))
    else:
        _init(tokenizer, spec, max_seq_len)
        parts = [_chunk(c) for c in tqdm(chunks, **bar)]
    if not parts:
        empty = np.zeros(0, np.int32)
        return Table(empty, empty, np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int64))
    owners = [p.owner + i * CHUNK for i, p in enumerate(parts)]
    return Table(np.concatenate([p.tokens for p in parts]), np.concatenate([p.labels for p in parts]),
                 np.concatenate([p.lengths for p in parts]), np.concatenate([p.flags for p in parts]),
                 np.concatenate(owners), sum(p.doc_tokens for p in parts), sum(p.kept_tokens for p in parts))


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
