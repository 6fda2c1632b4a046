"""The pack store: packs as flat int32 arrays on disk, keyed by a fingerprint of everything that
changes them, written atomically, verified on load, served memory-mapped."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torchtune.utils import get_logger
from tqdm import tqdm

log = get_logger("INFO")

STORE_VERSION = 4  # bump when the builder's output for the same inputs changes
FLAT = ("tokens", "labels")  # raw int32 files, written by the tokenizer as it goes
ARRAYS = ("seq_start", "seq_lens", "group_off")  # .npy, written once the packs are known


@dataclass
class Packs:
    """All packs. The token files hold every sample once, in the order they were tokenized; entry k of
    the pack order is the sample at tokens[seq_start[k]:seq_start[k] + seq_lens[k]] (a sample with
    weight 2 is two entries over the same tokens)."""

    tokens: np.ndarray  # int32, the sample table's tokens
    labels: np.ndarray  # int32, same layout
    seq_start: np.ndarray  # int64, one per entry of the pack order
    seq_lens: np.ndarray  # int32, one per entry
    group_off: np.ndarray  # int64, pack p holds entries group_off[p]:group_off[p + 1]


def _sha256_file(path: Path, bar: tqdm | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return h.hexdigest()


def fingerprint(tokenizer: Any, settings: dict, files: list[Path]) -> str:
    """A key over the builder settings, every input file's content and the tokenizer itself."""
    h = hashlib.sha256(f"store v{STORE_VERSION}".encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for f in sorted(set(files)):
        h.update(f"{f}:{_sha256_file(f)}".encode())
    h.update(_tokenizer_digest(tokenizer))
    return h.hexdigest()[:32]


_DIGESTS: dict[int, tuple[Any, bytes]] = {}


def _tokenizer_digest(tokenizer: Any) -> bytes:
    """Identifies a tokenizer: for tiktoken models, the split pattern, the special tokens, the ids and the whole merge
    table (every token's bytes and rank: two tokenizers of the same size with one merge apart differ), hashed once
    per tokenizer object; any other tokenizer by its pickle."""
    enc = getattr(getattr(tokenizer, "tt_model", None), "tt_model", None)
    if enc is None or not hasattr(enc, "_mergeable_ranks"):
        return hashlib.sha256(pickle.dumps(tokenizer)).digest()
    parts = [type(tokenizer).__qualname__, enc._pat_str, sorted(enc._special_tokens.items()),
             [getattr(tokenizer, a, None) for a in ("bos_id", "eos_id", "pad_id", "max_seq_len")],
             repr(getattr(tokenizer, "prompt_template", None))]
    head = json.dumps(parts, default=str).encode()
    memo = _DIGESTS.get(id(enc))
    if memo is None or memo[0] is not enc:
        ranks = enc._mergeable_ranks
        merges = hashlib.sha256(b"\0".join(ranks))
        merges.update(np.fromiter(ranks.values(), np.int64, len(ranks)).tobytes())
        memo = _DIGESTS[id(enc)] = (enc, merges.digest())
    return hashlib.sha256(head + memo[1]).digest()


def input_files(path: str) -> list[Path]:
    """The files a source reads (a folder: all files below it), for the fingerprint."""
    p = Path(path)
    if p.is_file():
        return [p.resolve()]
    if p.is_dir():
        return sorted(f.resolve() for f in p.rglob("*") if f.is_file())
    return []  # a Hugging Face id: keyed by name only


def _build_folder(cache_dir: Path, key: str, pid: int) -> Path:
    return cache_dir / f".{key}.{socket.gethostname()}.{pid}.tmp"


def _remove_stale(cache_dir: Path) -> None:
    """Removes the build folders that builders on this host left when they died (killed, out of memory): a folder
    whose process no longer exists. Another host's folders (a shared cache) are left alone."""
    host = socket.gethostname()
    for tmp in cache_dir.glob(f".*.{host}.*.tmp"):
        pid = tmp.name.removesuffix(".tmp").rsplit(".", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("Removing %s, left by a build that did not finish (process %s is gone).", tmp, pid)
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def begin(cache_dir: Path, key: str) -> Path:
    """A fresh, private folder to build the store for `key` in; `commit` moves it into place."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(cache_dir)
    tmp = _build_folder(cache_dir, key, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_arrays(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    for name in ARRAYS:
        np.save(folder / f"{name}.npy", arrays[name])


def commit(tmp: Path, cache_dir: Path, key: str, meta: dict, progress: bool = False) -> Path:
    """Checksums every file of a built folder into its manifest, then renames it into place.

    Two processes building the same key each build their own folder; the first rename wins and the
    other's copy is discarded, so no reader ever sees a half-written store.
    """
    final = cache_dir / key
    manifest = {"version": STORE_VERSION, "key": key, "files": {}, "meta": meta}
    files = sorted(tmp.rglob("*.*"))
    with tqdm(desc="Storing", total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True,
              disable=not progress, leave=False) as bar:
        for path in files:
            manifest["files"][path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256_file(path, bar)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished the same store first
        log.info("Another process stored %s first; using its copy.", final)
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def read(folder: Path) -> Packs:
    """The packs of a built folder, memory-mapped."""
    flat = {name: np.memmap(path, dtype=np.int32, mode="r") if (path := folder / f"{name}.bin").stat().st_size
            else np.zeros(0, np.int32) for name in FLAT}
    return Packs(**flat, **{name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS})


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
    return read(folder), manifest["meta"], folder


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
    if not {f"{n}.npy" for n in ARRAYS} | {f"{n}.bin" for n in FLAT} <= set(manifest.get("files", {})):
        return "incomplete file list"
    return None
