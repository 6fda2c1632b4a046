"""Builds the training data of a config, exactly as the training recipe will, and reports on it.

    python recipes/prepare_data.py --config configs/llama3_1_8b_qlora.yaml [key=value ...]   (or: make data)

Instantiates `tokenizer` and `dataset` from the SAME config the training recipe uses (so every
override applies), logs the data table, writes the held-out split, and writes
`<output_dir>/data/report.json` with every count, plus steps per epoch for the config's batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torchtune import config


@config.parse
def main(cfg: DictConfig) -> None:
    tokenizer = config.instantiate(cfg.tokenizer)
    dataset = config.instantiate(cfg.dataset, tokenizer)
    report = dataset.stats.as_dict()
    micro = cfg.get("batch_size", 1)
    accum = cfg.get("gradient_accumulation_steps", 1)
    report["steps_per_epoch"] = len(dataset) // micro // accum
    report["tokens_per_step"] = micro * accum * dataset.max_seq_len
    out = Path(cfg.output_dir) / "data" / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report["config"] = OmegaConf.to_container(cfg.dataset, resolve=True)
    out.write_text(json.dumps(report, indent=2, default=dict) + "\n")
    print(f"{len(dataset):,} packs; {report['steps_per_epoch']:,} optimizer steps per epoch at "
          f"{micro} x {accum} x {dataset.max_seq_len:,} = {report['tokens_per_step']:,} tokens per step")
    print(f"Wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
