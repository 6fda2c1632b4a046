"""Exports the tuned model of a training config for use outside this repo: transformers, peft, vLLM, llama.cpp, Ollama.

    tune run recipes/export_tuned.py --config configs/llama3_1_8b_qlora.yaml [key=value ...]   (or: make export CONFIG=...)

Writes <output_dir>/export/ (replacing an older one only once the new one is complete):

    hf/          the merged model (export.dtype, bf16 by default) + tokenizer + generation_config: AutoModelForCausalLM
                 and AutoTokenizer load it from the folder alone; `vllm serve <output_dir>/export/hf`
    adapter/     PEFT adapter (adapter_model.safetensors + adapter_config.json with base_model_name_or_path) + hf/'s
                 tokenizer: peft.PeftModel.from_pretrained(base, adapter/), vllm serve <base> --enable-lora --lora-modules
    model-<type>.gguf   llama.cpp's convert_hf_to_gguf.py on hf/ (export.gguf: f16, bf16, f32, q8_0, q4_k_m)
    Modelfile    Ollama: the first GGUF, the data's prompt template, the stop tokens
    export.json  what was exported from which adapter, and the prompt template make serve applies

Options (export.*): checkpoint (an epoch_N folder; null = the latest), dtype (bf16 | fp16 | fp32),
merge_into (trained | original: see docs/export-serve.md), gguf (list; [] = none), source (whose template the
Modelfile and server apply; null = the first instruct source), base_model_name_or_path (null = the base
checkpoint folder's absolute path).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from tuned import TunedModel, latest_adapter
from tuned import export as ex
from tuned.config import load
from tuned.sections import ExportOptions, section


def export_options(cfg: DictConfig) -> dict:
    """export.* checked against its declared type (tuned/sections.py), every default filled in."""
    try:
        return section(cfg, "export", ExportOptions)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def run_export(cfg: DictConfig) -> Path:
    opts = export_options(cfg)
    started = time.time()
    tuned = TunedModel(cfg)
    specs = tuned.instruct_specs()
    if opts["source"] and opts["source"] not in specs:
        raise SystemExit(f"export.source={opts['source']!r}: expected one of the instruct sources {sorted(specs)}")
    spec = specs[opts["source"]] if opts["source"] else next(iter(specs.values()), None)
    adapter_dir = Path(opts["checkpoint"] or latest_adapter(cfg.output_dir))
    tuned.load_adapter(adapter_dir)
    base_dir = Path(cfg.checkpointer.checkpoint_dir).resolve()
    base_name = opts["base_model_name_or_path"] or str(base_dir)

    final = Path(cfg.output_dir) / "export"
    work = final.with_name("export.tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"export: {tuned.adapter} on {base_dir} -> {final}", flush=True)
    ex.write_hf(work / "hf", tuned, opts["merge_into"], ex.DTYPES[opts["dtype"]])
    print(f"  hf/       merged ({opts['merge_into']} base, {opts['dtype']})", flush=True)
    ex.write_adapter(work / "adapter", tuned, base_name)
    print(f"  adapter/  PEFT, base_model_name_or_path={base_name}", flush=True)
    del tuned.model  # the GGUF converter reads hf/ in a process of its own
    ggufs = []
    for kind in opts["gguf"]:
        ggufs.append(ex.convert_gguf(work / "hf", work / f"model-{kind}.gguf", kind))
        print(f"  {ggufs[-1].name}", flush=True)
    if ex.add_bos_to_tokenizer_json(work / "hf", tuned.tokenizer):
        print("  hf/tokenizer.json adds BOS, as training did", flush=True)
    ex.copy_tokenizer_files(work / "hf", work / "adapter")
    affixes = ex.prompt_affixes(tuned.tokenizer, spec) if spec else ("", "")
    if ggufs:
        ex.write_modelfile(work, ggufs[0], affixes, tuned.tokenizer, tuned.max_seq_len)
    manifest = {
        "adapter": str(adapter_dir), "base": str(base_dir), "merge_into": opts["merge_into"], "dtype": opts["dtype"],
        "gguf": [g.name for g in ggufs], "source": spec.name if spec else None,
        "template": spec.template if spec else None, "prompt_prefix": affixes[0], "prompt_suffix": affixes[1],
        "max_seq_len": tuned.max_seq_len, "seconds": round(time.time() - started, 1),
    }
    (work / "export.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    print(f"export: done in {manifest['seconds']} s. Use it (docs/export-serve.md):\n"
          f"  transformers: AutoModelForCausalLM.from_pretrained('{final / 'hf'}')\n"
          f"  peft:         PeftModel.from_pretrained(base, '{final / 'adapter'}')\n"
          + (f"  llama.cpp:    {final / ggufs[0].name}   (make serve CONFIG=... for /v1/completions)\n" if ggufs else ""),
          flush=True)
    return final


def main(argv: list[str]) -> int:
    cfg = load(argv, __doc__.splitlines()[0])
    run_export(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
