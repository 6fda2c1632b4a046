"""The model of a training config, as the stock recipe builds it, with or without a trained adapter.

One model serves base and tuned: LoRA's B matrices start at zero, so before an adapter is loaded the
model computes exactly the base checkpoint (NF4 base + zero adapter under QLoRA). Evaluating the 8B
model therefore needs what training needs for weights (about 5.5 GiB under QLoRA) and none of the
optimizer state, gradients or stored activations.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils
from torchtune.generation import generate
from torchtune.modules.common_utils import local_kv_cache

from custom_datasets._chat import chat_prompt_ids
from custom_datasets._format import format_prompt
from custom_datasets._read import turns_from_messages
from custom_datasets._spec import ChatSpec, InstructSpec, TextSpec, parse_sources

ADAPTER = "adapter_model.pt"


def epoch_number(folder: str | Path) -> int | None:
    """N for a folder named `epoch_N` (what the recipe writes after epoch N), else None."""
    match = re.fullmatch(r"epoch_(\d+)", Path(folder).name)
    return int(match[1]) if match else None


def epoch_adapters(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every `epoch_N` folder under output_dir that holds an adapter, as (N, folder), oldest first."""
    return sorted((n, p) for p in Path(output_dir).glob("epoch_*")
                  if (n := epoch_number(p)) is not None and (p / ADAPTER).is_file())


def latest_adapter(output_dir: str | Path) -> Path:
    """The newest `epoch_N` folder under output_dir that holds an adapter."""
    found = epoch_adapters(output_dir)
    if not found:
        raise FileNotFoundError(
            f"No trained adapter under {output_dir} (looked for epoch_*/{ADAPTER}). Train first "
            "(make train CONFIG=...), or pass the adapter folder: eval.checkpoint=path/to/epoch_N"
        )
    return found[-1][1]


