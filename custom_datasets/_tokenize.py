"""Tokenizing a source, chunk by chunk, over several processes when it is large, straight to disk.

Only per-sample numbers (length, flags, owner, supervised count) stay in memory; the tokens and
labels of every chunk are appended to two flat int32 files as soon as the chunk is done, and at most
a few chunks are in flight at a time, so memory does not grow with the size of the data.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE
from tqdm import tqdm

from custom_datasets._chat import format_conversation
from custom_datasets._format import Cut, format_pair, window_document
from custom_datasets._spec import ChatSpec, InstructSpec, TextSpec

CHUNK = 2000  # rows (or documents) per task, at most
CHUNK_CHARS = 1 << 21  # characters per task, at most (but at least one item): bounds a task's memory
PARALLEL_FROM = 8  # tasks; below this a worker pool costs more than it saves
IN_FLIGHT = 2  # tasks queued per worker: enough to keep them busy, few enough to keep memory flat


class TokenFiles:
    """The sample table's tokens and labels: two int32 files, appended to as tasks finish (the store maps them)."""

    def __init__(self, folder: Path):
        self.paths = (folder / "tokens.bin", folder / "labels.bin")
        self._files = [p.open("wb") for p in self.paths]
        self.count = 0  # tokens written so far

    def append(self, tokens: np.ndarray, labels: np.ndarray) -> None:
        for f, array in zip(self._files, (tokens, labels)):
            f.write(np.ascontiguousarray(array, dtype=np.int32).tobytes())
        self.count += len(tokens)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def mapped(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, labels) of everything written so far, memory-mapped (flushed first: also while writing)."""
        for f in self._files:
            if not f.closed:
                f.flush()
        return tuple(np.memmap(p, np.int32, mode="r") if p.stat().st_size else np.zeros(0, np.int32) for p in self.paths)

    def read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, labels) of one span, read from the files (call after close()). Not memory-mapped:
        the kernel's read-ahead would map far more than the span into this process."""
        return tuple(np.fromfile(p, np.int32, count=length, offset=4 * start) for p in self.paths)


@dataclass
class Table:
    """One source's samples: sample i spans starts[i]:starts[i] + lengths[i] of the token files."""

    starts: np.ndarray  # int64
    lengths: np.ndarray  # int32 (per-sample numbers are kept small: they are what stays in memory)
    supervised: np.ndarray  # int32: tokens with a label
    flags: np.ndarray  # int8: _format.Cut bits: 1 prompt shortened, 4 completion cut, 2 dropped (length 0)
    owner: np.ndarray  # int32: the item (pair or document) each sample came from
    doc_tokens: int = 0  # text: tokens in the documents; chat: turns to train
    kept_tokens: int = 0  # text: of those, tokens trained in some window; chat: turns in some sample
    turns: np.ndarray | None = None  # int32, chat: trained turns in each sample


_STATE: dict = {}


def _init(tokenizer, spec, max_seq_len) -> None:
    _STATE.update(tokenizer=tokenizer, spec=spec, max_seq_len=max_seq_len)


