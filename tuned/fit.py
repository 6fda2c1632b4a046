"""Will a training config fit its GPU? Its real training step traced on fake tensors (tuned/memory.py), the
verdict against `gpu_memory_gb`, a bisection over traced steps, and the hand formulas as a cross-check line.
recipes/fit.py (make fit) prints them; recipes/compose_configs.py puts `summary` in each preset's header."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torchtune import config

from tuned.memory import ALLOCATOR_SLACK, CUDA_CONTEXT_GIB, NOT_MODELLED, sequence_length

GiB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
NF4_BYTES = 4.127 / 8  # 4-bit codes + an int8 scale per 64 values + an fp32 scale per 256 blocks (torchao NF4)


def verdict(total: float, budget_gib: float | None) -> tuple[str, bool]:
    """The line `make fit` ends with for `total` bytes against the config's gpu_memory_gb, and whether it fits
    (no budget: it fits)."""
    if budget_gib is None:
        return "no GPU budget in this config (gpu_memory_gb: null)", True
    spare = budget_gib - total / GiB
    fits = total <= budget_gib * GiB
    said = f"fits, {spare:.1f} GiB spare" if fits else f"does NOT fit, {-spare:.1f} GiB over"
    return f"budget {budget_gib:g} GiB (gpu_memory_gb): {said}", fits


@dataclass
class Estimate:
    lines: list[tuple[str, float]]  # (what, bytes), summed into the total
    notes: list[str]
    total: float
    budget_gib: float | None

    @property
    def fits(self) -> bool:
        return verdict(self.total, self.budget_gib)[1]

    def report(self) -> str:
        width = max(len(w) for w, _ in self.lines) + 2
        out = [f"  {w:<{width}}{b / GiB:7.2f} GiB" for w, b in self.lines]
        out += [f"  {'total (estimate)':<{width}}{self.total / GiB:7.2f} GiB"] + [f"  {n}" for n in self.notes]
        out.append(f"  {verdict(self.total, self.budget_gib)[0]}")
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
    lines.append((f"framework: CUDA context {CUDA_CONTEXT_GIB} GiB + {ALLOCATOR_SLACK:.0%} allocator slack",
                  CUDA_CONTEXT_GIB * GiB + ALLOCATOR_SLACK * live))
    notes = [f"activations would be {full / GiB:.2f} GiB without checkpointing, {ckpt / GiB:.2f} GiB with it, "
             f"{offload / GiB:.2f} GiB with offloading too"]
    return Estimate(lines, notes, sum(b for _, b in lines), cfg.get("gpu_memory_gb"))


def traced(cfg: DictConfig):
    from tuned.memory import trace_step

    return trace_step(cfg)


def report(cfg: DictConfig, trace) -> tuple[str, bool]:
    """The traced figure as `make fit` prints it, and whether it fits the config's budget."""
    budget = cfg.get("gpu_memory_gb")
    seq, batch = sequence_length(cfg), int(cfg.batch_size)
    total = trace.total()
    lines = ["Peak GPU memory, traced (the stock recipe's step on fake tensors; docs/fit.md):",
             f"  {batch} x {seq:,} tokens per micro-batch, gradient_accumulation_steps {cfg.get('gradient_accumulation_steps', 1)}, "
             f"activation checkpointing {'on' if cfg.get('enable_activation_checkpointing') else 'off'}, {cfg.get('dtype', 'bf16')}"]
    for kind in ("frozen weights", "adapter parameters", "gradients", "optimizer state"):
        lines.append(f"  {kind:<44}{trace.sizes.get(kind, 0) / GiB:7.2f} GiB")
    live = ", ".join(f"{_PHASE_WORDS[k]} {v / GiB:.2f}" for k, v in trace.live_at_peak.items())
    lines.append(f"  {'peak allocated (traced), during ' + trace.peak_phase:<44}{trace.peak / GiB:7.2f} GiB")
    lines.append(f"    live at the peak, by what allocated it (GiB): {live}")
    lines.append("    peak while each phase ran (GiB): " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in trace.phase_peaks.items()))
    lines.append(f"  {f'+ allocator slack {ALLOCATOR_SLACK:.0%} + CUDA context {CUDA_CONTEXT_GIB} GiB (stated)':<44}"
                 f"{(total - trace.peak) / GiB:7.2f} GiB")
    lines.append(f"  {'total':<44}{total / GiB:7.2f} GiB")
    formula = estimate(cfg)
    lines.append(f"  (cross-check: the hand formulas give {formula.total / GiB:.2f} GiB)")
    lines += ["  not modelled: " + NOT_MODELLED[0]] + [f"                {n}" for n in NOT_MODELLED[1:]]
    said, fits = verdict(total, budget)
    lines.append(f"  {said}")
    return "\n".join(lines), fits


_PHASE_WORDS = {"weights": "weights (model build)", "forward": "forward (saved activations, logits, loss)",
                "backward": "backward (gradients)", "optimizer": "optimizer (AdamW state)"}


def summary(cfg: DictConfig, trace, nproc: int | None = None) -> str:
    """One line for a preset's header. Under FSDP (nproc GPUs) each GPU holds 1/nproc of the weights, gradients and
    optimizer state: that share is taken off the unsharded trace."""
    budget = cfg.get("gpu_memory_gb")
    peak = trace.peak
    if nproc:
        peak -= (1 - 1 / nproc) * sum(trace.sizes.values())
    total = trace.total() if not nproc else trace.total() - (trace.peak - peak) * (1 + ALLOCATOR_SLACK)
    said = "no GPU budget" if budget is None else f"of {budget:g} GiB, {'fits' if verdict(total, budget)[1] else 'does NOT fit'}"
    where = f" per GPU, weights, gradients and optimizer state sharded over {nproc}" if nproc else ""
    return f"{total / GiB:.1f} GiB{where} {said} (peak allocated {peak / GiB:.1f} GiB traced, + slack and CUDA context)"


def _bisect(lo: int, hi: int, fits) -> int | None:
    """The largest x in [lo, hi] with fits(x) (fits is monotone: True then False), or None."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def search(cfg: DictConfig) -> str:
    """The longest max_seq_len (in steps of 256) and the largest batch_size at the config's length that fit."""
    from omegaconf import OmegaConf

    budget = cfg.get("gpu_memory_gb")
    if budget is None:
        return "  --search needs a budget: set gpu_memory_gb"

    def fits_with(**keys) -> bool:
        trial = OmegaConf.merge(cfg, OmegaConf.create({"tokenizer": {"max_seq_len": keys.get("seq", cfg.tokenizer.max_seq_len)},
                                                       "batch_size": keys.get("batch", cfg.batch_size)}))
        if "max_seq_len" in (cfg.get("dataset") or {}):
            trial.dataset.max_seq_len = keys.get("seq", cfg.dataset.max_seq_len)
        ok = traced(trial).total() <= budget * GiB
        print(f"    traced {keys}: {'fits' if ok else 'does not fit'}", flush=True)
        return ok

    limit = int(cfg.model.get("max_seq_len", 131072))
    longest = _bisect(1, limit // 256, lambda k: fits_with(seq=256 * k))
    batch = _bisect(1, 256, lambda b: fits_with(batch=b))
    return (f"  longest max_seq_len that fits {budget:g} GiB at batch_size {cfg.batch_size}: "
            f"{'none (not even 256)' if longest is None else f'{256 * longest:,}'}\n"
            f"  largest batch_size that fits at max_seq_len {cfg.tokenizer.max_seq_len:,}: {batch or 'none (not even 1)'}")
