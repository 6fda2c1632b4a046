"""The house: the data side (custom_datasets/) and the model side (tuned/) import in one direction, data <- model,
with no cycle in either (imports inside functions too); the readers know only the config specs; entry points
(recipes/, bench/, tools/) reach shared code by import, never by editing sys.path."""

import ast
from pathlib import Path

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
