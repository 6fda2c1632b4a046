"""Generation with a KV cache (TunedModel.generate_ids: torchtune's cache, prompts batched and left-padded) gives
the answers of the uncached path, token for token, in fp32: torchtune's own `generate` without caches, one
prompt at a time (the tiny random model and SmolLM2), and transformers' `generate` with its own KV cache on the
same SmolLM2 checkpoint (an engine nobody here wrote). Equal, or parted only at a near tie of the oracle's own
logits (tests/greedy.py): batch shapes and kernels can flip a tie, a bug moves logits by far more."""

from __future__ import annotations

import json

import pytest
import torch
from greedy import assert_agree
from support import REPO, load_config, tiny_config
from torchtune.generation import generate

from tuned import TunedModel

DEMO = "configs/smollm2_135m_lora_cpu.yaml"


def _uncached(tuned: TunedModel, ids: list[int], new: int) -> list[int]:
    """The oracle: torchtune's generate with no cache set up (the whole sequence again for every token), alone. Its
    pad_id must not occur in the prompt: generate masks every pad_id token as padding, and SmolLM2's pad_id is
    <|im_end|> (2), twice in every ChatML prompt (the old uncached `complete` passed it, and answered wrongly)."""
    assert not tuned.model.caches_are_enabled()
    pad = max(set(range(len(ids) + 1)) - set(ids))  # an id the prompt does not hold
    with torch.inference_mode():
        out, _ = generate(tuned.model, torch.tensor([ids]), max_generated_tokens=new, pad_id=pad,
                          temperature=1e-6, top_k=1, stop_tokens=tuned.tokenizer.stop_tokens)
    tokens = out[0, len(ids):].tolist()
    stop = set(tuned.tokenizer.stop_tokens)
    return tokens[: next((k for k, t in enumerate(tokens) if t in stop), len(tokens))]


def _next_logits(model, prompt: list[int]):
    """The oracle's logits after `prompt` + a prefix: a plain forward pass, no cache."""
    def logits(prefix: list[int]) -> list[float]:
        with torch.inference_mode():
            out = model(torch.tensor([prompt + prefix]))
        return (out.logits if hasattr(out, "logits") else out)[0, -1].float().tolist()
    return logits


def _agree(tuned: TunedModel, prompts: list[list[int]], ours: list[list[int]], theirs: list[list[int]], model=None):
    assert len(ours) == len(theirs) == len(prompts)
    for prompt, a, b in zip(prompts, ours, theirs):
        assert_agree(a, b, _next_logits(model or tuned.model, prompt), list(tuned.tokenizer.stop_tokens)[0], prompt)


def _prompts(tuned: TunedModel, new: int, count: int) -> list[list[int]]:
    spec = next(iter(tuned.instruct_specs().values()))
    rows = [json.loads(line) for line in (REPO / "data" / "pairs.jsonl").read_text().splitlines() if line.strip()]
    # lengths differ, so a batch is left-padded; one prompt repeated, so equal rows meet in one batch
    return [tuned.prompt_ids(spec, r["prompt"], new) for r in rows[:count]] + [tuned.prompt_ids(spec, rows[0]["prompt"], new)]


def test_cached_batched_generation_equals_the_uncached_path_on_the_tiny_model(tiny_checkpoint, tmp_path):
    tuned = TunedModel(tiny_config(tiny_checkpoint, tmp_path, "dtype=fp32", "model.quantize_base=False"))
    prompts = _prompts(tuned, 12, 6)
    assert len({len(p) for p in prompts}) > 2
    cached = tuned.generate_ids(prompts, 12, batch_size=4)
    _agree(tuned, prompts, cached, [_uncached(tuned, p, 12) for p in prompts])
    assert not tuned.model.caches_are_setup()  # released after


def test_a_loaded_adapter_is_generated_with(tiny_checkpoint, tmp_path):
    """With no adapter loaded, generation skips the LoRA layers (their B is zero: they add exact zeros); an adapter
    (B non-zero) must be used: cached answers equal the uncached path with the adapter, differ from the base's, and
    every LoRA layer is enabled again after."""
    from torchtune.modules.peft import LoRALinear

    tuned = TunedModel(tiny_config(tiny_checkpoint, tmp_path, "dtype=fp32", "model.quantize_base=False"))
    prompts = _prompts(tuned, 12, 4)
    base = tuned.generate_ids(prompts, 12, batch_size=4)
    lora = [m for m in tuned.model.modules() if isinstance(m, LoRALinear)]
    torch.manual_seed(0)
    with torch.no_grad():
        for m in lora:
            m.lora_b.weight.normal_(0, 0.5)
    tuned_ids = tuned.generate_ids(prompts, 12, batch_size=4)
    _agree(tuned, prompts, tuned_ids, [_uncached(tuned, p, 12) for p in prompts])
    assert tuned_ids != base
    assert not any(m.disabled for m in lora)


@pytest.fixture(scope="module")
def smollm2(small_checkpoint, tmp_path_factory) -> TunedModel:
    out = tmp_path_factory.mktemp("gen")
    return TunedModel(load_config(DEMO, f"checkpointer.checkpoint_dir={small_checkpoint}",
                                  f"tokenizer.path={small_checkpoint}", f"output_dir={out}", "dtype=fp32"))


def test_cached_batched_generation_equals_the_uncached_path_on_smollm2(smollm2):
    prompts = _prompts(smollm2, 32, 5)
    cached = smollm2.generate_ids(prompts, 32, batch_size=3)
    _agree(smollm2, prompts, cached, [_uncached(smollm2, p, 32) for p in prompts])
    assert all(cached)  # real answers, not an empty stop at once


def test_cached_generation_equals_transformers_generate(smollm2, small_checkpoint):
    """Oracle: transformers' LlamaForCausalLM.generate, greedy, fp32, with its own KV cache, on the checkpoint folder."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(small_checkpoint, torch_dtype=torch.float32).eval()
    prompts = _prompts(smollm2, 32, 5)
    stop = list(smollm2.tokenizer.stop_tokens)
    theirs = []
    for ids in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=32, do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
        tokens = out[0, len(ids):].tolist()
        theirs.append(tokens[: next((k for k, t in enumerate(tokens) if t in stop), len(tokens))])
    _agree(smollm2, prompts, smollm2.generate_ids(prompts, 32, batch_size=3), theirs, model=hf)
