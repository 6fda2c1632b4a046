"""TRL's side of `make bench-train`, and the one scorer both sides are judged by. Runs in its own virtual environment
(.venv-trl: TRL 1.16 wants transformers 5; lm-eval 0.4.8 in .venv needs transformers < 5), so it imports nothing
of this repo: bench/train.py hands it files and reads back JSON.

    python bench/trl_side.py train --job job.json     # TRL SFTTrainer + peft LoRA: N steps, stamps, adapter
    python bench/trl_side.py score --job job.json     # held-out loss of base and each adapter (transformers + peft)

train: the samples are the ones our builder made (token ids and loss labels, one row per sample, before packing),
so both sides train the same tokens with the same loss mask; TRL then does the rest as its docs advise for this job:
packing with its best strategy (bfd, which turns padding_free on: one flattened row per batch, position ids
restarting per sample), completion-only loss (the labels given), no gradient checkpointing (SFTConfig's default
is on: it would cost TRL a recomputed forward), fp32 on CPU. Each optimizer step's end is stamped and its
supervised tokens (labels != -100) counted, as the stock recipe logs ours.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train(job: dict) -> dict:
    import peft
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    stamps: list[float] = []
    tokens: list[int] = []

    class Counted(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            tokens.append(int((inputs["labels"] != -100).sum()))
            return super().training_step(model, inputs, *args, **kwargs)

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    data = Dataset.from_list([{"input_ids": r["tokens"], "labels": r["labels"]} for r in _rows(job["samples"])])
    args = SFTConfig(
        output_dir=job["output_dir"], max_length=job["max_seq_len"], packing=True, packing_strategy="bfd",
        padding_free=True, completion_only_loss=True, gradient_checkpointing=False,
        per_device_train_batch_size=job["batch_size"], gradient_accumulation_steps=job["gradient_accumulation_steps"],
        max_steps=job["steps"], learning_rate=job["lr"], weight_decay=job["weight_decay"], optim="adamw_torch",
        adam_beta1=job["betas"][0], adam_beta2=job["betas"][1], adam_epsilon=job["eps"], max_grad_norm=job["clip_grad_norm"],
        lr_scheduler_type="cosine", warmup_steps=job["warmup_steps"], seed=job["seed"], data_seed=job["seed"],
        use_cpu=True, bf16=False, fp16=False, model_init_kwargs={"dtype": torch.float32},
        dataloader_num_workers=0, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True)
    lora = LoraConfig(r=job["lora_rank"], lora_alpha=job["lora_alpha"], lora_dropout=job["lora_dropout"],
                      target_modules=job["target_modules"], task_type="CAUSAL_LM")
    trainer = Counted(model=job["checkpoint"], args=args, train_dataset=data, peft_config=lora,
                      processing_class=AutoTokenizer.from_pretrained(job["checkpoint"]), callbacks=[Stamp()])
    trainer.train()
    trainer.model.save_pretrained(job["adapter_dir"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    packed = trainer.train_dataset  # TRL's own packs: every label it would train, counted from its side
    supervised = sum(sum(x != -100 for x in row) for row in packed["labels"])
    return {"versions": {"trl": trl.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                         "torch": torch.__version__},
            "stamps": stamps, "supervised_tokens": tokens, "losses": losses, "packs": len(packed), "packed_supervised_tokens": supervised}


@torch.inference_mode()
def score(job: dict) -> dict:
    """Mean loss per supervised token of each source's held-out samples, labels shifted as in training, batched by
    length with right padding (the sums do not depend on the batching)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    samples = sorted(_rows(job["held_out"]), key=lambda s: len(s["tokens"]))
    out = {}
    for name, adapter in job["models"].items():
        model = AutoModelForCausalLM.from_pretrained(job["checkpoint"], dtype=torch.float32)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        sums: dict[str, list[float]] = {}
        for i in range(0, len(samples), job["batch_size"]):
            batch = samples[i:i + job["batch_size"]]
            n = max(len(s["tokens"]) for s in batch)
            ids = torch.tensor([s["tokens"] + [0] * (n - len(s["tokens"])) for s in batch])
            labels = torch.tensor([s["labels"] + [-100] * (n - len(s["labels"])) for s in batch])
            mask = torch.tensor([[1] * len(s["tokens"]) + [0] * (n - len(s["tokens"])) for s in batch])
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
            for s, row, lab in zip(batch, nll, labels[:, 1:]):
                acc = sums.setdefault(s["source"], [0.0, 0])
                acc[0] += float(row[lab != -100].sum())
                acc[1] += int((lab != -100).sum())
        out[name] = {src: {"loss": total / count, "tokens": count} for src, (total, count) in sums.items()}
        total = sum(v[0] for v in sums.values()) / sum(v[1] for v in sums.values())
        out[name]["all"] = {"loss": total, "tokens": sum(v[1] for v in sums.values())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["train", "score"])
    parser.add_argument("--job", required=True, type=Path)
    a = parser.parse_args()
    job = json.loads(a.job.read_text())
    result = train(job) if a.mode == "train" else score(job)
    Path(job["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
