"""Readers: one per file kind, each yielding plain records that remember where they came from, one
at a time, so that no file is ever held whole in memory (the builder reads each source twice: once
to check it, once to tokenize it).

Problems are appended to a list rather than raised, so the builder can report every problem in
every source at once. Row-level problems (a bad JSON line, an empty completion) are returned as
`BadRow`s: the builder either lists them all in one error or, with `bad_rows: skip`, counts them.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from custom_datasets._spec import ChatSpec, InstructSpec, TextSpec

TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = {".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Pair:
    prompt: str
    completion: str
    where: str  # "file:line" or "file row N"
    parts: tuple[str, ...] = ()  # the prompt's columns, when it has several (joined into `prompt`)


@dataclass(frozen=True)
class Document:
    text: str
    where: str


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant | tool
    content: str
    tool_calls: tuple = ()  # assistant: ((name, arguments: dict), ...)
    train: bool | None = None  # the row's per-turn flag (spec.train_key), if it has one


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]
    where: str  # "file:line" or "file row N"

    def record(self) -> list[dict]:
        """The turns as OpenAI-style messages (what the held-out file stores)."""
        out = []
        for t in self.turns:
            m = {"role": t.role, "content": t.content}
            if t.tool_calls:
                m["tool_calls"] = [{"name": n, "arguments": a} for n, a in t.tool_calls]
            if t.train is not None:
                m["train"] = t.train
            out.append(m)
        return out


def turns_from_messages(messages: list[dict]) -> tuple[Turn, ...]:
    """`Conversation.record()`'s messages (a held-out record, or a prompt to continue) back as turns."""
    return tuple(Turn(m["role"], m.get("content") or "", tuple((c["name"], c["arguments"]) for c in m.get("tool_calls", [])))
                 for m in messages)


@dataclass(frozen=True)
class BadRow:
    where: str
    reason: str  # short, used as a key in the skip counts
    detail: str


def _jsonl_rows(path: Path, key: str, problems: list[str], bad: list[BadRow]):
    """Yields (where, object) for each JSON object line of a JSONL file, read line by line."""
    first = True
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            if first and raw.lstrip()[:1] == b"[":
                problems.append(
                    f"{key}: {path} holds one JSON array, not JSON Lines. Write one object per line, "
                    "or rename the file to .json."
                )
                return
            first = False
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append(BadRow(where, "not UTF-8", f"byte {e.start} is not UTF-8; re-encode the file as UTF-8"))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append(BadRow(where, "malformed JSON", f"{e.msg} at column {e.colno}; fix or remove the line"))
                continue
            if not isinstance(obj, dict):
                bad.append(BadRow(where, "not an object", f"expected a JSON object, got {type(obj).__name__}"))
                continue
            yield where, obj


def _table_rows(path: str, fmt: str | None, split: str, key: str, problems: list[str]):
    """Yields (where, row) for .json/.csv/.parquet files or a Hugging Face dataset id."""
    import datasets

    try:
        if fmt is None:
            ds = datasets.load_dataset(path, split=split)
        else:
            ds = datasets.load_dataset(fmt, data_files=path, split="train")
    except Exception as e:  # datasets raises many types; all mean "could not read this source"
        problems.append(f"{key}: could not read {path}: {type(e).__name__}: {e}")
        return
    for index, row in enumerate(ds):
        yield f"{path} row {index + 1}", row


