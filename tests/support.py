"""Helpers shared by the tests: paths, small files, and the real `tune run` on the tiny checkpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TUNE = str(Path(sys.executable).parent / "tune")
CONFIG = "configs/llama3_1_8b_qlora.yaml"
RECIPE_ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # as the Makefile runs our recipes: ours is `recipes`


def our_recipe(name: str) -> list[str]:
    """The command that runs recipes/<name>.py through the real `tune run` (with env=RECIPE_ENV)."""
    return [TUNE, "run", f"recipes/{name}.py"]


def export(config: str, args: list[str], *extra: str) -> str:
    """make export: recipes/export_tuned.py through the real `tune run`."""
    return run([*our_recipe("export_tuned"), "--config", config, *args, *extra])


def write_jsonl(path: Path, rows: list) -> Path:
    """Writes rows (dicts, or raw strings written as they are) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def pairs(n: int, prefix: str = "q") -> list[dict]:
    return [{"prompt": f"{prefix} question number {i}?", "completion": f"answer {i} " * (1 + i % 5)} for i in range(n)]


def tiny_overrides(checkpoint: Path, output_dir: Path) -> list[str]:
    """What turns the 8B config into the tiny CPU run: model dimensions, checkpoint, tokenizer, device."""
    return [
        "model._component_=torchtune.models.llama3_1.lora_llama3_1", "model.vocab_size=128256",
        "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.embed_dim=256",
        "model.intermediate_dim=512", "model.max_seq_len=2048",
        f"checkpointer.checkpoint_dir={checkpoint}", "checkpointer.checkpoint_files=[model-00001-of-00001.safetensors]",
        f"tokenizer.path={checkpoint}/original/tokenizer.model", "tokenizer.max_seq_len=256",
        "device=cpu", "dtype=fp32", "enable_activation_checkpointing=False", "log_peak_memory_stats=False",
        "optimizer.fused=False", "batch_size=2", "gradient_accumulation_steps=1", f"output_dir={output_dir}",
        f"dataset.cache_dir={output_dir}/cache", "eval.base_cache=null",  # the base scored by each test's eval
    ]


def training_overrides(method: str) -> list[str]:
    """A few dozen steps on repeated data: 4 epochs of the sample pairs (seen twice) and text."""
    return [f"model.quantize_base={method == 'qlora'}", "epochs=4", "optimizer.lr=3e-3",
            "lr_scheduler.num_warmup_steps=0", "dataset.sources.pairs.weight=2"]


def run(args: list[str], timeout: int = 900) -> str:
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=RECIPE_ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def tune_run(config: str, args: list[str]) -> str:
    return run([TUNE, "run", "lora_finetune_single_device", "--config", config, *args])


def logged_losses(output_dir: Path) -> list[float]:
    (log,) = (output_dir / "logs").glob("log_*.txt")
    return [float(x) for x in re.findall(r"loss:([0-9.]+)", log.read_text())]


def load_config(path: str, *overrides: str):
    """A config exactly as `tune run --config path key=value ...` loads it."""
    from tuned.config import load_file

    return load_file(path, overrides)


def tiny_config(checkpoint: Path, output_dir: Path, *overrides: str):
    """The demo config (tiny Llama 3.1, QLoRA, CPU) on the session's tiny checkpoint."""
    return load_config("configs/tiny_qlora_cpu.yaml", f"checkpointer.checkpoint_dir={checkpoint}",
                       f"tokenizer.path={checkpoint}/original/tokenizer.model", f"output_dir={output_dir}", *overrides)
