"""The package's import graph: no circles, and ``kernels/`` is a leaf.

Walks every module of ``lowrank_optim`` with :mod:`ast` (module-level and function-level
imports alike; only ``if TYPE_CHECKING:`` blocks are left out, since they never run), so a lazy
import that closes a circle counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lowrank_optim"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (``from a import b`` points at ``a.b``
    when that is a module, else at ``a``)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_nodes(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    package = name.split(".") if path.name == "__init__.py" else \
                        name.split(".")[:-1]
                    package = package[: len(package) - node.level + 1]
                    base = ".".join([*package, base] if base else package)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    deps.add(full if full in files else base)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_in_the_package():
    graph = import_graph()
    assert "lowrank_optim.optim.base" in graph and graph["lowrank_optim.optim.base"]
    assert cycles(graph) == []


def test_kernels_import_nothing_outside_kernels():
    graph = import_graph()
    outside = {m: sorted(d for d in deps if not d.startswith("lowrank_optim.kernels"))
               for m, deps in graph.items() if m.startswith("lowrank_optim.kernels")}
    assert {m: d for m, d in outside.items() if d} == {}
    assert len(outside) >= 7  # dispatch, reference, blockwise and the Triton modules


def test_distributed_does_not_import_the_optimizers():
    graph = import_graph()
    for module, deps in graph.items():
        if module.startswith("lowrank_optim.distributed"):
            assert not any(d.startswith("lowrank_optim.optim") for d in deps), (module, deps)
