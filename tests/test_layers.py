"""The house's shape, kept: one package, layers that import only downward, no import circles, and
nothing outside tests/ importing tests. Read from the source with `ast` (every import counts, the
lazy ones inside functions too; only `if TYPE_CHECKING:` blocks are left out: they never run)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "quicknet"

# Each layer and the layers it may import (itself included). The base is the package's own
# modules that every layer shares: the model store, the errors, file helpers, the ONNX graph
# rewrite that both the INT8 compile and the CPU engine apply, NVML (GPU 0 and its driver), and how
# an image becomes the model's pixels (the server's decode and the client's resize).
BASE = {"quicknet", "quicknet.errors", "quicknet.fsutil", "quicknet.store", "quicknet.ort_graph", "quicknet.nvml"}
BASE |= {"quicknet.pixels"}
TOP = {"quicknet.cli", "quicknet.__main__", "quicknet.testing"}
MAY_IMPORT = {
    "base": {"base"},
    "api": {"base", "api"},
    "fused": {"base", "fused"},  # the fused GPU engine's kernels and file: the build writes it, the service loads it
    "build": {"base", "fused", "build"},
    "client": {"base", "api", "client"},
    "serve": {"base", "api", "fused", "serve"},  # no build code: a server imports what it serves, not how it was made
    "top": {"base", "api", "fused", "build", "client", "serve", "top"},
}


def layer_of(module: str) -> str:
    if module in BASE:
        return "base"
    if module in TOP:
        return "top"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in MAY_IMPORT:
        return parts[1]
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py's table")


def _module_name(path: Path, repo: Path = REPO) -> str:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST):
    """Import nodes that can run: everything but the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            stack.extend(node.orelse)  # exactly `if TYPE_CHECKING:`; `if not TYPE_CHECKING:` runs, and is read
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, repo: Path = REPO) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> modules under `root` it imports, module -> every top-level name it imports)."""
    files = {_module_name(p, repo): p for p in sorted(root.rglob("*.py"))}
    edges: dict[str, set[str]] = defaultdict(set)
    tops: dict[str, set[str]] = defaultdict(set)

    def known(name: str) -> str | None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in files:
                return ".".join(parts[:i])
        return None

    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                names = [f"{base}.{a.name}" for a in node.names]
            for name in names:
                tops[module].add(name.split(".")[0])
                target = known(name)
                if target is None or target == module:
                    continue
                edges[module].add(target)
                # importing a.b.c runs a and a.b first; a module's own parents are already running
                parts = target.split(".")
                for i in range(1, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent in files and not module.startswith(parent + "."):
                        edges[module].add(parent)
    return dict(edges), dict(tops)


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE)


def test_no_import_circles(graph):
    edges, _ = graph
    assert circles(edges) == [], "modules that import each other (directly or around a loop)"


def test_every_import_runs_down_a_layer(graph):
    edges, _ = graph
    upward = [
        f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})"
        for a, targets in sorted(edges.items())
        for b in sorted(targets)
        if layer_of(b) not in MAY_IMPORT[layer_of(a)]
    ]
    assert upward == []


def test_one_top_level_package_and_nothing_outside_tests_imports_tests(graph):
    _, tops = graph
    # the wheel holds `quicknet` alone: none of it may import the repository's other folders or old names
    outside = {"tests", "benchmarks", "service", "quicknet_cli"}
    assert not {m: sorted(names & outside) for m, names in tops.items() if names & outside}
    outside = {_module_name(p): p for p in (REPO / "benchmarks").rglob("*.py")}
    for module, path in outside.items():
        for node in _runtime_imports(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.split(".")[0] in ("tests", "service", "quicknet_cli") for n in names), module
    top_level = {p.name for p in REPO.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert top_level <= {"quicknet", "benchmarks", "tests"}, top_level


def test_the_server_imports_the_fused_engine_only_lazily():
    """`quicknet serve` starts without torch or triton: the server reaches into `quicknet.fused` (the
    fused GPU engine) only inside functions, never at a module's top (nor under `try` there)."""
    at_top = []
    for path in sorted((PACKAGE / "serve").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        top += [
            n for t in tree.body if isinstance(t, ast.Try) for n in t.body if isinstance(n, ast.Import | ast.ImportFrom)
        ]
        for node in top:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            at_top += [f"{path.name}: {n}" for n in names if n == "quicknet.fused" or n.startswith("quicknet.fused.")]
    assert at_top == []


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path):
    """The checker itself: a planted loop and a planted upward import are found."""
    pkg = tmp_path / "quicknet"
    (pkg / "serve").mkdir(parents=True)
    (pkg / "build").mkdir()
    for init in (pkg, pkg / "serve", pkg / "build"):
        (init / "__init__.py").write_text("")
    (pkg / "serve" / "a.py").write_text("def f():\n    from quicknet.serve import b\n")
    (pkg / "serve" / "b.py").write_text("from quicknet.serve.a import f\n")
    (pkg / "build" / "c.py").write_text("import quicknet.serve.a\n")
    (pkg / "build" / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import quicknet.serve.b\n"
    )
    edges, _ = import_graph(pkg, repo=tmp_path)
    assert circles(edges) == [["quicknet.serve.a", "quicknet.serve.b"]]
    assert "quicknet.serve.a" in edges["quicknet.build.c"] and "quicknet.build.d" not in edges
    assert layer_of("quicknet.serve.a") not in MAY_IMPORT[layer_of("quicknet.build.c")]


def test_every_front_declares_what_its_transport_reads():
    """A front is a module declaring the names of `transport.base.RestFront` / `GrpcFront` (the
    servers read nothing else of it, and no longer guess a default for a name left out)."""
    from quicknet.serve import main
    from quicknet.serve.transport.base import GrpcFront, RestFront

    for fronts, face in ((main.REST_FRONTS, RestFront), (main.GRPC_FRONTS, GrpcFront)):
        names = set(face.__annotations__) | {n for n in vars(face) if not n.startswith("_")}
        assert {"PROTOCOL"} < names
        for front in fronts:
            assert not [n for n in sorted(names) if not hasattr(front, n)], front.__name__
