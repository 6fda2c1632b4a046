"""The product path for real: stock `tune run lora_finetune_single_device` on the 8B config, pointed
at the tiny checkpoint by command-line overrides, trained on the sample pairs and text."""

import re

import pytest
import torch
from support import REPO, tiny_overrides, training_overrides, tune_run, logged_losses, CONFIG
from omegaconf import OmegaConf
from safetensors.torch import load_file


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_stock_recipe_trains_on_pairs_and_text_and_writes_adapter_and_merged_model(
        tmp_path, tiny_checkpoint, trained_run, method):
    if method == "qlora":
        out, output = trained_run
    else:
        out = tmp_path / "run"
        output = tune_run(CONFIG, tiny_overrides(tiny_checkpoint, out) + training_overrides(method))

    assert re.search(r"pairs +instruct +2 +48 +3 ", output), output  # the data table, with the override applied
    assert re.search(r"text +text +1 +2 +1 ", output)
    losses = logged_losses(out)
    assert len(losses) >= 20
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 0.3, losses  # repeated data: the loss falls

    last = out / "epoch_3"
    for name in ("adapter_model.safetensors", "adapter_config.json", "model-00001-of-00001.safetensors", "config.json"):
        assert (last / name).is_file(), name
    adapter = load_file(last / "adapter_model.safetensors")
    assert any(k.endswith("lora_A.weight") for k in adapter) and all(torch.isfinite(v).all() for v in adapter.values())
    base = load_file(tiny_checkpoint / "model-00001-of-00001.safetensors")
    merged = load_file(last / "model-00001-of-00001.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert merged.keys() == base.keys() and not torch.allclose(merged[key].float(), base[key].float())
    assert (out / "held_out" / "pairs.jsonl").is_file() and (out / "held_out" / "text.jsonl").is_file()


@pytest.mark.e2e
def test_demo_config_runs_as_is(tmp_path, tiny_checkpoint):
    out = tmp_path / "demo"
    output = tune_run("configs/tiny_qlora_cpu.yaml", [
        f"checkpointer.checkpoint_dir={tiny_checkpoint}", f"tokenizer.path={tiny_checkpoint}/original/tokenizer.model",
        f"output_dir={out}", "epochs=1", "max_steps_per_epoch=2"])
    assert "Data table (max_seq_len=256)" in output
    assert len(logged_losses(out)) == 2 and (out / "epoch_0" / "adapter_model.safetensors").is_file()


def test_demo_config_shares_the_data_and_training_sections():
    big, tiny = (OmegaConf.load(REPO / "configs" / name) for name in ("llama3_1_8b_qlora.yaml", "tiny_qlora_cpu.yaml"))
    raw = [OmegaConf.to_container(c, resolve=False) for c in (big, tiny)]  # ${output_dir} left as written
    for key in ("dataset", "loss", "seed", "shuffle", "metric_logger", "resume_from_checkpoint", "save_adapter_weights_only"):
        assert raw[0][key] == raw[1][key], key
    assert big.optimizer._component_ == tiny.optimizer._component_
    assert big.lr_scheduler._component_ == tiny.lr_scheduler._component_
    assert tiny.model.quantize_base is True and tiny.device == "cpu"


def test_tiny_checkpoint_loads_in_transformers_and_computes_what_torchtune_computes(tiny_checkpoint):
    """The tiny folder is complete for transformers (config + safetensors + index); oracle: transformers'
    LlamaForCausalLM (Llama 3.1 RoPE scaling) against torchtune's llama3_1 on the same weights, within 1e-4."""
    import torch
    from safetensors.torch import load_file
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.llama3_1 import llama3_1
    from transformers import AutoModelForCausalLM

    from make_tiny_checkpoint import TINY

    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32).eval()
    ours = llama3_1(**TINY).eval()
    state = load_file(tiny_checkpoint / "model-00001-of-00001.safetensors")
    ours.load_state_dict({k: v.float() for k, v in hf_to_tune(state, num_heads=TINY["num_heads"],
                          num_kv_heads=TINY["num_kv_heads"], dim=TINY["embed_dim"]).items()})
    x = torch.tensor([[128000, 9906, 1917, 0, 578, 374, 264, 1296, 13]])
    with torch.no_grad():
        assert (ref(x).logits - ours(x)).abs().max().item() < 1e-4
