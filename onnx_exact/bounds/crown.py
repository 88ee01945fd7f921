"""Sound pre-activation bounds: interval propagation (IBP) and symbolic back-substitution (CROWN).

Both bounds enclose every pre-activation ``y_k`` the network can produce for a network-space input
in the box ``[lo, hi]``:

* **Interval** (IBP): with centre ``c`` and radius ``r`` of the previous layer's output box,
  ``W c + b - |W| r <= y <= W c + b + |W| r``. Cheap and exact for the first layer (its extremes are
  attained at the box corners ``where(W_i > 0, hi, lo)`` and the opposite), loose further down.
* **Symbolic** (CROWN / DeepPoly): write ``y_k`` (or ``-y_k``) as a linear function of the previous
  layer's outputs and replace every ReLU by a linear bound that is valid on its known pre-activation
  interval ``[l, u]``: stably active neurons pass through (``h = y``), stably inactive ones vanish
  (``h = 0``), unstable ones (``l < 0 < u``) take the triangle's upper line
  ``h <= u / (u - l) * (y - l)`` where the coefficient is positive and the adaptive lower line
  ``h >= a y`` (``a = 1`` if ``u > -l`` else ``0``) where it is negative. Walking back to the input and
  concretising ``Λ x + const`` over the box with ``max(Λ, 0) hi + min(Λ, 0) lo`` bounds ``y_k``;
  the maximising vertex ``where(Λ > 0, hi, lo)`` is a natural witness candidate.

Soundness: everything is computed in float64 on the exact weights. Rounding can move a computed
bound by a few units in the last place of the magnitudes involved; the margin policy of
:mod:`onnx_exact.stability` (a proof needs the bound to clear zero by ``1e-12`` times the neuron's
scale) covers that. Intersections of bounds from different sources are kept ordered
(``lower <= upper``) so that a rounding-level crossing never produces an empty interval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from onnx_exact.core.box import Box
from onnx_exact.core.network import Network

# Rows of the back-substitution processed together, at most; the working set is about
# 2 * block * (widest layer) float64 values, kept under BLOCK_VALUES by a smaller block.
ROW_BLOCK = 512
BLOCK_VALUES = 1 << 23


def row_block(widest: int) -> int:
    """Rows per back-substitution block when the widest layer involved has ``widest`` neurons."""
    return int(min(ROW_BLOCK, max(16, BLOCK_VALUES // max(2 * widest, 1))))


@dataclass
class LayerBounds:
    """Proved bounds ``lower <= y_k <= upper`` of one layer's pre-activations over the box."""

    lower: np.ndarray
    upper: np.ndarray

    def intersect(self, other: LayerBounds) -> LayerBounds:
        """The tighter of two sound bounds, kept ordered.

        Two sound enclosures of the same quantity overlap; if rounding makes them cross by an ulp,
        the crossing values are swapped so the result still encloses the true value.
        """
        lower = np.maximum(self.lower, other.lower)
        upper = np.minimum(self.upper, other.upper)
        return LayerBounds(np.minimum(lower, upper), np.maximum(lower, upper))

    def copy(self) -> LayerBounds:
        return LayerBounds(self.lower.copy(), self.upper.copy())


@dataclass
class Vertices:
    """Box vertices, one per bounded row and side, kept as which coordinates sit at the upper
    end of the box (one byte per coordinate instead of eight: a CNN layer has thousands of rows
    over thousands of inputs). Indexing gives the points: ``vertices[key]`` is
    ``where(at_upper[key], upper, lower)``."""

    at_upper: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    def __getitem__(self, key) -> np.ndarray:
        return np.where(self.at_upper[key], self.upper, self.lower)


