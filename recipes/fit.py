"""Will it fit? An estimate of peak GPU memory for a training config, with its breakdown.

    PYTHONPATH=. tune run recipes/fit.py --config configs/llama3_1_8b_qlora.yaml [key=value ...]   (or: make fit)

The model is built on the meta device from the config's own `model` section (no weights, no GPU), so
parameter counts and NF4 quantization are exact; activations and logits follow the formulas below and
are an estimate until calibrated against measured peaks on a GPU. Exits 1 when the estimate exceeds
the config's `gpu_memory_gb`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torchtune import config

GiB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
NF4_BYTES = 4.127 / 8  # 4-bit codes + an int8 scale per 64 values + an fp32 scale per 256 blocks (torchao NF4)
FRAMEWORK_GIB = 0.8  # CUDA context and kernels, outside PyTorch's allocator
FRAGMENTATION = 0.10  # allocator slack on top of live tensors


@dataclass
class Estimate:
    lines: list[tuple[str, float]]  # (what, bytes), summed into the total
    notes: list[str]
    total: float
    budget_gib: float | None

    @property
    def fits(self) -> bool:
        return self.budget_gib is None or self.total <= self.budget_gib * GiB

    def report(self) -> str:
        width = max(len(w) for w, _ in self.lines) + 2
        out = [f"  {w:<{width}}{b / GiB:7.2f} GiB" for w, b in self.lines]
        out += [f"  {'total (estimate)':<{width}}{self.total / GiB:7.2f} GiB"] + [f"  {n}" for n in self.notes]
        if self.budget_gib is None:
            out.append("  no GPU budget in this config (gpu_memory_gb: null)")
        else:
            spare = self.budget_gib - self.total / GiB
            verdict = f"fits, {spare:.1f} GiB spare" if self.fits else f"does NOT fit, {-spare:.1f} GiB over"
            out.append(f"  budget {self.budget_gib:g} GiB (gpu_memory_gb): {verdict}")
        return "\n".join(out)

    def summary(self) -> str:
        budget = "no GPU budget" if self.budget_gib is None else f"of {self.budget_gib:g} GiB, {'fits' if self.fits else 'does NOT fit'}"
        return f"{self.total / GiB:.1f} GiB {budget}"


def _shapes(model: torch.nn.Module) -> tuple[int, int, int, int, int]:
    """(layers, embed dim, kv dim, MLP hidden dim, vocab) read off the built model."""
    sd = {k: tuple(v.shape) for k, v in model.named_parameters()}  # state_dict() hooks copy to CPU
    vocab, dim = sd["tok_embeddings.weight"]
    layers = len(model.layers)
    kv = sd["layers.0.attn.k_proj.weight"][0]
    hidden = sd["layers.0.mlp.w1.weight"][0]
    return layers, dim, kv, hidden, vocab


def estimate(cfg: DictConfig) -> Estimate:
    """Peak training memory of `cfg` on one GPU, unsharded."""
    nbytes = DTYPE_BYTES[cfg.get("dtype", "bf16")]
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    nf4 = trainable = frozen = 0
    for name, p in model.named_parameters():
        if type(p).__name__ == "NF4Tensor" or type(p.data).__name__ == "NF4Tensor":
            nf4 += p.numel()
        elif "lora_" in name or "magnitude" in name:
            trainable += p.numel()
        else:
            frozen += p.numel()
    layers, dim, kv, hidden, vocab = _shapes(model)
    seq = cfg.tokenizer.max_seq_len
    tokens = cfg.batch_size * seq
    # Per token per layer, kept for backward: norm in/out, q, k, v, attention out, o_proj out (7d + 2kv
    # counts q/out twice for the LoRA paths) and the SwiGLU's gate, up, act and product (4h). SDPA keeps
    # no s x s attention matrix.
    per_token_layer = nbytes * (7 * dim + 2 * kv + 4 * hidden)
    full = layers * tokens * per_token_layer
    recompute = tokens * per_token_layer  # one layer's activations live during its recomputation
    ckpt = layers * tokens * dim * nbytes + recompute
    offload = 2 * tokens * dim * nbytes + recompute  # inputs on CPU; two layers' in flight
    if not cfg.get("enable_activation_checkpointing", False):
        activations, how = full, "no checkpointing"
    elif cfg.get("enable_activation_offloading", False):
        activations, how = offload, "checkpointing + offloading"
    else:
        activations, how = ckpt, "checkpointing"
    logits = tokens * vocab * (nbytes + 1)  # logits kept in dtype + fp32 upcast of one of 8 chunks, fwd+bwd
    lines = [
        (f"base weights, NF4 ({nf4 / 1e9:.2f}B params)", nf4 * NF4_BYTES),
        (f"other frozen weights, {cfg.get('dtype', 'bf16')} ({frozen / 1e9:.2f}B params)", frozen * nbytes),
        (f"LoRA parameters ({trainable / 1e6:.1f}M)", trainable * nbytes),
        ("gradients (LoRA only)", trainable * nbytes),
        ("optimizer state (AdamW: 2 per LoRA param)", 2 * trainable * nbytes),
        (f"activations, {how} ({cfg.batch_size} x {seq:,} tokens)", activations),
        (f"logits and loss ({tokens:,} tokens x {vocab:,} vocab)", logits),
    ]
    live = sum(b for _, b in lines)
    lines.append((f"framework: CUDA context {FRAMEWORK_GIB} GiB + {FRAGMENTATION:.0%} allocator slack",
                  FRAMEWORK_GIB * GiB + FRAGMENTATION * live))
    notes = [f"activations would be {full / GiB:.2f} GiB without checkpointing, {ckpt / GiB:.2f} GiB with it, "
             f"{offload / GiB:.2f} GiB with offloading too"]
    return Estimate(lines, notes, sum(b for _, b in lines), cfg.get("gpu_memory_gb"))


@config.parse
def main(cfg: DictConfig) -> int:
    result = estimate(cfg)
    print("Estimated peak GPU memory (not a measurement; see README 'Will it fit?'):")
    print(result.report())
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
