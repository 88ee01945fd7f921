"""onnx-exact: exact compression of ReLU networks in ONNX by proving neuron stability.

Python API (README "Python API")::

    import numpy as np
    from onnx_exact import DomainSpec, analyze, check, compress

    box = DomainSpec(lower=np.zeros(784), upper=np.ones(784))  # or input_ranges=["[0,1]"]
    result = compress("model.onnx", "small.onnx", box)  # a path or an onnx.ModelProto
    print(result.report.params_before, result.report.params_after)
    print(check("model.onnx", result.model, box).passed)

Every error raised on purpose derives from :class:`OnnxExactError` (importable from here, like
its subclasses); its message is one line naming the file, node or argument at fault.

The names below are imported on first use (PEP 562 ``__getattr__``), not with the package: the
command line must install its SIGINT/SIGTERM handlers before onnx, onnxruntime and highspy load
(seconds on a busy machine), so that a Ctrl-C there gets the one-line message, not a traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from onnx_exact.version import __version__

_EXPORTS = {
    "AnalysisOptions": "pipeline",
    "DomainSpec": "pipeline",
    "analyze": "pipeline",
    "check": "pipeline",
    "compress": "pipeline",
    "check_equivalence": "equivalence.check",
    "OnnxExactError": "core.errors",
    "UnsupportedModelError": "core.errors",
    "MalformedModelError": "core.errors",
    "DomainError": "core.errors",
    "UsageError": "core.errors",
    "SolverError": "core.errors",
    "ResourceError": "core.errors",
    "VerificationError": "core.errors",
}

__all__ = [
    "AnalysisOptions",
    "DomainError",
    "DomainSpec",
    "MalformedModelError",
    "OnnxExactError",
    "ResourceError",
    "SolverError",
    "UnsupportedModelError",
    "UsageError",
    "VerificationError",
    "__version__",
    "analyze",
    "check",
    "check_equivalence",
    "compress",
]

if TYPE_CHECKING:
    from onnx_exact.core.errors import (
        DomainError,
        MalformedModelError,
        OnnxExactError,
        ResourceError,
        SolverError,
        UnsupportedModelError,
        UsageError,
        VerificationError,
    )
    from onnx_exact.equivalence.check import check_equivalence
    from onnx_exact.pipeline import AnalysisOptions, DomainSpec, analyze, check, compress


def __getattr__(name: str) -> Any:
    """Import the module that defines a public name the first time it is asked for."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'onnx_exact' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
