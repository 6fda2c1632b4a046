"""The pipeline's stages (data → train → eval → export), what each is made from, and the record of each run.

Each stage declares, once, here, what makes it stale:
- `reads`: the config sections it reads (a section is its whole subtree; "" is every key), less `ignores`;
- `inputs`: the files it reads (the data sources, the tokenizer, the base checkpoint);
- `after`: the stages whose outputs it reads (their digests, taken when they finished);
- `packages`: the installed versions that change its result;
- `code`: the project's own files it runs (an entry script: with every project file it imports).
A run of a stage (`make data|train|eval|export`, or `make all`) goes through `run()`: its record is removed first, a
`running` marker written with the fingerprint of its inputs as they were when it started; the command runs; only when
it has succeeded are its outputs digested and `<output_dir>/stages/<stage>.json` written (atomically) and the marker
removed. A stage killed at any point leaves the marker and no record: never fresh, and `status` says incomplete.

Digests are SHA-256 of the bytes; a file whose size and mtime equal the record's is taken as unchanged without
reading it again (as DVC and Make do), so a second `make status` on an 8B run does not read 16 GB.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tuned.files import write_json
from tuned.model import epoch_number

REPO = Path(__file__).resolve().parents[1]


def _source_paths(cfg: DictConfig) -> list[Path]:
    """The local files and folders the dataset's sources name (a Hugging Face id is only its key)."""
    sources = (cfg.get("dataset") or {}).get("sources") or {}
    paths = []
    for spec in sources.values():
        path = spec.get("path") if hasattr(spec, "get") else None
        for p in (path if isinstance(path, (list, tuple)) or OmegaConf.is_list(path) else [path]):
            if isinstance(p, str) and Path(p).exists():
                paths.append(Path(p))
    return paths


def tokenizer_paths(cfg: DictConfig) -> list[Path]:
    path = (cfg.get("tokenizer") or {}).get("path")
    return [Path(path)] if path and Path(path).exists() else []


def checkpoint_paths(cfg: DictConfig) -> list[Path]:
    """The base weights: checkpointer.checkpoint_files in checkpoint_dir (a filename_format: its safetensors)."""
    ck = cfg.get("checkpointer") or {}
    folder = Path(str(ck.get("checkpoint_dir", "")))
    files = ck.get("checkpoint_files")
    if OmegaConf.is_list(files):
        return [folder / str(f) for f in files if (folder / str(f)).exists()]
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def _out(*parts: str) -> Callable[[DictConfig], list[Path]]:
    return lambda cfg: [Path(str(cfg.output_dir), *parts)]


def _adapters(cfg: DictConfig) -> list[Path]:
    """What training leaves that later stages read: every epoch's adapter folder and the held-out split."""
    out = Path(str(cfg.output_dir))
    return sorted(out.glob("epoch_*")) + [Path(str(cfg.dataset.get("held_out_dir") or out / "held_out"))]


@dataclass(frozen=True)
class Stage:
    name: str
    make: str  # the make target that runs it
    reads: tuple[str, ...]
    outputs: Callable[[DictConfig], list[Path]]
    ignores: tuple[str, ...] = ()
    inputs: tuple[Callable[[DictConfig], list[Path]], ...] = ()
    after: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    code: tuple[str, ...] = ()
    leftovers: Callable[[DictConfig], list[Path]] | None = None  # an earlier run's outputs this run did not rewrite


def _old_epochs(cfg: DictConfig) -> list[Path]:
    """epoch_N folders with N >= epochs: a run with fewer epochs than the last one in this output_dir does not
    rewrite them, and make eval's "latest" would pick them (not when resuming: that run continues what is there)."""
    if cfg.get("resume_from_checkpoint"):
        return []
    out = Path(str(cfg.output_dir))
    return sorted(p for p in out.glob("epoch_*") if (n := epoch_number(p)) is not None and n >= int(cfg.get("epochs", 1)))


