"""Sound pre-activation bounds (interval, symbolic back-substitution)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LayerBounds:
    """Proved bounds ``lower <= y_k <= upper`` of one layer's pre-activations over the box."""

    lower: np.ndarray
    upper: np.ndarray
