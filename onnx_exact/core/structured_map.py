"""A CNN layer's affine map kept as the sequence of its structured operators, for fast passes.

The analysis reads a CNN layer as one dense matrix ``W`` (the ops between two ReLUs composed:
what CROWN, the LP/MILP encodings and the branch and bound need). A forward pass through that
matrix costs ``n_out · n_in`` multiply-adds per sample, while the convolution it came from costs
its kernel size times its output size: 10 to 100 times fewer on the CIFAR CNNs of the benchmark.
Witness searches (corner and gradient ascent, the attack, sampling, verification) push thousands
of points through the network, so :class:`~onnx_exact.core.network.DenseLayer` keeps, when the
reader can give it, this map as the operators themselves and uses it for ``W h + b`` and
``l W``.

The value differs from the dense product only by float64 rounding (the sums are taken in another
order), which is the same order of error as the dense product's own; no proof depends on
either (proofs are bounds with margins; a witness is a point whose pre-activation, recomputed,
shows a sign).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnx_exact.core.operators import LinearOperator

#: A structured map is used only when it costs at most this share of the dense product.
CHEAPER_BY = 4

#: Relative agreement a structured map must show with the dense matrix on random probes before
#: a layer uses it (a map that disagrees was built from a chain the reader changed by hand).
PROBE_TOLERANCE = 1e-9


class ElementwiseAffine(LinearOperator):
    """``y = scale ∘ x + shift`` per element (a folded BatchNormalization, per-channel Mul/Add
    broadcast to every position)."""

    def __init__(self, scale: np.ndarray, shift: np.ndarray) -> None:
        self.scale = np.asarray(scale, dtype=np.float64).reshape(-1)
        self.bias = np.asarray(shift, dtype=np.float64).reshape(-1)
        self.input_shape = self.output_shape = (self.scale.size,)

    @property
    def macs(self) -> int:
        return self.scale.size

    def linear(self, x: np.ndarray) -> np.ndarray:
        return x * self.scale

    def transpose(self, l: np.ndarray) -> np.ndarray:  # noqa: E741 (the CROWN name)
        return l * self.scale

    def abs(self) -> ElementwiseAffine:
        return ElementwiseAffine(np.abs(self.scale), np.zeros_like(self.bias))


class StructuredMap:
    """``y = A_m(… A_1(h))``: the operators of one layer applied in turn (biases included).

    Parameters
    ----------
    steps : the operators, first applied first; each one's ``n_in`` is the previous ``n_out``.
    """

    def __init__(self, steps: Sequence[LinearOperator]) -> None:
        if not steps:
            raise ValueError("StructuredMap: no operator")
        for before, after in zip(steps, steps[1:], strict=False):
            if after.n_in != before.n_out:
                raise ValueError(
                    f"StructuredMap: {type(after).__name__} takes {after.n_in} features, "
                    f"{type(before).__name__} gives {before.n_out}"
                )
        self.steps = tuple(steps)

    @property
    def n_in(self) -> int:
        return self.steps[0].n_in

    @property
    def n_out(self) -> int:
        return self.steps[-1].n_out

    @property
    def cost(self) -> int:
        """Multiply-adds per sample (data movement counted as one per element)."""
        return sum(max(step.macs, step.n_out) for step in self.steps)

    def forward(self, h: np.ndarray) -> np.ndarray:
        """``W h + b`` for a batch ``h`` of shape ``(m, n_in)``."""
        for step in self.steps:
            h = step.forward(h)
        return h

    def pullback(self, l: np.ndarray) -> np.ndarray:  # noqa: E741
        """``l W`` for row vectors ``l`` of shape ``(r, n_out)`` (the adjoints in reverse)."""
        for step in reversed(self.steps):
            l = step.transpose(l)  # noqa: E741
        return l

    def agrees_with(self, weight: np.ndarray, bias: np.ndarray, seed: int = 0) -> bool:
        """Whether ``forward`` and ``pullback`` match ``(weight, bias)`` on two random probes.

        The tolerance is ``PROBE_TOLERANCE`` times a bound on each result's magnitude,
        ``max|W| · ||probe||_1 + |b|``: round-off of either product stays far below it, while a
        map that is not the matrix misses it. No temporary of the matrix's size is made (the
        matrix may be hundreds of MB, or a :class:`~onnx_exact.core.sparse.SparseMatrix`).
        """
        if weight.shape != (self.n_out, self.n_in):
            return False
        rng = np.random.default_rng(seed)
        probe_in = rng.standard_normal((2, self.n_in))
        probe_out = rng.standard_normal((2, self.n_out))
        entries = getattr(weight, "data", weight)  # a SparseMatrix's stored entries
        largest = float(np.max(np.abs(entries), initial=0.0))
        scale_in = largest * np.abs(probe_in).sum(axis=1, keepdims=True) + np.abs(bias) + 1.0
        scale_out = largest * np.abs(probe_out).sum(axis=1, keepdims=True) + 1.0
        forward_error = np.abs(self.forward(probe_in) - (probe_in @ weight.T + bias))
        pullback_error = np.abs(self.pullback(probe_out) - probe_out @ weight)
        return bool(
            np.all(forward_error <= PROBE_TOLERANCE * scale_in)
            and np.all(pullback_error <= PROBE_TOLERANCE * scale_out)
        )
