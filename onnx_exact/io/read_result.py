"""What reading a model gives: the loaded proto, the network and where it lives in the graph.

Its own module so that both readers (:mod:`onnx_exact.io.onnx_reader` for MLPs,
:mod:`onnx_exact.io.cnn_reader` for sequential CNNs) return it without importing each other;
``onnx_exact.io.onnx_reader.ReadResult`` stays the public name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_exact.core.network import Network


@dataclass
class ReadResult:
    """A loaded model and the network extracted from it.

    ``binding`` says where the network lives in the graph: a
    :class:`onnx_exact.io.graph.Binding` for an MLP (the writer edits it in place), a
    :class:`onnx_exact.io.cnn_reader.CnnBinding` for a CNN. ``uses_external_data`` records
    whether the file stored its tensors in external data (torch's dynamo exporter always does)
    and ``external_tensors`` which ones (the loaded ``model`` holds them all inline):
    :meth:`onnx_exact.io.staging.TensorPlacement.like_input` keeps each tensor of the output
    where the input kept it.
    """

    model: onnx.ModelProto
    network: Network
    binding: Any
    path: Path | None
    input_shape: tuple
    has_batch_dim: bool
    input_dtype: np.dtype
    uses_external_data: bool = False
    external_tensors: frozenset[str] = frozenset()
