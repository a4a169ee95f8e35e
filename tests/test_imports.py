"""The import graph of imram_min/, export/ and runtime/, read from their source: no cycles, and
runtime/ imports only the standard library, numpy, onnxruntime, Pillow and FAISS (optional).

Every import statement of a module counts, wherever it is (top level, in a function, under
``if TYPE_CHECKING``): a cycle hidden in a function is still a cycle between two modules.
``from pkg import name`` is an edge to the module pkg.name when there is one, else to pkg.
"""
from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("imram_min", "export", "runtime")
RUNTIME_MAY_IMPORT = {"numpy", "onnxruntime", "PIL", "faiss", "runtime"}  # faiss: the optional first stage


def modules_of(root: str, packages) -> dict[str, str]:
    """{module name: source path} of every .py file under each package folder (subpackages too)."""
    modules = {}
    for package in packages:
        for folder, _, files in os.walk(os.path.join(root, package)):
            parts = os.path.relpath(folder, root).split(os.sep)
            for file in sorted(files):
                if file.endswith(".py"):
                    name = parts if file == "__init__.py" else [*parts, file[:-3]]
                    modules[".".join(name)] = os.path.join(folder, file)
    return modules


def _known(name: str, modules) -> str | None:
    """The longest prefix of a dotted name that is one of ``modules`` (None: an outside module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """{module: the modules of ``modules`` it imports}, from every import statement of its source."""
    graph = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(_known(a.name, modules) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.add(sub if sub in modules else _known(base, modules))
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (m0 -> m1 -> ... -> m0) per strongly connected component of more than one module."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):  # Tarjan
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
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_cycle_in(graph, component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_in(graph, component: set[str]) -> list[str]:
    """A path start -> ... -> start inside a strongly connected component (breadth-first: a shortest one)."""
    start = min(component)
    parent, queue = {start: None}, [start]
    for v in queue:
        for w in sorted(graph[v] & component):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError("not a strongly connected component")


def test_no_import_cycles():
    found = cycles(import_graph(modules_of(ROOT, PACKAGES)))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_runtime_imports_no_torch_nor_the_training_side():
    modules = modules_of(ROOT, ["runtime"])
    outside = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            for node in ast.walk(ast.parse(f.read(), path)):
                tops = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                        [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for top in (t.split(".")[0] for t in tops):
                    if top not in sys.stdlib_module_names and top not in RUNTIME_MAY_IMPORT:
                        outside.setdefault(name, set()).add(top)
    assert not outside, f"runtime/ imports beyond numpy, onnxruntime, PIL, faiss and the standard library: {outside}"


def test_the_cycle_finder_sees_function_level_and_submodule_imports(tmp_path):
    """a -> b at the top, b -> c in a function (``from pkg import c``), c -> a relatively: one cycle;
    d imports a name of the package (pkg/__init__.py), which imports nothing back: no cycle."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("VERSION = 1\n")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import c\n    return c\n")
    (pkg / "c.py").write_text("from .a import *\n")
    (pkg / "d.py").write_text("from pkg import VERSION\nimport numpy\n")
    graph = import_graph(modules_of(os.fspath(tmp_path), ["pkg"]))
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": {"pkg.a"}, "pkg.d": {"pkg"}}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
