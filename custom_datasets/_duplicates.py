"""Duplicates in a build: the options (`Dups`), rows and text windows fed to the index (`_dedup`) in order, each
copy counted in its source's stats and removed when the options say so; the count run beside the tokenizer when
nothing is removed."""

from __future__ import annotations

import dataclasses
import multiprocessing

import numpy as np
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE
from tqdm import tqdm

from custom_datasets._dedup import BATCH, DEDUP, Index, Pending, scan
from custom_datasets._items import _rows_of
from custom_datasets._spec import InstructSpec, did_you_mean
from custom_datasets._stats import SourceStats
from custom_datasets._tokenize import TokenFiles


@dataclasses.dataclass(frozen=True)
class Dups:
    """The duplicate options: what is removed (`mode`), from which similarity, and whether seen held-out rows are."""

    mode: str = "off"
    threshold: float = 0.8
    held_out: bool = False

    def removes(self, near: bool) -> bool:
        return self.mode == "near" or (self.mode == "exact" and not near)


def _dedup_problems(dedup, threshold, held_out_dedup) -> list[str]:
    problems = []
    if dedup not in DEDUP:
        problems.append(f"dataset.dedup: unknown value {dedup!r}; expected one of {list(DEDUP)}{did_you_mean(str(dedup), DEDUP)}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        problems.append(f"dataset.dedup_threshold: {threshold!r} is not a Jaccard similarity in (0, 1]; the default is 0.8.")
    if not isinstance(held_out_dedup, bool):
        problems.append(f"dataset.held_out_dedup: {held_out_dedup!r} is not true or false.")
    return problems


def _row_text(item) -> str:
    """What two rows are compared by: a pair's prompt and completion; a conversation's turns."""
    if hasattr(item, "turns"):
        return "\n".join(t.content for t in item.turns)
    return item.prompt + "\n" + item.completion


ROW_BITS = 40  # a row's id in the duplicate index: source number << ROW_BITS | row (or window) number


ROW_MASK = (1 << ROW_BITS) - 1


def _count(stats: SourceStats, verdict, source: int, dups: Dups) -> bool:
    """Counts a training row found to copy a kept one; True if the options remove it."""
    if verdict.near:
        stats.near_duplicates += 1
    else:
        stats.exact_duplicates += 1
    stats.duplicates_across += verdict.copy_of >> ROW_BITS != source
    removed = dups.removes(verdict.near)
    stats.deduplicated += removed
    return removed


def _row_duplicates(checked, held_rows: dict[str, set[int]], dups: Dups, progress: bool) -> dict[str, tuple[set[int], set[int]]]:
    """Pass 2 over the pair and chat sources: each source's training rows that the options remove, and its
    held-out rows (`held_rows`) with a copy among the training rows (of any source), both counted in its stats."""
    index, prompts, asked = Index(dups.threshold), Index(near=False), []  # asked: prompt keys not yet looked up
    held_items, out = Pending(), {}
    for source, (spec, stats, count, _) in enumerate(checked):
        if spec.name not in held_rows:
            continue
        held = held_rows[spec.name]
        out[spec.name] = (set(), set())

        def rows(spec=spec, stats=stats, held=held, base=source << ROW_BITS, count=count):
            for i, item in enumerate(tqdm(_rows_of(spec, [], []), desc=f"Duplicates {spec.name}", total=count,
                                          unit=" rows", disable=not progress, leave=False)):
                if i in held:
                    held_items.add(base | i, _row_text(item))
                    continue
                if isinstance(spec, InstructSpec):
                    asked.append((base | i, item.prompt))
                    if len(asked) == BATCH:
                        _repeats(stats, asked, prompts)
                yield base | i, _row_text(item)
            _repeats(stats, asked, prompts)

        for row, verdict in scan(rows(), index):
            if verdict.copy_of is not None and _count(stats, verdict, source, dups):
                out[spec.name][0].add(row & ROW_MASK)
    for row, verdict in held_items.verdicts(index):
        if verdict.copy_of is not None:
            spec, stats = checked[row >> ROW_BITS][:2]
            stats.held_out_seen += 1
            if dups.held_out:
                out[spec.name][1].add(row & ROW_MASK)
    return out


class _Beside:
    """fn(*args) run in a forked process while this one goes on; result() waits for it and re-raises its error. The
    process is a daemon: if this one stops on an error first, it does not wait for it."""

    def __init__(self, fn, *args):
        context = multiprocessing.get_context("fork")
        self._receive, send = context.Pipe(duplex=False)

        def run():
            try:
                send.send((True, fn(*args)))
            except BaseException as e:  # noqa: BLE001  (handed to the parent, which raises it)
                send.send((False, e))

        self._process = context.Process(target=run, daemon=True)
        self._process.start()
        send.close()

    def result(self):
        try:
            ok, value = self._receive.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the duplicate count's process ended without a result (exit code {self._process.exitcode})") from None
        self._process.join()
        if not ok:
            raise value
        return value


ROW_COUNTS = ("exact_duplicates", "near_duplicates", "duplicates_across", "deduplicated", "prompt_repeats", "held_out_seen")


def _row_duplicate_counts(checked, held_rows: dict[str, set[int]], dups: Dups) -> list[dict[str, int]]:
    """_row_duplicates in a process of its own: each source's duplicate counts (ROW_COUNTS), for the parent's stats."""
    _row_duplicates(checked, held_rows, dups, False)
    return [{field: getattr(stats, field) for field in ROW_COUNTS} for _, stats, _, _ in checked]


def _repeats(stats: SourceStats, asked: list, prompts: Index) -> None:
    """Counts the prompts that repeat an earlier training row's (exact keys only: flat memory, as the rows')."""
    stats.prompt_repeats += sum(v.copy_of is not None for _, v in scan(asked, prompts))
    asked.clear()


def _window_items(source: int, table, ids, out: TokenFiles):
    tokens, labels = out.mapped()
    for w in ids:
        a, b = int(table.starts[w]), int(table.starts[w]) + int(table.lengths[w])
        yield source << ROW_BITS | int(w), tokens[a:b][labels[a:b] != IGNORE]


def _window_duplicates(source: int, stats: SourceStats, table, train: np.ndarray, out: TokenFiles, index: Index, dups: Dups) -> np.ndarray:
    """A text source's training windows, but the copies the options remove (counted): windows compare the
    tokens they train (their stride context left out), with those of the text sources before."""
    removed = set()
    for row, verdict in scan(_window_items(source, table, train, out), index, tokens=True):
        if verdict.copy_of is not None and _count(stats, verdict, source, dups):
            removed.add(row & ROW_MASK)
    return train[~np.isin(train, list(removed))] if removed else train


def _seen_windows(source: int, stats: SourceStats, table, windows: np.ndarray, out: TokenFiles, index: Index, dups: Dups) -> tuple:
    """Held-out windows with a copy among the training windows of every text source: counted; with held_out_dedup,
    returned apart (the held-out split, the seen ones)."""
    seen = [row & ROW_MASK for row, verdict in scan(_window_items(source, table, windows, out), index, add=False, tokens=True)
            if verdict.copy_of is not None]
    stats.held_out_seen = len(seen)
    if not (dups.held_out and seen):
        return windows, windows[:0]
    mask = np.isin(windows, seen)
    return windows[~mask], windows[mask]
