"""make serve's settings: the `serve` section of a config over its defaults, checked; which GGUF of an export to serve."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path

from tuned.sections import ServeOptions, section

TEMPLATE_MODES = ("data", "raw")


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 in any form the C library accepts (127.1 too), ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        return ipaddress.ip_address(socket.inet_aton(host)).is_loopback  # 127.1, 2130706433, ...
    except OSError:
        return False


def options(cfg) -> dict:
    """serve.* of a config checked against its declared type (tuned/sections.py: ServeOptions), the key from $SERVE_API_KEY if unset, model_name as a list (default:
    output_dir's name; the first names responses); ValueError for an unknown key, a wrong type or value, and for a host other than loopback
    with no key (unless allow_open)."""
    opts = section(cfg, "serve", ServeOptions)
    opts["api_key"] = opts["api_key"] or os.environ.get("SERVE_API_KEY") or None
    names = opts["model_name"] or Path(str(cfg.output_dir)).name
    opts["model_name"] = [str(names)] if isinstance(names, str) else [str(n) for n in names]  # the first answers
    if not is_loopback(str(opts["host"])) and not opts["api_key"] and not opts["allow_open"]:
        raise ValueError(f"serve.host={opts['host']} opens the model to the network with no key. Set serve.api_key=... "
                         "(or SERVE_API_KEY) so that clients must send it, or serve.allow_open=true if anyone who "
                         "reaches the port may use the model.")
    return opts


def served_gguf(export_dir: Path, wanted: str | None) -> tuple[Path, dict]:
    """The GGUF of export_dir to serve (`wanted`: f16, model-f16.gguf, ...; None: the first) and export.json."""
    manifest_path = export_dir / "export.json"
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path} not found: run make export CONFIG=... first.")
    manifest = json.loads(manifest_path.read_text())
    names = manifest.get("gguf") or []
    if wanted is not None:
        names = [n for n in names if n in (wanted, f"model-{wanted}.gguf")]
    if not names:
        raise ValueError(f"{export_dir}: no GGUF{f' {wanted!r}' if wanted else ''} in this export (it has "
                         f"{manifest.get('gguf')}); export with export.gguf=[f16] (or f32, q8_0, q4_k_m).")
    return export_dir / names[0], manifest