def _post_activation(bounds: LayerBounds, relu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on ``h = relu(y)`` (or ``h = y``) from bounds on ``y`` (ReLU is monotone)."""
    if not relu:
        return bounds.lower, bounds.upper
    return np.maximum(bounds.lower, 0.0), np.maximum(bounds.upper, 0.0)


def layer_input_bounds(
    net: Network, box: Box, bounds: list[LayerBounds], layer: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on the input of layer ``layer``: the box for layer 0, else the previous post-activation."""
    if layer == 0:
        return box.lower, box.upper
    return _post_activation(bounds[layer - 1], net.layers[layer - 1].relu)


def interval_bounds(
    net: Network, box: Box, start_bounds: list[LayerBounds | None] | None = None
) -> list[LayerBounds]:
    """Interval bound propagation through every layer.

    Parameters
    ----------
    net : the network; ``relu=False`` layers pass their pre-activation bounds through unchanged.
    box : network-space input box.
    start_bounds : optional sound bounds per layer (entries may be ``None``; the list may be shorter
        than the network). Each layer's interval bounds are intersected with them *before* being
        propagated, so a refinement of layer k (symbolic, LP) tightens every later layer.

    Returns
    -------
    One :class:`LayerBounds` per layer of ``net``.
    """
    lo, hi = np.asarray(box.lower, dtype=np.float64), np.asarray(box.upper, dtype=np.float64)
    result: list[LayerBounds] = []
    for k, layer in enumerate(net.layers):
        centre = (lo + hi) / 2.0
        radius = (hi - lo) / 2.0
        mid = layer.weight @ centre + layer.bias
        spread = abs(layer.weight) @ radius
        current = LayerBounds(mid - spread, mid + spread)
        if start_bounds is not None and k < len(start_bounds) and start_bounds[k] is not None:
            current = current.intersect(start_bounds[k])
        result.append(current)
        lo, hi = _post_activation(current, layer.relu)
    return result


def relu_relaxation(bounds: LayerBounds, relu: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear bounds ``lower_slope * y <= h <= upper_slope * y + upper_intercept`` on one layer.

    Valid for every ``y`` in ``[bounds.lower, bounds.upper]``: identity for active and linear neurons,
    zero for inactive ones, the triangle upper line and the adaptive lower line for unstable ones.
    Elementwise, so the bounds may carry leading batch axes (one row per sub-box).
    """
    n = bounds.lower.shape
    if not relu:
        return np.ones(n), np.zeros(n), np.ones(n)
    lower, upper = bounds.lower, bounds.upper
    active = lower >= 0.0
    unstable = (lower < 0.0) & (upper > 0.0)
    upper_slope = active.astype(np.float64)
    upper_intercept = np.zeros(n)
    lower_slope = active.astype(np.float64)
    l_u, u_u = lower[unstable], upper[unstable]
    slope = u_u / (u_u - l_u)
    upper_slope[unstable] = slope
    upper_intercept[unstable] = -slope * l_u
    lower_slope[unstable] = (u_u > -l_u).astype(np.float64)
    return upper_slope, upper_intercept, lower_slope


def _back_substitute(
    net: Network,
    relaxations: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    layer: int,
    coeffs: np.ndarray,
    const: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Upper-bound ``coeffs @ h_{layer-1} + const`` by a linear function of the network input.

    Walking down from layer ``layer - 1``, each ReLU is replaced by its upper line where the
    coefficient is positive and its lower line where it is negative (that keeps the expression an
    upper bound), then the affine layer is substituted. Columns of stably inactive neurons are zero
    and are skipped, which keeps the products as small as the live part of each layer. A layer's
    selection rows (:attr:`DenseLayer.passthrough`: ``y_i = h_{s_i}``, a residual CNN's skip
    carried across a branch) are substituted by adding their coefficients into column ``s_i``,
    the value of their product without its cost.
    """
    for j in range(layer - 1, -1, -1):
        upper_slope, upper_intercept, lower_slope = relaxations[j]
        positive = np.maximum(coeffs, 0.0)
        const = const + positive @ upper_intercept
        coeffs = positive * upper_slope + np.minimum(coeffs, 0.0) * lower_slope
        current = net.layers[j]
        copied = 0 if current.passthrough is None else current.passthrough.size
        first = current.out_features - copied
        if current.is_sparse:
            # Dead columns are zero already. The whole matrix's product (its operators' BLAS
            # products, or the sparse one with the transpose cached on the weight) beats a
            # fresh sparse matrix of the live rows per block.
            selected = coeffs[:, first:].copy()
            coeffs[:, first:] = 0.0
            const = const + coeffs[:, :first] @ current.bias[:first]
            coeffs = current.pullback(coeffs)
            if copied:
                np.add.at(coeffs, (slice(None), current.passthrough), selected)
            continue
        selected = coeffs[:, first:]
        coeffs = coeffs[:, :first]
        live = (upper_slope[:first] != 0.0) | (lower_slope[:first] != 0.0)
        weight, bias = current.weight[:first], current.bias[:first]
        if not live.all():
            coeffs, weight, bias = coeffs[:, live], weight[live], bias[live]
        const = const + coeffs @ bias
        coeffs = coeffs @ weight
        if copied:
            np.add.at(coeffs, (slice(None), current.passthrough), selected)
    return coeffs, const


def symbolic_bounds(
    net: Network,
    box: Box,
    bounds: list[LayerBounds],
    layer: int,
    rows: np.ndarray | None = None,
    deadline: float = np.inf,
) -> tuple[LayerBounds, Vertices]:
    """CROWN/DeepPoly bounds for selected neurons of one layer.

    Parameters
    ----------
    net, box : the network and its network-space input box.
    bounds : sound bounds of layers ``0 .. layer - 1`` (the tightest known: they fix the ReLU
        relaxations); if ``bounds[layer]`` exists the result is intersected with it and rows not
        selected keep it unchanged (otherwise they are ``(-inf, inf)``).
    layer : index of the layer to bound.
    rows : neuron indices to bound (typically the ones interval arithmetic leaves unstable);
        ``None`` means all.
    deadline : ``time.monotonic()`` after which no new block of rows is started (rows left
        keep their bounds; their vertices are the box's lower corner). A big CNN's layer has
        tens of thousands of rows.

    Returns
    -------
    bounds : LayerBounds of the whole layer.
    corners : :class:`Vertices` of shape ``(2, len(rows), n_in)``; ``corners[0, r]`` is the input
        vertex that attains the linear upper bound of row ``rows[r]`` (a candidate for
        ``y > 0``), ``corners[1, r]`` the one attaining the linear lower bound (a candidate for
        ``y < 0``).
    """
    target = net.layers[layer]
    rows = np.arange(target.out_features) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(bounds) > layer:
        result = bounds[layer].copy()
    else:
        result = LayerBounds(
            np.full(target.out_features, -np.inf), np.full(target.out_features, np.inf)
        )
    lo, hi = np.asarray(box.lower, dtype=np.float64), np.asarray(box.upper, dtype=np.float64)
    at_upper = np.zeros((2, rows.shape[0], lo.shape[0]), dtype=bool)
    relaxations = [relu_relaxation(bounds[j], net.layers[j].relu) for j in range(layer)]
    widest = max([lo.shape[0]] + [net.layers[j].out_features for j in range(layer + 1)])
    step = row_block(widest)
    for start in range(0, rows.shape[0], step):
        if start and time.monotonic() >= deadline:
            break
        block = rows[start : start + step]
        m = block.shape[0]
        # Upper bounds of +y (first m rows) and of -y (last m rows) in one pass.
        weight = target.rows(block)
        coeffs = np.concatenate([weight, -weight])
        const = np.concatenate([target.bias[block], -target.bias[block]])
        coeffs, const = _back_substitute(net, relaxations, layer, coeffs, const)
        values = const + np.maximum(coeffs, 0.0) @ hi + np.minimum(coeffs, 0.0) @ lo
        at_upper[0, start : start + m] = coeffs[:m] > 0.0
        at_upper[1, start : start + m] = coeffs[m:] > 0.0
        refined = LayerBounds(-values[m:], values[:m]).intersect(
            LayerBounds(result.lower[block], result.upper[block])
        )
        result.lower[block] = refined.lower
        result.upper[block] = refined.upper
    return result, Vertices(at_upper, lo, hi)
