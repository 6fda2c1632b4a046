"""Beyond one GPU: torchtune's installed `lora_finetune_distributed` (FSDP2), unchanged but for three CUDA-only
spots (tests/cpu_distributed.py), on CPU ranks under torchrun with gloo, fed by our data layer, started the way a
user starts it (`make train NPROC=...`, which runs `tune run ... lora_finetune_distributed`).

- 2 ranks x batch 2 against the oracle, the stock single-device recipe with batch 4, from the same weights and
  data: the same losses step by step and the same adapter.
- Every pack drawn exactly once an epoch across the ranks (what each rank fetched, against the packs the data layer
  makes of the same config), with a pack count the data makes odd.
- Two nodes (`--nnodes 2 --nproc_per_node 1 --rdzv_backend c10d` on localhost): trains, one store built; then
  `resume_from_checkpoint` under two ranks continues with the losses and adapter of the unbroken run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from support import RECIPE_ENV, REPO, tiny_config, tune_run, write_jsonl

from tuned.serve.engine import free_port as _free_port

CONFIG = "configs/tiny_qlora_cpu.yaml"
LAUNCHER = "tests/cpu_distributed.py"


def _data(folder: Path, n: int = 56) -> Path:
    """Pairs of many lengths and one text document: at max_seq_len 256 the packer makes an odd number of packs."""
    rows = [{"prompt": f"Question {i}: " + "why do ranks share the work? " * (1 + i % 7),
             "completion": f"Answer {i}: " + "each rank trains its own packs. " * (1 + (i * 3) % 11)} for i in range(n)]
    write_jsonl(folder / "pairs.jsonl", rows)
    (folder / "text").mkdir(parents=True, exist_ok=True)
    (folder / "text" / "notes.txt").write_text("Gradients are reduced across the ranks after each step.\n" * 40)
    return folder


def _args(data: Path, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [f"checkpointer.checkpoint_dir={checkpoint}", f"tokenizer.path={checkpoint}/original/tokenizer.model",
            f"output_dir={out}", f"dataset.cache_dir={out}/cache", f"dataset.sources.pairs.path={data}/pairs.jsonl",
            f"dataset.sources.text.path={data}/text", "model.quantize_base=False", "dtype=fp32", "epochs=1",
            "optimizer.lr=3e-3", "lr_scheduler.num_warmup_steps=0", *extra]


def _make_train(args: list[str], nproc: int, *, drawn: Path | None = None, nnodes: int = 1, rdzv: str = "",
                wait: bool = True):
    """`make train NPROC=... CONFIG=... ARGS=...` with the CPU launcher as the distributed recipe."""
    cmd = ["make", "--no-print-directory", "train", f"NPROC={nproc}", f"NNODES={nnodes}", f"RDZV={rdzv}",
           f"DIST_RECIPE={LAUNCHER}", f"CONFIG={CONFIG}", "ARGS=" + " ".join(args)]
    env = {**RECIPE_ENV, "OMP_NUM_THREADS": "1", **({"CPU_DISTRIBUTED_DRAWN": str(drawn)} if drawn else {})}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    return _finished(proc)


def _finished(proc, timeout: int = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


def _losses(out: Path) -> list[float]:
    logs = sorted((out / "logs").glob("log_*.txt"), key=lambda p: p.stat().st_mtime)
    return [float(x) for x in re.findall(r"loss:([0-9.]+)", logs[-1].read_text())]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "adapter_model.pt", map_location="cpu", weights_only=True)


def _drawn(folder: Path) -> dict[int, list[int]]:
    return {int(p.stem[4:]): [int(x) for x in p.read_text().split()] for p in sorted(folder.glob("rank*.txt"))}


def _packs(checkpoint: Path, data: Path, out: Path, *overrides: str):
    """The data layer's packs for that config, made here in one process: the store the ranks read from."""
    from torchtune import config

    cfg = tiny_config(checkpoint, out, *_args(data, out, checkpoint, *overrides))
    return config.instantiate(cfg.dataset, config.instantiate(cfg.tokenizer))


@pytest.fixture(scope="module")
def start(tiny_checkpoint, tmp_path_factory) -> Path:
    """One starting point for both recipes: the tiny base weights and LoRA A and B matrices, in torchtune's own
    format (FullModelTorchTuneCheckpointer loads it as the base, LoRA keys included, in both recipes). Needed
    because the two recipes draw a fresh adapter differently: the single-device one while it builds the model,
    after the base weights' own random draws; the distributed one after sharding, per rank (seed + rank), through
    DTensor's random-number tracker."""
    from torchtune import config, training

    folder = tmp_path_factory.mktemp("start")
    cfg = tiny_config(tiny_checkpoint, folder, "model.quantize_base=False", "dtype=fp32")
    base = config.instantiate(cfg.checkpointer).load_checkpoint()[training.MODEL_KEY]
    torch.manual_seed(0)
    model = config.instantiate(cfg.model)
    lora = {k: v for k, v in model.state_dict().items() if "lora" in k}
    for k, v in lora.items():
        if "lora_b" in k:
            v.normal_(0, 0.02)  # so that the first steps already move both matrices
    torch.save({**base, **lora}, folder / "model.pt")
    shutil.copytree(tiny_checkpoint / "original", folder / "original")
    return folder


def _from_start(start: Path) -> list[str]:
    return ["checkpointer._component_=torchtune.training.FullModelTorchTuneCheckpointer",
            f"checkpointer.checkpoint_dir={start}", "checkpointer.checkpoint_files=[model.pt]"]


