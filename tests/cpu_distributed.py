"""Test-only launcher: torchtune's installed `lora_finetune_distributed` (FSDP2), unchanged, on CPU ranks with gloo.

    tune run --nproc_per_node 2 tests/cpu_distributed.py --config <config> key=value ...

(`tune run` hands a recipe path to torchrun as `python -m tests.cpu_distributed`.) The recipe file is the one
`tune run lora_finetune_distributed` runs, found the way tune finds it, and executed as it would be; before it
runs, three CUDA-only spots of torchtune 0.6.1 are bypassed, and nothing else:

1. `init_process_group("cuda:nccl,cpu:gloo")`: a CPU-only torch has no NCCL backend, so the group cannot be
   made with that string; it is made with gloo alone, which is what the CPU half of it names anyway.
2. `training.get_memory_stats` raises on a device that is not CUDA; the recipe calls it (rank 0, after the
   model is loaded) only to log GPU memory, so it returns zeros.
3. `training.cleanup_before_training` calls `torch.cpu.empty_cache` and `torch.cpu.reset_peak_memory_stats`
   (the device namespace's), which the CPU namespace does not have: no-ops.

Set `CPU_DISTRIBUTED_DRAWN=<folder>` to record what each rank draws: every dataset index the rank's DataLoader
fetches is appended to `<folder>/rank<N>.txt`, one index a line in the order fetched (an observer on `MixedDataset.__getitem__`;
the packs themselves are unchanged).
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import torch
import torch.distributed
from torchtune import training
from torchtune._cli.run import ROOT
from torchtune._recipe_registry import get_all_recipes

RECIPE = "lora_finetune_distributed"

_init_process_group = torch.distributed.init_process_group


def _gloo(backend=None, *args, **kwargs):  # (1)
    return _init_process_group("gloo", *args, **kwargs)


def _no_gpu_memory(device=None, reset_stats: bool = True) -> dict:  # (2)
    return {"peak_memory_active": 0.0, "peak_memory_alloc": 0.0, "peak_memory_reserved": 0.0}


def _record_draws(folder: Path) -> None:
    """Each rank appends the indices it fetches (one batch a line) to folder/rank<N>.txt."""
    from custom_datasets._mixed import MixedDataset

    fetch = MixedDataset.__getitem__
    folder.mkdir(parents=True, exist_ok=True)

    def observed(self, index):
        with (folder / f"rank{torch.distributed.get_rank()}.txt").open("a") as f:
            f.write(f"{index}\n")
        return fetch(self, index)

    MixedDataset.__getitem__ = observed


def main() -> None:
    torch.distributed.init_process_group = _gloo
    training.get_memory_stats = _no_gpu_memory
    for name in ("empty_cache", "reset_peak_memory_stats"):  # (3)
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, lambda *a, **k: None)
    if os.environ.get("CPU_DISTRIBUTED_DRAWN"):
        _record_draws(Path(os.environ["CPU_DISTRIBUTED_DRAWN"]))
    recipe = next(r for r in get_all_recipes() if r.name == RECIPE)
    runpy.run_path(str(ROOT / "recipes" / recipe.file_path), run_name="__main__")


if __name__ == "__main__":
    main()
