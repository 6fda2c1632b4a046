"""The chat reader: OpenAI-style `messages` rows (or a conversation column of a table) as `Conversation`s, each turn
checked (roles, content as text or text parts, tool calls), problems returned as `BadRow`s like the other readers'."""

from __future__ import annotations

import json
from collections.abc import Iterator

from custom_datasets._read import CONVERSATION_COLUMNS, BadRow, Conversation, Turn, _rows
from custom_datasets._spec import ChatSpec, did_you_mean


def _content(value, where: str, k: int) -> tuple[str | None, BadRow | None]:
    """A turn's text: a string, or OpenAI's list of parts (text parts joined); a tool's JSON result as JSON text."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        if any(p.get("type", "text") != "text" for p in value):
            return None, BadRow(where, "non-text content", f"turn {k}: only text content is supported, got part types "
                                f"{sorted({p.get('type') for p in value})}; fix the row or set dataset.bad_rows=skip")
        return "".join(str(p.get("text", "")) for p in value), None
    if value is None:
        return "", None
    return None, BadRow(where, "non-string content", f"turn {k}: content is {value!r:.80}, expected a string; fix the row "
                        "or set dataset.bad_rows=skip")


def _tool_calls(value, where: str, k: int) -> tuple[tuple | None, BadRow | None]:
    """OpenAI's tool_calls ([{type: function, function: {name, arguments: JSON text}}], or {name, arguments}) as
    ((name, arguments dict), ...)."""
    calls = []
    for c, call in enumerate(value if isinstance(value, list) else [value]):
        fn = call.get("function", call) if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        args = fn.get("arguments", fn.get("parameters", {})) if isinstance(fn, dict) else None
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                return None, BadRow(where, "bad tool call", f"turn {k}: tool_calls[{c}] arguments are not JSON ({e.msg}); "
                                    "fix the row or set dataset.bad_rows=skip")
        if not isinstance(name, str) or not name or not isinstance(args, dict):
            return None, BadRow(where, "bad tool call", f"turn {k}: tool_calls[{c}] is {call!r:.100}; expected "
                                "{type: function, function: {name: ..., arguments: {...}}}; fix the row or set dataset.bad_rows=skip")
        calls.append((name, args))
    return tuple(calls), None


def _conversation(turns, spec: ChatSpec, where: str, column: str) -> tuple[Conversation | None, BadRow | None]:
    """Checks and normalises one row's turns (OpenAI or ShareGPT)."""
    def bad(reason: str, detail: str):
        return None, BadRow(where, reason, detail + "; fix the row or set dataset.bad_rows=skip")

    if not isinstance(turns, list) or not turns:
        return bad("not a conversation", f"column {column!r} is {turns!r:.80}, expected a non-empty list of turns")
    roles = spec.role_map()
    out: list[Turn] = []
    for k, raw in enumerate(turns):
        if not isinstance(raw, dict):
            return bad("not a turn", f"turn {k} is {raw!r:.80}, expected an object")
        fmt = spec.format if spec.format != "auto" else ("sharegpt" if "from" in raw else "openai")
        role_key, content_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
        name = raw.get(role_key)
        if name not in roles:
            return bad("unknown role", f"turn {k}: role {name!r} (key {role_key!r}) is not one of {sorted(roles)}"
                       f"{did_you_mean(str(name), roles)}; map it with dataset.sources.{spec.name}.roles, "
                       f"e.g. roles: {{{name}: user}}")
        role = roles[name]
        content, problem = _content(raw.get(content_key), where, k)
        if problem:
            return None, problem
        calls = ()
        if role == "assistant" and raw.get("tool_calls"):
            calls, problem = _tool_calls(raw["tool_calls"], where, k)
            if problem:
                return None, problem
        train = raw.get(spec.train_key)
        if train is not None and not isinstance(train, bool):
            return bad("bad train flag", f"turn {k}: {spec.train_key!r} is {train!r}, expected true or false")
        if role == "system" and k != 0:
            return bad("turns out of order", f"turn {k} is a system turn; only the first turn may be one")
        if role == "tool" and not (out and (out[-1].tool_calls or out[-1].role == "tool")):
            return bad("tool result without a call", f"turn {k} is a tool result, but the turn before it is not an "
                       "assistant turn with tool_calls (or another tool result)")
        if not content.strip() and not calls:
            return bad("empty message", f"turn {k} ({name}) is empty")
        out.append(Turn(role, content, calls, train))
    if not any(t.role == "assistant" for t in out):
        return bad("no assistant turn", f"the conversation has no assistant turn to train on (roles: {[t.role for t in out]})")
    return Conversation(tuple(out), where), None


def read_conversations(spec: ChatSpec, problems: list[str], bad: list[BadRow]) -> Iterator[Conversation]:
    """Yields the conversations of a chat source, one row at a time, each checked: roles, order, tool results, empty
    turns, an assistant turn. Bad rows name the file, line and turn."""
    key = f"dataset.sources.{spec.name}"
    column = spec.column
    for where, row in _rows(spec, key, problems, bad):
        if column is None:
            found = [c for c in CONVERSATION_COLUMNS if c in row]
            if not found:
                problems.append(f"{key}: {where} has no {' or '.join(map(repr, CONVERSATION_COLUMNS))} column; it has "
                                f"{sorted(row)}. Set {key}.column to the column that holds the turns.")
                return
            column = found[0]
        elif column not in row:
            problems.append(f"{key}: {where} has no column {column!r}; it has {sorted(row)}"
                            f"{did_you_mean(column, row)}. Set {key}.column to the column that holds the turns.")
            return
        conversation, problem = _conversation(row.get(column), spec, where, column)
        if problem:
            bad.append(problem)
        else:
            yield conversation
