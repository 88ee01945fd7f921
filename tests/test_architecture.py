"""The package's layout rules, checked on the source with ``ast`` (see docs/architecture.md).

Why: the layout is what lets a newcomer find where each step lives and lets each step be tested
alone. It decays one convenient import at a time: a numpy-only module that loads onnx makes every
worker process pay for it, a solver that imports the analysis above it makes a circle, and a file
that keeps growing ends up doing four jobs. These tests name the offending import or file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "onnx_exact"
MAX_LINES = 700

# package (first component below onnx_exact) -> packages it must never import
FORBIDDEN = {
    "core": {
        "io",
        "bounds",
        "solvers",
        "search",
        "stability",
        "equivalence",
        "pipeline",
        "cli",
        "reduce",
        "verify",
        "report",
        "parallel",
        "resources",
        "interrupts",
        "progress",
    },
    "io": {"stability", "equivalence", "pipeline", "solvers", "bounds", "search", "cli", "report"},
    "solvers": {"stability", "equivalence", "pipeline", "io", "cli", "report", "verify"},
    "bounds": {"stability", "equivalence", "pipeline", "io", "solvers", "cli", "report", "verify"},
    "search": {"stability", "equivalence", "pipeline", "io", "cli", "report", "verify"},
}

# third-party distribution -> the only places that may import it (package or top-level module)
CONFINED = {
    "highspy": {"solvers"},
    "onnx": {"io", "verify", "pipeline"},
    "onnxruntime": {"io", "verify"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(package modules imported, third-party top-level names imported), anywhere in the file."""
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "onnx_exact":
                    internal.add(alias.name)
                else:
                    external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "onnx_exact":
                external.add(node.module.split(".")[0])
                continue
            for alias in node.names:  # ``from onnx_exact.pkg import module`` names a module
                candidate = f"{node.module}.{alias.name}"
                internal.add(candidate if candidate in MODULES else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path.relative_to(PACKAGE)}: relative import (use absolute)")
    return internal, external


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _area(module: str) -> str:
    """``onnx_exact.solvers.exact_tiers`` -> ``solvers``; ``onnx_exact.pipeline`` -> ``pipeline``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_file_is_over_the_line_limit(module):
    lines = MODULES[module].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{module}: {lines} lines (limit {MAX_LINES}): split it by job"


def test_packages_import_only_what_is_below_them():
    wrong = [
        f"{module} imports {target}"
        for module, (internal, _) in GRAPH.items()
        for target in internal
        if _area(target) in FORBIDDEN.get(_area(module), set())
    ]
    assert not wrong, "; ".join(sorted(wrong))


def test_heavy_third_party_imports_stay_in_their_package():
    wrong = [
        f"{module} imports {name}"
        for module, (_, external) in GRAPH.items()
        for name in external
        if name in CONFINED and _area(module) not in CONFINED[name]
    ]
    assert not wrong, "; ".join(sorted(wrong))


def test_no_import_circle_between_modules():
    """Tarjan's strongly connected components over module imports: every one has size 1."""
    edges = {
        m: {t for t in internal if t in GRAPH and t != m} for m, (internal, _) in GRAPH.items()
    }
    for module in list(edges):  # importing a submodule runs its package's __init__ first
        edges[module] |= {
            p for t in edges[module] for p in _parents(t) if p in GRAPH and p != module
        }
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def test_the_rules_see_the_package():
    """Guard against a vacuous pass: the walk finds the packages and their imports."""
    assert {"core", "io", "bounds", "solvers", "search", "stability", "equivalence"} <= {
        _area(m) for m in MODULES
    }
    assert "onnx_exact.core.box" in GRAPH["onnx_exact.bounds.crown"][0]
    assert "highspy" in GRAPH["onnx_exact.solvers.highs_model"][1]