_DATA_CODE = ("custom_datasets/**/*.py",)
STAGES = (
    Stage("data", "data", reads=("dataset", "tokenizer"), ignores=("dataset.cache_dir",),
          inputs=(_source_paths, tokenizer_paths), outputs=_out("data"),
          packages=("torchtune", "tiktoken", "tokenizers", "datasets"),
          code=(*_DATA_CODE, "recipes/prepare_data.py")),
    # Every key the recipe may read, less what only other stages or only logging read.
    Stage("train", "train", reads=("",),
          ignores=("eval", "export", "serve", "metric_logger", "log_every_n_steps", "log_peak_memory_stats",
                   "profiler", "gpu_memory_gb", "dataset.cache_dir"),
          inputs=(_source_paths, tokenizer_paths, checkpoint_paths), outputs=_adapters, leftovers=_old_epochs,
          packages=("torch", "torchtune", "torchao", "tiktoken", "tokenizers", "datasets"), code=_DATA_CODE),
    Stage("eval", "eval", reads=("eval",), after=("train",), outputs=_out("eval"),
          packages=("torch", "torchtune", "torchao", "lm_eval", "transformers", "sacrebleu", "rouge_score"),
          code=(*_DATA_CODE, "recipes/eval_report.py")),
    Stage("export", "export", reads=("export",), after=("train",), outputs=_out("export"),
          packages=("torch", "torchtune", "torchao", "transformers", "peft", "llama_cpp_python", "safetensors"),
          code=(*_DATA_CODE, "recipes/export_tuned.py")),
)
BY_NAME = {s.name: s for s in STAGES}