def _chunk(task: tuple[int, list]):
    """Formats a task's items: (tokens, labels, lengths, supervised, flags, owner, doc_tokens, kept, turns)."""
    first, items = task
    tok, spec, max_len = _STATE["tokenizer"], _STATE["spec"], _STATE["max_seq_len"]
    tokens, labels, lengths, flags, owner, turns = [], [], [], [], [], []
    doc_tokens = kept = 0
    for index, item in enumerate(items, start=first):
        if isinstance(spec, ChatSpec):
            f = format_conversation(tok, spec, item, max_len)
            doc_tokens += f.targets
            kept += sum(f.turns)
            if not f.samples:
                lengths.append(0)
                flags.append(int(Cut.DROPPED))
                owner.append(index)
                turns.append(0)
            for (sample, cut), n in zip(f.samples, f.turns):
                tokens.append(np.array(sample.tokens, np.int32))
                labels.append(np.array(sample.labels, np.int32))
                lengths.append(len(sample.tokens))
                flags.append(int(cut))
                owner.append(index)
                turns.append(n)
        elif isinstance(spec, InstructSpec):
            sample, cut = format_pair(tok, spec, item, max_len)
            if sample is None:
                lengths.append(0)
                flags.append(int(Cut.DROPPED))
                owner.append(index)
                continue
            tokens.append(np.array(sample.tokens, np.int32))
            labels.append(np.array(sample.labels, np.int32))
            lengths.append(len(sample.tokens))
            flags.append(int(cut))
            owner.append(index)
        else:
            w = window_document(tok, spec, item, max_len)
            tokens.append(w.tokens)
            labels.append(w.labels)
            lengths += w.lengths
            flags += [0] * len(w.lengths)
            owner += [index] * len(w.lengths)
            doc_tokens += w.doc_tokens
            kept += w.trained_tokens
    none = np.zeros(0, np.int32)
    tokens, labels = np.concatenate(tokens or [none]), np.concatenate(labels or [none])
    lengths = np.array(lengths, np.int32)
    offsets = _offsets(lengths)
    labels[offsets[lengths > 0]] = IGNORE  # never learn the next sample's first token in a pack
    cum = np.concatenate([[0], np.cumsum(labels != IGNORE)])
    supervised = (cum[offsets + lengths] - cum[offsets]).astype(np.int32)
    return (tokens, labels, lengths, supervised, np.array(flags, np.int8), np.array(owner, np.int32), doc_tokens, kept,
            np.array(turns, np.int32))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """Where each of consecutive samples of these lengths starts (int64)."""
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def item_size(item) -> int:
    """An item's characters (a pair, a document or a conversation): what bounds a task and sizes the progress bars."""
    if hasattr(item, "turns"):
        return sum(len(t.content) for t in item.turns)
    return len(item.text) if hasattr(item, "text") else len(item.prompt) + len(item.completion)


def _tasks(items: Iterable):
    """(index of the first item, items) for runs of at most CHUNK items and CHUNK_CHARS characters."""
    batch, chars, first = [], 0, 0
    for item in items:
        if batch and (len(batch) == CHUNK or chars + item_size(item) > CHUNK_CHARS):
            yield first, batch
            first, batch, chars = first + len(batch), [], 0
        batch.append(item)
        chars += item_size(item)
    if batch:
        yield first, batch


def tokenize(tokenizer, spec: InstructSpec | TextSpec | ChatSpec, items: Iterable, count: int, chars: int, max_seq_len: int,
             workers: int, progress: bool, out: TokenFiles) -> Table:
    """Formats every item (a Pair, or a Document cut into windows), in item order, appending the
    tokens to `out`; returns the source's sample table. `count` and `chars` (the items' number and
    characters, from the checking pass) size the progress bar and decide whether a worker pool pays."""
    first = out.count
    meta: list[tuple] = []
    tasks = max(-(-count // CHUNK), -(-chars // CHUNK_CHARS))
    bar = tqdm(desc=f"Tokenizing {spec.name}", total=tasks, unit="task", disable=not progress, leave=False)

    def take(part) -> None:
        out.append(part[0], part[1])
        meta.append(part[2:])  # (lengths, supervised, flags, owner, doc_tokens, kept, turns): no tokens
        bar.update()

    if workers > 1 and tasks >= PARALLEL_FROM and "fork" in multiprocessing.get_all_start_methods():
        # fork: the workers inherit the tokenizer instead of unpickling it; they never touch CUDA.
        with multiprocessing.get_context("fork").Pool(workers, _init, (tokenizer, spec, max_seq_len)) as pool:
            pending: deque = deque()
            for task in _tasks(items):
                pending.append(pool.apply_async(_chunk, (task,)))
                if len(pending) >= IN_FLIGHT * workers:
                    take(pending.popleft().get())
            while pending:
                take(pending.popleft().get())
    else:
        _init(tokenizer, spec, max_seq_len)
        for task in _tasks(items):
            take(_chunk(task))
    bar.close()
    if not meta:
        none = np.zeros(0, np.int32)
        return Table(np.zeros(0, np.int64), none, none, np.zeros(0, np.int8), none, turns=none)
    lengths = np.concatenate([m[0] for m in meta])
    starts = first + _offsets(lengths)
    return Table(starts, lengths, np.concatenate([m[1] for m in meta]), np.concatenate([m[2] for m in meta]),
                 np.concatenate([m[3] for m in meta]), sum(m[4] for m in meta), sum(m[5] for m in meta),
                 np.concatenate([m[6] for m in meta]))


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
