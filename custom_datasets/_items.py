"""A source's items as each pass reads them: the rows of a source held out by row (pairs, or
conversations), the usable documents of a text source."""

from __future__ import annotations

from custom_datasets._chat import read_trained_conversations
from custom_datasets._read import read_documents, read_pairs
from custom_datasets._spec import ChatSpec


def _rows_of(spec, problems, bad):
    """The items of a source that is held out by row: pairs, or conversations."""
    return (read_trained_conversations if isinstance(spec, ChatSpec) else read_pairs)(spec, problems, bad)


def _no_usable(spec) -> str:
    return f"dataset.sources.{spec.name}: {spec.path} holds no usable rows or text. Check the file, or remove the source."


def _documents(spec):
    return (d for d in read_documents(spec, [], []) if d.text.strip())