def flat_keys(node, prefix: str = "") -> dict:
    """{dotted key: resolved value}; a value this process cannot resolve (`${oc.env:RANK}` outside torchrun) is kept
    as its interpolation, so the key still counts."""
    if OmegaConf.is_dict(node):
        out = {}
        for key in node.keys():
            try:
                value = node[key]
            except Exception:  # noqa: BLE001 (omegaconf raises several kinds for an unresolvable interpolation)
                value = OmegaConf.to_container(node, resolve=False)[key]
            out.update(flat_keys(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if OmegaConf.is_list(node):
        try:
            return {prefix: OmegaConf.to_container(node, resolve=True)}
        except Exception:  # noqa: BLE001
            return {prefix: OmegaConf.to_container(node, resolve=False)}
    return {prefix: node}


def within(key: str, sections: tuple[str, ...]) -> bool:
    """`key` is one of `sections` or inside one ("" is every key)."""
    return any(s == "" or key == s or key.startswith(s + ".") for s in sections)


def keys_read(stage: Stage, cfg: DictConfig) -> dict:
    """The resolved values of the config keys `stage` reads, flat (`optimizer.lr`)."""
    flat = flat_keys(cfg)
    return {k: v for k, v in sorted(flat.items()) if within(k, stage.reads) and not within(k, stage.ignores)}


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest_files(paths: list[Path], known: dict | None = None) -> dict:
    """{path: [size, mtime_ns, sha256]} of every file in `paths` (folders walked); `known` entries reused when the
    size and mtime are the same."""
    known = known or {}
    out = {}
    for top in paths:
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top] if top.is_file() else []
        for p in files:
            st, key = p.stat(), str(p)
            old = known.get(key)
            same = old and old[0] == st.st_size and old[1] == st.st_mtime_ns
            out[key] = [st.st_size, st.st_mtime_ns, old[2] if same else _sha256(p)]
    return out


def versions(stage: Stage) -> dict:
    found = {}
    for name in stage.packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


_PROJECT = ("custom_datasets", "tuned", "recipes", "tools", "bench")


def _module_files(name: str) -> list[Path]:
    """The files importing `name` (a dotted project module) runs: each package's __init__.py on the way, the module."""
    parts, found = name.split("."), []
    for i in range(1, len(parts) + 1):
        base = REPO.joinpath(*parts[:i])
        found += [f for f in (base / "__init__.py", base.with_suffix(".py")) if f.is_file()]
    return found


def imported_files(entry: Path) -> set[Path]:
    """`entry` and every project file it imports, at any depth, wherever the import statement sits (a function-level
    import counts): what running it runs of this project."""
    seen, todo = set(), [entry]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        package = list(path.relative_to(REPO).parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module or ""
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            todo += [f for n in names if n.split(".")[0] in _PROJECT for f in _module_files(n)]
    return seen


def code_digest(stage: Stage) -> dict:
    """{file: digest} of the stage's code: each `code` entry a glob, or an entry script (`recipes/x.py`) with every
    project file it imports (so a change to tuned/compare.py does not make eval stale; one to tuned/heldout.py does)."""
    files = set()
    for pattern in stage.code:
        matched = [p for p in REPO.glob(pattern) if p.is_file()]
        files |= {f for p in matched for f in imported_files(p)} if pattern.startswith("recipes/") else set(matched)
    return {str(p.relative_to(REPO)): hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(files)}


def records_dir(cfg: DictConfig) -> Path:
    return Path(str(cfg.output_dir)) / "stages"


def read_record(cfg: DictConfig, name: str, kind: str = "") -> dict | None:
    return read_record_in(records_dir(cfg), name, kind)


def read_record_in(folder: Path, name: str, kind: str = "") -> dict | None:
    """The record `<folder>/<name><kind>.json`, or None if it is absent or unreadable."""
    path = folder / f"{name}{kind}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def outputs_digest(record: dict) -> str:
    """One digest of a finished stage's outputs: what a later stage records as its input."""
    return hashlib.sha256(json.dumps({k: v[2] for k, v in record["outputs"].items()}, sort_keys=True)
                          .encode()).hexdigest()[:16]


def fingerprint(stage: Stage, cfg: DictConfig, known: dict | None = None) -> dict:
    """What `stage` is made from now: keys, input files, the finished stages it reads, versions, code."""
    known = known or {}
    after = {}
    for name in stage.after:
        record = read_record(cfg, name)
        after[name] = outputs_digest(record) if record else None
    return {"keys": keys_read(stage, cfg),
            "files": digest_files([p for find in stage.inputs for p in find(cfg)], known.get("files")),
            "after": after, "packages": versions(stage), "code": code_digest(stage)}


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def changes(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, one phrase each, in the order keys, files, stages, packages, code."""
    said = []
    for key in sorted(set(old["keys"]) | set(new["keys"])):
        a, b = old["keys"].get(key, "(unset)"), new["keys"].get(key, "(unset)")
        if a != b:
            said.append(f"{key} {_short(a)} → {_short(b)}")
    for path in sorted(set(old["files"]) | set(new["files"])):
        a, b = old["files"].get(path), new["files"].get(path)
        if (a and a[2]) != (b and b[2]):
            said.append(f"{path} {'added' if not a else 'removed' if not b else 'changed'}")
    for name in sorted(set(old["after"]) | set(new["after"])):
        if old["after"].get(name) != new["after"].get(name):
            said.append(f"{name} re-ran" if new["after"].get(name) else f"{name} has no finished run")
    for name in sorted(set(old["packages"]) | set(new["packages"])):
        a, b = old["packages"].get(name), new["packages"].get(name)
        if a != b:
            said.append(f"package {name} {a} → {b}")
    code = sorted(p for p in set(old["code"]) | set(new["code"]) if old["code"].get(p) != new["code"].get(p))
    if code:
        said.append(f"code of the stage changed ({', '.join(code[:3])}{', ...' if len(code) > 3 else ''})")
    return said


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def status(stage: Stage, cfg: DictConfig) -> tuple[str, list[str]]:
    """(state, reasons): fresh | stale | never run | incomplete | running."""
    running = read_record(cfg, stage.name, ".running")
    if running:
        if _alive(running.get("pid", -1)):
            return "running", [f"started {running['started']} (pid {running['pid']})"]
        return "incomplete", [f"killed part-way: started {running['started']}, never finished"]
    record = read_record(cfg, stage.name)
    if record is None:
        return "never run", []
    said = changes(record["made_from"], fingerprint(stage, cfg, record["made_from"]))
    outputs = digest_files([Path(p) for p in record["output_roots"]], record["outputs"])
    moved = sorted(p for p in set(outputs) | set(record["outputs"])
                   if (outputs.get(p) or [None] * 3)[2] != (record["outputs"].get(p) or [None] * 3)[2])
    if moved:
        said.append(f"its outputs changed since it ran ({moved[0]}{', ...' if len(moved) > 1 else ''})")
    return ("stale", said) if said else ("fresh", [f"finished {record['finished']}"])


def timestamp(seconds: float | None = None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def run(stage: Stage, cfg: DictConfig, command: list[str]) -> int:
    """Runs `command` as `stage`: the old record removed, a running marker, then (on success only) the record."""
    folder = records_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    old = read_record(cfg, stage.name) or read_record(cfg, stage.name, ".running") or {}
    made_from = fingerprint(stage, cfg, old.get("made_from"))
    (folder / f"{stage.name}.json").unlink(missing_ok=True)
    start = time.time()
    write_json(folder / f"{stage.name}.running.json", {"pid": os.getpid(), "started": timestamp(), "made_from": made_from})
    code = subprocess.call(command)
    if code != 0:
        (folder / f"{stage.name}.running.json").unlink(missing_ok=True)  # failed, not killed: nothing to resume
        return code
    for path in stage.leftovers(cfg) if stage.leftovers else []:
        shutil.rmtree(path)
        print(f"{stage.name}: removed {path}: left by an earlier run, not written by this one", flush=True)
    roots = [str(p) for p in stage.outputs(cfg)]
    write_json(folder / f"{stage.name}.json", {
        "stage": stage.name, "made_from": made_from, "output_roots": roots,
        "outputs": digest_files([Path(p) for p in roots]), "started": timestamp(start), "started_unix": round(start, 3),
        "finished": timestamp(), "seconds": round(time.time() - start, 1)})
    (folder / f"{stage.name}.running.json").unlink(missing_ok=True)
    return 0
