"""The tuned model out of the repo: a merged Hugging Face folder, a PEFT adapter, GGUF files, an Ollama Modelfile.

Every format is written by the tool that owns it: torchtune's own weight conversions (tune -> HF names,
tune -> PEFT adapter), safetensors, transformers' tiktoken converter (for a Llama 3 `tokenizer.model`
with no `tokenizer.json`), llama.cpp's `convert_hf_to_gguf.py` and its quantizer (through
llama-cpp-python). Nothing here knows a particular model: shapes come from the base checkpoint's
`config.json`, the template from the data config.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchtune import config as tt_config
from torchtune import training
from torchtune.models import convert_weights
from torchtune.modules.peft import get_adapter_state_dict, get_lora_module_names, get_merged_lora_ckpt

from custom_datasets._spec import ChatSpec, InstructSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MERGE_INTO = ("trained", "original")
GGUF_TYPES = ("f16", "bf16", "f32", "q8_0", "q4_k_m")  # the first four from the converter, q4_k_m by llama.cpp's quantizer
MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def llama_cpp_dir() -> Path:
    """Where `make install` unpacks llama.cpp's Python tools (convert_hf_to_gguf.py + gguf-py) from the
    llama-cpp-python sdist; LLAMA_CPP_DIR overrides it."""
    return Path(os.environ.get("LLAMA_CPP_DIR") or Path(sys.prefix) / "llama.cpp")


def _hf_config(cfg) -> dict:
    return json.loads((Path(cfg.checkpointer.checkpoint_dir) / "config.json").read_text())


def _shape_kwargs(hf: dict) -> dict:
    return {"num_heads": hf["num_attention_heads"], "num_kv_heads": hf["num_key_value_heads"],
            "dim": hf["hidden_size"], "head_dim": hf.get("head_dim")}


def tune_to_hf(cfg, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchtune names -> Hugging Face names, with the conversion the stock checkpointer uses for this model_type."""
    hf, model_type = _hf_config(cfg), str(cfg.checkpointer.model_type).upper()
    if model_type == "QWEN2":
        from torchtune.models.qwen2._convert_weights import qwen2_tune_to_hf

        kwargs = _shape_kwargs(hf)
        kwargs.pop("head_dim")
        return qwen2_tune_to_hf(state, **kwargs, tie_word_embeddings=hf.get("tie_word_embeddings", False))
    if model_type not in ("LLAMA2", "LLAMA3", "LLAMA3_2", "MISTRAL"):
        raise ValueError(f"checkpointer.model_type={model_type}: export knows LLAMA2, LLAMA3, LLAMA3_2, MISTRAL and QWEN2 "
                         "(the families whose weights torchtune converts with tune_to_hf / qwen2_tune_to_hf).")
    return convert_weights.tune_to_hf(state, **_shape_kwargs(hf))


def _dequantized(value: torch.Tensor) -> torch.Tensor:
    """A plain fp32 tensor; NF4 weights (QLoRA) dequantized in their own dtype, as `linear_nf4` uses them."""
    from torchao.dtypes.nf4tensor import NF4Tensor

    if isinstance(value, NF4Tensor):
        value = value.get_original_weight()
    return value.detach().to("cpu", torch.float32)


