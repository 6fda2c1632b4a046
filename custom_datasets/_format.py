"""Formatting: records -> token ids + labels (-100 where no loss is taken).

Labels are unshifted, as everywhere in torchtune: the recipe shifts them by one. The first label of
every sample is -100, so that in a pack no sample learns to predict the next sample's first token.
"""

from __future__ import annotations

import contextlib
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


def format_pair(
    tokenizer: ModelTokenizer, spec: InstructSpec, pair: Pair, max_seq_len: int
) -> tuple[Sample | None, bool]:
    """Tokenizes one pair with the source's template.

    Returns:
        (sample, truncated): sample is None when the pair is too long and the source drops long pairs.
    """
    if spec.template in CHAT_TEMPLATES:
        prompt_ids, comp_ids, comp_labels = _chat_parts(tokenizer, spec, pair.prompt, pair.completion)
        head, prompt_ids = prompt_ids[:1], prompt_ids[1:]  # BOS is kept whatever is truncated
    else:
        head = [tokenizer.bos_id]
        prompt_ids = _encode(tokenizer, pair.prompt + spec.separator)
        comp_ids = _encode(tokenizer, pair.completion) + [tokenizer.eos_id]
        comp_labels = list(comp_ids)
    truncated = len(head) + len(prompt_ids) + len(comp_ids) > max_seq_len
    if truncated:
        if spec.too_long == "drop":
            return None, True
        # Keep the prompt's end and as much completion as fits; the prompt keeps at least half the
        # room when both are long, so the model still sees what it is answering.
        body = max_seq_len - len(head)
        keep_comp = min(len(comp_ids), max(body - len(prompt_ids), body // 2))
        keep_prompt = body - keep_comp
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
        comp_ids, comp_labels = comp_ids[:keep_comp], comp_labels[:keep_comp]
    tokens = head + prompt_ids + comp_ids
    prompt_labels = list(prompt_ids) if spec.train_on_input else [IGNORE] * len(prompt_ids)
    labels = [IGNORE] * len(head) + prompt_labels + comp_labels
    return Sample(tokens, labels), truncated


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
