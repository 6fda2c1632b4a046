"""torchtune's DiskLogger files (`log_*.txt`), read back by one parser: the eval report's training curve and the
benchmarks' step times read the same lines the same way. `StampedDiskLogger` adds a clock stamp to each line."""

from __future__ import annotations

import re
import time
from pathlib import Path

from torchtune.training.metric_logging import DiskLogger

# DiskLogger.log_dict writes "Step {step} | name:value name:value \n"; .log writes one name:value a line
_LINE = re.compile(r"^Step (\d+) \| (.*)$", re.M)


def log_files(log_dir: str | Path, since: float | None = None) -> list[Path]:
    """The DiskLogger files of a log folder, oldest first (a resumed run adds a file); with `since` (a Unix time: when
    the training that made the current adapters started), only those written to after it, not an earlier run's."""
    found = sorted(Path(log_dir).glob("log_*.txt"), key=lambda p: (p.stat().st_mtime, p.name))
    return [p for p in found if since is None or p.stat().st_mtime >= since]


def steps(path: str | Path) -> list[dict[str, float]]:
    """Each logged line of one file as {"step": N, name: value, ...}; values as floats (nan and inf included),
    a value that is no number left out."""
    out = []
    for step, rest in _LINE.findall(Path(path).read_text(errors="replace")):
        row = {"step": float(step)}
        for pair in rest.split():
            name, _, value = pair.partition(":")
            try:
                row[name] = float(value)
            except ValueError:
                continue
        out.append(row)
    return out


def read_steps(log_dir: str | Path, since: float | None = None) -> list[dict[str, float]]:
    """Every logged line of every file of a log folder (written to after `since`), oldest file first."""
    return [row for path in log_files(log_dir, since) for row in steps(path)]


def training_since(train_record: dict | None) -> float | None:
    """When the training whose log is current started, from the train stage's record (tuned/stages.py): its start,
    or None (every file) for a resumed run (its earlier files are part of it) or a run without a record."""
    if not train_record or train_record.get("made_from", {}).get("keys", {}).get("resume_from_checkpoint"):
        return None
    return train_record.get("started_unix")


class StampedDiskLogger(DiskLogger):
    """torchtune's DiskLogger, with a clock stamp on each step's line (`stamp`, perf_counter seconds): the recipe
    logs each step's supervised tokens per second, and the stamps give each step's time, so tokens add up over a
    run (the benchmarks' speeds)."""

    def log_dict(self, payload, step: int) -> None:
        super().log_dict({**payload, "stamp": time.perf_counter()}, step)