@pytest.mark.e2e
def test_two_ranks_train_as_one_device_with_twice_the_batch_and_draw_every_pack_once(tiny_checkpoint, start, tmp_path):
    data = _data(tmp_path / "data")
    odd = _packs(tiny_checkpoint, data, tmp_path / "unsplit", "dataset.batch_size=1")
    assert len(odd) % 2 == 1  # the packer's own count: odd, so 2 ranks x batch 2 needs packs split
    packs = _packs(tiny_checkpoint, data, tmp_path / "split", "batch_size=4")
    assert len(packs) % 4 == 0 and packs.stats.split_packs == (-len(odd)) % 4
    # the split packs hold the same samples, each once
    assert sorted(packs._packs.seq_start.tolist()) == sorted(odd._packs.seq_start.tolist())

    one = tmp_path / "one"
    tune_run(CONFIG, [*_args(data, one, tiny_checkpoint, "batch_size=4"), *_from_start(start)])
    expected = _losses(one)
    assert len(expected) == len(packs) // 4 >= 4

    two, drawn = tmp_path / "two", tmp_path / "drawn"
    printed = _make_train([*_args(data, two, tiny_checkpoint, "batch_size=2"), *_from_start(start)], 2, drawn=drawn)
    assert "Running with torchrun" in printed
    assert _losses(two) == pytest.approx(expected, abs=1e-4)
    theirs, ours = _adapter(one / "epoch_0"), _adapter(two / "epoch_0")
    assert theirs.keys() == ours.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=0, msg=k)

    per_rank = _drawn(drawn)
    assert sorted(per_rank) == [0, 1] and len(per_rank[0]) == len(per_rank[1]) == len(packs) // 2
    assert sorted(per_rank[0] + per_rank[1]) == list(range(len(packs)))  # every pack once, across the ranks


@pytest.mark.e2e
def test_two_nodes_train_then_two_ranks_resume_with_the_unbroken_losses(tiny_checkpoint, tmp_path):
    """`torchrun --nnodes 2 --nproc_per_node 1 --rdzv_backend c10d` on localhost, through make train, 2 epochs;
    then that run as a crash in epoch 2 leaves it (epoch_1 not written yet) resumed with 2 ranks on one node."""
    data = _data(tmp_path / "data")
    whole, drawn = tmp_path / "whole", tmp_path / "drawn"
    args = _args(data, whole, tiny_checkpoint, "epochs=2", "batch_size=2")
    rdzv = f"localhost:{_free_port()}"
    nodes = [_make_train(args, 1, drawn=drawn, nnodes=2, rdzv=rdzv, wait=False) for _ in range(2)]
    printed = [_finished(p) for p in nodes]
    expected = _losses(whole)
    steps = len(expected) // 2
    assert steps >= 3 and len(expected) == 2 * steps
    assert len([p for p in (whole / "cache").iterdir() if p.is_dir()]) == 1  # one store: one rank built it
    assert sum("Data table" in p for p in printed) == 1  # (logged by the rank that built it, rank 0)
    per_rank = _drawn(drawn)
    assert sorted(per_rank) == [0, 1]
    for epoch in range(2):  # each epoch: every pack once across the two nodes
        both = [i for r in (0, 1) for i in per_rank[r][epoch * 2 * steps : (epoch + 1) * 2 * steps]]
        assert sorted(both) == list(range(4 * steps))

    crashed = tmp_path / "crashed"
    shutil.copytree(whole, crashed, ignore=shutil.ignore_patterns("epoch_1", "logs"))
    resumed_args = [a.replace(str(whole), str(crashed)) for a in args] + ["resume_from_checkpoint=True"]
    _make_train(resumed_args, 2)
    assert _losses(crashed) == pytest.approx(expected[steps:], abs=1e-5)
    theirs, ours = _adapter(whole / "epoch_1"), _adapter(crashed / "epoch_1")
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=0, msg=k)


def test_make_train_nproc_runs_the_distributed_recipe_with_its_preset():
    printed = subprocess.run(["make", "-n", "--no-print-directory", "train", "NPROC=8"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
    assert ("tune run --nnodes 1 --nproc_per_node 8  lora_finetune_distributed --config "
            "configs/llama3_1_8b_lora_distributed.yaml") in printed
    printed = subprocess.run(["make", "-n", "--no-print-directory", "train", "NPROC=4", "NNODES=2", "RDZV=node0:29500",
                              "CONFIG=configs/llama3_1_8b_qlora.yaml"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
    assert ("--nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint node0:29500 lora_finetune_distributed "
            "--config configs/llama3_1_8b_qlora.yaml") in printed


@pytest.mark.e2e
def test_a_rank_that_cannot_see_rank_0s_store_says_what_to_do(tiny_checkpoint, tmp_path):
    """Nodes without a shared cache_dir, as two ranks each resolving its own folder (${oc.env:RANK}): rank 1 finds no
    store after the barrier and stops with what to do, naming the key."""
    data = _data(tmp_path / "data")
    out = tmp_path / "run"
    args = [a for a in _args(data, out, tiny_checkpoint, "batch_size=2") if not a.startswith("dataset.cache_dir=")]
    proc = _make_train([*args, f"'dataset.cache_dir={tmp_path}/node$${{oc.env:RANK}}'"], 2, wait=False)  # (quoted for the shell)
    printed, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "dataset.cache_dir: rank 1 cannot read the packs rank 0 built at" in printed
    assert "run `make data` with the same config on each node first" in printed
