"""Conversations -> samples: the tokenizer's chat format, loss on the turns `train_on` picks, a conversation longer
than max_seq_len split at turn boundaries.

Llama 3 tokenizers (tiktoken `tokenizer.model`): Meta's dialog format, written here turn by turn as llama-models'
`ChatFormat.encode_message` writes it: `<|start_header_id|>{role}<|end_header_id|>\\n\\n` + content + `<|eot_id|>`,
tool results under the `ipython` role (Llama 3.1), an assistant's tool calls as Meta's JSON
(`{"type": "function", "name": ..., "parameters": {...}}`) after its content. Contents are stripped of surrounding
whitespace, as torchtune's message API and the Llama 3.1 Hugging Face chat template (`| trim`) do. torchtune's own
message API is not used: 0.6.1 refuses tool-call conversations and drops `tool_calls`.

Tokenizers with a `tokenizer.json` (custom_datasets._hf_tokenizer): the model's own Jinja chat template,
rendered turn by turn; each turn owns the tokens it adds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE

from custom_datasets._format import Cut, Sample
from custom_datasets._read import BadRow, Conversation, Turn
from custom_datasets._read_chat import read_conversations
from custom_datasets._spec import ChatSpec

LLAMA3_ROLE = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython"}


@dataclass
class Piece:
    """One turn's tokens: its header (never trained) and body (content, tool calls, end of turn)."""

    header: list[int]
    body: list[int]
    trained: bool = False


def with_system_prompt(spec: ChatSpec, turns: tuple[Turn, ...]) -> tuple[Turn, ...]:
    """The turns with the source's system_prompt as the first turn (replacing the conversation's own)."""
    if spec.system_prompt is None:
        return turns
    rest = turns[1:] if turns and turns[0].role == "system" else turns
    return (Turn("system", spec.system_prompt), *rest)


def read_trained_conversations(spec: ChatSpec, problems: list[str], bad: list[BadRow]) -> Iterator[Conversation]:
    """The source's conversations as the reader checks them, less those with no turn to train (every turn that
    train_on would train has its own train flag false): a bad row each, in reading order."""
    for conversation in read_conversations(spec, problems, bad):
        if any(trained_turns(spec, conversation.turns)):
            yield conversation
        else:
            bad.append(BadRow(conversation.where, "nothing to train", f"every turn that train_on={spec.train_on} would "
                              f"train has {spec.train_key}: false; fix the row or set dataset.bad_rows=skip"))


def trained_turns(spec: ChatSpec, turns: tuple[Turn, ...]) -> list[bool]:
    """Which turns carry the loss: train_on's choice, overridden by a turn's own train flag."""
    assistants = [i for i, t in enumerate(turns) if t.role == "assistant"]
    out = []
    for i, t in enumerate(turns):
        if spec.train_on == "all":
            trained = True
        else:
            trained = t.role == "assistant" and (spec.train_on == "all_assistant" or i == assistants[-1])
        out.append(trained if t.train is None else t.train)
    return out


def _is_llama3(tokenizer) -> bool:
    return "<|start_header_id|>" in getattr(tokenizer, "special_tokens", {})


def tool_call_text(name: str, arguments: dict) -> str:
    """An assistant's tool call as Llama 3.1 writes it (llama-models' ToolUtils.encode_tool_call, JSON format)."""
    return json.dumps({"type": "function", "name": name, "parameters": arguments})


def _llama3_pieces(tok, turns: tuple[Turn, ...]) -> tuple[list[int], list[Piece]]:
    special = tok.special_tokens

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_bos=False, add_eos=False) if text else []

    pieces = []
    for t in turns:
        header = [special["<|start_header_id|>"]] + enc(LLAMA3_ROLE[t.role]) + [special["<|end_header_id|>"]] + enc("\n\n")
        body = enc(t.content.strip())
        for name, arguments in t.tool_calls:
            body += enc(tool_call_text(name, arguments))
        pieces.append(Piece(header, body + [special["<|eot_id|>"]]))
    return [tok.bos_id], pieces


