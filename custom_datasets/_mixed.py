"""The builder: instruct pairs and raw text -> one packed, loss-masked token stream."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
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
from tqdm import tqdm

from custom_datasets import _store as store
from custom_datasets._dedup import BATCH, DEDUP, Index, Pending, scan
from custom_datasets._format import Cut, template_overhead
from custom_datasets._mix import apply_weight, held_out_count, held_out_ids
from custom_datasets._pack import best_fit_decreasing, split_to_multiple
from custom_datasets._chat import chat_overhead, read_trained_conversations
from custom_datasets._read import BadRow, read_documents, read_pairs
from custom_datasets._spec import BAD_ROWS, ChatSpec, DatasetError, InstructSpec, TextSpec, did_you_mean, parse_sources
from custom_datasets._stats import DataStats, SourceStats
from custom_datasets._store import Packs, fingerprint, input_files
from custom_datasets._tokenize import Table, TokenFiles, default_workers, item_size, tokenize

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
    if unknown:
        raise DatasetError(unknown_keys(unknown))
    max_seq_len = max_seq_len or getattr(tokenizer, "max_seq_len", None)
    if not max_seq_len:
        raise DatasetError(["No sequence length: set tokenizer.max_seq_len (e.g. 2048) or dataset.max_seq_len."])
    if bad_rows not in BAD_ROWS:
        raise DatasetError([f"dataset.bad_rows: unknown value {bad_rows!r}; expected one of {list(BAD_ROWS)}."])
    dedup = "off" if dedup is False else dedup  # YAML and `key=off` on the command line read `off` as false
    problems = _dedup_problems(dedup, dedup_threshold, held_out_dedup) + _shuffle_problems(shuffle_seed)
    if problems:
        raise DatasetError(problems)
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


def _rows_of(spec, problems, bad):
    """The items of a source that is held out by row: pairs, or conversations."""
    return (read_trained_conversations if isinstance(spec, ChatSpec) else read_pairs)(spec, problems, bad)



def _no_usable(spec) -> str:
    return f"dataset.sources.{spec.name}: {spec.path} holds no usable rows or text. Check the file, or remove the source."


def _documents(spec):
    return (d for d in read_documents(spec, [], []) if d.text.strip())


def _holding_out(spec: InstructSpec | ChatSpec, held: set[int], path: Path, drop: set[int] = frozenset(),
                 seen: set[int] = frozenset()):
    """Yields the source's training pairs (or conversations) but those in `drop` (removed copies); writes the
    held-out ones to `path` on the way, those in `seen` (held out, with a copy in training) to <source>.seen.jsonl."""
    files: dict[Path, Any] = {}
    try:
        for i, item in enumerate(_rows_of(spec, [], [])):
            if i not in held:
                if i not in drop:
                    yield item
                continue
            target = path.with_suffix(".seen.jsonl") if i in seen else path
            if target not in files:
                path.parent.mkdir(parents=True, exist_ok=True)
                files[target] = target.open("w", encoding="utf-8")
            files[target].write(json.dumps(_held_out_record(spec, item), ensure_ascii=False) + "\n")
    finally:
        for f in files.values():
            f.close()


def _held_out_record(spec, item) -> dict:
    if isinstance(spec, ChatSpec):  # eval scores and generates the last assistant turn, after the turns before it
        messages = item.record()
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        before = messages[:last]
        prompt = next((m["content"] for m in reversed(before) if m["role"] == "user"), "")
        return {"source": spec.name, "where": item.where, "messages": messages[: last + 1], "prompt": prompt,
                "completion": _answer_text(messages[last])}
    record = {"source": spec.name, "where": item.where, "prompt": item.prompt, "completion": item.completion}
    if item.parts:  # eval shortens a too-long prompt as training does: it needs the columns
        record["prompt_parts"] = list(item.parts)
    return record


def _answer_text(message: dict) -> str:
    """An assistant turn as the reference text of a generation: its content, then its tool calls as written."""
    from custom_datasets._chat import tool_call_text

    calls = [tool_call_text(c["name"], c["arguments"]) for c in message.get("tool_calls", [])]
    return "".join([message["content"].strip(), *calls])


def _held_out_windows(tokenizer, spec: TextSpec, table: Table, windows: np.ndarray, out: TokenFiles, path: Path) -> None:
    """Writes held-out text windows as {context, text} records, decoded from the token files."""
    wanted = {int(table.owner[w]) for w in windows}
    where = {}
    for i, doc in enumerate(_documents(spec)):  # pass 3, to name the held-out windows' documents
        if i in wanted:
            where[i] = doc.where
            if len(where) == len(wanted):
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for w in windows:
            toks, labs = out.read(int(table.starts[w]), int(table.lengths[w]))
            context = int((labs[1:] == IGNORE).sum())
            body = toks[1:].tolist()
            record = {"source": spec.name, "where": where.get(int(table.owner[w]), spec.path),  # (changed file: refused later)
                      "context": tokenizer.decode(body[:context]), "text": tokenizer.decode(body[context:])}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _need_held_out_dir(per_source: list[SourceStats], held_out_dir: str | None, problems: list[str]) -> None:
    if any(s.held_out for s in per_source) and not held_out_dir:
        problems.append("dataset.held_out_dir is not set but a source holds rows out; set it, e.g. held_out_dir: ${output_dir}/held_out")


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

        def rows(spec=spec, stats=stats, held=held, base=source << ROW_BITS):
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
            held = held_rows[spec.name]
            drop, seen = row_dups[spec.name]
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
        else:
            table = tokenize(tokenizer, spec, _documents(spec), count, chars, max_seq_len, workers, progress, out)
            stats.doc_tokens, stats.kept_tokens, stats.windows = table.doc_tokens, table.kept_tokens, len(table.lengths)
            n = len(table.lengths)
            windows = held_out_ids(n, held_out_count(n, spec.val_fraction, spec.val_size), seed, spec.name)
            stats.held_out = len(windows)
            train = np.setdiff1d(np.arange(n), windows)
            train = _window_duplicates(source, stats, table, train, out, text_index, dups)
            texts_held.append((source, spec, stats, table, windows, held_path))
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
        tables.append((table, weighted))
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
    # One packing over every source's samples.
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
