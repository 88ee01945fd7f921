"""Every module the package imports is the standard library or a declared dependency.

Why: CI and the developers' machines have packages that a fresh install does not (torch,
click, ...). An undeclared import passes every test there and fails the README's first command
on a new machine; ``import click`` did exactly that once typer stopped installing click.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "onnx_exact"


def _normalise(distribution: str) -> str:
    """PEP 503 name: ``onnx_graphsurgeon`` and ``ONNX-GraphSurgeon`` are the same distribution."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _declared_runtime_dependencies() -> set[str]:
    """The distributions ``pip install .`` installs: requirements without an extra marker."""
    try:
        requirements = metadata.requires("onnx-exact") or []
    except metadata.PackageNotFoundError:
        pytest.skip("onnx-exact is not installed (pip install .)")
    names = set()
    for requirement in requirements:
        if "extra ==" in requirement:
            continue
        names.add(_normalise(re.match(r"[A-Za-z0-9._-]+", requirement).group(0)))
    return names


def _imported_top_level_modules() -> dict[str, str]:
    """Absolute third-party imports anywhere in the package (also inside functions): module -> file."""
    found: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name.split(".")[0] != "onnx_exact":
                    found.setdefault(name.split(".")[0], str(path.relative_to(PACKAGE)))
    return found


def test_every_import_is_stdlib_or_a_declared_dependency():
    declared = _declared_runtime_dependencies()
    providers = metadata.packages_distributions()
    undeclared = []
    for module, where in sorted(_imported_top_level_modules().items()):
        if module in sys.stdlib_module_names or module == "__future__":
            continue
        distributions = {_normalise(name) for name in providers.get(module, [])}
        if not distributions & declared:
            undeclared.append(f"{module} (imported in {where}; from {sorted(distributions)})")
    assert not undeclared, "imports missing from [project].dependencies: " + ", ".join(undeclared)


def test_the_check_sees_the_dependencies_it_must():
    """Guard against a vacuous pass: the walk finds the libraries the pipeline is built on."""
    imported = _imported_top_level_modules()
    assert {"numpy", "onnx", "onnxruntime", "highspy", "typer", "rich"} <= set(imported)
