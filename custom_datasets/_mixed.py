"""The builder: instruct pairs and raw text -> one packed, loss-masked token stream."""

from __future__ import annotations

import json
import os
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

from custom_datasets._format import Sample, format_pair, template_overhead, window_document
from custom_datasets._mix import apply_weight, held_out_count, split_held_out
from custom_datasets._pack import best_fit_decreasing
from custom_datasets._read import BadRow, read_documents, read_pairs
from custom_datasets._spec import BAD_ROWS, DatasetError, InstructSpec, TextSpec, parse_sources
from custom_datasets._stats import DataStats, SourceStats

log = get_logger("INFO")


class MixedDataset(Dataset):
    """Packs (or samples) held as flat int32 arrays; items are built as torchtune expects them.

    Packed items follow torchtune's `PackedDataset` format exactly (`tokens`, `labels`, `input_pos`,
    `seq_lens`, padded to max_seq_len, padding as its own last sequence), so the stock
    `padded_collate_packed` builds the block-causal mask. Unpacked items are `tokens`/`labels` lists
    for `padded_collate_sft`.
    """

    def __init__(self, samples: list[Sample], groups: list[list[int]], *, max_seq_len: int,
                 pad_id: int, packed: bool, stats: DataStats):
        self.packed = packed
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        self.stats = stats
        order = [i for g in groups for i in g]
        lengths = np.array([len(samples[i].tokens) for i in order], dtype=np.int64)
        self._tokens = np.fromiter((t for i in order for t in samples[i].tokens), np.int32, int(lengths.sum()))
        self._labels = np.fromiter((t for i in order for t in samples[i].labels), np.int32, int(lengths.sum()))
        self._seq_lens = lengths
        self._sample_off = np.concatenate([[0], np.cumsum(lengths)])
        self._group_off = np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(np.int64)

    def __len__(self) -> int:
        return len(self._group_off) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        first, last = self._group_off[index], self._group_off[index + 1]
        start, end = self._sample_off[first], self._sample_off[last]
        tokens = torch.from_numpy(self._tokens[start:end].astype(np.int64))
        labels = torch.from_numpy(self._labels[start:end].astype(np.int64))
        if not self.packed:
            return {"tokens": tokens.tolist(), "labels": labels.tolist()}
        seq_lens = torch.from_numpy(self._seq_lens[first:last].copy())
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


def _build_source(tokenizer, spec, max_seq_len, seed, bad_rows, problems, bad):
    """Returns (training samples before weighting, held-out records, stats) for one source."""
    stats = SourceStats(spec.name, spec.type, spec.weight)
    held_records: list[dict] = []
    samples: list[Sample] = []
    if isinstance(spec, InstructSpec):
        overhead = template_overhead(tokenizer, spec)
        if max_seq_len < overhead + 2:
            problems.append(
                f"dataset.sources.{spec.name}.template: {spec.template} needs {overhead} tokens of markup, "
                f"so max_seq_len={max_seq_len} leaves no room for text. Raise tokenizer.max_seq_len."
            )
            return samples, held_records, stats
        pairs = read_pairs(spec, problems, bad)
        stats.rows = len(pairs)
        train, held = split_held_out(pairs, held_out_count(len(pairs), spec.val_fraction, spec.val_size), seed, spec.name)
        stats.held_out = len(held)
        held_records = [{"source": spec.name, "where": p.where, "prompt": p.prompt, "completion": p.completion} for p in held]
        for pair in train:
            sample, truncated = format_pair(tokenizer, spec, pair, max_seq_len)
            stats.truncated += truncated and sample is not None
            stats.dropped += sample is None
            if sample is not None:
                samples.append(sample)
    else:
        docs = read_documents(spec, problems, bad)
        windows = []
        for doc in docs:
            if not doc.text.strip():
                stats.empty_documents += 1
                continue
            stats.rows += 1
            w = window_document(tokenizer, spec, doc, max_seq_len)
            stats.doc_tokens += w.doc_tokens
            stats.kept_tokens += w.trained_tokens
            windows += [(doc.where, s) for s in w.samples]
        stats.windows = len(windows)
        train, held = split_held_out(windows, held_out_count(len(windows), spec.val_fraction, spec.val_size), seed, spec.name)
        stats.held_out = len(held)
        for where, s in held:
            context = sum(1 for x in s.labels[1:] if x == IGNORE)
            body = s.tokens[1:]
            held_records.append({"source": spec.name, "where": where,
                                 "context": tokenizer.decode(body[:context]), "text": tokenizer.decode(body[context:])})
        samples = [s for _, s in train]
    if bad_rows == "skip":
        for b in bad:
            stats.skipped[b.reason] += 1
    reported = any(p.startswith(f"dataset.sources.{spec.name}") for p in problems) or (bad and bad_rows == "error")
    if not samples and not reported:
        problems.append(f"dataset.sources.{spec.name}: {spec.path} holds no usable rows or text. Check the file, or remove the source.")
    return samples, held_records, stats


