"""TRL's side of `make bench-scale`'s data-preparation row: SFTTrainer's own dataset preparation of the same pairs and
text, timed. Runs in TRL's virtual environment (.venv-trl) and imports nothing of this repo.

    .venv-trl/bin/python bench/trl_prep.py --tokenizer DIR --pairs FILE --text FILE_OR_DIR --max-seq-len 2048

What a TRL user does for this data: the pairs as a prompt-completion dataset (completion-only loss, EOS added,
packed best-fit decreasing, TRL's default `bfd`), the text as a language-modelling dataset, one row a file, packed
`bfd_split` (a document longer than max_length is split into pieces, not cut: our text windows keep every token
too). `SFTTrainer._prepare_dataset` runs each, as SFTTrainer.__init__ would (a trainer without a model: the
preparation uses only the tokenizer and the config). The tokenizer is the same Llama 3 tokenizer, as transformers
loads it (tokenizer.json converted from tiktoken by `bench/scale.py`). Prints one JSON line: seconds
(preparation alone, not imports or tokenizer loading), packs and tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()  # cold: nothing reused from an earlier run
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    text = Path(args.text)
    files = sorted(p for p in text.rglob("*") if p.suffix in (".txt", ".md")) if text.is_dir() else [text]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        rows = [json.loads(line) for line in open(args.pairs, encoding="utf-8") if line.strip()]
        pairs = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
        docs = datasets.Dataset.from_list([{"text": p.read_text(encoding="utf-8")} for p in files])
        packs = []
        for data, strategy, name in ((pairs, "bfd", "pairs"), (docs, "bfd_split", "text")):
            config = SFTConfig(output_dir=out, max_length=args.max_seq_len, packing=True, packing_strategy=strategy,
                               completion_only_loss=True, report_to=[], use_cpu=True)
            trainer = SFTTrainer.__new__(SFTTrainer)
            trainer._tokenizer, trainer.chat_template, trainer.completion_only_loss = tokenizer, None, True
            packs.append(trainer._prepare_dataset(data, tokenizer, config, True, None, name))
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "packs": sum(len(p) for p in packs),
                      "tokens": sum(sum(map(len, p["input_ids"])) for p in packs)}))


if __name__ == "__main__":
    main()
