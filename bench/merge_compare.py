"""QLoRA: how far each `make export` merge is from the model training saw (NF4 base + adapter).

    python bench/merge_compare.py --config configs/tiny_qlora_cpu.yaml output_dir=runs/tiny_qlora_cpu

Needs a trained run under output_dir. Exports both merges (fp32, no GGUF) into output_dir/merge_compare/ and
prints, for each, the held-out loss of the pairs (transformers on the exported folder) and the largest logit
difference from the NF4 model with the adapter unmerged.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from custom_datasets._format import format_pair
from custom_datasets._read import Pair
from tuned import TunedModel, latest_adapter
from tuned import export as ex
from tuned.config import load


def held_out_loss(forward, samples) -> float:
    total, count = 0.0, 0
    for s in samples:
        x, y = torch.tensor([s.tokens]), torch.tensor(s.labels[1:] + [-100])
        with torch.no_grad():
            logits = forward(x)[0].float()
        total += torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
    return total / count


def main(argv: list[str]) -> None:
    from transformers import AutoModelForCausalLM

    cfg = load(argv)
    tuned = TunedModel(cfg)
    tuned.load_adapter(latest_adapter(cfg.output_dir))
    name, spec = next(iter(tuned.instruct_specs().items()))
    rows = [json.loads(line) for line in (Path(cfg.dataset.held_out_dir) / f"{name}.jsonl").read_text().splitlines()]
    samples = [format_pair(tuned.tokenizer, spec, Pair(r["prompt"], r["completion"], "held out"), tuned.max_seq_len)[0]
               for r in rows]
    samples = [s for s in samples if s is not None]
    x0 = torch.tensor([samples[0].tokens])
    with torch.no_grad():
        reference = tuned.model(x0).float()
    print(f"NF4 base + adapter: held-out loss {held_out_loss(tuned.model, samples):.5f} "
          f"({len(samples)} {name} rows; logits up to {reference.abs().max().item():.3g})")
    root = Path(cfg.output_dir) / "merge_compare"
    for merge in ex.MERGE_INTO:
        folder = root / merge
        shutil.rmtree(folder, ignore_errors=True)
        ex.write_hf(folder, tuned, merge, torch.float32)
        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            diff = (model(x0).logits - reference).abs().max().item()
        print(f"merge_into={merge}: held-out loss {held_out_loss(lambda x, model=model: model(x).logits, samples):.5f}, "
              f"max |logit difference| {diff:.3g}")


if __name__ == "__main__":
    main(sys.argv[1:])
