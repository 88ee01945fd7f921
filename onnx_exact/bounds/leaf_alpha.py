"""α-CROWN for a batch of input-space leaves: optimised lower ReLU lines, per leaf and row.

Why: where the input-splitting branch and bound (:mod:`onnx_exact.bounds.input_split`) stalls,
a direction's leaves stay open because the linear relaxation is loose, not because the leaves
are wide; halving a leaf of an ``n``-input net in every dimension costs ``2^n`` leaves and only
about halves the relaxation's gap, so a bound a constant factor tighter saves whole levels of
the split tree.

The bound
---------
CROWN back-substitutes a row ``c . h_{k-1} + d`` to the input through each leaf's ReLU
relaxations: an unstable neuron (``l < 0 < u`` on the leaf) takes the upper line
``h <= u (y - l) / (u - l)`` where the row's coefficient is positive and a lower line
``h >= a y`` where it is negative. Every ``a`` in ``[0, 1]`` is sound (``relu(y) >= a y`` for
all ``y``), so each (leaf, row) gets its own slopes ``a``, optimised by projected gradient
descent (Adam) on the resulting bound ``max_x Λ(a) x + d(a)`` over the leaf, as α-CROWN does.
The bound is piecewise linear in ``a``; its gradient is obtained by one reverse pass through the
back-substitution (the back-substitution is a chain of products and sign splits, so the reverse
pass is as cheap as the forward one). Every iterate's bound is sound, and each (leaf, row)
keeps its smallest.

Only the asked rows' slopes are optimised, through the caller's bounds of the layers below.
Optimising those layers' bounds the same way (every unstable neuron, or the ten that weigh most
in the rows, of the layer just below) closes more leaves, but costs tens of optimisations
through several layers per leaf: measured on ACAS Xu (acas_1_9's layer 3: 42k and 56k leaves
instead of 71k) it cost more time than the leaves it saved.

Soundness: float64 throughout on the exact weights, as :mod:`onnx_exact.bounds.leaf_crown`;
the bounds are intersected with the caller's, and the caller's margin covers rounding.
"""

from __future__ import annotations

import numpy as np

from onnx_exact.core.network import Network

# projected Adam steps (on ACAS Xu leaves the tightened bound leaves open, with the layers
# below optimised too, 8 steps closed 95% of the pairs 20 closed, at 0.6 the cost)
STEPS = 10
RATE = 0.25  # Adam step size on the slopes (they live in [0, 1])
_CHUNK_VALUES = 2_000_000  # slopes of one layer for one chunk of pairs, at most (16 MB)
_BETAS = (0.9, 0.999)
_EPS = 1e-12


def maximum_over_leaf(
    coeffs: np.ndarray, const: np.ndarray, lower: np.ndarray, upper: np.ndarray
) -> np.ndarray:
    """``max`` of the linear forms ``coeffs (B, R, n) . x + const (B, R)`` over each leaf ``b``."""
    return (
        const
        + np.einsum("brn,bn->br", np.maximum(coeffs, 0.0), upper)
        + np.einsum("brn,bn->br", np.minimum(coeffs, 0.0), lower)
    )