class TunedModel:
    """The config's model on its device, base weights loaded; `load_adapter` turns it into a tuned one.

    Args:
        cfg: a training config (the same file and overrides the recipe ran with).
    """

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.device = utils.get_device(device=cfg.device)
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.max_seq_len = int(cfg.get("dataset", {}).get("max_seq_len") or cfg.tokenizer.max_seq_len)
        checkpointer = config.instantiate(cfg.checkpointer)
        self.base_files = [str(Path(cfg.checkpointer.checkpoint_dir) / f) for f in cfg.checkpointer.checkpoint_files]
        with training.set_default_dtype(self.dtype), self.device:
            self.model = config.instantiate(cfg.model)
        missing, unexpected = self.model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY], strict=False)
        if unexpected or any("lora" not in k and "magnitude" not in k for k in missing):
            raise ValueError(f"Base checkpoint does not match cfg.model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for m in self.model.modules():
            if hasattr(m, "initialize_dora_magnitude"):
                m.initialize_dora_magnitude()
        self.model.eval()
        self.adapter: str | None = None

    def load_adapter(self, adapter_dir: str | Path) -> None:
        """Loads `adapter_dir/adapter_model.pt` (the recipe's adapter), replacing any loaded before."""
        path = Path(adapter_dir) / ADAPTER
        state = torch.load(path, map_location=self.device, weights_only=True)
        _, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"{path} does not fit cfg.model (unexpected keys {unexpected[:5]}); was it trained with this config?")
        self.adapter = str(path)

    def specs(self) -> dict[str, InstructSpec | TextSpec | ChatSpec]:
        """Every source of the config's dataset section, checked as the builder checks them."""
        return {s.name: s for s in parse_sources(self.cfg.dataset.sources, self.max_seq_len)}

    def instruct_specs(self) -> dict[str, InstructSpec | ChatSpec]:
        """The sources with prompts to complete: pairs and conversations."""
        return {name: s for name, s in self.specs().items() if isinstance(s, (InstructSpec, ChatSpec))}

    def prompt_ids(self, spec: InstructSpec | ChatSpec, prompt: str | list[dict], max_new_tokens: int) -> list[int]:
        """The ids generation starts from, in the source's template. For a chat source, `prompt` is the user's
        message, or the conversation so far as OpenAI-style messages ({role, content}).

        A prompt that leaves no room for `max_new_tokens` within max_seq_len keeps its first token
        (BOS) and its end (the template's answer header), as training keeps a too-long prompt's end.
        """
        if isinstance(spec, ChatSpec):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            ids = chat_prompt_ids(self.tokenizer, spec, turns_from_messages(messages))
        else:
            ids = format_prompt(self.tokenizer, spec, prompt)
        room = max(self.max_seq_len - max_new_tokens, 2)
        return ids if len(ids) <= room else ids[:1] + ids[len(ids) - room + 1 :]

    @torch.inference_mode()
    def logits_at(self, tokens: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """fp32 logits [n, vocab] at the n positions of `tokens` [b, s] where `where` [b, s] is True, in
        row-major order. Only those positions are projected onto the vocabulary: a full [b, s, vocab]
        projection costs 4 bytes x 128,256 per token (1 GiB for 8 x 256 tokens), most of it unused."""
        model = self.model
        model.unembed = lambda h: model.norm(h)  # the decoder's last step, without the output projection
        try:
            hidden = model(tokens.to(self.device))
        finally:
            del model.unembed
        return model.output(hidden[where.to(self.device)]).float()

    @torch.inference_mode()
    def complete(self, ids: list[int], max_new_tokens: int) -> str:
        """Greedy continuation of token ids, stopping at the end-of-turn tokens; special tokens dropped."""
        return self.complete_many([ids], max_new_tokens)[0]

    def complete_many(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8) -> list[str]:
        """Greedy continuations of several prompts (token ids), decoded, special tokens dropped (see generate_ids)."""
        return [self.tokenizer.decode(ids) for ids in self.generate_ids(prompts, max_new_tokens, batch_size)]

    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8) -> list[list[int]]:
        """Greedy continuations of several prompts (token ids), in their order, each up to (not including) its
        first end-of-turn token: torchtune's `generate` with a KV
        cache (`local_kv_cache`, set up for each batch's width + max_new_tokens and released after), prompts of
        similar length batched together and left-padded, each sequence stopped at its own end-of-turn token.
        Only the last position is projected onto the vocabulary (a prompt's other positions never are)."""
        model, out = self.model, [[] for _ in prompts]
        stop = list(self.tokenizer.stop_tokens)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        model.unembed = lambda h: model.output(model.norm(h[:, -1:]))  # the decoder's last step, last position only
        idle = _zero_lora(model)  # no adapter loaded: its B matrices are zero, so skipping them changes no output
        for m in idle:
            m.disabled = True
        try:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                width = max(len(prompts[i]) for i in chunk)
                used = {t for i in chunk for t in prompts[i]}
                pad = next(t for t in (self.tokenizer.pad_id, *range(model.tok_embeddings.num_embeddings)) if t not in used)
                x = torch.full((len(chunk), width), pad, dtype=torch.long)
                for row, i in enumerate(chunk):
                    x[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                with local_kv_cache(model, batch_size=len(chunk), device=self.device, dtype=self.dtype,
                                    decoder_max_seq_len=width + max_new_tokens), _gqa_in_sdpa(model, self.device):
                    tokens, _ = generate(model, x.to(self.device), max_generated_tokens=max_new_tokens, pad_id=pad,
                                         temperature=1e-6, top_k=1, stop_tokens=stop,
                                         custom_generate_next_token=_next_token_without_logits)
                for row, i in enumerate(chunk):
                    new = tokens[row, width:].tolist()
                    end = next((k for k, t in enumerate(new) if t in stop), len(new))
                    out[i] = new[:end]
        finally:
            del model.unembed
            for m in idle:
                m.disabled = False
        return out

    def generate(self, spec: InstructSpec | ChatSpec, prompt: str | list[dict], max_new_tokens: int) -> str:
        """Greedy completion of `prompt` in the source's template."""
        return self.complete(self.prompt_ids(spec, prompt, max_new_tokens), max_new_tokens)


def _next_token_without_logits(model, input_pos, x, q=None, *, mask=None, temperature=1.0, top_k=None):
    """torchtune's generate_next_token for the steps after the first, greedy (the arg max: what its sampling
    with top_k=1 returns, without drawing a [batch, vocab] exponential each step) and keeping no logits
    (generate concatenates every step's [batch, vocab] logits, which nothing here reads: 0.5 GiB for 8 x 128
    tokens of Llama 3)."""
    logits = model(x, input_pos=input_pos, mask=mask)[:, -1]
    return logits.argmax(-1, keepdim=True), logits.unsqueeze(1)[:, :0]


@contextlib.contextmanager
def _gqa_in_sdpa(model, device: torch.device):
    """On CPU, grouped-query attention without copying the cache: torchtune's attention repeats each key/value head
    for the query heads that share it (`expand(...).flatten`, a copy of the layer's whole KV cache, every layer,
    every step: 10% of a SmolLM2 decode step here) before calling SDPA; SDPA's `enable_gqa` reads the shared heads
    in place. Inside the cache's context (the caches keep their real head count): each attention module is told it
    has as many key/value heads as query heads, so it skips the copy, and its SDPA call is made with enable_gqa.
    Same outputs (the identity tests); left alone on GPUs, where it is not measured."""
    from torchtune.modules.attention import MultiHeadAttention

    grouped = [m for m in model.modules() if isinstance(m, MultiHeadAttention) and m.num_heads != m.num_kv_heads]
    if device.type != "cpu" or not grouped:
        yield
        return
    saved = [(m.num_kv_heads, m._attention_call) for m in grouped]

    def sdpa(q, k, v, mask=None, dropout_p=0.0, is_causal=False):
        mask = None if mask is None else mask[:, None, :, :]  # as torchtune's own call does
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                                is_causal=is_causal, enable_gqa=True)

    for m in grouped:
        m.num_kv_heads, m._attention_call = m.num_heads, sdpa
    try:
        yield
    finally:
        for m, (heads, call) in zip(grouped, saved):
            m.num_kv_heads, m._attention_call = heads, call


def _zero_lora(model) -> list:
    """The LoRA layers whose B matrix is all zeros (no adapter loaded yet): their path adds exact zeros."""
    from torchtune.modules.peft import LoRALinear

    return [m for m in model.modules() if isinstance(m, LoRALinear) and not m.disabled
            and not bool(m.lora_b.weight.detach().any())]
