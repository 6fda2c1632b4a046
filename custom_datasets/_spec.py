"""Source specs: the `dataset.sources.<name>` mappings of a config, checked and typed."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

# completion: BOS + prompt + separator + completion + EOS. chat: the tokenizer's own chat format, through its message
# API (the Llama 3 header format for the Llama 3 tokenizer, the model's Jinja chat template for a tokenizer.json
# model). llama3_chat: the name chat had first, kept for existing configs.
TEMPLATES = ("completion", "chat", "llama3_chat")
CHAT_TEMPLATES = ("chat", "llama3_chat")
TOO_LONG = ("truncate", "drop")
BAD_ROWS = ("error", "skip")
TYPES = ("instruct", "text", "chat")
TRAIN_ON = ("all_assistant", "last_assistant", "all")
CHAT_TOO_LONG = ("split", "drop")
CHAT_FORMATS = ("auto", "openai", "sharegpt")
CHAT_ROLES = ("system", "user", "assistant", "tool")
# The role names each format uses, mapped to ours (a source's `roles` adds to or overrides these). ShareGPT's
# human/gpt, and the names tool results go by: OpenAI's tool (function: its older name), Llama 3.1's ipython,
# LLaMA-Factory's observation.
DEFAULT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool", "function": "tool",
                 "ipython": "tool", "observation": "tool", "human": "user", "gpt": "assistant"}


TRACEBACK_ENV = "CUSTOM_DATASETS_TRACEBACK"


def _print_dataset_errors(hook):
    """A sys.excepthook that prints a DatasetError that ends a run as its message alone (the fix is in it; the
    traceback of 16 frames of torchtune and our builder above it is noise), and leaves every other exception
    to `hook`. CUSTOM_DATASETS_TRACEBACK=1 keeps the traceback."""
    import os

    def excepthook(kind, error, tb):
        if isinstance(error, DatasetError) and not os.environ.get(TRACEBACK_ENV):
            print(f"\nDatasetError: {error}\n(set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
        else:
            hook(kind, error, tb)

    excepthook.wraps_dataset_errors = True
    return excepthook


def print_dataset_errors_plainly() -> None:
    """Installs `_print_dataset_errors` over the process's sys.excepthook, once. Called by the builder when it
    runs (a run it ends prints its message alone), never at import: importing the package changes nothing."""
    if not getattr(sys.excepthook, "wraps_dataset_errors", False):
        sys.excepthook = _print_dataset_errors(sys.excepthook)


def did_you_mean(word: str, choices) -> str:
    """"; did you mean 'x'?" for the closest of `choices`, or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class DatasetError(ValueError):
    """Every problem found while building the dataset, raised once.

    Attributes:
        problems: one line per problem, each naming the config key or file and the fix.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the dataset config or data:\n{lines}")

    def __reduce__(self):  # from a worker or the duplicate count's process, whole (its args are the message)
        return DatasetError, (self.problems,)


@dataclass(frozen=True)
class InstructSpec:
    """Prompt -> completion pairs. See docs/data.md "Source options" for every key."""

    name: str
    path: str
    prompt: tuple[str, ...] = ("prompt",)
    completion: str = "completion"
    prompt_joiner: str = "\n\n"
    separator: str = "\n"
    template: str = "completion"
    system_prompt: str | None = None
    train_on_input: bool = False
    too_long: str = "truncate"
    split: str = "train"
    weight: float = 1.0
    val_fraction: float = 0.0
    val_size: int | None = None
    type: str = "instruct"


@dataclass(frozen=True)
class TextSpec:
    """Unstructured text, cut into windows of `max_seq_len`."""

    name: str
    path: str
    column: str = "text"
    stride: int = 0
    weight: float = 1.0
    val_fraction: float = 0.0
    val_size: int | None = None
    type: str = "text"


@dataclass(frozen=True)
class ChatSpec:
    """Conversations (OpenAI `messages` or ShareGPT `conversations`), in the tokenizer's chat format, loss on the
    assistant's turns. See docs/data.md "Conversations: type: chat"."""

    name: str
    path: str
    column: str | None = None  # None: `messages` or `conversations`, whichever the rows have
    format: str = "auto"  # auto (from the rows) | openai (role/content) | sharegpt (from/value)
    roles: tuple = ()  # extra role names: ((their name, ours), ...), given in the config as a mapping
    system_prompt: str | None = None  # adds a system turn, or replaces the conversation's own
    train_on: str = "all_assistant"  # all_assistant | last_assistant | all
    train_key: str = "train"  # a turn with this key false is not trained (true: trained even if train_on skips it)
    too_long: str = "split"  # split at turn boundaries into several samples | drop the conversation
    split: str = "train"
    weight: float = 1.0
    val_fraction: float = 0.0
    val_size: int | None = None
    type: str = "chat"

    def role_map(self) -> dict[str, str]:
        return {**DEFAULT_ROLES, **dict(self.roles)}


SPECS = {"instruct": InstructSpec, "text": TextSpec, "chat": ChatSpec}


