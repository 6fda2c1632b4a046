"""Every config under configs/ is checked: composed from its layers, components resolve, the model
builds on the meta device, the data section builds on the sample data, and overrides reach the objects."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from support import RECIPE_ENV, REPO, our_recipe
from torchtune import config
from torchtune.config._utils import _get_component_from_path
from torchtune.modules.peft import LoRALinear

from recipes.compose_configs import compose, presets
from tools.make_tiny_checkpoint import llama3_tokenizer_path
from tuned.config import load_file
from tuned.fit import estimate

CONFIGS = REPO / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))
FLAT = sorted(p for p in ALL_YAML if p.parent == CONFIGS)


def load(path: Path, *overrides: str):
    """Loads a config exactly as `tune run --config path key=value ...` does."""
    return load_file(path, overrides)


def components(node, where=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_component_":
                yield where, v
            else:
                yield from components(v, f"{where}.{k}" if where else k)


def test_every_preset_has_a_committed_config_and_nothing_else_is_flat():
    assert {p.stem for p in FLAT} == set(presets())


@pytest.mark.parametrize("name", list(presets()))
def test_committed_config_equals_its_layers(name):
    p = presets()[name]
    assert (CONFIGS / f"{name}.yaml").read_text() == compose(name, p["layers"], p["recipe"], p["about"], p.get("nproc")), \
        "configs/ is out of date with configs/layers/: run `make configs`"


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_component_resolves(path):
    found = list(components(OmegaConf.to_container(OmegaConf.load(path))))
    for _where, target in found:
        _get_component_from_path(target)  # raises InstantiationError if it does not resolve
    if path in FLAT:
        assert {w for w, _ in found} >= {"model", "tokenizer", "checkpointer", "dataset", "optimizer", "loss"}


@pytest.mark.parametrize("path", FLAT, ids=lambda p: p.stem)
def test_flat_config_model_builds_on_meta_and_data_builds_on_the_sample(path, tmp_path):
    # Llama configs point at checkpoints/ a user downloads: the same tokenizer ships in llama-models. A
    # tokenizer.json model's folder is written by make (make small-checkpoint, which make test runs first).
    llama = OmegaConf.load(path).tokenizer._component_.endswith("llama3_tokenizer")
    cfg = load(path, *[f"tokenizer.path={llama3_tokenizer_path()}"] * llama, f"output_dir={tmp_path}")
    with torch.device("meta"):
        model = config.instantiate(cfg.model)
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    tokenizer = config.instantiate(cfg.tokenizer)
    dataset = config.instantiate(cfg.dataset, tokenizer)
    assert cfg.dataset.packed is True and len(dataset) > 0
    assert dataset.max_seq_len == cfg.tokenizer.max_seq_len
    assert (tmp_path / "held_out" / "pairs.jsonl").is_file()
    assert str(cfg.checkpointer.output_dir) == str(tmp_path)
    assert "tune run" in path.read_text().splitlines()[2]  # each config opens with the command that runs it


def test_unknown_key_in_the_builder_section_is_an_error(tmp_path):
    cfg = load(CONFIGS / "tiny_qlora_cpu.yaml", f"tokenizer.path={llama3_tokenizer_path()}",
               f"output_dir={tmp_path}", "dataset.pakced=True")
    from custom_datasets import DatasetError

    with pytest.raises(DatasetError, match=r"dataset\.pakced: unknown key; did you mean 'packed'\?"):
        config.instantiate(cfg.dataset, config.instantiate(cfg.tokenizer))


def test_overrides_reach_the_built_objects(tmp_path):
    pairs = tmp_path / "mine.jsonl"
    pairs.write_text("".join(f'{{"prompt": "p{i}", "completion": "c{i}"}}\n' for i in range(30)))
    cfg = load(CONFIGS / "tiny_qlora_cpu.yaml", f"tokenizer.path={llama3_tokenizer_path()}", f"output_dir={tmp_path}/run",
               f"dataset.sources.pairs.path={pairs}", "dataset.sources.text.weight=2", "tokenizer.max_seq_len=512",
               "model.lora_rank=16", "optimizer.lr=1e-5", "batch_size=3")
    dataset = config.instantiate(cfg.dataset, config.instantiate(cfg.tokenizer))
    pairs_stats, text_stats = dataset.stats.sources
    assert pairs_stats.rows == 30 and text_stats.weight == 2 and dataset.max_seq_len == 512
    assert (tmp_path / "run" / "held_out" / "pairs.jsonl").is_file()
    model = config.instantiate(cfg.model)
    assert {m.rank for m in model.modules() if isinstance(m, LoRALinear)} == {16}
    optimizer = config.instantiate(cfg.optimizer, model.parameters())
    assert optimizer.param_groups[0]["lr"] == 1e-5 and cfg.batch_size == 3


def test_make_config_composes_an_ad_hoc_mix(tmp_path):
    out = tmp_path / "mine.yaml"
    run = subprocess.run([sys.executable, "recipes/compose_configs.py", "--layers", "model/llama3_2_3b", "method/dora",
                          "data/pairs_text", "base/train", "hardware/gpu_24gb", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    cfg = OmegaConf.load(out)
    assert cfg.model._component_.endswith("lora_llama3_2_3b") and cfg.model.use_dora is True
    assert cfg.tokenizer.max_seq_len == 4096 and cfg.output_dir == "runs/mine"
    bad = subprocess.run([sys.executable, "recipes/compose_configs.py", "--layers", "model/llama4", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "Unknown layer 'model/llama4'; expected one of" in bad.stderr


def test_fit_formula_cross_check_counts_the_real_model_and_orders_the_activation_options():
    cfg = load(CONFIGS / "llama3_1_8b_qlora.yaml")
    est = estimate(cfg)
    parts = dict(est.lines)
    nf4 = next(k for k in parts if k.startswith("base weights, NF4"))
    assert "(6.98B params)" in nf4  # every linear layer of the 8B base, quantized
    assert est.fits and 8 * 2**30 < est.total < 20 * 2**30
    without = estimate(load(CONFIGS / "llama3_1_8b_qlora.yaml", "enable_activation_checkpointing=False"))
    offload = estimate(load(CONFIGS / "llama3_1_8b_qlora.yaml", "enable_activation_offloading=True"))
    assert offload.total < est.total < without.total and not without.fits
    lora = estimate(load(CONFIGS / "llama3_1_8b_lora.yaml"))
    assert lora.total > est.total + 8 * 2**30  # a bf16 base costs ~11 GiB more than NF4


def test_make_fit_exits_1_when_the_config_does_not_fit():
    run = subprocess.run([*our_recipe("fit"), "--config", "configs/tiny_qlora_cpu.yaml", "gpu_memory_gb=0.5"],
                         cwd=REPO, capture_output=True, text=True, env=RECIPE_ENV)
    assert run.returncode == 1 and "does NOT fit" in run.stdout and "peak allocated (traced), during forward" in run.stdout
