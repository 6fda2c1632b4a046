"""The house: the data side (custom_datasets/) and the model side (tuned/) import in one direction, data <- model,
with no cycle in either (imports inside functions too); the readers know only the config specs; entry points
(recipes/, bench/, tools/) reach shared code by import, never by editing sys.path."""

import ast

from support import REPO

PACKAGES = ("custom_datasets", "tuned")


def _graph() -> dict[str, set[str]]:
    """module -> the packages' modules it imports anywhere in its source. `from custom_datasets import _store` is an
    import of custom_datasets._store (the package's __init__ runs first for any of them, so it is not counted)."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; the layer imports by full name")
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                deps.update(subs or [node.module])
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def test_no_import_cycle_in_either_side():
    graph = _graph()
    assert "custom_datasets._read" in graph and "tuned.serve.app" in graph  # the walk found the layer
    assert _cycles(graph) == []


def test_the_data_side_never_imports_the_model_side():
    graph = _graph()
    data_side = {name: deps for name, deps in graph.items() if name.split(".")[0] == "custom_datasets"}
    assert len(data_side) > 10 and len(graph) > len(data_side) + 10  # the walk found both sides
    assert {name: sorted(d for d in deps if d.startswith("tuned")) for name, deps in data_side.items()
            if any(d.startswith("tuned") for d in deps)} == {}


def test_no_entry_point_edits_sys_path():
    """Shared code is imported (the packages are installed; bench/ and tools/ run as `python -m` from the root)."""
    scripts = [p for folder in ("recipes", "bench", "tools", *PACKAGES) for p in (REPO / folder).rglob("*.py")]
    assert len(scripts) > 30
    edits = [f"{p.relative_to(REPO)}:{n}" for p in scripts for n, line in enumerate(p.read_text().splitlines(), 1)
             if "sys.path.insert" in line or "sys.path.append" in line]
    assert edits == []


def test_the_readers_know_only_the_specs():
    assert _graph()["custom_datasets._read"] == {"custom_datasets._spec"}


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


# -- sizes and first lines (docs/layout.md: a module one job, that its first line states) -----------------------

MAX_MODULE_LINES, MAX_FUNCTION_LINES = 350, 80
CODE = ("custom_datasets", "tuned", "recipes", "bench", "tools")


def _modules() -> list:
    found = [p for folder in CODE for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(found) > 50  # the walk found the code
    return found


def _function_lines(node) -> int:
    """A function's lines, its docstring aside."""
    n = node.end_lineno - node.lineno + 1
    if ast.get_docstring(node, clean=False) is not None:
        n -= node.body[0].end_lineno - node.body[0].lineno + 1
    return n


def test_no_module_or_function_is_over_the_house_size():
    long_modules = {str(p.relative_to(REPO)): n for p in _modules()
                    if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    long_functions = {f"{p.relative_to(REPO)}:{node.lineno} {node.name}": _function_lines(node) for p in _modules()
                      for node in ast.walk(ast.parse(p.read_text()))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _function_lines(node) > MAX_FUNCTION_LINES}
    assert (long_modules, long_functions) == ({}, {})


def test_the_size_check_measures_what_it_says():
    """The oracle: a function written out with a known count of lines, its docstring not counted."""
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    (node,) = ast.parse(f'def f():\n    """one\n    two"""\n{body}\n').body
    assert _function_lines(node) == 82  # the def line and 81 statements


def test_every_module_says_its_job_in_its_first_line():
    silent = [str(p.relative_to(REPO)) for p in _modules()
              if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()]
    assert silent == []


# -- importing changes nothing ------------------------------------------------------------------------------------

SNAPSHOT = r'''
import ast, importlib, logging, os, signal, sys, threading, warnings
from pathlib import Path
ours = sys.argv[1:]
roots = {n.split(".")[0] for n in ours}
third = set()
for name in ours:
    path = Path(*name.split(".")).with_suffix(".py")
    path = path if path.is_file() else Path(*name.split("."), "__init__.py")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            third.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            third.add(node.module)
for name in sorted(t for t in third if t.split(".")[0] not in roots and t != "__future__"):
    try:
        importlib.import_module(name)  # what a library changes when imported is its own doing
    except ImportError:
        pass
def snap():
    return {"sys.excepthook": sys.excepthook, "sys.displayhook": sys.displayhook, "sys.path": list(sys.path),
            "os.environ": dict(os.environ), "cwd": os.getcwd(), "threads": threading.active_count(),
            "signals": {s: signal.getsignal(s) for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)},
            "root logger": (logging.getLogger().level, list(logging.getLogger().handlers)),
            "warnings.filters": list(warnings.filters), "stdout/stderr": (sys.stdout, sys.stderr)}
before = snap()
for name in ours:
    importlib.import_module(name)
after = snap()
print(sorted(k for k in before if before[k] != after[k]))
'''


def _import_changes(modules: list[str]) -> list[str]:
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", SNAPSHOT, *modules], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return eval(run.stdout.strip().splitlines()[-1])


def test_importing_the_code_changes_nothing_in_the_process():
    """Every module of the packages and of the entry points imported (an entry point runs only under __main__):
    the process's hooks, path, environment, signal handlers, logging, warning filters and threads are as before."""
    modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__") for p in _modules())
    assert _import_changes(modules) == []


def test_the_import_check_sees_a_hook_installed_at_import(tmp_path, monkeypatch):
    """Seeded: a module that installs an excepthook when imported (what custom_datasets._spec used to do)."""
    probe = REPO / "tools" / "_probe_side_effect.py"
    probe.write_text('"""probe"""\nimport sys\nsys.excepthook = lambda *a: None\n')
    try:
        assert _import_changes(["tools._probe_side_effect"]) == ["sys.excepthook"]
    finally:
        probe.unlink()
