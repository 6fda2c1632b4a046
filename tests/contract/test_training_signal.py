"""The training signal is right: packing changes nothing per sample, and gradient accumulation with the
stock recipe's token-weighted normalisation equals one large batch. Tiny Llama 3.1, fp32, CPU."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support import REPO, pairs, tiny_config, write_jsonl
from torchtune.data import padded_collate_packed
from torchtune.models.llama3_1 import lora_llama3_1
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from custom_datasets import mixed_dataset

IGNORE = -100


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = lora_llama3_1(lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
                      vocab_size=128_256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                      intermediate_dim=128, max_seq_len=256, lora_rank=4, lora_alpha=8)
    for name, p in m.named_parameters():
        if "lora_b" in name:
            torch.nn.init.normal_(p, std=0.02)  # nonzero adapters, so every LoRA matrix gets a gradient
    set_trainable_params(m, get_adapter_params(m))
    return m.float()


@pytest.fixture(scope="module")
def packs(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("signal")
    (tmp / "t.txt").write_text(" ".join(f"word{i}" for i in range(150)))
    return mixed_dataset(tokenizer, max_seq_len=128, sources={
        "pairs": {"type": "instruct", "path": str(write_jsonl(tmp / "p.jsonl", pairs(12))), "train_on_input": True},
        "text": {"type": "text", "path": str(tmp / "t.txt"), "stride": 16},
        "chats": {"type": "chat", "path": str(REPO / "data" / "chat" / "messages_tools.jsonl"), "weight": 0.25}})


def shift(labels: torch.Tensor) -> torch.Tensor:
    """The recipe's shift: position i is graded on token i + 1."""
    return torch.hstack([labels[..., 1:], torch.full_like(labels[..., :1], IGNORE)])


def adapter_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def test_packed_equals_unpacked_per_sample_loss_and_lora_gradients(model, packs):
    item = max(packs, key=lambda x: len(x["seq_lens"]) + 100 * bool((x["tokens"] == 128006).any()))  # with a conversation
    lens = item["seq_lens"].tolist()[:-1] if item["labels"][-1] == IGNORE and item["tokens"][-1] == packs.pad_id else item["seq_lens"].tolist()
    assert len(lens) >= 3 and (item["tokens"] == 128006).any()  # <|start_header_id|>: a conversation is in the pack
    batch = padded_collate_packed([item])
    logits = model(batch["tokens"], mask=batch["mask"], input_pos=batch["input_pos"])[0]
    labels = shift(batch["labels"])[0]
    per_token = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    packed_losses, start = [], 0
    for n in lens:
        seg = slice(start, start + n)
        # within a pack, the last position of a sample is graded on nothing (the next sample's first label is -100)
        packed_losses.append(per_token[seg].sum() / (labels[seg] != IGNORE).sum())
        start += n
    sum(loss * (labels[s : s + n] != IGNORE).sum() for loss, s, n in zip(packed_losses, [sum(lens[:k]) for k in range(len(lens))], lens)).backward()
    packed_grads = adapter_grads(model)

    single_losses, total = [], 0
    start = 0
    for n in lens:
        tokens, lab = item["tokens"][start : start + n][None], shift(item["labels"][start : start + n][None])[0]
        out = model(tokens)[0]
        tok_loss = F.cross_entropy(out, lab, ignore_index=IGNORE, reduction="sum")
        single_losses.append(tok_loss / (lab != IGNORE).sum())
        total = total + tok_loss
        start += n
    total.backward()
    single_grads = adapter_grads(model)

    torch.testing.assert_close(torch.stack(packed_losses), torch.stack(single_losses), atol=1e-5, rtol=0)
    assert packed_grads.keys() == single_grads.keys() and len(packed_grads) > 10
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], single_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _stock_recipe_class():
    """torchtune's own lora_finetune_single_device recipe class, from the installed wheel (not a copy)."""
    import importlib.util

    import torchtune

    path = Path(torchtune.__file__).parents[1] / "recipes" / "lora_finetune_single_device.py"
    spec = importlib.util.spec_from_file_location("stock_lora_finetune_single_device", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LoRAFinetuneRecipeSingleDevice


def _first_step_grads(checkpoint, out, batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
    """Runs the stock recipe's setup() and train() for one optimizer step on the tiny config and returns the adapter
    gradients its optimizer steps with (after the recipe's own token-weighted loss, backward and scale_grads)."""
    cfg = tiny_config(checkpoint, out, f"batch_size={batch_size}", f"gradient_accumulation_steps={accumulation}",
                      "epochs=1", "max_steps_per_epoch=1", "model.quantize_base=False", "dataset.cache_dir=null",
                      "save_adapter_weights_only=True")
    recipe = _stock_recipe_class()(cfg)
    recipe.setup(cfg)
    grads, step = {}, recipe._optimizer.step

    def recording_step(*args, **kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in recipe._model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    recipe._optimizer.step = recording_step
    recipe.train()
    recipe.cleanup()
    return grads


def test_gradient_accumulation_in_the_stock_recipe_equals_one_large_batch(tmp_path, tiny_checkpoint):
    """The stock recipe's own loop: 2 micro-batches of 2 packs (loss x tokens each, then scale_grads by 1 / all
    tokens) give the gradients of one batch of 4, within 1e-5 (fp32)."""
    default_dtype = torch.get_default_dtype()
    try:
        big = _first_step_grads(tiny_checkpoint, tmp_path / "big", 4, 1)
        accumulated = _first_step_grads(tiny_checkpoint, tmp_path / "acc", 2, 2)
    finally:
        torch.set_default_dtype(default_dtype)
    assert big.keys() == accumulated.keys() and len(big) > 10
    assert all(g.abs().max() > 0 for n, g in big.items() if "lora_b" in n)  # (lora_a's are 0 while B starts at 0)
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], atol=1e-5, rtol=1e-5, msg=name)
