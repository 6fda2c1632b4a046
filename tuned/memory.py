"""Will it fit? The config's real training step, run on fake tensors, with every allocation counted.

The stock recipe's step (lora_finetune_single_device 0.6.1) is rebuilt from the config as the recipe builds it:
the model under the config's dtype, `set_trainable_params` on the adapter, activation checkpointing on each
`TransformerSelfAttentionLayer`, the loss's output chunks; then `gradient_accumulation_steps` micro-batches of
forward, loss (x tokens), backward, and `scale_grads`, AdamW's step and `zero_grad(set_to_none=True)`, twice (the
second step runs with the optimizer state the first one made). Under `FakeTensorMode` no tensor holds data: the
8B model runs on this CPU in well under a minute and a few hundred MB of RAM, and a dispatch mode counts each
op's output storage (rounded up to 512 bytes, the CUDA caching allocator's block) from its creation until its
last reference dies. The peak of that count is the peak `torch.cuda.memory_allocated` would report, without
what tracing cannot see (see NOT_MODELLED).

Three stand-ins, each for what a GPU runs: attention is one op with flash/flex attention's memory (output and
log-sum-exp saved, no [b, h, s, s] score matrix), where CPU SDPA with a packed batch's dense mask would
materialise the scores; Llama 3.1's RoPE scaling runs on real tensors (it branches on values); FrozenNF4Linear
assigns its NF4 weight instead of `torch.utils.swap_tensors` (which refuses fake tensors; the memory is the same).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 1024**3
TRACER_VERSION = 1  # bump when a change here changes traced figures (configs/layers/traced.json is keyed by it)
BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of 512 bytes
CUDA_CONTEXT_GIB = 0.5  # CUDA context + cuBLAS/cuDNN workspaces, outside PyTorch's allocator (typical; not traced)
ALLOCATOR_SLACK = 0.10  # reserved over allocated: the caching allocator's fragmentation (typical; not traced)
NOT_MODELLED = [
    "torch.compile (compile: True): fused kernels keep fewer temporaries; torchtune's own figures show 10-25% less",
    "activation offloading (enable_activation_offloading): moves saved activations to CPU; lower than traced",
    "CUDA context and allocator fragmentation: added as the stated constants above, not traced",
]
PHASES = ("weights", "forward", "backward", "optimizer")


@dataclass
class Trace:
    """What a traced step allocated: the peak, the phase it happened in, and what was live then, by the phase
    that allocated it."""

    peak: int = 0
    peak_phase: str = ""
    live_at_peak: dict = field(default_factory=dict)  # phase that allocated it -> bytes live at the peak
    phase_peaks: dict = field(default_factory=dict)  # phase -> highest count while it ran
    sizes: dict = field(default_factory=dict)  # exact sizes: frozen weights, adapter params, grads, optimizer state

    def total(self) -> float:
        """Peak allocated + the stated allocator slack and CUDA context, in bytes."""
        return self.peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB * GiB


class MemoryCounter(TorchDispatchMode):
    """Counts the bytes of every storage an op creates until the storage dies (real or fake tensors alike)."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.trace = Trace()
        self.phase = "weights"
        self.by_phase = dict.fromkeys(PHASES, 0)
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def _free(self, size: int, phase: str) -> None:
        self.current -= size
        self.by_phase[phase] -= size

    def track(self, t: torch.Tensor) -> None:
        for inner in _inner_tensors(t):
            try:
                storage = inner.untyped_storage()
            except (NotImplementedError, RuntimeError):
                continue
            if storage in self._seen:
                continue
            size = -(-storage.nbytes() // BLOCK) * BLOCK
            if not size:
                continue
            self._seen[storage] = size
            weakref.finalize(storage, self._free, size, self.phase)
            self.current += size
            self.by_phase[self.phase] += size
            peaks = self.trace.phase_peaks
            peaks[self.phase] = max(peaks.get(self.phase, 0), self.current)
            if self.current > self.trace.peak:
                self.trace.peak, self.trace.peak_phase = self.current, self.phase
                self.trace.live_at_peak = {k: v for k, v in self.by_phase.items() if v}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def _inner_tensors(t: torch.Tensor):
    """A tensor subclass's inner tensors (NF4Tensor: codes and scalers), or the tensor itself."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not _is_fake(t):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _inner_tensors(getattr(t, name))
    else:
        yield t


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


class _FlashAttention(torch.autograd.Function):
    """Attention with the memory of flash/flex attention on a GPU: the output and an fp32 log-sum-exp per query are
    kept for backward (with q, k, v), no score matrix; backward returns the three input gradients."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention(q, k, v, mask=None, dropout_p=0.0, is_causal=True):
    return _FlashAttention.apply(q, k, v)


@contextlib.contextmanager
def _stand_ins(fake_mode):
    """The three patches the module docstring names, undone on exit."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torchao.dtypes.nf4tensor import to_nf4
    from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
    from torchtune.modules import attention
    from torchtune.modules.low_precision.nf4_linear import FrozenNF4Linear

    saved = (Llama3ScaledRoPE.apply_scaling, FrozenNF4Linear.__init__, attention.MultiHeadAttention.__init__)
    scaling = saved[0]

    def apply_scaling(self, freqs, *args):
        with unset_fake_temporarily():
            real = 1.0 / (self.base ** (torch.arange(0, self.dim, 2)[: (self.dim // 2)].float() / self.dim))
            theta = scaling(self, real, *args)
        return fake_mode.from_tensor(theta) if fake_mode is not None else theta

    def nf4_init(self, in_dim, out_dim, bias=False, device=None, dtype=None, **kwargs):
        torch.nn.Linear.__init__(self, in_dim, out_dim, bias=bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.weight = torch.nn.Parameter(to_nf4(self.weight, **kwargs), requires_grad=False)

    def mha_init(self, *args, **kwargs):
        saved[2](self, *args, **kwargs)
        self._attention_call = _attention

    Llama3ScaledRoPE.apply_scaling = apply_scaling
    FrozenNF4Linear.__init__ = nf4_init
    attention.MultiHeadAttention.__init__ = mha_init
    try:
        yield
    finally:
        Llama3ScaledRoPE.apply_scaling, FrozenNF4Linear.__init__, attention.MultiHeadAttention.__init__ = saved


def trace_step(cfg: DictConfig, fake: bool = True) -> Trace:
    """Runs the config's training step under the counter (on fake tensors unless fake=False) and returns what it saw:
    one micro-batch and an optimizer step (which makes AdamW's state), then min(gradient_accumulation_steps, 2)
    micro-batches of the next step, the second with the first one's gradients live, as in every step after the first
    of a run. Further micro-batches repeat the same memory. Reads batch_size, tokenizer.max_seq_len (or dataset.max_seq_len), gradient_accumulation_steps,
    enable_activation_checkpointing, dtype, model, loss and optimizer."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torchtune import config, modules, training
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    batch, seq = int(cfg.batch_size), sequence_length(cfg)
    accumulate = min(int(cfg.get("gradient_accumulation_steps", 1)), 2)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[cfg.get("dtype", "bf16")]
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    counter = MemoryCounter()
    with contextlib.ExitStack() as stack:
        if fake_mode is not None:
            stack.enter_context(fake_mode)
        stack.enter_context(_stand_ins(fake_mode))
        stack.enter_context(counter)
        with training.set_default_dtype(dtype), torch.device("cpu"):
            model = config.instantiate(cfg.model)
        adapter = get_adapter_params(model)
        set_trainable_params(model, adapter)
        if cfg.get("enable_activation_checkpointing", False):
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        loss_fn = config.instantiate(cfg.loss)
        if hasattr(loss_fn, "num_output_chunks"):
            model.set_num_output_chunks(loss_fn.num_output_chunks)
        optimizer_cfg = {k: v for k, v in cfg.optimizer.items() if k != "fused"}  # (fused: a CUDA kernel, same state)
        optimizer = config.instantiate(DictConfig(optimizer_cfg), model.parameters())
        sizes = counter.trace.sizes
        sizes["frozen weights"] = sum(_bytes(p) for p in model.parameters() if not p.requires_grad) + \
            sum(_bytes(b) for b in model.buffers())
        sizes["adapter parameters"] = sum(_bytes(p) for p in adapter.values())
        vocab = model.tok_embeddings.num_embeddings
        ignore = torch.full((batch, 1), -100, dtype=torch.long)

        def micro_batch() -> int:
            counter.set_phase("forward")
            tokens, labels = torch.randint(0, vocab, (batch, seq)), torch.randint(0, vocab, (batch, seq))
            logits = model(tokens, input_pos=torch.arange(seq).expand(batch, seq))
            loss = loss_fn(logits, torch.hstack((labels[..., 1:], ignore)))  # the recipe's shift
            del logits
            counter.set_phase("backward")
            (loss * (batch * seq)).backward()  # the recipe: loss x tokens of the micro-batch
            return batch * seq

        num_tokens = micro_batch()
        counter.set_phase("optimizer")
        training.scale_grads(model, torch.tensor(1 / num_tokens))
        sizes["gradients"] = sum(_bytes(p.grad) for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sizes["optimizer state"] = sum(_bytes(v) for st in optimizer.state.values() for v in st.values()
                                       if isinstance(v, torch.Tensor))
        for _ in range(accumulate):  # the next step: with the optimizer state live, and from the second micro-batch
            micro_batch()            # on, the gradients accumulated so far
    return counter.trace


def sequence_length(cfg: DictConfig) -> int:
    return int(cfg.get("dataset", {}).get("max_seq_len") or cfg.tokenizer.max_seq_len)


def _bytes(t: torch.Tensor) -> int:
    return sum(-(-i.untyped_storage().nbytes() // BLOCK) * BLOCK for i in _inner_tensors(t))