def _messages(turns: tuple[Turn, ...]) -> list[dict]:
    """The turns as a chat template reads them (OpenAI's message shape, tool calls included)."""
    out = []
    for t in turns:
        m = {"role": t.role, "content": t.content.strip()}
        if t.tool_calls:
            m["tool_calls"] = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in t.tool_calls]
        out.append(m)
    return out


def _template_pieces(tok, turns: tuple[Turn, ...]) -> tuple[list[int], list[Piece]]:
    messages = _messages(turns)
    head, pieces = [tok.bos_id], []  # every sample starts with BOS, as in training
    done = list(head)
    for i, t in enumerate(turns):
        header: list[int] = []
        if t.role == "assistant":
            ids = tok._ids(tok.render(messages[:i], add_generation_prompt=True)) if i else list(head)
            header = _added(tok, done, ids, i)
            done = ids
        ids = tok._ids(tok.render(messages[: i + 1]))
        pieces.append(Piece(header, _added(tok, done, ids, i)))
        done = ids
    return head, pieces


def _added(tok, before: list[int], after: list[int], turn: int) -> list[int]:
    if after[: len(before)] != before:
        raise ValueError(f"{getattr(tok, 'path', 'tokenizer')}: the chat template does not render turn {turn} as a "
                         "continuation of the turns before it, so its tokens cannot be told apart for the loss mask.")
    return after[len(before):]


def conversation_pieces(tokenizer, spec: ChatSpec, turns: tuple[Turn, ...]) -> tuple[list[int], list[Piece]]:
    """(head: BOS, one Piece per turn with its `trained` flag) in the tokenizer's chat format."""
    turns = with_system_prompt(spec, turns)
    if _is_llama3(tokenizer):
        head, pieces = _llama3_pieces(tokenizer, turns)
    elif hasattr(tokenizer, "render"):
        head, pieces = _template_pieces(tokenizer, turns)
    else:
        raise ValueError(f"dataset.sources.{spec.name}: type chat needs a Llama 3 tokenizer (tokenizer.model) or a "
                         f"tokenizer.json with a chat template (custom_datasets._hf_tokenizer); got {type(tokenizer).__name__}.")
    for piece, trained in zip(pieces, trained_turns(spec, turns)):
        piece.trained = trained
    return head, pieces


def _assemble(head, pieces, span, train: set[int], train_on: str) -> tuple[list[int], list[int], int]:
    """tokens, labels and where the last turn's body starts, for the turns in `span` (indices, in order)."""
    tokens, labels = list(head), [IGNORE] * len(head)
    body_at = 0
    for i in span:
        p = pieces[i]
        tokens += p.header
        labels += list(p.header) if i in train and train_on == "all" else [IGNORE] * len(p.header)
        body_at = len(tokens)
        tokens += p.body
        labels += list(p.body) if i in train else [IGNORE] * len(p.body)
    labels[0] = IGNORE
    return tokens, labels, body_at