def _keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "name"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_common(key: str, spec: dict[str, Any], problems: list[str]) -> None:
    weight = spec.get("weight", 1.0)
    if not _is_number(weight) or weight <= 0:
        problems.append(
            f"{key}.weight: {weight!r} is not a positive number. Use e.g. 1 (once per epoch), "
            "0.25 (a deterministic quarter) or 2 (twice). To leave the source out, remove it: "
            f"~{key} on the command line (make ... ARGS=\"~{key}\"), or delete it from the config."
        )
    frac = spec.get("val_fraction", 0.0)
    if not _is_number(frac) or not 0 <= frac < 1:
        problems.append(f"{key}.val_fraction: {frac!r} must be a number in [0, 1), e.g. 0.05.")
    size = spec.get("val_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        problems.append(f"{key}.val_size: {size!r} must be a whole number >= 0, e.g. 200.")
    if size is not None and _is_number(frac) and frac > 0:
        problems.append(f"{key}: set val_fraction or val_size, not both.")
    if not isinstance(spec.get("path"), str) or not spec.get("path"):
        problems.append(
            f"{key}.path is missing. Set it to a file, a folder or a Hugging Face dataset id, "
            f"e.g. {key}.path=data/pairs.jsonl"
        )


def _check_instruct(key: str, spec: dict[str, Any], problems: list[str]) -> None:
    prompt = spec.get("prompt", "prompt")
    if isinstance(prompt, str):
        spec["prompt"] = (prompt,)
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        spec["prompt"] = tuple(prompt)
    else:
        problems.append(
            f"{key}.prompt: {prompt!r} must be a column name or a list of column names, "
            "e.g. [instruction, input]."
        )
    for name, allowed in (("template", TEMPLATES), ("too_long", TOO_LONG)):
        value = spec.get(name, getattr(InstructSpec, name))
        if value not in allowed:
            problems.append(f"{key}.{name}: unknown value {value!r}; expected one of {list(allowed)}.")
    if not isinstance(spec.get("train_on_input", False), bool):
        problems.append(f"{key}.train_on_input must be True or False.")
    for name in ("completion", "prompt_joiner", "separator", "split"):
        if name in spec and not isinstance(spec[name], str):
            problems.append(f"{key}.{name}: {spec[name]!r} must be a string.")


def _check_text(key: str, spec: dict[str, Any], max_seq_len: int, problems: list[str]) -> None:
    stride = spec.get("stride", 0)
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 0:
        problems.append(f"{key}.stride: {stride!r} must be a whole number >= 0 (tokens of overlap).")
    elif stride >= max_seq_len - 1:
        problems.append(
            f"{key}.stride: {stride} leaves no new tokens in a window of max_seq_len={max_seq_len} "
            f"(one slot is BOS). Use a stride below {max_seq_len - 1}, e.g. {max_seq_len // 8}."
        )


def _check_chat(key: str, spec: dict[str, Any], problems: list[str]) -> None:
    for name, allowed in (("format", CHAT_FORMATS), ("train_on", TRAIN_ON), ("too_long", CHAT_TOO_LONG)):
        value = spec.get(name, getattr(ChatSpec, name))
        if value not in allowed:
            problems.append(f"{key}.{name}: unknown value {value!r}; expected one of {list(allowed)}.")
    for name in ("column", "system_prompt"):
        if spec.get(name) is not None and not isinstance(spec[name], str):
            problems.append(f"{key}.{name}: {spec[name]!r} must be a string (or null).")
    for name in ("train_key", "split"):
        if name in spec and not isinstance(spec[name], str):
            problems.append(f"{key}.{name}: {spec[name]!r} must be a string.")
    roles = spec.get("roles") or {}
    if not isinstance(roles, Mapping) or not all(isinstance(k, str) and v in CHAT_ROLES for k, v in roles.items()):
        problems.append(f"{key}.roles: {roles!r} must map the data's role names to one of {list(CHAT_ROLES)}, "
                        "e.g. {human: user, bot: assistant}.")
    else:
        spec["roles"] = tuple(sorted(roles.items()))


def parse_sources(sources: Mapping[str, Any], max_seq_len: int) -> list[InstructSpec | TextSpec | ChatSpec]:
    """Checks `dataset.sources` and returns one typed spec per source, in config order.

    Args:
        sources: the `dataset.sources` mapping, as plain Python or as the recipe's OmegaConf node
            (list prompts arrive as `ListConfig`, which is read like a list).
        max_seq_len: the sequence length the sources are cut to.

    Raises:
        DatasetError: listing every problem in every source.
    """
    if isinstance(sources, DictConfig):
        sources = OmegaConf.to_container(sources, resolve=True)
    problems: list[str] = []
    if not isinstance(sources, Mapping) or not sources:
        raise DatasetError(
            [
                "dataset.sources must be a non-empty mapping from a source name to its spec, e.g.\n"
                "      sources:\n        pairs: {type: instruct, path: data/pairs.jsonl}\n"
                "        notes: {type: text, path: data/text}\n        chats: {type: chat, path: data/chat.jsonl}"
            ]
        )
    specs = []
    for name, raw in sources.items():
        key = f"dataset.sources.{name}"
        if not isinstance(raw, Mapping):
            problems.append(f"{key} must be a mapping with at least `type` and `path`, got {raw!r}.")
            continue
        spec = dict(raw)
        before = len(problems)
        kind = spec.get("type")
        if kind not in SPECS:
            problems.append(f"{key}.type: unknown source type {kind!r}; expected one of {list(TYPES)}.")
            continue
        cls = SPECS[kind]
        unknown = sorted(set(spec) - set(_keys(cls)))
        if unknown:
            problems.append(
                f"{key}: unknown key(s) {unknown} for a {kind} source; valid keys are {sorted(_keys(cls))}."
            )
        _check_common(key, spec, problems)
        if kind == "instruct":
            _check_instruct(key, spec, problems)
        elif kind == "chat":
            _check_chat(key, spec, problems)
        else:
            _check_text(key, spec, max_seq_len, problems)
        if len(problems) == before:
            specs.append(cls(name=str(name), **spec))
    if problems:
        raise DatasetError(problems)
    return specs
