"""Formatting: records -> token ids + labels (-100 where no loss is taken).

Labels are unshifted, as everywhere in torchtune: the recipe shifts them by one. The first label of
every sample is -100, so that in a pack no sample learns to predict the next sample's first token.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass

import numpy as np
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE
from torchtune.data import Message
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from custom_datasets._read import Document, Pair
from custom_datasets._spec import CHAT_TEMPLATES, InstructSpec, TextSpec


@dataclass
class Sample:
    tokens: list[int]
    labels: list[int]


@contextlib.contextmanager
def _untruncated(tokenizer: ModelTokenizer):
    """The tokenizer's message API truncates to its max_seq_len; we count and truncate ourselves."""
    saved = getattr(tokenizer, "max_seq_len", None)
    tokenizer.max_seq_len = None
    try:
        yield tokenizer
    finally:
        tokenizer.max_seq_len = saved


def _encode(tokenizer: ModelTokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_bos=False, add_eos=False)


def _chat_parts(tokenizer: ModelTokenizer, spec: InstructSpec, prompt: str, completion: str):
    """Returns (prompt ids, completion ids, completion labels) through the tokenizer's message API."""
    head = [Message(role="system", content=spec.system_prompt, masked=True)] if spec.system_prompt else []
    head.append(Message(role="user", content=prompt, masked=True))
    with _untruncated(tokenizer):
        prompt_ids, _ = tokenizer.tokenize_messages(
            head + [Message(role="assistant", content="", masked=False)], add_end_tokens=False
        )
        ids, mask = tokenizer.tokenize_messages(head + [Message(role="assistant", content=completion, masked=False)])
    # prompt_ids = BOS + system + user + assistant header: the part the model sees at generation time.
    cut = len(prompt_ids)
    if ids[:cut] != prompt_ids:
        raise ValueError(f"{spec.template}: the tokenizer's message API gave a prompt that is not a prefix of the sample")
    labels = [IGNORE if m else t for t, m in zip(ids[cut:], mask[cut:])]
    return ids[:cut], ids[cut:], labels


class Cut(enum.IntFlag):
    """What format_pair did to a too-long pair (stored as the sample's flag; truthy when anything was cut)."""

    NONE = 0
    PROMPT = 1  # the prompt was shortened
    DROPPED = 2  # too_long: drop
    COMPLETION = 4  # the completion was cut


CUT_MARK = " [\u2026]"  # ends a prompt column that was shortened


def _pieces(tokenizer: ModelTokenizer, spec: InstructSpec, prompt: str, completion: str):
    """(head, prompt ids, completion ids, completion labels) of a pair in the source's template."""
    if spec.template in CHAT_TEMPLATES:
        prompt_ids, comp_ids, comp_labels = _chat_parts(tokenizer, spec, prompt, completion)
        return prompt_ids[:1], prompt_ids[1:], comp_ids, comp_labels  # BOS is kept whatever is truncated
    comp_ids = _encode(tokenizer, completion) + [tokenizer.eos_id]
    return [tokenizer.bos_id], _encode(tokenizer, prompt + spec.separator), comp_ids, list(comp_ids)


def _shorten_columns(tokenizer, spec: InstructSpec, pair: Pair, keep_prompt: int):
    """Shortens the longest prompt column after the first (the instruction is never cut) by its end, marked
    with CUT_MARK, until the prompt fits in keep_prompt tokens or that column is empty.
    Returns the pieces of the shortened pair, or None when no column could absorb the cut."""
    parts = list(pair.parts)
    pieces = None
    for _ in range(8):  # re-tokenizing the joined text can differ by a token or two from the parts: a few rounds
        lengths = [len(_encode(tokenizer, p)) for p in parts]
        i = max(range(1, len(parts)), key=lambda j: lengths[j])
        current = pieces or _pieces(tokenizer, spec, spec.prompt_joiner.join(parts), pair.completion)
        excess = len(current[1]) - keep_prompt
        if excess <= 0:
            return current
        text = parts[i][: -len(CUT_MARK)] if parts[i].endswith(CUT_MARK) else parts[i]
        ids = _encode(tokenizer, text)
        keep = len(ids) - excess - len(_encode(tokenizer, CUT_MARK))
        if keep <= 0:
            return None
        parts[i] = tokenizer.decode(ids[:keep]) + CUT_MARK
        pieces = _pieces(tokenizer, spec, spec.prompt_joiner.join(parts), pair.completion)
    return pieces if len(pieces[1]) <= keep_prompt else None


