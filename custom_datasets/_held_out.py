"""The held-out splits: rows written as eval reads them (`<source>.jsonl`, the seen ones apart), text windows
decoded back to {context, text}."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE

from custom_datasets._items import _documents, _rows_of
from custom_datasets._spec import ChatSpec, InstructSpec, TextSpec
from custom_datasets._stats import SourceStats
from custom_datasets._tokenize import Table, TokenFiles


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
