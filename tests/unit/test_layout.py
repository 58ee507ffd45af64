"""The package's shape, checked from its source: no import circles (function-level imports
included), the sweep machinery above the training code, the loop below the smoke run and every
command line, matplotlib only where a plot is drawn, models and data sources at the bottom."""


from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "cifar_dist"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its body."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cifar_dist"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # `from cifar_dist import checkpoint`
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("cifar_dist"))
        graph[name] = {m for m in found if m in modules and m != name and m != "cifar_dist"}
    return graph


def test_no_import_circles():
    graph = imports()
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", "import circle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_floors():
    graph = imports()
    sweep = {m for m in graph if m.startswith("cifar_dist.sweep")}
    for name, targets in graph.items():
        if name not in sweep and name != "cifar_dist.cli":
            assert not targets & sweep, f"{name} imports the sweep machinery"
    # Plain PyTorch at the bottom: a net or a data source knows nothing of config, ranks or runs.
    grounds = {"cifar_dist.models", "cifar_dist.sources", "cifar_dist.images", "cifar_dist.image_folders",
               "cifar_dist.metrics", "cifar_dist.rundir"}
    for ground in grounds:
        assert graph[ground] <= {"cifar_dist.errors"} | grounds, f"{ground} imports {graph[ground]}"
    # The evaluation algorithm depends only on data and distributed code (and its result and settings types).
    assert graph["cifar_dist.exact_eval"] <= {"cifar_dist.data", "cifar_dist.distributed", "cifar_dist.metrics",
                                              "cifar_dist.config"}


def below(graph: dict[str, set[str]], module: str) -> set[str]:
    """Every module `module` imports, directly or through others."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_loop_never_imports_the_smoke_run():
    """The smoke run drives the loop from above; the loop, and what it imports, know no command line."""
    graph = imports()
    loop = below(graph, "cifar_dist.train")
    assert "cifar_dist.smoke" not in loop
    commands = {"cifar_dist.cli", "cifar_dist.evaluate", "cifar_dist.predict"} | {m for m in graph if ".sweep" in m}
    assert not loop & commands, f"the loop imports {loop & commands}"
    assert "cifar_dist.train" in below(graph, "cifar_dist.smoke")  # the smoke goes through the loop itself


def test_matplotlib_is_imported_only_where_a_plot_is_drawn():
    # Training, the console and the sweep commands import the plotting modules; matplotlib (a second
    # of import time, a backend chosen) must come only with a plot.
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only; imports inside functions are fine
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "matplotlib" for n in names), f"{path.name} imports matplotlib at module level"
