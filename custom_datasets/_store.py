"""The pack store: packs as flat int32 arrays on disk, keyed by a fingerprint of everything that
changes them, written atomically, verified on load, served memory-mapped."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torchtune.utils import get_logger

log = get_logger("INFO")

STORE_VERSION = 1  # bump when the builder's output for the same inputs changes
ARRAYS = ("tokens", "labels", "seq_lens", "group_off")


@dataclass
class Packs:
    """All packs: sample i of the pack order spans tokens[sample_off[i]:sample_off[i + 1]]."""

    tokens: np.ndarray  # int32, every sample's tokens, in pack order
    labels: np.ndarray  # int32, same layout
    seq_lens: np.ndarray  # int32, one per sample
    group_off: np.ndarray  # int64, pack p holds samples group_off[p]:group_off[p + 1]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(tokenizer: Any, settings: dict, files: list[Path]) -> str:
    """A key over the builder settings, every input file's content and the tokenizer itself."""
    h = hashlib.sha256(f"store v{STORE_VERSION}".encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for f in sorted(set(files)):
        h.update(f"{f}:{_sha256_file(f)}".encode())
    h.update(_tokenizer_digest(tokenizer))
    return h.hexdigest()[:32]


def _tokenizer_digest(tokenizer: Any) -> bytes:
    """Identifies a tokenizer cheaply: for tiktoken models, the split pattern, the special tokens and a
    sample of the merge table (hashing all of it, or pickling the tokenizer, costs ~20-30 ms)."""
    enc = getattr(getattr(tokenizer, "tt_model", None), "tt_model", None)
    if enc is None or not hasattr(enc, "_mergeable_ranks"):
        return hashlib.sha256(pickle.dumps(tokenizer)).digest()
    ranks = list(enc._mergeable_ranks)
    parts = [type(tokenizer).__qualname__, enc._pat_str, sorted(enc._special_tokens.items()), len(ranks),
             [getattr(tokenizer, a, None) for a in ("bos_id", "eos_id", "pad_id", "max_seq_len")],
             repr(getattr(tokenizer, "prompt_template", None))]
    return hashlib.sha256(json.dumps(parts, default=str).encode() + b"".join(ranks[::61])).digest()


def input_files(path: str) -> list[Path]:
    """The files a source reads (a folder: all files below it), for the fingerprint."""
    p = Path(path)
    if p.is_file():
        return [p.resolve()]
    if p.is_dir():
        return sorted(f.resolve() for f in p.rglob("*") if f.is_file())
    return []  # a Hugging Face id: keyed by name only


def save(cache_dir: Path, key: str, packs: Packs, meta: dict, held_out: dict[str, Path]) -> Path:
    """Writes the store for `key` atomically: a temporary folder renamed into place when complete.

    Two processes building the same key both write their own folder; the first rename wins and the
    other's copy is discarded, so no reader ever sees a half-written store.
    """
    final = cache_dir / key
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest = {"version": STORE_VERSION, "key": key, "files": {}, "meta": meta}
    for name in ARRAYS:
        np.save(tmp / f"{name}.npy", getattr(packs, name))
    for name, path in held_out.items():  # copied out again on every load, as files: no re-encoding
        (tmp / "held_out").mkdir(exist_ok=True)
        shutil.copyfile(path, tmp / "held_out" / f"{name}.jsonl")
    for path in sorted(tmp.rglob("*.*")):
        manifest["files"][path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256_file(path)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished the same store first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load(cache_dir: Path, key: str) -> tuple[Packs, dict, Path] | None:
    """The verified, memory-mapped store for `key` (packs, meta, folder), or None (missing, or corrupt and removed)."""
    folder = cache_dir / key
    if not folder.is_dir():
        return None
    problem = _verify(folder, key)
    if problem:
        log.warning("Data cache %s is unusable (%s); rebuilding it.", folder, problem)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    manifest = json.loads((folder / "manifest.json").read_text())
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    return Packs(**arrays), manifest["meta"], folder


def _verify(folder: Path, key: str) -> str | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"manifest unreadable: {e}"
    if manifest.get("version") != STORE_VERSION or manifest.get("key") != key:
        return "written by another builder version or for another key"
    for name, want in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != want["bytes"]:
            return f"{name} is missing or truncated"
        if _sha256_file(path) != want["sha256"]:
            return f"{name} does not match its checksum"
    if not {f"{n}.npy" for n in ARRAYS} <= set(manifest.get("files", {})):
        return "incomplete file list"
    return None
