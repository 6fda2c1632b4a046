"""The tuned model outside this repo: `make export` on the real small model (SmolLM2-135M, fine-tuned by the demo),
checked against independent engines: transformers, peft, llama.cpp. And the QLoRA path (NF4 base, Llama 3
tokenizer.model only) on the tiny checkpoint. `make serve`: tests/recipes/test_serve.py."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from support import REPO, export, load_config, run

from tuned import TunedModel

DEMO = "configs/smollm2_135m_lora_cpu.yaml"
MAX_NEW = 48  # the demo's eval.max_new_tokens
# A sample prompt whose greedy answer llama.cpp's default repetition penalty (1.1) changes, measured on the demo
# model: it catches a server that does not answer with OpenAI's sampling defaults.
SENSITIVE = "What is QLoRA?"


@pytest.fixture(scope="module")
def exported_fp32(demo_run, tmp_path_factory):
    """The same adapter exported in fp32 (no GGUF), to check the weight mapping without bf16 rounding."""
    out, args = demo_run
    other = tmp_path_factory.mktemp("fp32")
    export(DEMO, [*args, f"output_dir={other}"], f"export.checkpoint={out}/epoch_5", "export.dtype=fp32", "export.gguf=[]")
    return other / "export"


@pytest.fixture(scope="module")
def held_out_prompts(demo_run) -> list[str]:
    out, _ = demo_run
    rows = [json.loads(line) for line in (out / "held_out" / "pairs.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows] + [SENSITIVE]


@pytest.fixture(scope="module")
def generated(demo_run, held_out_prompts, tmp_path_factory) -> dict[str, str]:
    """What `make generate PROMPTS=file` prints for the held-out prompts (greedy, our model, fp32)."""
    _, args = demo_run
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in held_out_prompts))
    text = run([sys.executable, "recipes/generate_tuned.py", "--config", DEMO, "--prompts-file", str(prompts), *args,
                f"eval.max_new_tokens={MAX_NEW}"])
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return {r["prompt"]: r["completion"] for r in rows}


def _tuned(demo_run) -> TunedModel:
    out, args = demo_run
    tuned = TunedModel(load_config(DEMO, *args))
    tuned.load_adapter(out / "epoch_5")
    return tuned


def _ids(tuned: TunedModel, prompts: list[str]) -> list[list[int]]:
    spec = next(iter(tuned.instruct_specs().values()))
    return [tuned.prompt_ids(spec, p, MAX_NEW) for p in prompts]


def test_export_writes_every_format(exported):
    names = {p.name for p in exported.iterdir()}
    assert names == {"hf", "adapter", "model-f16.gguf", "model-f32.gguf", "Modelfile", "export.json"}
    hf = {p.name for p in (exported / "hf").iterdir()}
    assert hf >= {"config.json", "generation_config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert "adapter_config.json" not in hf  # transformers with peft installed would take the folder for an adapter
    assert json.loads((exported / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((exported / "hf" / "generation_config.json").read_text())["eos_token_id"] == 2  # <|im_end|>
    config = json.loads((exported / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and (config["r"], config["lora_alpha"]) == (8, 16)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert config["base_model_name_or_path"] == str((REPO / "checkpoints" / "smollm2_135m").resolve()) or \
        (REPO / config["base_model_name_or_path"]).is_dir()
    modelfile = (exported / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_hf_folder_alone_loads_and_computes_the_tuned_model(demo_run, exported, exported_fp32, held_out_prompts):
    """Oracle: transformers' LlamaForCausalLM on the exported folder (and its tokenizer) against our model with
    the adapter unmerged: fp32 export, logits within 1e-3 (a mapping error would be O(1)). The default bf16
    export holds exactly the fp32 export's weights rounded to bf16 (its logits then differ by bf16 rounding
    through 30 layers: 0.17-0.73 measured on logits of magnitude ~30), and transformers loads and runs it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tuned = _tuned(demo_run)
    manifest = json.loads((exported / "export.json").read_text())
    tok = AutoTokenizer.from_pretrained(exported / "hf")
    for prompt in held_out_prompts:  # docs/export-serve.md's recipe: export.json's text around the prompt
        ids = tok(manifest["prompt_prefix"] + prompt + manifest["prompt_suffix"])["input_ids"]
        # the ids training saw (oracle: the training formatter), BOS included: the exported tokenizer adds it
        # (SmolLM2's own does not: make export sets its post-processor)
        assert ids == _ids(tuned, [prompt])[0] and ids[0] == tok.bos_token_id
    x = torch.tensor(_ids(tuned, held_out_prompts[:1]))
    with torch.no_grad():
        ours = tuned.model(x).float()
        model = AutoModelForCausalLM.from_pretrained(exported_fp32 / "hf", torch_dtype=torch.float32).eval()
        theirs = model(x).logits
        assert (ours - theirs).abs().max().item() < 1e-3
        bf16 = AutoModelForCausalLM.from_pretrained(exported / "hf", torch_dtype=torch.bfloat16).eval()
        assert (bf16(x).logits.float().argmax(-1) == ours.argmax(-1)).float().mean().item() > 0.9
    from safetensors.torch import load_file

    (full,) = (exported_fp32 / "hf").glob("model-*.safetensors")
    (half,) = (exported / "hf").glob("model-*.safetensors")
    full, half = load_file(full), load_file(half)
    assert full.keys() == half.keys() and all(half[k].dtype == torch.bfloat16 for k in half)
    assert all(torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)


