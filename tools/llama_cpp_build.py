"""llama.cpp compiled once per machine and version: one cmake build of the llama.cpp that the llama-cpp-python sdist
vendors gives both the shared libraries its Python binding loads and `llama-server` (make serve's engine), kept in a
cache outside the clone so that a second clone, or CI on the same machine, reuses it.

    python tools/llama_cpp_build.py --source .venv/llama.cpp --sdist .venv/sdist/llama_cpp_python-X.tar.gz --venv .venv

(`make install` runs it after installing the binding without its own build: CMAKE_ARGS=-DLLAMA_BUILD=OFF.)

The cache: $LLAMA_CPP_CACHE, else $XDG_CACHE_HOME/custom-datasets/llama.cpp, else ~/.cache/custom-datasets/llama.cpp;
one folder per key. The key covers what changes the binaries: the sdist's bytes (its version and sources), the
cmake flags, the compiler and cmake versions, the CPU's instruction-set flags (ggml builds with -march=native) and
this layout's version. A folder counts only if its manifest (written last, then the folder renamed into place) lists
every file with its size and SHA-256 and they all match: a half-written or truncated entry is rebuilt, not trusted.
A cache that cannot be written is skipped with a note (the build is then kept in the venv, <venv>/llama.cpp-cache).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

LAYOUT = 1  # bump when what an entry holds or how it is installed changes
# One build for the binding and the server: shared libraries (the binding loads libllama.so through ctypes), the
# server and the common library, no UI, no curl, no TLS (the server runs on loopback behind the front). The rpath
# lets the libraries find each other ($ORIGIN) and the server find them in the venv's lib/ ($ORIGIN/../lib).
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN:$ORIGIN/../lib",
]
MANIFEST = "manifest.json"


def cache_root() -> Path:
    if os.environ.get("LLAMA_CPP_CACHE"):
        return Path(os.environ["LLAMA_CPP_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "custom-datasets" / "llama.cpp"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "absent"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()


def build_key(sdist: Path, flags: list[str] = CMAKE_FLAGS) -> str:
    """What the binaries depend on, as one name: `<sdist name>-<16 hex>`."""
    parts = {"layout": LAYOUT, "sdist": sha256(sdist), "flags": flags, "machine": platform.machine(),
             "cpu": _cpu_flags(), "compiler": _first_line(["c++", "--version"]), "cmake": _first_line(["cmake", "--version"])}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{sdist.name.removesuffix('.tar.gz')}-{digest}"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if (p.is_file() or p.is_symlink()) and p.name != MANIFEST)


def _describe(path: Path) -> dict:
    if path.is_symlink():  # libllama.so -> libllama.so.0 -> libllama.so.0.5.0: the names the loader asks for
        return {"link": os.readlink(path)}
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def write_manifest(folder: Path, key: str) -> None:
    files = {str(p.relative_to(folder)): _describe(p) for p in _files(folder)}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"key": key, "files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def problem_with(folder: Path, key: str) -> str | None:
    """Why a cache entry cannot be trusted (None: it can): no manifest (a build that never finished), another key,
    a file missing, added, resized or changed since the manifest was written, no server or no libllama."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest (a build that did not finish)"
    if manifest.get("key") != key:
        return f"its manifest is for {manifest.get('key')!r}"
    for needed in ("bin/llama-server", "lib/libllama.so"):
        if needed not in files:
            return f"{needed} is not in it"
    on_disk = {str(p.relative_to(folder)) for p in _files(folder)}
    if on_disk != set(files):
        return f"files differ from its manifest: {sorted(on_disk ^ set(files))[:3]}"
    for name, want in files.items():
        path = folder / name
        if "link" in want or path.is_symlink():
            if not path.is_symlink() or os.readlink(path) != want.get("link") or not path.exists():
                return f"{name} is not the link to {want.get('link')} its manifest says"
            continue
        if path.stat().st_size != want["size"]:
            return f"{name} is {path.stat().st_size} bytes, the manifest says {want['size']} (truncated?)"
        if sha256(path) != want["sha256"]:
            return f"{name} does not match its SHA-256"
    return None


