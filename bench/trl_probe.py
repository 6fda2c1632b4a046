"""Not a benchmark: the probe that showed TRL's side of the training comparison (issue #24) runs here, kept for the
session that builds `make bench-train`. TRL 1.16 SFTTrainer + peft LoRA on SmolLM2-135M-Instruct (checkpoints/, from
make small-checkpoint), CPU fp32, bfd packing, completion-only loss, padding-free, 64 alpaca pairs as conversational
prompt-completion rows, 2 steps. Run in its own venv (TRL 1.16 wants transformers 5, lm-eval 0.4.8 needs < 5):

    python3 -m venv /tmp/venv-trl && /tmp/venv-trl/bin/pip install torch==2.13.0 && \
        /tmp/venv-trl/bin/pip install trl==1.16.0 peft datasets
    /tmp/venv-trl/bin/python bench/trl_probe.py

Seen on 2026-12-02: trl 1.16.0, transformers 5.24.0, peft 0.21.2, torch 2.13.0+cpu install from PyPI here and
train. Its SFTConfig turns gradient checkpointing on by default (set it off to compare like with like); TRL takes
one dataset type, so raw text has to join the pairs as its own rows; no timing here is a measurement (it ran beside
other jobs)."""

import json
import time
from pathlib import Path

import peft
import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

print("versions", trl.__version__, transformers.__version__, peft.__version__, torch.__version__, flush=True)
REPO = Path(__file__).resolve().parents[1]
ckpt = str(REPO / "checkpoints" / "smollm2_135m")
rows = [json.loads(l) for l in open(REPO.parent / "shared" / "data" / "alpaca_8k.jsonl")][:64]
pairs = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"] if "prompt" in r else r["instruction"]}],
                            "completion": [{"role": "assistant", "content": r.get("completion") or r.get("output")}]} for r in rows])
print(pairs[0], flush=True)
cfg = SFTConfig(output_dir="/tmp/trl_probe", max_length=512, packing=True, packing_strategy="bfd", padding_free=True,
                completion_only_loss=True, per_device_train_batch_size=2, gradient_accumulation_steps=1, learning_rate=3e-4,
                lr_scheduler_type="cosine", warmup_steps=0, max_steps=2, seed=0, use_cpu=True, logging_steps=1,
                report_to=[], save_strategy="no", dataloader_num_workers=0, bf16=False, fp16=False)
lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
t = time.perf_counter()
trainer = SFTTrainer(model=ckpt, args=cfg, train_dataset=pairs, peft_config=lora)
print("setup", time.perf_counter() - t, flush=True)
t = time.perf_counter()
out = trainer.train()
print("train", time.perf_counter() - t, out, flush=True)
print(trainer.state.log_history, flush=True)