def merged_weights(tuned, merge_into: str = "trained", dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The tuned model as plain weights (torchtune names) in `dtype`, each LoRA/DoRA merged in fp32 by torchtune's
    `get_merged_lora_ckpt`.

    merge_into: "trained" merges into the base as training saw it (under QLoRA, the NF4 weights dequantized: the
    model `make eval` measured); "original" merges into the checkpoint's own weights (the bf16 base before 4-bit
    rounding). Without quantization the two are the same weights.
    """
    if merge_into not in MERGE_INTO:
        raise ValueError(f"export.merge_into={merge_into!r}: expected one of {MERGE_INTO}")
    cfg = tuned.cfg
    # The parameters themselves: torchtune's QLoRA builders hook state_dict() to turn NF4 into bf16, a rounding
    # the model never computed with when it ran in fp32.
    params = dict(tuned.model.named_parameters())
    state = {k: params.get(k, v) for k, v in tuned.model.state_dict().items()}
    original = None
    if merge_into == "original":
        original = tt_config.instantiate(cfg.checkpointer).load_checkpoint()[training.MODEL_KEY]
    rank, alpha = int(cfg.model.lora_rank), float(cfg.model.lora_alpha)
    out: dict[str, torch.Tensor] = {}
    modules = {k.rsplit(".lora_a.weight", 1)[0] for k in state if k.endswith(".lora_a.weight")}
    for key, value in state.items():
        if ".lora_a." in key or ".lora_b." in key or key.endswith(".magnitude"):
            continue
        base = original[key] if original is not None else value
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module in modules:
            part = {f"{module}.weight": _dequantized(base),
                    **{f"{module}.{p}": _dequantized(state[f"{module}.{p}"])
                       for p in ("lora_a.weight", "lora_b.weight", "magnitude") if f"{module}.{p}" in state}}
            out[key] = get_merged_lora_ckpt(part, rank=rank, alpha=alpha)[key].to(dtype)
        else:
            out[key] = _dequantized(base).to(dtype)
    return out


def write_safetensors(folder: Path, weights: dict[str, torch.Tensor], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Shards `model-0000i-of-0000n.safetensors` of at most max_shard_bytes, and model.safetensors.index.json.

    Written here rather than by huggingface_hub's `save_torch_state_dict`: for one shard that writes
    `model.safetensors` and no index, while the layout `tune download` gives (Meta's repos, what torchtune's
    checkpointer configs name as `checkpoint_files`, and what tools/make_tiny_checkpoint.py copies) is always
    numbered shards + index, whatever the size. transformers, peft, vLLM and llama.cpp's converter read both."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        weight_map.update({name: path.name for name in shard})
        paths.append(path)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    return paths


def _bos_first(bos: str, bos_id: int):
    """A tokenizers post-processor that puts BOS before every sequence (as Meta's Llama 3 tokenizer.json does)."""
    from tokenizers import processors

    return processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                         special_tokens=[(bos, bos_id)])


def write_tokenizer_files(folder: Path, cfg, tokenizer) -> list[str]:
    """The base checkpoint's tokenizer files, set to add BOS as every training sample began with it.

    A Llama 3 `tokenizer.model` alone is converted by transformers' TikTokenConverter into `tokenizer.json`
    (whose post-processor adds BOS, as Meta's own does). A tokenizer.json that does not add BOS (SmolLM2's)
    is left as it is here, since llama.cpp's converter recognises a tokenizer by its exact output, and its
    tokenizer_config.json gets `add_bos_token: true`; after the GGUF conversion, `add_bos_to_tokenizer_json`
    makes the tokenizer.json itself add BOS (transformers' fast tokenizer ignores the config key).
    """
    from tokenizers import Tokenizer

    base = Path(cfg.checkpointer.checkpoint_dir)
    bos_id = int(tokenizer.bos_id)
    bos = tokenizer.decode([bos_id], truncate_at_eos=False, skip_special_tokens=False)
    eos = tokenizer.decode([int(tokenizer.eos_id)], truncate_at_eos=False, skip_special_tokens=False)
    found = [name for name in TOKENIZER_FILES if (base / name).is_file()]
    if "tokenizer.json" in found:
        for name in found:
            shutil.copy2(base / name, folder / name)
        adds_bos = Tokenizer.from_file(str(folder / "tokenizer.json")).encode("a").ids[:1] == [bos_id]
        config_path = folder / "tokenizer_config.json"
        tc = json.loads(config_path.read_text()) if config_path.is_file() else {"bos_token": bos, "eos_token": eos}
        if not adds_bos and not tc.get("add_bos_token"):
            tc["add_bos_token"] = True
            config_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
        return sorted({*found, "tokenizer_config.json"})
    encoding = getattr(getattr(tokenizer, "tt_model", None), "tt_model", None)
    if encoding is None:
        raise FileNotFoundError(f"{base}: no tokenizer.json to export, and tokenizer {type(tokenizer).__name__} is not a "
                                "tiktoken one that could be converted. Put the model's tokenizer.json in the checkpoint folder.")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(vocab_file=str(cfg.tokenizer.path), pattern=encoding._pat_str,
                                  additional_special_tokens=encoding._special_tokens).converted()
    converted.post_processor = _bos_first(bos, bos_id)
    converted.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": bos, "eos_token": eos, "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos}, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def add_bos_to_tokenizer_json(folder: Path, tokenizer) -> bool:
    """hf/tokenizer.json set to put BOS first, as every training sample began (True if it had to be changed):
    transformers' AutoTokenizer, vLLM and TGI then feed the model what training fed it. Run after the GGUF
    conversion, which recognises a tokenizer by its exact output without BOS; the GGUF adds BOS itself
    (set_add_bos)."""
    from tokenizers import Tokenizer, processors

    path = folder / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    bos_id = int(tokenizer.bos_id)
    if tok.encode("a").ids[:1] == [bos_id]:
        return False
    bos = tok.id_to_token(bos_id)
    template = _bos_first(bos, bos_id)
    tok.post_processor = processors.Sequence([tok.post_processor, template]) if tok.post_processor else template
    tok.save(str(path))
    return True


