"""The held-out split as the training data was built: samples for the loss, handled exactly as training
handles them (template, masks, `too_long`), counted."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX as IGNORE
from torchtune.data import padded_collate_sft
from torchtune.modules.transforms.tokenizers import ModelTokenizer
from tqdm import tqdm

from custom_datasets._chat import format_conversation
from custom_datasets._format import format_pair
from custom_datasets._read import Conversation, Pair, turns_from_messages
from custom_datasets._spec import ChatSpec, InstructSpec, TextSpec
from tuned.model import TunedModel

MAX_NLL = 700.0  # exp(700) is about 1e304: perplexities are capped there, never an overflow


def perplexity(nll: float) -> float:
    """exp of a mean negative log-likelihood per token (capped at exp(700), so it never overflows)."""
    return math.exp(min(nll, MAX_NLL))


def read_held_out(held_out_dir: str | Path, sources: list[str]) -> dict[str, list[dict]]:
    """Each source's held-out records (`<held_out_dir>/<source>.jsonl`, written by the builder)."""
    held_dir = Path(held_out_dir)
    out = {}
    for name in sources:
        path = held_dir / f"{name}.jsonl"
        if path.is_file():
            with path.open(encoding="utf-8") as f:
                out[name] = [json.loads(line) for line in f if line.strip()]
    if not out:
        raise FileNotFoundError(
            f"No held-out split under {held_dir}. Set dataset.sources.<name>.val_fraction (or val_size) and "
            "build the data (make data, or training) with the same config first.")
    return out


@dataclass
class HeldOut:
    """One source's held-out samples, formatted as training formats them."""

    source: str
    rows: int = 0  # held-out records read
    truncated: int = 0  # longer than max_seq_len, cut as training cuts (too_long: truncate)
    dropped: int = 0  # longer than max_seq_len, left out as training leaves them (too_long: drop)
    samples: list[dict] = field(default_factory=list)  # {tokens, labels, record}

    def counts(self) -> dict:
        return {"rows": self.rows, "scored": len(self.samples), "truncated": self.truncated, "dropped": self.dropped}


def held_out_samples(tok: ModelTokenizer, spec: InstructSpec | TextSpec | ChatSpec, records: list[dict], max_len: int) -> HeldOut:
    """Held-out records as (tokens, labels), masked as the training loss is: completion tokens (and
    EOS) of pairs, never the prompt; the new tokens of text windows, never their stride context; a conversation's
    last assistant turn, after the turns before it (as much of them as fits).
    Pairs longer than `max_len` are cut or left out by the source's `too_long`, as in training."""
    out = HeldOut(spec.name, rows=len(records))
    for r in records:
        if isinstance(spec, ChatSpec):
            last = dataclasses.replace(spec, train_on="last_assistant", train_key="\0")  # the turns' own flags: not here
            f = format_conversation(tok, last, Conversation(turns_from_messages(r["messages"]), r["where"]), max_len)
            out.dropped += not f.samples
            if f.samples:
                sample, cut = f.samples[-1]
                out.truncated += bool(cut) or len(f.samples) > 1
                out.samples.append({"tokens": sample.tokens, "labels": sample.labels, "record": r})
            continue
        if isinstance(spec, InstructSpec):
            pair_spec = dataclasses.replace(spec, train_on_input=False)
            sample, cut = format_pair(tok, pair_spec, Pair(r["prompt"], r["completion"], r["where"], tuple(r.get("prompt_parts", ()))), max_len)
            out.truncated += cut and sample is not None
            out.dropped += sample is None
            if sample is not None:
                out.samples.append({"tokens": sample.tokens, "labels": sample.labels, "record": r})
            continue
        ctx = tok.encode(r["context"], add_bos=False, add_eos=False)
        body = tok.encode(r["text"], add_bos=False, add_eos=False)
        tokens, labels = [tok.bos_id] + ctx + body, [IGNORE] * (1 + len(ctx)) + body
        out.truncated += len(tokens) > max_len  # re-encoding decoded text can differ by a token at the edges
        out.samples.append({"tokens": tokens[:max_len], "labels": labels[:max_len], "record": r})
    return out


@torch.inference_mode()
def held_out_loss(tuned: TunedModel, held: HeldOut, batch_size: int, desc: str) -> dict:
    """Mean loss per supervised token over a source's held-out samples, shifted as the recipe shifts.
    Samples are batched by length (less padding); the sum does not depend on the order."""
    total, count = 0.0, 0
    samples = sorted(held.samples, key=lambda s: len(s["tokens"]))
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch", leave=False):
        batch = padded_collate_sft([{"tokens": s["tokens"], "labels": s["labels"]} for s in samples[start : start + batch_size]],
                                   padding_idx=tuned.tokenizer.pad_id)
        targets = batch["labels"][:, 1:]  # position i predicts token i+1
        where = torch.zeros_like(batch["labels"], dtype=torch.bool)
        where[:, :-1] = targets != IGNORE
        logits = tuned.logits_at(batch["tokens"], where)
        total += F.cross_entropy(logits, targets[targets != IGNORE].to(logits.device), reduction="sum").item()
        count += len(logits)
    mean = total / count if count else None  # None: every held-out row of the source was dropped
    return {"loss": mean, "perplexity": None if mean is None else perplexity(mean), "tokens": count, **held.counts()}
