"""The product path for real: stock `tune run lora_finetune_single_device` on the 8B config, pointed
at the tiny checkpoint by command-line overrides, trained on the sample pairs and text."""

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from support import CONFIG, REPO, TUNE, logged_losses, tiny_overrides, training_overrides, tune_run, write_jsonl


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

    from tools.make_tiny_checkpoint import TINY

    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32).eval()
    ours = llama3_1(**TINY).eval()
    state = load_file(tiny_checkpoint / "model-00001-of-00001.safetensors")
    ours.load_state_dict({k: v.float() for k, v in hf_to_tune(state, num_heads=TINY["num_heads"],
                          num_kv_heads=TINY["num_kv_heads"], dim=TINY["embed_dim"]).items()})
    x = torch.tensor([[128000, 9906, 1917, 0, 578, 374, 264, 1296, 13]])
    with torch.no_grad():
        assert (ref(x).logits - ours(x)).abs().max().item() < 1e-4


@pytest.mark.e2e
def test_conversations_train_with_pairs_and_text_through_the_stock_recipe_then_eval_and_generate(tmp_path, tiny_checkpoint):
    """The Instruct preset (pairs in the chat format, text, an OpenAI-messages file with tool calls and a multi-turn
    ShareGPT file) on the tiny checkpoint: one packed stream through stock tune run; make eval scores and generates
    the held-out conversations' last answers; make generate continues a conversation."""
    from support import our_recipe, run

    config = "configs/llama3_1_8b_instruct_qlora.yaml"
    out = tmp_path / "chat"
    args = tiny_overrides(tiny_checkpoint, out) + ["tokenizer.max_seq_len=512", "epochs=1", "max_steps_per_epoch=2",
                                                   "batch_size=1", "gradient_accumulation_steps=1"]
    output = tune_run(config, args)
    assert re.search(r"chats +chat +1 +24 +3 ", output) and re.search(r"sharegpt +chat +1 +24 +3 ", output), output
    assert "chats: 24 conversations, 49 turns to train in the training ones; 49 placed" in output
    assert len(logged_losses(out)) == 2 and (out / "epoch_0" / "adapter_model.pt").is_file()
    held = [json.loads(line) for line in (out / "held_out" / "chats.jsonl").read_text().splitlines()]
    assert len(held) == 3 and all(r["messages"][-1]["role"] == "assistant" for r in held)

    run([*our_recipe("eval_report"), "--config", config, *args, "eval.num_generations=40", "eval.max_new_tokens=4",
         "eval.batch_size=4", "eval.local_task=false"])
    report = json.loads((out / "eval" / "report.json").read_text())
    for side in ("base", "tuned"):
        assert set(report[side]["held_out"]) == {"pairs", "text", "chats", "sharegpt"}
        assert report[side]["held_out"]["chats"]["rows"] == 3 and report[side]["held_out"]["chats"]["tokens"] > 0
    assert {g["source"] for g in report["generations"]} == {"pairs", "chats", "sharegpt"}

    prompts = write_jsonl(tmp_path / "conv.jsonl", [{"messages": held[0]["messages"][:-1]}])
    printed = run([str(Path(TUNE).parent / "python"), "recipes/generate_tuned.py", "--config", config,
                   *args, "--source", "chats", "--prompts-file", str(prompts), "eval.max_new_tokens=4"])
    (line,) = [json.loads(x) for x in printed.splitlines() if x.startswith('{"prompt"')]
    assert "template: chat (chats)" in printed and line["prompt"] == held[0]["messages"][:-1] and line["completion"]