def _rows(spec: InstructSpec | TextSpec | ChatSpec, key: str, problems: list[str], bad: list[BadRow]):
    path = Path(spec.path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _jsonl_rows(path, key, problems, bad)
        if suffix in TABLE_SUFFIXES:
            return _table_rows(str(path), TABLE_SUFFIXES[suffix], "train", key, problems)
        problems.append(
            f"{key}.path: {path} has an unsupported suffix {suffix!r}; expected one of "
            f"['.jsonl', '.json', '.csv', '.parquet']."
        )
        return iter(())
    if path.is_dir():  # a folder of .jsonl/.json/.csv/.parquet files, as `datasets` loads one
        return _table_rows(str(path), None, getattr(spec, "split", "train"), key, problems)
    if path.is_symlink():
        problems.append(f"{key}.path: {path} is a broken or looping symlink. Point it at a real file.")
        return iter(())
    if path.exists() or path.is_absolute() or path.suffix or spec.path.startswith("."):
        problems.append(f"{key}.path: {path} does not exist. Check the path (relative paths start at the directory you run from).")
        return iter(())
    # Not on disk and shaped like "org/name": a Hugging Face dataset id (needs network or the HF cache).
    return _table_rows(spec.path, None, getattr(spec, "split", "train"), key, problems)


CONVERSATION_COLUMNS = ("messages", "conversations")


def _check_columns(row: dict[str, Any], columns: tuple[str, ...], where: str, key: str, problems: list[str]) -> bool:
    missing = [c for c in columns if c not in row]
    chats = [c for c in CONVERSATION_COLUMNS if isinstance(row.get(c), list)]
    if missing and chats:
        problems.append(f"{key}: {where} holds conversations (column {chats[0]!r}), not {', '.join(map(repr, missing))}. "
                        f"Use type: chat for this source ({key}.type=chat), which reads OpenAI messages and ShareGPT "
                        "conversations and trains on the assistant's turns.")
    elif missing:
        hints = [f"{c!r} -> {m[0]!r}?" for c in missing if (m := difflib.get_close_matches(c, list(row), n=1))]
        problems.append(
            f"{key}: {where} has no column(s) {missing}; it has {sorted(row)}"
            f"{' (renamed? ' + ', '.join(hints) + ')' if hints else ''}. "
            f"Set {key}.prompt / .completion (or .column) to the names your data uses."
        )
    return not missing


def read_pairs(spec: InstructSpec, problems: list[str], bad: list[BadRow]) -> Iterator[Pair]:
    """Yields prompt/completion pairs, one row at a time; a prompt may join several columns (empty
    ones are skipped). Problems and bad rows are appended to the lists as they are met."""
    key = f"dataset.sources.{spec.name}"
    columns = (*spec.prompt, spec.completion)
    checked = False
    for where, row in _rows(spec, key, problems, bad):
        if not checked:
            if not _check_columns(row, columns, where, key, problems):
                return
            checked = True
        reason = None
        missing = [c for c in columns if c not in row]
        if missing:
            reason = ("missing column", f"row lacks column(s) {missing}")
        parts = []
        for i, column in enumerate(columns if reason is None else ()):
            value = row[column]
            required = i in (0, len(columns) - 1)  # first prompt column and the completion
            if value is None and not required:
                continue  # optional extra prompt column, e.g. Alpaca's `input`
            if not isinstance(value, str):
                kind = "null" if value is None else "non-string"
                reason = (f"{kind} {column}", f"column {column!r} is {value!r}, expected a string")
                break
            if required and not value.strip():
                reason = (f"empty {column}", f"column {column!r} is empty or whitespace only")
                break
            parts.append(value)
        if reason is not None:
            bad.append(BadRow(where, reason[0], reason[1] + "; fix the row or set dataset.bad_rows=skip"))
            continue
        columns_used = tuple(p for p in parts[:-1] if p.strip())
        yield Pair(spec.prompt_joiner.join(columns_used), parts[-1], where, columns_used if len(columns_used) > 1 else ())


def read_documents(spec: TextSpec, problems: list[str], bad: list[BadRow]) -> Iterator[Document]:
    """Yields the documents of a .txt/.md file, a folder of them (recursively, sorted), or a
    .jsonl/.json/.csv/.parquet column, one at a time."""
    key = f"dataset.sources.{spec.name}"
    path = Path(spec.path)
    if path.is_dir():
        entries = sorted(path.rglob("*"))
        for p in entries:
            if p.is_symlink() and p.is_dir():
                problems.append(f"{key}.path: {p} is a symlinked folder, which is not followed (it could loop). "
                                "Point another source at it, or copy its files in.")
            elif p.suffix.lower() in TEXT_SUFFIXES and not p.exists():
                problems.append(f"{key}.path: {p} is a broken or looping symlink. Fix or remove it.")
        files = [p for p in entries if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()]
        if not files:
            problems.append(f"{key}.path: folder {path} has no {list(TEXT_SUFFIXES)} files.")
        yield from (d for f in files if (d := _read_text_file(f, key, problems)) is not None)
        return
    if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        doc = _read_text_file(path, key, problems)
        if doc is not None:
            yield doc
        return
    checked = False
    for where, row in _rows(spec, key, problems, bad):
        if not checked:
            if not _check_columns(row, (spec.column,), where, key, problems):
                return
            checked = True
        value = row.get(spec.column)
        if not isinstance(value, str):
            bad.append(BadRow(where, f"non-string {spec.column}", f"column {spec.column!r} is {value!r}, expected a string; fix the row or set dataset.bad_rows=skip"))
            continue
        yield Document(value, where)


def _read_text_file(path: Path, key: str, problems: list[str]) -> Document | None:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        problems.append(f"{key}: {path}:{line}: byte {e.start} is not UTF-8. Re-encode the file as UTF-8.")
        return None
    return Document(text.replace("\r\n", "\n"), str(path))
