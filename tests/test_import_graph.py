"""The package's import graph: every module imports, there are no cycles, and the layering holds.

The graph is read from the source (AST), so it holds every import of a medsass module, at module top and
inside functions alike; only imports under ``if TYPE_CHECKING:`` are left out (they never run). A cycle
fails with its modules named in order.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

ROOTS = ("medsass", "medsass.pipeline", "medsass.trainer")  # separate folders (pyproject package-dir)
DASK_DISTRIBUTED_OK = {"medsass.pipeline.parallel"}  # the one module of the package that knows Dask


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for root in ROOTS:
        pkg = importlib.import_module(root)
        out[root] = Path(pkg.__file__)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=root + "."):
            spec = importlib.util.find_spec(info.name)
            out[info.name] = Path(spec.origin)
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``path`` that runs, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{module}.{a.name}"
                own = module == "medsass" or module.startswith("medsass.")
                out.append((sub if sub in MODULES or not own else module, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return out


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported medsass module: first line}.

    An import of a.b.c also runs a and a.b; those implied parents count unless they are the importer's own
    parents (which are running already). An explicit import of an own parent (``from . import Frame``) counts."""
    graph: dict[str, dict[str, int]] = {name: {} for name in MODULES}
    for name, imports in IMPORTS.items():
        for target, line in imports:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                t = ".".join(parts[:i])
                implied_own_parent = t != target and name.startswith(t + ".")
                if t in MODULES and t != name and not implied_own_parent:
                    graph[name].setdefault(t, line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per knot: per strongly connected component of more than one module (Tarjan), the shortest
    cycle through its first module. Untying that cycle may leave another in the same knot; the test says so."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return [_cycle_in(graph, set(c), c[0]) for c in comps]


def _cycle_in(graph: dict[str, dict[str, int]], comp: set[str], start: str) -> list[str]:
    """A shortest path start -> ... -> start inside one component (breadth first)."""
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in comp:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(cycle) + "  (" + ", ".join(
        f"{a} line {graph[a][b]}" for a, b in zip(cycle, cycle[1:])
    ) + ")"


def _knot(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    """Every module that shares a cycle with ``cycle[0]``."""
    def reach(start: str, edges: dict[str, set[str]]) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for w in edges.get(todo.pop(), ()):
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return seen

    back: dict[str, set[str]] = {}
    for a, targets in graph.items():
        for b in targets:
            back.setdefault(b, set()).add(a)
    forward = {a: set(t) for a, t in graph.items()}
    return ", ".join(sorted(reach(cycle[0], forward) & reach(cycle[0], back)))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_graph_sees_the_package():
    graph = _graph()
    assert {"medsass.manifest", "medsass.pipeline.readers.dicom", "medsass.trainer.loop",
            "medsass.trainer.study.runner"} <= set(graph)
    assert "medsass.trainer.model" in graph["medsass.trainer.loop"]


def test_cycle_finder_names_the_cycle():
    graph = {"a": {"b": 3}, "b": {"c": 7}, "c": {"a": 9}, "d": {"a": 1}}
    (cycle,) = _cycles(graph)
    assert cycle == ["a", "b", "c", "a"]
    assert _describe(graph, cycle) == "a -> b -> c -> a  (a line 3, b line 7, c line 9)"
    assert _knot(graph, cycle) == "a, b, c"


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles (module, line of the import), each in a knot of modules:\n" + "\n".join(
        f"{_describe(graph, c)}\n    knot: {_knot(graph, c)}" for c in cycles
    )


def test_pipeline_never_imports_trainer():
    bad = [
        f"{name} line {line}: {target}"
        for name, imports in IMPORTS.items() if name.startswith("medsass.pipeline")
        for target, line in imports if target == "medsass.trainer" or target.startswith("medsass.trainer.")
    ]
    assert not bad, "pipeline/ must not import trainer/:\n" + "\n".join(bad)


def test_only_parallel_imports_dask_distributed():
    bad = [
        f"{name} line {line}: {target}"
        for name, imports in IMPORTS.items() if name not in DASK_DISTRIBUTED_OK
        for target, line in imports
        if target in ("distributed", "dask_jobqueue") or target.startswith(("distributed.", "dask.distributed"))
    ]
    assert not bad, "only pipeline/parallel.py may import dask.distributed:\n" + "\n".join(bad)