def _relaxation(
    lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per leaf ``(B, n_j)``: unstable mask, upper slope and intercept, adaptive lower slope."""
    unstable = (lo < 0.0) & (hi > 0.0)
    span = np.where(unstable, hi - lo, 1.0)
    upper_slope = np.where(unstable, hi / span, (lo >= 0.0).astype(np.float64))
    upper_intercept = np.where(unstable, -upper_slope * lo, 0.0)
    adaptive = np.where(unstable, (hi > -lo).astype(np.float64), upper_slope)
    return unstable, upper_slope, upper_intercept, adaptive


def optimise(
    net: Network,
    bounds: list[tuple[np.ndarray, np.ndarray]],
    lower: np.ndarray,
    upper: np.ndarray,
    layer: int,
    coeffs: np.ndarray,
    const: np.ndarray,
    steps: int = STEPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Upper bounds of the rows ``coeffs (B, R, n_{layer-1}) . h_{layer-1} + const (B, R)``.

    Parameters
    ----------
    bounds : per layer below ``layer``, ``(lo, hi)`` of shape ``(n_j, B)``: sound bounds of its
        pre-activations on each leaf (they fix the upper lines and which neurons are relaxed).
    lower, upper : ``(B, n)`` the leaves.
    steps : gradient steps after the first (adaptive-line) bound.

    Returns
    -------
    values : ``(B, R)`` the smallest bound over the iterates, never above the adaptive CROWN
        bound (the first iterate).
    best : ``(B, R, n)`` the input coefficients of the linear bound that attains it (its
        maximising vertex is a witness candidate).
    """
    relaxed = [
        _relaxation(bounds[j][0].T, bounds[j][1].T) if net.layers[j].relu else None
        for j in range(layer)
    ]
    slopes = {
        j: np.broadcast_to(r[3][:, None, :], (*coeffs.shape[:2], r[3].shape[1])).copy()
        for j, r in enumerate(relaxed)
        if r is not None and r[0].any()
    }
    moments = {j: (np.zeros_like(a), np.zeros_like(a)) for j, a in slopes.items()}
    values = np.full(coeffs.shape[:2], np.inf)
    best = np.zeros((*coeffs.shape[:2], lower.shape[1]))
    for step in range(steps + 1):
        value, final, tops = _substitute(net, relaxed, slopes, layer, coeffs, const, lower, upper)
        better = value < values
        values = np.where(better, value, values)
        best = np.where(better[:, :, None], final, best)
        if step == steps or not slopes:
            break
        grads = _gradient(net, relaxed, slopes, layer, tops, final, lower, upper)
        for j, grad in grads.items():
            first, second = moments[j]
            first *= _BETAS[0]
            first += (1.0 - _BETAS[0]) * grad
            second *= _BETAS[1]
            second += (1.0 - _BETAS[1]) * grad * grad
            scale = RATE * np.sqrt(1.0 - _BETAS[1] ** (step + 1)) / (1.0 - _BETAS[0] ** (step + 1))
            slopes[j] -= scale * first / (np.sqrt(second) + _EPS)
            np.clip(slopes[j], 0.0, 1.0, out=slopes[j])
    return values, best


def _substitute(net, relaxed, slopes, layer, coeffs, const, lower, upper):
    """The back-substitution with the current slopes: bound ``(B, R)``, input coefficients
    ``(B, R, n)``, and the row coefficients on each ReLU layer's output (for the reverse pass)."""
    batch, rows = coeffs.shape[:2]
    tops: dict[int, np.ndarray] = {}
    for j in range(layer - 1, -1, -1):
        if relaxed[j] is not None:
            unstable, upper_slope, upper_intercept, adaptive = relaxed[j]
            tops[j] = coeffs
            positive = np.maximum(coeffs, 0.0)
            lower_slope = slopes[j] if j in slopes else adaptive[:, None, :]
            const = const + np.einsum("brj,bj->br", positive, upper_intercept)
            coeffs = positive * upper_slope[:, None, :] + (coeffs - positive) * lower_slope
        weight, bias = net.layers[j].weight, net.layers[j].bias
        flat = coeffs.reshape(batch * rows, -1)
        const = const + (flat @ bias).reshape(batch, rows)
        coeffs = (flat @ weight).reshape(batch, rows, -1)
    return maximum_over_leaf(coeffs, const, lower, upper), coeffs, tops


def _gradient(net, relaxed, slopes, layer, tops, final, lower, upper):
    """``d value / d slopes[j]`` for every optimised layer, by the reverse pass.

    With ``g_j`` the row's coefficients on ``h_j`` after layer ``j``'s relaxation, the bound is
    ``... + g_j . (W_j h_{j-1} + b_j)``, so the derivative by ``g_j`` is ``δ W_j^T + b_j``
    (``δ`` the derivative by the coefficients below, at the input the maximising vertex); a
    negative coefficient ``c`` of an unstable neuron enters ``g_j`` as ``c a``, a positive one as
    ``c u / (u - l)`` plus ``c`` times the intercept into the constant.
    """
    delta = np.where(final > 0.0, upper[:, None, :], lower[:, None, :])
    batch, rows = final.shape[:2]
    grads: dict[int, np.ndarray] = {}
    for j in range(layer):
        weight, bias = net.layers[j].weight, net.layers[j].bias
        delta = (delta.reshape(batch * rows, -1) @ weight.T).reshape(batch, rows, -1) + bias
        if relaxed[j] is None:
            continue
        unstable, upper_slope, upper_intercept, adaptive = relaxed[j]
        top = tops[j]
        negative = np.minimum(top, 0.0)
        lower_slope = slopes[j] if j in slopes else adaptive[:, None, :]
        if j in slopes:
            grads[j] = np.where(unstable[:, None, :], delta * negative, 0.0)
        delta = np.where(
            top > 0.0,
            delta * upper_slope[:, None, :] + upper_intercept[:, None, :],
            delta * lower_slope,
        )
    return grads


def bound_rows(
    net: Network,
    bounds: list[tuple[np.ndarray, np.ndarray]],
    lower: np.ndarray,
    upper: np.ndarray,
    layer: int,
    coeffs: np.ndarray,
    const: np.ndarray,
    wanted: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`optimise` of the ``wanted`` (leaf, row) pairs, each pair one batch entry.

    ``wanted (B, R)`` (bool, default all): the pairs to bound; the others get ``inf``, so the
    work follows the pairs, not the rows asked of some leaf. The pairs are taken in chunks (a
    chunk's slopes of one layer stay within ``_CHUNK_VALUES`` values); a pair's result does not
    depend on its chunk. Returns ``values (B, R)`` and ``best (B, R, n)`` as :func:`optimise`.
    """
    batch, rows = coeffs.shape[:2]
    wanted = np.ones((batch, rows), dtype=bool) if wanted is None else wanted
    widest = max(net.layers[j].out_features for j in range(layer))
    values = np.full((batch, rows), np.inf)
    best = np.zeros((batch, rows, lower.shape[1]))
    leaves, columns = np.nonzero(wanted)
    step = max(1, _CHUNK_VALUES // widest)
    for first in range(0, leaves.size, step):
        leaf, row = leaves[first : first + step], columns[first : first + step]
        found, found_best = optimise(
            net,
            [(lo[:, leaf], hi[:, leaf]) for lo, hi in bounds[:layer]],
            lower[leaf],
            upper[leaf],
            layer,
            coeffs[leaf, row][:, None, :],
            const[leaf, row][:, None],
        )
        values[leaf, row], best[leaf, row] = found[:, 0], found_best[:, 0]
    return values, best