def test_peft_adapter_equals_the_merged_model(demo_run, exported, exported_fp32):
    """peft (pinned to a version that imports beside torchao 0.15) loads adapter/ on the base folder; base +
    adapter equals the merged fp32 export (the merge is W + (alpha/r) B A, exactly what LoRA computes). And
    transformers' own adapter path (from_pretrained on the adapter folder) finds the base by itself."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, args = demo_run
    tuned = _tuned(demo_run)
    x = torch.tensor([tuned.tokenizer.encode("Which glue for outdoor oak? Answer briefly.", add_eos=False)])
    base = AutoModelForCausalLM.from_pretrained(load_config(DEMO, *args).checkpointer.checkpoint_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(x).logits  # before peft: PeftModel wraps `base` in place
        merged = AutoModelForCausalLM.from_pretrained(exported_fp32 / "hf", torch_dtype=torch.float32)(x).logits
        with_adapter = PeftModel.from_pretrained(base, exported / "adapter").eval()(x).logits
        auto = AutoModelForCausalLM.from_pretrained(exported / "adapter", torch_dtype=torch.float32).eval()(x).logits
        unmerged_ours = tuned.model(x).float()
    assert (with_adapter - merged).abs().max().item() < 1e-3
    assert (auto - merged).abs().max().item() < 1e-3
    assert (with_adapter - unmerged_ours).abs().max().item() < 1e-3
    assert (merged - base_logits).abs().max().item() > 0.1  # the adapter is not a no-op
    # adapter/'s own tokenizer (AutoTokenizer on the folder, as a peft user loads it) gives the ids training saw, BOS
    # first; the base checkpoint's (SmolLM2's) would not (no BOS)
    from transformers import AutoTokenizer

    manifest = json.loads((exported / "export.json").read_text())
    prompt = "Which glue for outdoor oak? Answer briefly."
    text = manifest["prompt_prefix"] + prompt + manifest["prompt_suffix"]
    assert AutoTokenizer.from_pretrained(exported / "adapter")(text)["input_ids"] == _ids(tuned, [prompt])[0]


def _teacher_forced_agreement(llm, tuned, generated: dict[str, str]) -> float:
    """Fed the same tokens (each prompt and make generate's completion of it), the share of completion positions
    where llama.cpp and our model rank the same next token first."""
    agree = total = 0
    for prompt, expected in generated.items():
        prompt_ids = _ids(tuned, [prompt])[0]
        tokens = prompt_ids + tuned.tokenizer.encode(expected, add_bos=False, add_eos=False)
        llm.reset()
        llm.eval(tokens)
        span = slice(len(prompt_ids) - 1, len(tokens) - 1)
        with torch.no_grad():
            ours = tuned.model(torch.tensor([tokens]))[0, span].argmax(-1).tolist()
        theirs = llm.scores[span].argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(ours, theirs))
        total += len(ours)
    return agree / total


@pytest.fixture(scope="module")
def engine_completions(exported, generated) -> dict[str, str]:
    """llama.cpp's own greedy completions on the f16 GGUF (what make serve loads), the prompt in export.json's
    template, called directly through llama-cpp-python."""
    from llama_cpp import Llama

    manifest = json.loads((exported / "export.json").read_text())
    llm = Llama(str(exported / "model-f16.gguf"), n_ctx=manifest["max_seq_len"], verbose=False, n_threads=1)
    return {p: llm.create_completion(manifest["prompt_prefix"] + p + manifest["prompt_suffix"], max_tokens=MAX_NEW,
                                     temperature=0.0, repeat_penalty=1.0)["choices"][0]["text"] for p in generated}


def test_gguf_computes_the_tuned_model(demo_run, exported, generated, engine_completions):
    """Oracle: llama.cpp (llama-cpp-python) on the GGUFs, the prompt in export.json's template. Two engines'
    greedy texts can part at a near-tie and differ from there on (llama.cpp's f16 attention cache and its own
    kernels move logits by up to ~0.7 here), so the check is teacher-forced: fed the same tokens (prompt and
    make generate's completion), llama.cpp and our model rank the same next token first at 95% of the positions
    or more (f32 and f16 GGUFs; 100% measured)."""
    from llama_cpp import Llama

    tuned = _tuned(demo_run)
    manifest = json.loads((exported / "export.json").read_text())
    for name in ("model-f32.gguf", "model-f16.gguf"):
        llm = Llama(str(exported / name), n_ctx=manifest["max_seq_len"], verbose=False, n_threads=1, logits_all=True)
        assert _teacher_forced_agreement(llm, tuned, generated) >= 0.95, name
    # Each GGUF's own tokenizer (BOS as its metadata says, special tokens parsed, as Ollama and llama-server do) turns
    # the Modelfile's template around a prompt into the ids training saw (oracle: the training formatter)
    template = re.search(r'TEMPLATE """(.*?)"""', (exported / "Modelfile").read_text(), re.S)[1]
    prompts = list(generated)
    for name in ("model-f32.gguf", "model-f16.gguf"):
        vocab = Llama(str(exported / name), vocab_only=True, verbose=False)
        for prompt, ids in zip(prompts, _ids(tuned, prompts)):
            assert vocab.tokenize(template.replace("{{ .Prompt }}", prompt).encode(), add_bos=True, special=True) == ids
        # what llama.cpp (and make serve, Ollama) feed the model for a raw prompt is what training fed it
        assert llm.metadata.get("tokenizer.ggml.add_bos_token") == "true", name
        for prompt in generated:
            text = manifest["prompt_prefix"] + prompt + manifest["prompt_suffix"]
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == _ids(tuned, [prompt])[0]
    assert all(text.strip() for text in engine_completions.values())


def test_qlora_export_of_the_tiny_model(trained_run, tiny_checkpoint, tmp_path):
    """The QLoRA path (NF4 base) with a Llama 3 tokenizer.model and no tokenizer.json: hf/ loads in transformers;
    its tokenizer.json (converted by transformers' TikTokenConverter) gives torchtune's Llama 3 tokenizer ids, BOS
    included; merge_into=trained reproduces the model training saw (NF4 base + adapter) within 1e-3."""
    from support import CONFIG, tiny_overrides
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = trained_run
    args = [*tiny_overrides(tiny_checkpoint, tmp_path), "model.quantize_base=True"]
    export(CONFIG, args, f"export.checkpoint={max(out.glob('epoch_*'))}", "export.dtype=fp32", "export.gguf=[]")
    folder = tmp_path / "export" / "hf"
    cfg = load_config(CONFIG, *args)
    tuned = TunedModel(cfg)
    tuned.load_adapter(max(out.glob("epoch_*")))
    text = "Hello world! It's 2026, isn't it? émojis 😀 12345"
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == tuned.tokenizer.encode(text, add_eos=False)
    x = torch.tensor([tuned.tokenizer.encode(text, add_eos=False)])
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)(x).logits
        ours = tuned.model(x).float()
    assert (ours - theirs).abs().max().item() < 1e-3
