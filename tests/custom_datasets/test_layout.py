"""The data layer imports in one direction: no module of custom_datasets/ reaches itself through its imports (those
inside functions too), and the readers know only the config specs."""

import ast
from pathlib import Path

from support import REPO

PACKAGE = REPO / "custom_datasets"


def _graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its source. `from custom_datasets import _store` is an
    import of custom_datasets._store (the package's __init__ runs first for any of them, so it is not counted)."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; the layer imports by full name")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("custom_datasets"):
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                deps.update(subs or [node.module])
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("custom_datasets"))
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


def test_no_import_cycle_in_the_data_layer():
    graph = _graph()
    assert "custom_datasets._read" in graph and "custom_datasets.tuned.serve" in graph  # the walk found the layer
    assert _cycles(graph) == []


def test_the_readers_know_only_the_specs():
    assert _graph()["custom_datasets._read"] == {"custom_datasets._spec"}


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