def _cut(tokens, labels, body_at: int, head: int, max_seq_len: int) -> tuple[list[int], list[int], Cut]:
    """A sample of one trained turn that is too long: the turn keeps what fits once the context has half the room,
    the context (after BOS) keeps its end; as a too-long pair is cut."""
    room = max_seq_len - head
    body = len(tokens) - body_at
    context = body_at - head
    keep_body = min(body, max(room - context, room // 2))
    keep_context = room - keep_body
    cut = Cut.COMPLETION if keep_body < body else Cut.NONE
    if keep_context < context:
        cut |= Cut.PROMPT
    keep = list(range(head)) + list(range(body_at - keep_context, body_at)) + list(range(body_at, body_at + keep_body))
    return [tokens[i] for i in keep], [labels[i] for i in keep], cut


@dataclass
class Formatted:
    samples: list[tuple[Sample, Cut]]  # empty: dropped (too_long: drop)
    turns: list[int]  # trained turns in each sample
    targets: int  # turns the conversation trains (each lands in exactly one sample, unless dropped)


def format_conversation(tokenizer, spec: ChatSpec, conversation: Conversation, max_seq_len: int) -> Formatted:
    """Tokenizes a conversation; one sample if it fits. Longer: too_long drop leaves it out; split cuts it at turn
    boundaries into samples that each keep the system turn and train a run of the turns not trained yet; a sample
    after the first opens with the turns before it as context (no loss), up to half the room, from a user turn on,
    and takes more if the room allows. Every trained turn lands in exactly one sample; one that does not fit even with
    only the turn before it is cut (Cut flags)."""
    head, pieces = conversation_pieces(tokenizer, spec, conversation.turns)
    roles = [turn.role for turn in with_system_prompt(spec, conversation.turns)]
    sys = [0] if roles and roles[0] == "system" else []
    first = len(sys)
    targets = [i for i in range(first, len(pieces)) if pieces[i].trained]
    if sys and pieces[0].trained:  # train_on all: the system turn's loss goes with the first sample
        targets = [0] + targets
    size = [len(p.header) + len(p.body) for p in pieces]
    base = len(head) + sum(size[i] for i in sys)
    total = len(head) + sum(size)
    if total <= max_seq_len:
        tokens, labels, _ = _assemble(head, pieces, range(len(pieces)), set(targets), spec.train_on)
        return Formatted([(Sample(tokens, labels), Cut.NONE)], [len(targets)], len(targets))
    if spec.too_long == "drop":
        return Formatted([], [], len(targets))
    rest = [t for t in targets if t >= first]
    samples, counts = [], []
    t, prev_end = 0, first - 1
    fits = lambda s, e: base + sum(size[s:e + 1]) <= max_seq_len  # noqa: E731
    while t < len(rest):
        s, u = prev_end + 1, t
        e = rest[t]
        if samples:  # a later sample opens with the turns before it as context, up to half the room,
            c = s    # from a user turn on
            while c - 1 >= first and sum(size[c - 1:s]) <= (max_seq_len - base) // 2:
                c -= 1
            while c < s and roles[c] != "user":
                c += 1
            s = c if fits(c, e) else s
        while s < e - 1 and not fits(s, e):  # too long with all the turns since the last sample: less context
            s += 1
        if fits(s, e):
            while u + 1 < len(rest) and fits(s, rest[u + 1]):  # train as many of the next turns as fit
                u += 1
            e = rest[u]
            while s > first and fits(s - 1, e):  # and as much context before them as fits
                s -= 1
        else:
            s = max(first, e - 1)  # the turn alone with the one before it is too long: cut it
        train = set(rest[t:u + 1]) | ({0} if 0 in targets and not samples else set())
        tokens, labels, body_at = _assemble(head, pieces, [*sys, *range(s, e + 1)], train, spec.train_on)
        cut = Cut.NONE
        if len(tokens) > max_seq_len:
            tokens, labels, cut = _cut(tokens, labels, body_at, len(head), max_seq_len)
        samples.append((Sample(tokens, labels), cut))
        counts.append(u + 1 - t + (1 if 0 in train and 0 in targets else 0))
        t, prev_end = u + 1, e
    return Formatted(samples, counts, len(targets))


def chat_prompt_ids(tokenizer, spec: ChatSpec, turns: tuple[Turn, ...]) -> list[int]:
    """The ids generation starts from after `turns`: the conversation so far and the assistant's header."""
    head, pieces = conversation_pieces(tokenizer, spec, (*turns, Turn("assistant", "x")))
    ids = list(head)
    for p in pieces:
        ids += p.header + p.body
    return ids[: len(ids) - len(pieces[-1].body)]


def chat_overhead(tokenizer, spec: ChatSpec) -> int:
    """Tokens a one-exchange conversation needs around its text (BOS, system turn, headers, end-of-turn tokens)."""
    head, pieces = conversation_pieces(tokenizer, spec, (Turn("user", "x"), Turn("assistant", "x")))
    return len(head) + sum(len(p.header) + len(p.body) for p in pieces) - 2
