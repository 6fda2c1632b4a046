"""The base model's column of make eval, scored once per (base checkpoint, held-out split, eval settings) and reused
by every later run on the same: a second learning rate on the same data and base does not score the base again.

The entry's key is the SHA-256 of everything the base column is computed from, as `made_from`:
- the base checkpoint's and the tokenizer's bytes (by file name, not folder: a copy elsewhere is the same base);
- the held-out split's bytes (what is scored; a different seed or data gives another split and another key);
- the config keys that shape the model as eval builds it and the samples it scores: `model.*` but the adapter's own
  size (`lora_rank`, `lora_alpha`, `lora_dropout`: LoRA's B starts at zero, so the base is the same whatever they are),
  `tokenizer.*` but its path, `dataset.*` but the cache, held-out folder and source paths (their content is the split),
  `dtype`, `device`, and `eval.*` but which adapters to score (`checkpoint`, `epochs`, `full`) and this cache's place;
- (the lm-eval tasks are `eval.tasks` and `eval.local_task`, among the keys) the installed versions and the project's code that the eval stage declares (tuned/stages.py).
An entry is read only if its recorded `made_from` equals this one in full and it has every held-out source and
generation; otherwise (missing, truncated, another key) the base is scored again and the entry rewritten.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig

from tuned.files import write_json
from tuned.stages import (
    BY_NAME,
    checkpoint_paths,
    code_digest,
    digest_files,
    flat_keys,
    timestamp,
    tokenizer_paths,
    versions,
    within,
)

# what shapes the model eval builds and the samples it scores; not the adapter's own size (LoRA's B starts at zero) nor
# where things are (their bytes are in the key)
_READS = ("model", "tokenizer", "dataset", "dtype", "device")
_IGNORES = ("model.lora_rank", "model.lora_alpha", "model.lora_dropout", "tokenizer.path", "dataset.cache_dir",
            "dataset.held_out_dir")
_EVAL_IGNORED = ("checkpoint", "epochs", "full", "base_cache")


def _shas(paths: list[Path], memo: dict) -> dict:
    """{file name relative to its top path: sha256}; `memo` ({path: [size, mtime, sha]}) updated in place."""
    found = digest_files(paths, memo)
    memo.update(found)
    out = {}
    for top in paths:
        for path, (_, _, sha) in found.items():
            p = Path(path)
            if p == top or top in p.parents:
                out[str(p.relative_to(top)) if p != top else p.name] = sha
    return dict(sorted(out.items()))


def _keys(cfg: DictConfig, opts: dict) -> dict:
    keep = {k: v for k, v in flat_keys(cfg).items() if within(k, _READS) and not within(k, _IGNORES)
            and not (k.startswith("dataset.sources.") and k.endswith(".path"))}
    keep.update({f"eval.{k}": v for k, v in opts.items() if k not in _EVAL_IGNORED})
    return dict(sorted(keep.items()))


class BaseScores:
    """The cache entry for this config's base column (`eval.base_cache` folder)."""

    def __init__(self, cfg: DictConfig, opts: dict, held_out_dir: str | Path):
        self.folder = Path(opts["base_cache"])
        memo_path = self.folder / "files.json"
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
        stage = BY_NAME["eval"]
        self.made_from = {
            "base": _shas(checkpoint_paths(cfg), memo), "tokenizer": _shas(tokenizer_paths(cfg), memo),
            "held_out": _shas([Path(held_out_dir)], memo), "keys": _keys(cfg, opts),
            "packages": versions(stage), "code": code_digest(stage)}
        self.key = hashlib.sha256(json.dumps(self.made_from, sort_keys=True, default=str).encode()).hexdigest()[:24]
        self.path = self.folder / f"{self.key}.json"
        self._memo, self._memo_path = memo, memo_path

    def load(self, sources: list[str], generations: int) -> dict | None:
        """The stored entry, if it was made from exactly this and is whole; else None."""
        try:
            entry = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        phase = entry.get("phase") or {}
        if (entry.get("made_from") != json.loads(json.dumps(self.made_from, default=str))
                or sorted(phase.get("held_out", {})) != sorted(sources)
                or len(entry.get("generations") or []) != generations):
            return None
        return entry

    def save(self, phase: dict, generations: list[str], run: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"made_from": self.made_from, "scored": timestamp(), "run": run, "phase": phase,
                               "generations": list(generations)})
        write_json(self._memo_path, self._memo)