def ensure(roots: list[Path], key: str, build: Callable[[Path], None], log: Callable[[str], None] = print) -> Path:
    """The cache entry for `key` in the first of `roots` that can be written (a sound entry there is reused; an
    absent or untrustworthy one is built by `build(folder)` in a work folder, its manifest written last, then
    renamed into place). A root that cannot be written is said and skipped."""
    for root in roots:
        entry = root / key
        if entry.exists():
            problem = problem_with(entry, key)
            if problem is None:
                log(f"llama.cpp: reusing the build cached in {entry}")
                return entry
            log(f"llama.cpp: the cached build in {entry} is not trusted ({problem}): rebuilding")
            shutil.rmtree(entry, ignore_errors=True)
        try:
            root.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
        except OSError as err:
            log(f"llama.cpp: cache {root} cannot be written ({err.strerror or err}): skipped "
                "(set LLAMA_CPP_CACHE to a writable folder to keep the build across clones)")
            continue
        try:
            build(work)
            write_manifest(work, key)
            try:
                os.rename(work, entry)
            except OSError:  # another install finished the same key first: keep whichever is sound
                if problem_with(entry, key) is None:
                    shutil.rmtree(work, ignore_errors=True)
                else:
                    shutil.rmtree(entry, ignore_errors=True)
                    os.rename(work, entry)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        log(f"llama.cpp: built and cached in {entry}")
        return entry
    raise OSError(f"none of {[str(r) for r in roots]} can be written")


def cmake_build(source: Path, jobs: int) -> Callable[[Path], None]:
    """The real build: configure and build `llama-server` (and with it libllama, ggml, common, mtmd) from `source`,
    then copy the server to <folder>/bin and the shared libraries to <folder>/lib."""

    def build(folder: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="llama.cpp-cmake.") as tmp:
            log_path = folder / "build.log"
            with log_path.open("w") as out:
                for command in (["cmake", "-S", str(source), "-B", tmp, *CMAKE_FLAGS],
                                ["cmake", "--build", tmp, "--target", "llama-server", "-j", str(jobs)]):
                    if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
                        raise RuntimeError(f"llama.cpp build failed: {' '.join(command)}\n{tail}")
            log_path.unlink()
            (folder / "bin").mkdir()
            (folder / "lib").mkdir()
            shutil.copy2(Path(tmp) / "bin" / "llama-server", folder / "bin" / "llama-server")
            for lib in (Path(tmp) / "bin").glob("lib*.so*"):  # with their links (the SONAME libllama.so.0, ...)
                shutil.copy2(lib, folder / "lib" / lib.name, follow_symlinks=False)

    return build


def install(entry: Path, venv: Path) -> None:
    """Copies the libraries next to the binding (site-packages/llama_cpp/lib) and into <venv>/lib, the server into
    <venv>/bin; then runs the server's --version and loads the binding, so a broken copy fails here, not in a test."""
    python = venv / "bin" / "python"
    binding = Path(subprocess.run([str(python), "-c", "import importlib.util as u; "
                                   "print(u.find_spec('llama_cpp').submodule_search_locations[0])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    for target in (binding / "lib", venv / "lib"):
        target.mkdir(parents=True, exist_ok=True)
        for lib in (entry / "lib").iterdir():
            (target / lib.name).unlink(missing_ok=True)
            shutil.copy2(lib, target / lib.name, follow_symlinks=False)
    server = venv / "bin" / "llama-server"
    server.unlink(missing_ok=True)
    shutil.copy2(entry / "bin" / "llama-server", server)
    checks = ([str(server), "--version"], [str(python), "-c", "import llama_cpp; llama_cpp.llama_backend_init()"])
    for command in checks:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed after installing {entry}:\n{done.stdout}{done.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="llama.cpp's sources (the sdist's vendor/llama.cpp)")
    parser.add_argument("--sdist", type=Path, required=True, help="the llama-cpp-python sdist (its bytes key the cache)")
    parser.add_argument("--venv", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--build-only", action="store_true", help="build (or find) the cache entry; install nothing "
                        "(make install runs this beside pip, then installs once the binding is there)")
    args = parser.parse_args(argv)
    start = time.time()
    # the shared cache first; the venv's own folder if that cannot be written (then each clone builds once)
    roots = [cache_root(), args.venv.resolve() / "llama.cpp-cache"]
    entry = ensure(roots, build_key(args.sdist), cmake_build(args.source.resolve(), args.jobs))
    if not args.build_only:
        install(entry, args.venv)
        print(f"llama.cpp: binding libraries and llama-server installed in {args.venv} ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
