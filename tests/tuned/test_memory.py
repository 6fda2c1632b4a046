"""make fit's tracer: the counter against hand-counted bytes, the fake-tensor trace against the same step on real
tensors, and the 8B configs traced as a user runs them."""

import json
import subprocess

import torch
from support import RECIPE_ENV, REPO, load_config, our_recipe

from tuned.memory import GiB, MemoryCounter, trace_step


def test_the_counter_counts_storages_in_512_byte_blocks_until_they_die():
    """Hand-counted: 1,000 fp32 = 4,000 bytes -> 4,096; 10 fp32 -> 512; 2,000 fp32 -> 8,192. A view or an in-place
    op allocates nothing; a freed tensor gives its bytes back."""
    with MemoryCounter() as counter:
        a = torch.empty(1000)
        b = torch.empty(10)
        a.view(10, 100).add_(1)
        assert counter.current == 4096 + 512
        del a
        assert counter.current == 512
        c = torch.empty(2000)
        assert counter.current == 512 + 8192
    assert counter.trace.peak == 512 + 8192 and b.numel() + c.numel() == 2010


def test_the_fake_trace_of_the_tiny_step_is_byte_for_byte_the_real_one(tiny_checkpoint):
    """The same counter over the same step (tiny Llama 3.1, QLoRA, fp32): fake tensors and real CPU tensors."""
    cfg = load_config("configs/tiny_qlora_cpu.yaml", f"tokenizer.path={tiny_checkpoint}/original/tokenizer.model",
                      "gradient_accumulation_steps=2", "enable_activation_checkpointing=True")
    fake, real = trace_step(cfg, fake=True), trace_step(cfg, fake=False)
    assert fake.peak == real.peak and fake.sizes == real.sizes and fake.phase_peaks == real.phase_peaks
    # AdamW: exp_avg and exp_avg_sq per adapter tensor, and a scalar `step` (one 512-byte block) for each of the
    # 2 layers x 7 LoRA'd linears x (A, B) = 28 adapter tensors
    assert fake.sizes["gradients"] == fake.sizes["adapter parameters"] > 0
    assert fake.sizes["optimizer state"] == 2 * fake.sizes["gradients"] + 28 * 512


def test_the_default_8b_config_traces_as_its_header_says():
    """The 8B QLoRA preset, traced fresh: about 14 GiB allocated at the peak (the figure configs/layers/traced.json
    holds for its header), NF4 base weights 3.35 GiB of the 5.37 GiB frozen."""
    trace = trace_step(load_config("configs/llama3_1_8b_qlora.yaml"))
    stored = json.loads((REPO / "configs" / "layers" / "traced.json").read_text())
    assert trace.peak in {entry["peak"] for entry in stored.values()}
    assert 13.5 * GiB < trace.peak < 14.5 * GiB and trace.peak_phase == "forward"
    assert 5.3 * GiB < trace.sizes["frozen weights"] < 5.45 * GiB
    assert "15.9 GiB of 20 GiB, fits" in (REPO / "configs" / "llama3_1_8b_qlora.yaml").read_text().splitlines()[6]


def test_make_fit_says_16k_tokens_do_not_fit_20_gb_and_exits_1():
    run = subprocess.run([*our_recipe("fit"), "--config", "configs/llama3_1_8b_qlora.yaml", "batch_size=1",
                          "tokenizer.max_seq_len=16384"], cwd=REPO, env=RECIPE_ENV, capture_output=True, text=True, timeout=900)
    assert run.returncode == 1, run.stderr[-2000:]
    peak = next(line for line in run.stdout.splitlines() if "peak allocated (traced)" in line)
    assert 21.5 < float(peak.split()[-2]) < 23.5 and "does NOT fit" in run.stdout


def test_make_fit_search_finds_the_longest_length_and_largest_batch_that_fit(tiny_checkpoint):
    """Bisection over traced steps on the tiny config with a 2 GiB budget: the reported length fits and 256 more
    does not; the same for the batch (each checked by its own trace)."""
    args = ["--config", "configs/tiny_qlora_cpu.yaml", f"tokenizer.path={tiny_checkpoint}/original/tokenizer.model",
            "gpu_memory_gb=2", "model.max_seq_len=4096"]
    run = subprocess.run([*our_recipe("fit"), *args, "--search"], cwd=REPO, env=RECIPE_ENV, capture_output=True, text=True,
                         timeout=900)
    lines = run.stdout.splitlines()
    longest = int(next(x for x in lines if "longest max_seq_len" in x).split()[-1].replace(",", ""))
    batch = int(next(x for x in lines if "largest batch_size" in x).split()[-1])

    def total(*overrides):
        return trace_step(load_config("configs/tiny_qlora_cpu.yaml", *args[3:], *overrides)).total()

    assert 256 <= longest < 4096 and total(f"tokenizer.max_seq_len={longest}") <= 2 * GiB < total(f"tokenizer.max_seq_len={longest + 256}")
    assert batch >= 1 and total(f"batch_size={batch}") <= 2 * GiB < total(f"batch_size={batch + 1}")
