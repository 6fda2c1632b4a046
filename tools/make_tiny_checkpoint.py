"""Writes a tiny Llama 3.1 (random, seeded weights) in the layout `tune download` produces.

    python -m tools.make_tiny_checkpoint --output-dir checkpoints/tiny

gives
    checkpoints/tiny/config.json
    checkpoints/tiny/model-00001-of-00001.safetensors
    checkpoints/tiny/model.safetensors.index.json     (so that transformers loads the folder too)
    checkpoints/tiny/original/tokenizer.model        (the real Llama 3 tokenizer, from llama-models)

so that the stock recipes load it with `FullModelHFCheckpointer(model_type: LLAMA3)` exactly as they
load meta-llama/Llama-3.1-8B. Nothing is downloaded. The model component that matches it:

    model._component_=torchtune.models.llama3_1.lora_llama3_1 model.vocab_size=128256
    model.num_layers=2 model.num_heads=4 model.num_kv_heads=2 model.embed_dim=256
    model.intermediate_dim=512 model.max_seq_len=2048
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from torchtune.models.convert_weights import tune_to_hf
from torchtune.models.llama3_1 import llama3_1

from tuned.export import write_safetensors

TINY = dict(vocab_size=128_256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256,
            intermediate_dim=512, max_seq_len=2048)


def llama3_tokenizer_path() -> Path:
    """The real Llama 3 tokenizer.model shipped in the `llama-models` package."""
    import llama_models

    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def hf_config() -> dict:
    """config.json as Hugging Face writes it for Llama 3.1, at the tiny dimensions."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": TINY["embed_dim"],
        "intermediate_size": TINY["intermediate_dim"],
        "num_attention_heads": TINY["num_heads"],
        "num_hidden_layers": TINY["num_layers"],
        "num_key_value_heads": TINY["num_kv_heads"],
        "head_dim": TINY["embed_dim"] // TINY["num_heads"],
        "max_position_embeddings": TINY["max_seq_len"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": TINY["vocab_size"],
    }


def write_tiny_checkpoint(output_dir: Path, seed: int = 0) -> Path:
    """Writes the checkpoint and returns its directory."""
    torch.manual_seed(seed)
    model = llama3_1(**TINY)
    for _name, param in model.named_parameters():  # the default init gives logits far too large
        if param.dim() > 1:
            torch.nn.init.normal_(param, std=0.02)
    state = tune_to_hf(model.state_dict(), num_heads=TINY["num_heads"], num_kv_heads=TINY["num_kv_heads"],
                       dim=TINY["embed_dim"])
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "original").mkdir(exist_ok=True)
    (shard,) = write_safetensors(output_dir, state)  # one shard + its index, as export writes them
    assert shard.name == "model-00001-of-00001.safetensors"
    (output_dir / "config.json").write_text(json.dumps(hf_config(), indent=2) + "\n")
    shutil.copyfile(llama3_tokenizer_path(), output_dir / "original" / "tokenizer.model")
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("checkpoints/tiny"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = write_tiny_checkpoint(args.output_dir, args.seed)
    print(f"Wrote a tiny Llama 3.1 checkpoint to {out}")


if __name__ == "__main__":
    main()
