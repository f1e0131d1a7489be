"""The layout of saiproxy/ as docs/architecture.md draws it, checked from the source.

Layers, bottom to top; a module imports only from its own layer or lower ones
(any import: at the top, inside a function, or for the type checker only),
and no chain of imports comes back to where it started. The size bounds and
``__all__`` keep each module readable on its own.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "saiproxy"

# Bottom to top, as docs/architecture.md draws them.
LAYERS = (
    "base",
    "logs",
    "tracing",
    "upstream",
    "limits",
    "state",
    "core",
    "protocols",
    "web",
    "cli",
)
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
# Declared data tables: long because they list data, not logic.
DATA_TABLES: dict[str, str] = {}


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


MODULES = dict(_modules())


def _layer(module: str) -> int:
    """Return a module's layer: the package root's face is the bottom, __main__ the top."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1
    if parts[1] == "__main__":
        return len(LAYERS)
    return LAYERS.index(parts[1])


def _imports(module: str, path: Path) -> set[str]:
    """Return the saiproxy modules that ``module`` imports, wherever the import is."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                name = f"{target}.{alias.name}"
                found.add(name if name in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_every_module_belongs_to_a_declared_layer() -> None:
    for module in MODULES:
        parts = module.split(".")
        assert len(parts) == 1 or parts[1] in (*LAYERS, "__main__"), module


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert upward == []


def test_no_import_circles() -> None:
    circles: list[str] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert circles == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_declares_all_and_stays_small(module: str) -> None:
    path = MODULES[module]
    tree = ast.parse(path.read_text("utf-8"))
    declared = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    assert "__all__" in declared, f"{module} declares no __all__"
    if module not in DATA_TABLES:
        lines = len(path.read_text("utf-8").splitlines())
        assert lines <= MAX_MODULE_LINES, f"{module}: {lines} lines"
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
        and f"{module}.{node.name}" not in DATA_TABLES
    ]
    assert long == []