def format_pair(
    tokenizer: ModelTokenizer, spec: InstructSpec, pair: Pair, max_seq_len: int
) -> tuple[Sample | None, Cut]:
    """Tokenizes one pair with the source's template.

    A pair over max_seq_len is cut (too_long: truncate) or left out (drop). When cut, the completion keeps
    what fits once the prompt has at least half the room; the prompt is shortened to the rest: with several
    prompt columns (`prompt: [instruction, context]`), the longest column after the first loses its end,
    marked with " [...]", so the instruction stays whole; a one-column prompt keeps its end.

    Returns:
        (sample, cut): sample is None when the pair is too long and the source drops long pairs; `cut` says
        what was shortened (Cut.PROMPT, Cut.COMPLETION, both, or Cut.DROPPED), falsy when nothing was.
    """
    head, prompt_ids, comp_ids, comp_labels = _pieces(tokenizer, spec, pair.prompt, pair.completion)
    if len(head) + len(prompt_ids) + len(comp_ids) <= max_seq_len:
        cut = Cut.NONE
    elif spec.too_long == "drop":
        return None, Cut.DROPPED
    else:
        body = max_seq_len - len(head)
        keep_comp = min(len(comp_ids), max(body - len(prompt_ids), body // 2))
        keep_prompt = body - keep_comp
        cut = Cut.COMPLETION if keep_comp < len(comp_ids) else Cut.NONE
        if len(prompt_ids) > keep_prompt:
            cut |= Cut.PROMPT
            shortened = _shorten_columns(tokenizer, spec, pair, keep_prompt) if len(pair.parts) > 1 else None
            if shortened is not None:
                head, prompt_ids = shortened[0], shortened[1]
            prompt_ids = prompt_ids[max(len(prompt_ids) - keep_prompt, 0):]
        comp_ids, comp_labels = comp_ids[:keep_comp], comp_labels[:keep_comp]
    tokens = head + prompt_ids + comp_ids
    prompt_labels = list(prompt_ids) if spec.train_on_input else [IGNORE] * len(prompt_ids)
    labels = [IGNORE] * len(head) + prompt_labels + comp_labels
    return Sample(tokens, labels), cut


def format_prompt(tokenizer: ModelTokenizer, spec: InstructSpec, prompt: str) -> list[int]:
    """The token ids a model sees before it writes the completion: what generation starts from."""
    if spec.template in CHAT_TEMPLATES:
        return _chat_parts(tokenizer, spec, prompt, "")[0]
    return [tokenizer.bos_id] + _encode(tokenizer, prompt + spec.separator)


def template_overhead(tokenizer: ModelTokenizer, spec: InstructSpec) -> int:
    """Tokens the template adds around an empty prompt and completion."""
    if spec.template in CHAT_TEMPLATES:
        prompt_ids, comp_ids, _ = _chat_parts(tokenizer, spec, "", "")
        return len(prompt_ids) + len(comp_ids)
    return 2 + len(_encode(tokenizer, spec.separator))


@dataclass
class Windows:
    """A document's windows, concatenated: window i is the i-th `lengths` slice of tokens/labels."""

    tokens: np.ndarray  # int32
    labels: np.ndarray  # int32
    lengths: list[int]
    doc_tokens: int  # tokens of the document (+ its EOS)
    trained_tokens: int  # of those, how many carry a label in some window


def window_document(tokenizer: ModelTokenizer, spec: TextSpec, doc: Document, max_seq_len: int) -> Windows:
    """Cuts a document into windows of BOS + up to max_seq_len - 1 tokens.

    Consecutive windows overlap by `stride` tokens; the repeated tokens are context only (label
    -100), so every token of the document is trained exactly once and none is dropped. The ids are
    held as int32 arrays (4 bytes a token, not a Python int's ~36), so a long document stays cheap.
    """
    ids = np.array(_encode(tokenizer, doc.text) + [tokenizer.eos_id], np.int32)
    width = max_seq_len - 1
    tokens, labels, lengths = [], [], []
    bos, ignore = np.array([tokenizer.bos_id], np.int32), np.array([IGNORE], np.int32)
    trained = 0
    start = 0
    while True:
        context = 0 if start == 0 else spec.stride
        chunk = ids[start : start + width]
        tokens += [bos, chunk]
        labels += [ignore, np.full(min(context, len(chunk)), IGNORE, np.int32), chunk[context:]]
        lengths.append(1 + len(chunk))
        trained += len(chunk) - context
        if start + width >= len(ids):
            break
        start += width - spec.stride
    return Windows(np.concatenate(tokens), np.concatenate(labels), lengths, len(ids), trained)
