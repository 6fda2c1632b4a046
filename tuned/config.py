"""A run's config: loaded once, the way `tune run` loads it, and its keys checked before a run.

`load(argv)` is the one loader every script of ours uses (torchtune's own parser and merge: `--config PATH` then
`key=value` overrides, `~key` removals). The check: a typo (`epoch=1`, `batchsize=2`) is an error with a
did-you-mean, not a run with the default. a typo (`epoch=1`, `batchsize=2`) is an error with a
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
from omegaconf import DictConfig, ListConfig

from custom_datasets._spec import did_you_mean


def load(argv, description: str = "") -> DictConfig:
    """The config `--config PATH [key=value ...]` names, composed as `tune run` composes it."""
    from torchtune.config._parse import TuneRecipeArgumentParser, _merge_yaml_and_cli_args

    parser = TuneRecipeArgumentParser(description=description)
    return _merge_yaml_and_cli_args(*parser.parse_known_args([str(a) for a in argv]))


def load_file(path, overrides=()) -> DictConfig:
    """load() of one file with overrides."""
    return load(["--config", str(path), *overrides])

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


# What a target needs on disk or in the machine before it starts, checked after the keys (make data: the tokenizer;
# make train: the tokenizer, the checkpoint and the device; ...). Each problem is one line with the fix.
NEEDS = ("tokenizer", "checkpoint", "device")
CPU_CONFIGS = "make demo (SmolLM2-135M on CPU: CONFIG=configs/smollm2_135m_lora_cpu.yaml) or CONFIG=configs/tiny_qlora_cpu.yaml"
_DOWNLOAD = re.compile(r"tune download \S+ --output-dir (\S+).*$")


def download_command(config_path: str | None, checkpoint_dir: str) -> str:
    """The `tune download` line the preset's model layer states for `checkpoint_dir`, or a generic one."""
    try:
        lines = Path(config_path).read_text().splitlines() if config_path else []
    except OSError:
        lines = []
    for line in lines:
        match = _DOWNLOAD.search(line)
        if match and Path(match.group(1)) == Path(checkpoint_dir):
            return match.group(0).strip()
    return f"tune download <hub repo of the model> --output-dir {checkpoint_dir}"


def _checkpoint_files(checkpointer) -> list[Path]:
    folder = Path(str(checkpointer.get("checkpoint_dir", "")))
    files = checkpointer.get("checkpoint_files")
    if not isinstance(files, (list, ListConfig)):
        return [folder]  # a filename_format dict or nothing listed: the folder at least
    return [folder / str(f) for f in files]


def check_needs(cfg, config_path: str | None, needs: list[str]) -> list[str]:
    """What the run needs but this machine lacks, one line each with the fix: the tokenizer file and the checkpoint
    (with the preset's `tune download` command), a CUDA GPU for a config with device=cuda (and the CPU configs)."""
    where = f"{config_path}: " if config_path else ""
    unknown = sorted(set(needs) - set(NEEDS))
    if unknown:
        raise ValueError(f"--needs {unknown}: expected some of {list(NEEDS)}")
    problems = []
    checkpointer = cfg.get("checkpointer") or {}
    checkpoint_dir = str(checkpointer.get("checkpoint_dir", ""))
    download = download_command(config_path, checkpoint_dir)
    if "device" in needs and str(cfg.get("device", "cuda")).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problems.append(f"{where}device={cfg.get('device', 'cuda')} needs a CUDA GPU and none is visible here "
                            f"(torch {torch.__version__}). On a CPU use {CPU_CONFIGS}.")
    if "tokenizer" in needs and cfg.get("tokenizer") is not None and cfg.tokenizer.get("path"):
        path = Path(str(cfg.tokenizer.path))
        if not path.exists():
            problems.append(f"{where}tokenizer.path={path} not found. Download the model: {download} "
                            "(or set tokenizer.path=... to your copy).")
    if "checkpoint" in needs and checkpoint_dir:
        missing = [p for p in _checkpoint_files(checkpointer) if not p.exists()]
        if missing:
            problems.append(f"{where}checkpointer.checkpoint_dir={checkpoint_dir}: {missing[0].name} "
                            f"{'and %d more ' % (len(missing) - 1) if len(missing) > 1 else ''}not found. "
                            f"Download the model: {download} (or set checkpointer.checkpoint_dir=... to your copy).")
    return problems