def write_configs(folder: Path, cfg, tokenizer, dtype: torch.dtype) -> None:
    """config.json (the base's, with the export dtype) and generation_config.json whose EOS ids are the
    tokenizer's stop tokens (the completion template ends with EOS; chat models end a turn with theirs)."""
    base = Path(cfg.checkpointer.checkpoint_dir)
    hf = _hf_config(cfg)
    hf["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = json.loads((base / "generation_config.json").read_text()) if (base / "generation_config.json").is_file() else {}
    stops = sorted({int(t) for t in getattr(tokenizer, "stop_tokens", [])} | {int(tokenizer.eos_id)})
    gen.update({"bos_token_id": int(tokenizer.bos_id), "eos_token_id": stops if len(stops) > 1 else stops[0]})
    gen.setdefault("pad_token_id", int(getattr(tokenizer, "pad_id", None) or tokenizer.eos_id))
    gen.setdefault("transformers_version", hf.get("transformers_version", "4.57.6"))
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def write_hf(folder: Path, tuned, merge_into: str, dtype: torch.dtype) -> None:
    """`hf/`: the merged model, complete for AutoModelForCausalLM + AutoTokenizer from the folder alone."""
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder, tune_to_hf(tuned.cfg, merged_weights(tuned, merge_into, dtype)))
    write_configs(folder, tuned.cfg, tuned.tokenizer, dtype)
    write_tokenizer_files(folder, tuned.cfg, tuned.tokenizer)


def adapter_config(cfg, base_model_name_or_path: str) -> dict:
    """PEFT's adapter_config.json for the config's LoRA/DoRA, through torchtune's own conversion."""
    m = cfg.model
    target = get_lora_module_names(list(m.lora_attn_modules), bool(m.get("apply_lora_to_mlp", False)),
                                   bool(m.get("apply_lora_to_output", False)))
    peft = convert_weights.tune_to_peft_adapter_config(
        {"r": int(m.lora_rank), "lora_alpha": float(m.lora_alpha), "target_modules": target, "peft_type": "LORA"},
        base_model_name_or_path=base_model_name_or_path)
    return {**peft, "task_type": "CAUSAL_LM", "use_dora": bool(m.get("use_dora", False)),
            "lora_dropout": float(m.get("lora_dropout", 0.0)), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True}


def write_adapter(folder: Path, tuned, base_model_name_or_path: str) -> None:
    """`adapter/`: adapter_model.safetensors (PEFT names) + adapter_config.json, for peft and vLLM --lora-modules."""
    folder.mkdir(parents=True, exist_ok=True)
    adapter = {k: v.detach().to("cpu", torch.float32) for k, v in get_adapter_state_dict(tuned.model.state_dict()).items()}
    peft_weights = convert_weights.tune_to_peft_adapter_weights(adapter, **_shape_kwargs(_hf_config(tuned.cfg)))
    save_file({k: v.contiguous() for k, v in peft_weights.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(tuned.cfg, base_model_name_or_path), indent=2) + "\n")


def copy_tokenizer_files(hf: Path, adapter: Path) -> list[str]:
    """hf/'s tokenizer files (BOS first, as training) into adapter/: AutoTokenizer.from_pretrained(adapter/) then
    gives the ids training saw, where the base checkpoint's own tokenizer may not (SmolLM2's adds no BOS)."""
    names = [name for name in TOKENIZER_FILES if (hf / name).is_file()]
    for name in names:
        shutil.copy2(hf / name, adapter / name)
    return names


