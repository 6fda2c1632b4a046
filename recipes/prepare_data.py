"""Builds the training data of a config, exactly as the training recipe will, and reports on it.

    PYTHONPATH=. tune run recipes/prepare_data.py --config configs/llama3_1_8b_qlora.yaml [key=value ...]   (or: make data)

Instantiates `tokenizer` and `dataset` from the SAME config the training recipe uses (so every
override applies). With `dataset.cache_dir` set (the presets set it), the packs are tokenized once
and stored; training then loads them memory-mapped instead of tokenizing again. Logs the data table,
writes the held-out split, and writes `<output_dir>/data/report.json`, `report.md` and
`token_lengths.png`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torchtune import config

import custom_datasets  # noqa: F401  (imported here so that "Prepared in" times the preparation, not imports)
from custom_datasets import DataStats
from custom_datasets._tables import markdown_table


def mixture(stats: dict) -> list[dict]:
    """Each source's share of the trained tokens and of the supervised tokens."""
    total, sup = max(stats["tokens"], 1), max(stats["supervised"], 1)
    return [{"source": s["name"], "tokens": s["tokens"], "share": s["tokens"] / total,
             "supervised_share": s["supervised"] / sup} for s in stats["sources"]]


def plot(stats: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = stats["hist_edges"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for s in stats["sources"]:
        ax.stairs(s["length_hist"], edges, label=f"{s['name']} ({s['type']})", linewidth=1.5)
    ax.set_yscale("symlog")
    ax.set_xlabel(f"tokens per sample (max_seq_len {stats['max_seq_len']:,})")
    ax.set_ylabel("samples, each counted once (before weights)")
    ax.set_title(f"Sample lengths, unweighted: {stats['packs']:,} packs, fill {100 * stats['fill']:.2f}%")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(report: dict) -> str:
    """report.md: the console table's columns and notes, as Markdown."""
    stats = DataStats.from_dict(report)
    lines = ["# Training data", "", f"Config `{report['config']}`; prepared in {report['seconds']:.2f} s ({report['cache']}).", "",
             *markdown_table([[*DataStats.COLUMNS, "share of tokens"],
                              *([*row, f"{100 * m['share']:.1f}%"] for row, m in zip(stats.rows(), report["mixture"]))],
                             left=2)]
    lines += [""] + [f"- {note}" for note in stats.notes()]
    lines += ["", f"- packs: {report['packs']:,} x {report['max_seq_len']:,} tokens, fill {100 * report['fill']:.2f}%",
              f"- supervised tokens: {100 * report['supervised'] / max(report['tokens'], 1):.1f}% of tokens",
              f"- steps per epoch: {report['steps_per_epoch']:,} ({report['tokens_per_step']:,} tokens per optimizer step)"]
    for s in report["sources"]:
        if s["type"] == "text":
            lines.append(f"- {s['name']}: {s['doc_tokens']:,} document tokens in {s['rows']:,} documents, split into "
                         f"{s['windows']:,} windows; {100 * (s['kept_tokens'] - s.get('never_trained', 0)) / max(s['doc_tokens'], 1):.1f}% "
                         "kept (trained in the run or held out); "
                         f"{s['empty_documents']:,} empty documents")
    lines += ["", "![token lengths](token_lengths.png)"]
    return "\n".join(lines) + "\n"


@config.parse
def main(cfg: DictConfig) -> None:
    tokenizer = config.instantiate(cfg.tokenizer)
    start = time.perf_counter()
    dataset = config.instantiate(cfg.dataset, tokenizer)
    seconds = time.perf_counter() - start
    report = dataset.stats.as_dict()
    micro = cfg.get("batch_size", 1)
    accum = cfg.get("gradient_accumulation_steps", 1)
    report.update(config=sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else None,
                  seconds=seconds, steps_per_epoch=len(dataset) // micro // accum,
                  tokens_per_step=micro * accum * dataset.max_seq_len, mixture=mixture(report),
                  dataset_config=OmegaConf.to_container(cfg.dataset, resolve=True))
    out = Path(cfg.output_dir) / "data"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=dict) + "\n")
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "token_lengths.png")
    print(f"Prepared in {seconds:.3f} s ({report['cache']}). {len(dataset):,} packs; {report['steps_per_epoch']:,} "
          f"optimizer steps per epoch at {micro} x {accum} x {dataset.max_seq_len:,} = {report['tokens_per_step']:,} tokens per step")
    print(f"Wrote {out}/report.json, report.md, token_lengths.png")


if __name__ == "__main__":
    sys.exit(main())
