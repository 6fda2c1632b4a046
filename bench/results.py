"""A benchmark's results file: stamped with the date and the machine it was measured on, written whole."""

from __future__ import annotations

import os
import platform
from datetime import date
from pathlib import Path

from tuned.files import write_json


def stamp() -> dict:
    """{"date", "machine"} of this run, as every results file under bench/results/ carries them."""
    return {"date": date.today().isoformat(),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.platform()})"}


def save(path: str | Path, result: dict) -> None:
    """The results as JSON, atomically (a crash or Ctrl-C later keeps what was saved before)."""
    write_json(path, result)
