"""A torchtune `ModelTokenizer` for any model that ships a Hugging Face `tokenizer.json`.

torchtune 0.6.1 has only `HuggingFaceBaseTokenizer` (encode/decode); the builder, the recipe and eval
also need bos/eos/pad ids, stop tokens and `max_seq_len`, which come from the folder's
`tokenizer_config.json` and `generation_config.json`, as transformers reads them.

Example:
    >>> tokenizer:
    >>>   _component_: custom_datasets.hf_tokenizer
    >>>   path: checkpoints/smollm2_135m
    >>>   max_seq_len: 256
"""

from __future__ import annotations

import json
from pathlib import Path

from torchtune.data import Message
from torchtune.modules.transforms.tokenizers import ModelTokenizer


def _special(config: dict, key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer(ModelTokenizer):
    """`tokenizer.json` + `tokenizer_config.json` (+ `generation_config.json`) of a model folder.

    Args:
        path: the model folder (or its tokenizer.json).
        max_seq_len: the sequence length samples are cut to (None: no limit).
    """

    def __init__(self, path: str, max_seq_len: int | None = None):
        from tokenizers import Tokenizer

        folder = Path(path).parent if Path(path).is_file() else Path(path)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer.path: no tokenizer.json in {folder}. Point it at the model folder.")
        self.path = str(folder)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").is_file() else {}
        gen = json.loads((folder / "generation_config.json").read_text()) if (folder / "generation_config.json").is_file() else {}
        ids = {k: self.tokenizer.token_to_id(t) for k in ("bos_token", "eos_token", "pad_token")
               if (t := _special(config, k)) is not None}
        self.bos_id = ids.get("bos_token", gen.get("bos_token_id"))
        self.eos_id = ids.get("eos_token", gen.get("eos_token_id"))
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"{folder}: tokenizer_config.json names no bos_token/eos_token (and generation_config.json no ids).")
        self.pad_id = ids.get("pad_token", gen.get("pad_token_id", self.eos_id))
        gen_eos = gen.get("eos_token_id", [])
        self.stop_tokens = sorted({self.eos_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])})
        self.chat_template = config.get("chat_template")
        self.max_seq_len = max_seq_len
        self._template = None  # compiled on first use

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, token_ids: list[int], truncate_at_eos: bool = True, skip_special_tokens: bool = True) -> str:
        if truncate_at_eos and self.eos_id in token_ids:
            token_ids = token_ids[: token_ids.index(self.eos_id)]
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The model's chat template (tokenizer_config.json's Jinja `chat_template`), rendered as transformers'
        `apply_chat_template(tokenize=False)` renders it: a sandboxed Jinja environment, trim_blocks, lstrip_blocks."""
        if not self.chat_template:
            raise ValueError(f"{self.path}: tokenizer_config.json has no chat_template, so a chat-formatted source "
                             "(template: chat) cannot be written for this model; use template: completion.")
        if getattr(self, "_template", None) is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        bos = self.tokenizer.id_to_token(self.bos_id)
        eos = self.tokenizer.id_to_token(self.eos_id)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=bos, eos_token=eos)

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ids if ids[:1] == [self.bos_id] else [self.bos_id] + ids  # every sample starts with BOS, as in training

    def tokenize_messages(self, messages: list[Message], add_end_tokens: bool = True, **kwargs) -> tuple[list[int], list[bool]]:
        """Token ids and mask (True = no loss) of a conversation in the model's own chat template.

        Each message owns the tokens its turn adds to the rendered conversation; an assistant turn's header
        (what `add_generation_prompt` renders) is masked like a prompt, its content and end-of-turn tokens
        follow the message's `masked`. With add_end_tokens=False and a last, empty assistant message, the
        result ends with that assistant header: what generation starts from.
        """
        turns = [{"role": m.role, "content": m.text_content} for m in messages]
        if not add_end_tokens and turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            ids = self._ids(self.render(turns[:-1], add_generation_prompt=True))
            return ids, [True] * len(ids)
        tokens: list[int] = []
        mask: list[bool] = []
        for i, message in enumerate(messages):
            if message.role == "assistant":
                header = self._ids(self.render(turns[:i], add_generation_prompt=True)) if i else [self.bos_id]
                self._extend(tokens, mask, header, True, i)
            self._extend(tokens, mask, self._ids(self.render(turns[: i + 1])), message.masked, i)
        return tokens, mask

    def _extend(self, tokens: list[int], mask: list[bool], ids: list[int], masked: bool, turn: int) -> None:
        """Appends what `ids` (the conversation rendered so far) adds to `tokens`."""
        if ids[: len(tokens)] != tokens:
            raise ValueError(f"{self.path}: the chat template does not render turn {turn} as a continuation of the "
                             "turns before it, so its tokens cannot be told apart for the loss mask.")
        mask += [masked] * (len(ids) - len(tokens))
        tokens += ids[len(tokens):]

    def __call__(self, sample: dict, inference: bool = False) -> dict:
        tokens, mask = self.tokenize_messages(sample["messages"])
        return {**sample, "tokens": tokens, "mask": mask}

    def __getstate__(self) -> dict:  # picklable (the pack store fingerprints the tokenizer by pickling it)
        return {**self.__dict__, "tokenizer": self.tokenizer.to_str(), "_template": None}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer

        self.__dict__.update({**state, "tokenizer": Tokenizer.from_str(state["tokenizer"])})


def hf_tokenizer(path: str, max_seq_len: int | None = None) -> HFTokenizer:
    """The tokenizer of a Hugging Face model folder (see `HFTokenizer`)."""
    return HFTokenizer(path, max_seq_len)
