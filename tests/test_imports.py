"""The package's import graph: dependencies run one way, with no cycle anywhere (imports inside
functions and under TYPE_CHECKING count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import memrl

SRC = Path(memrl.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """memrl module -> the memrl modules it imports. ``from package import submodule`` is an
    edge to the submodule alone: the package itself is initialised before any of its modules."""
    files = {module_name(path): path for path in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                subs = [f"{base}.{alias.name}" for alias in node.names]
                targets = [s for s in subs if s in files] or [base]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_memrl():
    assert cycles(import_graph()) == []


def test_dependencies_run_one_way():
    """Cores, nn, envs, data and runs never import a pipeline; no pipeline imports another."""
    pipelines = ("rl", "world_model", "imitation", "spatial")
    graph = import_graph()
    for name, targets in graph.items():
        area = name.split(".")[1] if "." in name else ""
        for target in targets:
            to = target.split(".")[1] if "." in target else ""
            if area in ("cores", "nn", "envs", "data", "runs"):
                assert to not in (*pipelines, "cli"), f"{name} imports {target}"
            if area in pipelines and to in pipelines:
                assert to == area, f"{name} imports {target}"
