"""The llama.cpp build cache (tools/llama_cpp_build.py): a sound entry is reused, not rebuilt; a truncated library,
a half-written entry (no manifest), a changed file or a broken link is detected and rebuilt; an unwritable cache
still installs (the build goes to a temporary folder); a change of sdist or flags is another key. The build is a
stand-in that writes files (the real one takes minutes: `make install` runs it, and every serving test uses what
it installed); the cache logic under test is the real one. Oracle: the bytes the stand-in wrote, counted builds."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from tools.llama_cpp_build import CMAKE_FLAGS, build_key, ensure, problem_with

KEY = "llama_cpp_python-0.0.0-0123456789abcdef"
LIB = b"\x7fELF" + bytes(range(256)) * 64


class Builds:
    """A stand-in build that counts its calls and lays out what the real one does: bin/llama-server, lib/ with links."""

    def __init__(self):
        self.count = 0

    def __call__(self, folder: Path) -> None:
        self.count += 1
        (folder / "bin").mkdir()
        (folder / "lib").mkdir()
        (folder / "bin" / "llama-server").write_bytes(b"\x7fELF server " + LIB)
        (folder / "lib" / "libllama.so.0.5.0").write_bytes(LIB)
        os.symlink("libllama.so.0.5.0", folder / "lib" / "libllama.so.0")
        os.symlink("libllama.so.0", folder / "lib" / "libllama.so")


def _ensure(root: Path, build: Builds) -> Path:
    return ensure([root], KEY, build, log=lambda line: None)


def test_a_sound_entry_is_reused(tmp_path):
    build = Builds()
    first = _ensure(tmp_path, build)
    assert first == tmp_path / KEY and build.count == 1
    again = _ensure(tmp_path, build)
    assert again == first and build.count == 1
    assert (again / "lib" / "libllama.so").read_bytes() == LIB
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work folder left behind


@pytest.mark.parametrize("damage", ["truncated library", "half-written binary", "no manifest", "broken link",
                                    "extra file", "manifest of another key"])
def test_a_damaged_entry_is_rebuilt_not_trusted(tmp_path, damage):
    build = Builds()
    entry = _ensure(tmp_path, build)
    lib, server = entry / "lib" / "libllama.so.0.5.0", entry / "bin" / "llama-server"
    if damage == "truncated library":
        lib.write_bytes(LIB[: len(LIB) // 2])
    elif damage == "half-written binary":
        server.write_bytes(server.read_bytes()[:100] + b"\0" * (server.stat().st_size - 100))  # same size
    elif damage == "no manifest":
        (entry / "manifest.json").unlink()
    elif damage == "broken link":
        (entry / "lib" / "libllama.so.0").unlink()
        os.symlink("libllama.so.9", entry / "lib" / "libllama.so.0")
    elif damage == "extra file":
        (entry / "lib" / "stray.so").write_bytes(b"?")
    else:
        manifest = json.loads((entry / "manifest.json").read_text())
        (entry / "manifest.json").write_text(json.dumps({**manifest, "key": "another"}))
    assert problem_with(entry, KEY)
    messages = []
    again = ensure([tmp_path], KEY, build, log=messages.append)
    assert build.count == 2 and again == entry and problem_with(again, KEY) is None
    assert (again / "lib" / "libllama.so").read_bytes() == LIB and "not trusted" in messages[0]


def test_a_build_that_fails_leaves_no_entry(tmp_path):
    def broken(folder: Path) -> None:
        (folder / "bin").mkdir()
        raise RuntimeError("compiler died")

    with pytest.raises(RuntimeError):
        _ensure(tmp_path, broken)
    assert list(tmp_path.iterdir()) == []  # neither an entry nor a work folder
    assert problem_with(_ensure(tmp_path, Builds()), KEY) is None


def test_an_unwritable_cache_is_skipped_for_the_next_root_and_said(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache root would have to be a folder below this file")  # unwritable even for root
    build, messages = Builds(), []
    folder = ensure([blocker / "cache", tmp_path / "venv-cache"], KEY, build, log=messages.append)
    assert folder == tmp_path / "venv-cache" / KEY and build.count == 1 and problem_with(folder, KEY) is None
    assert "cannot be written" in messages[0] and "LLAMA_CPP_CACHE" in messages[0]
    assert ensure([blocker / "cache", tmp_path / "venv-cache"], KEY, build, log=messages.append) == folder
    assert build.count == 1  # the second install reuses it


def test_the_key_changes_with_the_sdist_and_the_flags(tmp_path):
    def sdist(name: str, payload: bytes) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            info = tarfile.TarInfo("x/CMakeLists.txt")
            info.size = len(payload)
            tar.addfile(info, __import__("io").BytesIO(payload))
        return path

    a = sdist("llama_cpp_python-1.0.tar.gz", b"a")
    b = sdist("llama_cpp_python-1.0-copy.tar.gz", b"b")
    assert build_key(a) == build_key(a) and build_key(a).startswith("llama_cpp_python-1.0-")
    assert build_key(a).split("-")[-1] != build_key(b).split("-")[-1]  # other bytes, other key
    assert build_key(a) != build_key(a, [*CMAKE_FLAGS, "-DGGML_NATIVE=OFF"])