def convert_gguf(hf_dir: Path, out: Path, outtype: str) -> Path:
    """llama.cpp's convert_hf_to_gguf.py (f16/bf16/f32/q8_0); q4_k_m: f16 first, then llama.cpp's quantizer."""
    if outtype not in GGUF_TYPES:
        raise ValueError(f"export.gguf: {outtype!r} is not one of {GGUF_TYPES}")
    if outtype == "q4_k_m":
        f16 = out.with_name(out.name.replace("q4_k_m", "f16"))
        if not f16.is_file():
            convert_gguf(hf_dir, f16, "f16")
        quantize_gguf(f16, out, "q4_k_m")
        return out
    script = llama_cpp_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: `make install` unpacks it from the llama-cpp-python sdist "
                                "(or set LLAMA_CPP_DIR to a llama.cpp checkout). To skip GGUF: export.gguf=[]")
    tmp = out.with_suffix(".gguf.tmp")
    subprocess.run([sys.executable, str(script), str(hf_dir), "--outfile", str(tmp), "--outtype", outtype],
                   check=True, stdout=subprocess.DEVNULL)
    set_add_bos(tmp)
    os.replace(tmp, out)
    return out


def set_add_bos(path: Path) -> None:
    """Every training sample began with BOS: make llama.cpp (and Ollama) add it too. The converter takes
    `add_bos_token` from a tokenizer.json post-processor before tokenizer_config.json, so a byte-level tokenizer
    that adds nothing (SmolLM2's) converts with False; llama.cpp's gguf_set_metadata.py flips it in place."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).get_field("tokenizer.ggml.add_bos_token")
    if field is not None and bool(field.contents()):
        return
    script = llama_cpp_dir() / "gguf-py" / "gguf" / "scripts" / "gguf_set_metadata.py"
    env = {**os.environ, "PYTHONPATH": str(llama_cpp_dir() / "gguf-py")}
    subprocess.run([sys.executable, str(script), str(path), "tokenizer.ggml.add_bos_token", "1", "--force"],
                   check=True, stdout=subprocess.DEVNULL, env=env)


def quantize_gguf(src: Path, dst: Path, kind: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize), as `llama-quantize` runs it."""
    import llama_cpp

    ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    tmp = dst.with_suffix(".gguf.tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {kind}")
    os.replace(tmp, dst)


def prompt_affixes(tokenizer, spec: InstructSpec | ChatSpec) -> tuple[str, str]:
    """The text the data's template puts before and after a prompt (BOS excluded: the exported tokenizer and
    GGUF add it), found by formatting a marker prompt with the training formatter and decoding it. For a chat
    source the prompt is one user message."""
    from custom_datasets._chat import chat_prompt_ids
    from custom_datasets._format import format_prompt
    from custom_datasets._read import Turn

    marker = "\u2063PROMPT\u2063"
    if isinstance(spec, ChatSpec):
        ids = chat_prompt_ids(tokenizer, spec, (Turn("user", marker),))
    else:
        ids = format_prompt(tokenizer, spec, marker)
    if ids[:1] == [tokenizer.bos_id]:
        ids = ids[1:]
    text = tokenizer.decode(ids, truncate_at_eos=False, skip_special_tokens=False)
    if text.count(marker) != 1:
        raise ValueError(f"source {spec.name!r}: cannot locate the prompt inside its template ({text!r})")
    before, after = text.split(marker)
    return before, after


def write_modelfile(folder: Path, gguf: Path, affixes: tuple[str, str], tokenizer, max_seq_len: int) -> Path:
    """An Ollama Modelfile for `ollama create <name> -f Modelfile`: the GGUF, the data's template in Ollama's
    syntax (the prompt between the template's text), the stop tokens."""
    before, after = affixes
    lines = [f"FROM ./{gguf.name}", 'TEMPLATE """' + before + "{{ .Prompt }}" + after + '"""']
    for stop in sorted({*getattr(tokenizer, "stop_tokens", []), tokenizer.eos_id}):
        text = tokenizer.decode([stop], truncate_at_eos=False, skip_special_tokens=False)
        lines.append(f"PARAMETER stop {json.dumps(text)}")
    lines += [f"PARAMETER num_ctx {max_seq_len}", "PARAMETER temperature 0"]
    path = folder / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path
