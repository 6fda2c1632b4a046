"""Files written whole or not at all: a reader (or a run killed part-way) never sees half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """`text` to `path` through a temporary file beside it, renamed over it (os.replace is atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj) -> None:
    """`obj` as indented JSON, atomically."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")
