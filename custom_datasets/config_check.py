"""A composed config's keys, checked before a run: a typo (`epoch=1`, `batchsize=2`) is an error with a
did-you-mean, not a run with the default.

The known top-level keys are not a hand-kept list: they are every `cfg.<key>` / `cfg.get("<key>")` the
stock torchtune recipes read (their source, as installed), every top-level key our config layers define
(configs/layers/), and the sections our recipes read (eval, export, serve). Plain `tune run` cannot do
this (the stock recipe reads what it knows and ignores the rest); `make train` and every Make target that
runs a config call it first.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from custom_datasets._spec import did_you_mean

STOCK_RECIPES = ("lora_finetune_single_device", "lora_finetune_distributed")
LAYERS = Path(__file__).resolve().parent.parent / "configs" / "layers"
_READS = re.compile(r"""\bcfg\s*(?:\.\s*get\(\s*["'](\w+)["']|\.\s*(\w+)\b|\[\s*["'](\w+)["']\s*\])""")
_NOT_KEYS = {"get", "pop", "keys", "items", "values", "copy", "setdefault", "update"}


def recipe_keys() -> set[str]:
    """Every top-level key the stock LoRA recipes read, from their installed source."""
    import torchtune

    folder = Path(torchtune.__file__).parent.parent / "recipes"  # where `tune run` finds them (the wheel's `recipes`)
    keys: set[str] = set()
    for name in STOCK_RECIPES:
        path = folder / f"{name}.py"
        if path.is_file():
            for match in _READS.finditer(path.read_text()):
                keys.add(next(g for g in match.groups() if g))
    return keys - _NOT_KEYS


def layer_keys(layers: Path = LAYERS) -> set[str]:
    """Every top-level key defined in our config layers."""
    keys: set[str] = set()
    for path in layers.rglob("*.yaml"):
        if path.name == "presets.yaml":
            continue
        data = yaml.safe_load(path.read_text()) or {}
        keys |= set(data) if isinstance(data, dict) else set()
    return keys


def known_keys() -> set[str]:
    return recipe_keys() | layer_keys() | {"eval", "export", "serve"}


def check_config(cfg, config_path: str | None = None) -> list[str]:
    """Problems with the composed config's keys, one line each (empty: fine)."""
    where = f"{config_path}: " if config_path else ""
    known = known_keys()
    problems = [f"{where}unknown top-level key {key!r}{did_you_mean(key, known)} (no recipe reads it: with plain "
                "`tune run` it would be ignored silently)" for key in cfg if key not in known]
    dataset = cfg.get("dataset")
    if dataset is not None and str(dataset.get("_component_", "")).startswith("custom_datasets."):
        from custom_datasets._mixed import unknown_keys

        problems += [f"{where}{problem}" for problem in unknown_keys(k for k in dataset if k != "_component_")]
    return problems
