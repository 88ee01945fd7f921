"""The input box every proof is relative to: ``lower <= x <= upper`` over the flattened input.

numpy only, so the bounds, search and solver code (and its worker processes) never load onnx.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_exact.core.network import InputMap


@dataclass(frozen=True)
class Box:
    """An axis-aligned box over the flattened input, float64.

    Attributes
    ----------
    lower, upper : (n,) float64 with ``lower <= upper`` and both finite.
    input_name : the ONNX graph input it constrains.
    source : where it came from, for reports ("--input-range", "metadata", "vnnlib:prop_1.vnnlib", ...).
    """

    lower: np.ndarray
    upper: np.ndarray
    input_name: str = "input"
    source: str = ""

    @property
    def size(self) -> int:
        return int(self.lower.shape[0])

    @property
    def center(self) -> np.ndarray:
        return (self.lower + self.upper) / 2.0

    @property
    def radius(self) -> np.ndarray:
        return (self.upper - self.lower) / 2.0

    def to_network(self, input_map: InputMap) -> Box:
        """The image of the box under ``x_net = scale * x_raw + shift`` (exact for a box)."""
        a = input_map.scale * self.lower + input_map.shift
        b = input_map.scale * self.upper + input_map.shift
        return Box(np.minimum(a, b), np.maximum(a, b), self.input_name, self.source)