def mixed_dataset(
    tokenizer: ModelTokenizer,
    *,
    sources: Mapping[str, Any],
    packed: bool = True,
    max_seq_len: int | None = None,
    seed: int = 0,
    bad_rows: str = "error",
    held_out_dir: str | None = None,
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

    Returns:
        MixedDataset: a map-style dataset; its `stats` hold the counts of the logged data table.

    Raises:
        DatasetError: a ValueError listing every problem (config key, file, line, fix) at once.

    Example:
        >>> dataset:
        >>>   _component_: custom_datasets.mixed_dataset
        >>>   packed: True
        >>>   held_out_dir: ${output_dir}/held_out
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
    problems: list[str] = []
    all_samples: list[Sample] = []
    held_out: dict[str, list[dict]] = {}
    per_source = []
    for spec in specs:
        bad: list[BadRow] = []
        samples, held, stats = _build_source(tokenizer, spec, max_seq_len, seed, bad_rows, problems, bad)
        if bad_rows == "error":
            problems += [f"dataset.sources.{spec.name}: {b.where}: {b.reason}: {b.detail}" for b in bad]
        weighted = apply_weight(samples, spec.weight, seed, spec.name)
        if samples and not weighted:
            problems.append(f"dataset.sources.{spec.name}.weight: {spec.weight} of {len(samples)} samples leaves none; raise the weight.")
        stats.samples = len(weighted)
        stats.tokens = sum(len(s.tokens) for s in weighted)
        stats.supervised = sum(sum(1 for x in s.labels if x != IGNORE) for s in weighted)
        all_samples += weighted
        held_out[spec.name] = held
        per_source.append(stats)
    if any(h for h in held_out.values()) and not held_out_dir:
        problems.append("dataset.held_out_dir is not set but a source holds rows out; set it, e.g. held_out_dir: ${output_dir}/held_out")
    if problems:
        raise DatasetError(problems)
    for s in all_samples:
        s.labels[0] = IGNORE  # never learn to predict the first token of the next sample in a pack
    stats = DataStats(max_seq_len=max_seq_len, packed=packed, sources=per_source)
    if packed:
        groups = best_fit_decreasing([len(s.tokens) for s in all_samples], max_seq_len)
        stats.packs = len(groups)
        stats.pad_tokens = stats.packs * max_seq_len - stats.tokens
    else:
        groups = [[i] for i in range(len(all_samples))]
    if held_out_dir:
        for name, records in held_out.items():
            if records:
                _write_jsonl(Path(held_out_dir) / f"{name}.jsonl", records)
    log.info("Data table (max_seq_len=%d):\n%s", max_seq_len, stats.table())
    return MixedDataset(all_samples, groups, max_seq_len=max_seq_len,
                        pad_id=getattr(tokenizer, "pad_id", 0), packed=packed, stats=stats)
