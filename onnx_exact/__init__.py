"""onnx-exact: exact compression of ReLU networks in ONNX by proving neuron stability.

Python API::

    from onnx_exact import compress, analyze, DomainSpec
    result = compress("model.onnx", "small.onnx", DomainSpec(input_ranges=["[0,1]"]))
    print(result.report.params_before, result.report.params_after)

The names below are imported on first use (PEP 562 ``__getattr__``), not with the package: the
command line must install its SIGINT/SIGTERM handlers before onnx, onnxruntime and highspy load
(seconds on a busy machine), so that a Ctrl-C there gets the one-line message, not a traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "1.0.0"

_EXPORTS = {
    "AnalysisOptions": "pipeline",
    "DomainSpec": "pipeline",
    "analyze": "pipeline",
    "check": "pipeline",
    "compress": "pipeline",
    "check_equivalence": "equivalence",
}

__all__ = [
    "AnalysisOptions",
    "DomainSpec",
    "__version__",
    "analyze",
    "check",
    "check_equivalence",
    "compress",
]

if TYPE_CHECKING:
    from .equivalence import check_equivalence
    from .pipeline import AnalysisOptions, DomainSpec, analyze, check, compress


def __getattr__(name: str) -> Any:
    """Import the module that defines a public name the first time it is asked for."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'onnx_exact' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
