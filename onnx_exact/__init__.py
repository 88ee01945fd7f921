"""onnx-exact: exact compression of ReLU networks in ONNX by proving neuron stability.

Python API::

    from onnx_exact import compress, analyze, DomainSpec
    result = compress("model.onnx", "small.onnx", DomainSpec(input_ranges=["[0,1]"]))
    print(result.report.params_before, result.report.params_after)
"""

__version__ = "1.0.0"

from .equivalence import check_equivalence  # noqa: E402
from .pipeline import AnalysisOptions, DomainSpec, analyze, check, compress  # noqa: E402

__all__ = [
    "AnalysisOptions",
    "DomainSpec",
    "__version__",
    "analyze",
    "check",
    "check_equivalence",
    "compress",
]
