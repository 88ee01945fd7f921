"""Sound bounds of a batch of input-space leaves: forward linear relaxation, CROWN, tightening.

Why a module of its own: :mod:`onnx_exact.bounds.input_split` decides *which* leaves to bound
and what their bounds prove; this module computes the bounds of thousands of leaves (sub-boxes
``lower[b] <= x <= upper[b]`` of a few-input network) at once, by array operations over all
leaves and neurons, and nothing else. A leaf's bounds depend on that leaf alone, whatever batch
it is bounded in (so the search's outcome does not depend on ``jobs`` or on how batches are cut).

Bounds of a batch of leaves
---------------------------
Forward linear relaxation (symbolic intervals, as in ReluVal/Neurify, :func:`leaf_bounds`):
every pre-activation of layer ``j`` is enclosed on leaf ``b`` between two affine functions of the
input, ``L_{j,b}(x) <= y_j(x) <= U_{j,b}(x)``. Their extremes over the leaf, intersected with
interval propagation from the previous layer and with the caller's whole-box bounds ``outer``,
give ``l_j <= y_j <= u_j``. The ReLU is relaxed on each form's own range (chords of ``relu`` over
``[min U, max U]`` and ``[min L, max L]``), and the next layer gets ``W+ U + W- L + b`` and
``W+ L + W- U + b``: two matrix products per layer over all leaves and neurons at once. The
asked rows get CROWN (back-substitution through each leaf's relaxations, adaptive lower ReLU
lines and again with lower lines parallel to the upper ones); their bound is the
smallest of the forward and the CROWN ones.

Tightening: a leaf the forward relaxation leaves open is bounded again with the intermediate
neurons tightened (every neuron of layers ``1 .. top - 1`` unstable on the leaf gets CROWN
through the leaf's own tightened bounds below it, bottom-up), several times the cost. On a deep
net the forward relaxation's intermediate bounds, not the leaf size, are what keeps some
directions open: the split tree of such a direction grows without end, while the tightened
bound closes most of its deep leaves (when to tighten is the search's choice:
:mod:`onnx_exact.bounds.input_split`). A leaf the tightened bound leaves open gets α-CROWN for
its open rows
(:mod:`onnx_exact.bounds.leaf_alpha`: lower ReLU lines optimised per (leaf, row)) if that is
likely to close it: every bound ``v`` still above its target is at most ``ALPHA_GATE`` times
the gap ``v - y_c`` to the row's value at the leaf's centre (α-CROWN removes up to about half
of that gap; the others seldom close).

Memory traffic, not arithmetic, bounds the speed of these passes: the batch is cut into chunks
whose ``(leaves, rows, width)`` arrays stay in cache (``_CACHE_VALUES``, ``_ROW_CACHE_VALUES``).

Soundness: float64 throughout on the exact weights; a computed bound can be off by rounding of the
order of ``1e-16`` times the magnitudes involved, which the caller's margin (``1e-12 * s_i``, see
:mod:`onnx_exact.stability`) covers.
"""

from __future__ import annotations

import numpy as np

from onnx_exact.bounds import leaf_alpha
from onnx_exact.bounds.crown import LayerBounds
from onnx_exact.core.network import Network

_CACHE_VALUES = 100_000  # pairs x 2 x width of one tightening back-substitution, at most
_ROW_CACHE_VALUES = 300_000  # leaves x rows x width of one CROWN of the asked rows, at most
ALPHA_GATE = 0.5  # α-CROWN for a leaf whose every missed bound v has v <= this * (v - centre)
# CROWN lower ReLU lines tried per row besides the adaptive one: a slope in [0, 1], or "chord"
# (every unstable neuron's lower line parallel to its upper line, slope u / (u - l))
_LOWER_LINES: tuple[float | str, ...] = ("chord",)
# ... with at least this many input features: the pass costs as much as the first per leaf,
# while a tighter bound saves about d log2(ratio) levels of splits with d inputs (2-input nets
# 1.2-1.3x faster without it, an 8-input one alike, ACAS Xu 1_1 5 % slower)
LOWER_LINES_MIN_INPUTS = 4
PAIR_DENSITY = 0.75  # CROWN pair by pair when at most this share of (leaf, row) pairs is open


def _extremes(
    forms: np.ndarray, centre: np.ndarray, radius: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``min`` and ``max`` over each leaf of affine forms ``(n_j, n + 1, B)`` (input coefficients,
    then the constant; ``centre`` and ``radius`` are the leaves' ``(n, B)``): ``(n_j, B)`` each."""
    n = centre.shape[0]
    coeffs = forms[:, :n]
    middle = np.einsum("jmb,mb->jb", coeffs, centre) + forms[:, n]
    spread = np.einsum("jmb,mb->jb", np.abs(coeffs), radius)
    return middle - spread, middle + spread


def _relu_slopes(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Slope of the chord of ``relu`` over ``[low, high]``: 1 if ``low >= 0``, 0 if ``high <= 0``."""
    crossing = (low < 0.0) & (high > 0.0)
    span = np.where(crossing, high - low, 1.0)
    return np.where(crossing, high / span, (low >= 0.0).astype(np.float64))


def leaf_bounds(
    net: Network,
    lower: np.ndarray,
    upper: np.ndarray,
    outer: list[LayerBounds],
    top: int,
    tighten: bool = False,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
    """Sound bounds of layers ``0 .. top`` on each of ``B`` leaves, by forward linear relaxation.

    Every pre-activation is enclosed between an upper form ``U(x)`` and a lower form ``L(x)``
    (affine in the input, per leaf). The ReLU is relaxed on each form's own range over the leaf
    (symbolic linear relaxation, as in Neurify): ``relu(y) <= relu(U) <= a_U (U - U_min)`` with
    ``a_U = U_max / (U_max - U_min)`` and ``relu(y) >= relu(L) >= a_L L`` with the chord slope
    ``a_L = L_max / (L_max - L_min)`` (any ``a_L`` in ``[0, 1]`` is sound; the chord keeps the
    search complete within its leaf budgets where the smaller-triangle line ``0`` or ``1`` left
    directions open). Both are exact when a form keeps its sign; zero when ``y <= 0``, the
    identity when ``y >= 0`` is known. They are kept as their mean ``M`` and
    half-difference ``H``, so an affine layer costs two matrix products over all leaves and
    neurons at once: ``W+ U + W- L = W M + |W| H``.

    Parameters
    ----------
    lower, upper : ``(B, n)`` leaves (network space).
    outer : sound bounds over the whole box of at least layers ``0 .. top`` (every leaf is part of
        the box, so they hold on each leaf).
    top : the highest layer to bound.
    tighten : also bound each neuron of layers ``1 .. top - 1`` on each leaf it is unstable on
        by CROWN through the leaf's own (so tightened) bounds of the layers below, before its
        ReLU is relaxed (:func:`_tighten_rows`): several times the cost of the forward pass,
        and on a deep net far tighter bounds of the layers above (see "Tightening").

    Returns
    -------
    bounds : per layer ``0 .. top``, ``(lo, hi)`` of shape ``(n_j, B)``: the forms' extremes
        intersected with interval propagation and ``outer``.
    shares : per layer below ``top``, ``(n_j, n, B)``: how much of neuron ``y_j``'s range on the
        leaf each input dimension makes (``|c_m| w_m`` normalised over ``m``, ``c`` the
        coefficients of ``M``, ``w`` the leaf's widths): where a split narrows it most.
    """
    batch, n = lower.shape
    widest = max(layer.out_features for layer in net.layers[: top + 1])
    chunk = max(_CACHE_VALUES // (widest * (n + 1)), 1)
    if batch > chunk:  # leaves are independent; their forms stay in cache a chunk at a time
        parts = [
            leaf_bounds(net, lower[s : s + chunk], upper[s : s + chunk], outer, top, tighten)
            for s in range(0, batch, chunk)
        ]
        bounds = [
            tuple(np.concatenate([part[0][j][end] for part in parts], axis=1) for end in (0, 1))
            for j in range(top + 1)
        ]
        shares = [np.concatenate([part[1][j] for part in parts], axis=2) for j in range(top)]
        return bounds, shares
    centre, radius = (lower + upper).T / 2.0, (upper - lower).T / 2.0
    first = net.layers[0]
    middle = np.concatenate([first.weight, first.bias[:, None]], axis=1)[:, :, None]
    half = np.zeros_like(middle)
    prev_lo, prev_hi = lower.T, upper.T
    bounds: list[tuple[np.ndarray, np.ndarray]] = []
    shares: list[np.ndarray] = []
    for j in range(top + 1):
        layer = net.layers[j]
        if j > 0:
            shape = (layer.out_features, n + 1, batch)
            middle = (layer.weight @ middle.reshape(middle.shape[0], -1)).reshape(shape)
            half = (np.abs(layer.weight) @ half.reshape(half.shape[0], -1)).reshape(shape)
            middle[:, n] += layer.bias[:, None]
        upper_form, lower_form = middle + half, middle - half
        upper_min, upper_max = _extremes(upper_form, centre, radius)
        lower_min, lower_max = _extremes(lower_form, centre, radius)
        mid = layer.weight @ ((prev_lo + prev_hi) / 2.0) + layer.bias[:, None]
        spread = np.abs(layer.weight) @ ((prev_hi - prev_lo) / 2.0)
        hi = np.minimum(np.minimum(upper_max, mid + spread), outer[j].upper[:, None])
        lo = np.maximum(np.maximum(lower_min, mid - spread), outer[j].lower[:, None])
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)  # a rounding-level crossing stays ordered
        bounds.append((lo, hi))
        if j == top:
            break
        if tighten and j > 0 and layer.relu:
            lo, hi = bounds[j] = _tighten_rows(net, bounds, j, lower, upper)
        shape = (layer.out_features, n + 1, batch)
        dependence = np.abs(middle[:, :n]) * (2.0 * radius)
        shares.append(dependence / np.maximum(dependence.sum(axis=1, keepdims=True), 1e-300))
        if layer.relu:
            known_active, known_inactive = lo >= 0.0, hi <= 0.0
            upper_slope = np.where(known_active, 1.0, _relu_slopes(upper_min, upper_max))
            lower_slope = np.where(known_active, 1.0, _relu_slopes(lower_min, lower_max))
            upper_slope[known_inactive] = lower_slope[known_inactive] = 0.0
            relaxed = (upper_slope > 0.0) & (upper_slope < 1.0)
            # in place: both forms are this layer's own arrays (fewer large temporaries)
            if upper_form.shape[2] != batch:  # the first layer's forms are every leaf's
                upper_form, lower_form = (
                    np.repeat(f, batch, axis=2) for f in (upper_form, lower_form)
                )
            upper_form *= upper_slope[:, None, :]
            upper_form[:, n] -= np.where(relaxed, upper_slope * upper_min, 0.0)
            lower_form *= lower_slope[:, None, :]
            middle = upper_form + lower_form
            middle *= 0.5
            half = np.subtract(upper_form, lower_form, out=upper_form)
            half *= 0.5
            prev_lo, prev_hi = np.maximum(lo, 0.0), np.maximum(hi, 0.0)
        else:
            middle = np.broadcast_to(middle, shape)
            half = np.broadcast_to(half, shape)
            prev_lo, prev_hi = lo, hi
    return bounds, shares


def _tighten_rows(
    net: Network,
    bounds: list[tuple[np.ndarray, np.ndarray]],
    j: int,
    lower: np.ndarray,
    upper: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Layer j's leaf bounds intersected with CROWN's for each neuron unstable on the leaf.

    CROWN (adaptive lower lines) back-substitutes the neuron's row through the leaf's bounds of
    the layers below (:func:`back_substitute`), both signs at once; every bound stays sound, so
    the intersection is. Only the (leaf, neuron) pairs with ``l < 0 < u`` are bounded: a
    stable neuron's relaxation is exact whatever its bounds, and a leaf's bounds then do not
    depend on the other leaves of its batch (so neither on the batch's chunks nor on ``jobs``).
    """
    lo, hi = bounds[j]
    leaf, neuron = np.nonzero(((lo < 0.0) & (hi > 0.0)).T)  # leaf by leaf
    if not neuron.size:
        return lo, hi
    layer = net.layers[j]
    # in chunks of pairs whose (pairs, 2, width) arrays stay in cache: the passes of the
    # back-substitution are bound by memory traffic (on ACAS Xu, 3x faster than all at once);
    # a chunk's pairs belong to a run of consecutive leaves, whose relaxations alone it needs
    widest = max(below.in_features for below in net.layers[:j])
    chunk = max(_CACHE_VALUES // (2 * widest), 1)
    value = np.empty((neuron.size, 2))
    for first in range(0, neuron.size, chunk):
        part = slice(first, first + chunk)
        rows, owner = layer.weight[neuron[part]], leaf[part]
        start, stop = owner[0], owner[-1] + 1
        below = [(lo_i[:, start:stop], hi_i[:, start:stop]) for lo_i, hi_i in bounds[:j]]
        bias = layer.bias[neuron[part]]
        coeffs, const, _ = back_substitute(
            net,
            below,
            None,
            j,
            np.stack([rows, -rows], axis=1),
            np.stack([bias, -bias], axis=1),
            owner=owner - start,
        )
        value[part] = leaf_alpha.maximum_over_leaf(coeffs, const, lower[owner], upper[owner])
    lo, hi = lo.copy(), hi.copy()
    hi[neuron, leaf] = np.minimum(hi[neuron, leaf], value[:, 0])
    lo[neuron, leaf] = np.maximum(lo[neuron, leaf], -value[:, 1])
    return np.minimum(lo, hi), np.maximum(lo, hi)


def direction_bounds(
    net: Network,
    lower: np.ndarray,
    upper: np.ndarray,
    outer: list[LayerBounds],
    top: int,
    asked: np.ndarray,
    layers: np.ndarray,
    neurons: np.ndarray,
    signs: np.ndarray,
    targets: np.ndarray | None = None,
    open_pairs: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per leaf, bounds on ``s * y`` of the ``asked`` directions, and where to split for them.

    Returns ``values (B, R)``, the smaller of the forward bound and CROWN (back-substitution of
    the row through each leaf's own relaxations, :func:`back_substitute`). CROWN runs with the
    adaptive lower ReLU lines and again with every unstable neuron's lower line ``h >= a y``
    chosen by each rule of ``_LOWER_LINES`` (a fixed slope, or ``"chord"``: ``a = u / (u - l)``,
    parallel to the upper line; sound for any ``a`` in ``[0, 1]``: a cheap α-CROWN step; only with
    at least ``LOWER_LINES_MIN_INPUTS`` input features, where a split narrows a leaf less), and
    each (leaf, row) keeps the smallest bound; ``coeffs (B, R, n)``,
    the input coefficients of that linear bound (its maximising vertex is a witness candidate);
    ``scores (B, R, n)``, how much of each row's bound each input dimension accounts for. With
    ``targets (B, R)`` (the bounds each (leaf, row) must reach, ``inf`` where none) the leaves'
    intermediate bounds are CROWN-tightened first (:func:`leaf_bounds`), and a leaf that still
    misses targets, each by at most ``ALPHA_GATE`` of the row's gap to its value at the leaf's
    centre, gets α-CROWN (:func:`onnx_exact.bounds.leaf_alpha.bound_rows`) for those rows;
    ``tried (B,)`` says which leaves did.

    With ``open_pairs (B, R)`` (which directions are still open on which leaf) CROWN runs only on
    the open (leaf, row) pairs when they are at most ``PAIR_DENSITY`` of the batch: a leaf of a
    layer with many open directions holds few of them (2-input ring2d: 40 %). The other pairs
    get the forward bound, zero coefficients and zero scores: their values are never read.
    """
    # leaves are independent: a chunk at a time, the (leaves, rows, width) arrays of CROWN
    # stay in cache
    widest = max(layer.out_features for layer in net.layers[: top + 1])
    chunk = max(_ROW_CACHE_VALUES // (asked.size * widest), 16)
    if lower.shape[0] > chunk:
        parts = [
            direction_bounds(
                net,
                lower[s : s + chunk],
                upper[s : s + chunk],
                outer,
                top,
                asked,
                layers,
                neurons,
                signs,
                None if targets is None else targets[s : s + chunk],
                None if open_pairs is None else open_pairs[s : s + chunk],
            )
            for s in range(0, lower.shape[0], chunk)
        ]
        return tuple(np.concatenate(part) for part in zip(*parts, strict=True))
    bounds, shares = leaf_bounds(net, lower, upper, outer, top, targets is not None)
    batch, n = lower.shape
    tried = np.zeros(batch, dtype=bool)
    values = np.empty((batch, asked.size))
    coeffs = np.empty((batch, asked.size, n))
    scores = np.empty((batch, asked.size, n))
    width = upper - lower
    for k in np.unique(layers[asked]):
        columns = np.flatnonzero(layers[asked] == k)
        i, sign = neurons[asked][columns], signs[asked][columns].astype(np.float64)
        lo, hi = bounds[k]
        forward = np.where(sign > 0, hi[i].T, -lo[i].T)
        row_weight = sign[:, None] * net.layers[k].weight[i]
        start = np.broadcast_to(row_weight, (batch, *row_weight.shape))
        start_const = np.broadcast_to(sign * net.layers[k].bias[i], (batch, i.size))
        wanted = None if open_pairs is None else open_pairs[:, columns]
        if wanted is not None and wanted.mean() <= PAIR_DENSITY:
            leaf, column = np.nonzero(wanted)
            values[:, columns] = forward
            coeffs[:, columns] = scores[:, columns] = 0.0
            if leaf.size:
                crown, row_coeffs, slack = _crown_rows(
                    net,
                    bounds,
                    shares,
                    int(k),
                    row_weight[column][:, None, :],
                    start_const[leaf, column][:, None],
                    lower,
                    upper,
                    leaf,
                )
                values[leaf, columns[column]] = np.minimum(forward[leaf, column], crown[:, 0])
                coeffs[leaf, columns[column]] = row_coeffs[:, 0]
                scores[leaf, columns[column]] = (
                    slack[:, 0] + np.abs(row_coeffs[:, 0]) * width[leaf] / 2.0
                )
        else:
            crown, row_coeffs, slack = _crown_rows(
                net, bounds, shares, int(k), start, start_const, lower, upper
            )
            values[:, columns] = np.minimum(forward, crown)
            coeffs[:, columns] = row_coeffs
            scores[:, columns] = slack + np.abs(row_coeffs) * width[:, None, :] / 2.0
        if targets is None or k == 0:
            continue
        missed = values[:, columns] > targets[:, columns]
        centre = sign * net.preactivations((lower + upper) / 2.0)[k][:, i]
        hopeless = missed & (values[:, columns] > ALPHA_GATE * (values[:, columns] - centre))
        stuck = np.flatnonzero(missed.any(axis=1) & ~hopeless.any(axis=1))
        tried[stuck] = True
        if stuck.size:
            below = [(lo_j[:, stuck], hi_j[:, stuck]) for lo_j, hi_j in bounds[:k]]
            found, found_coeffs = leaf_alpha.bound_rows(
                net,
                below,
                lower[stuck],
                upper[stuck],
                int(k),
                start[stuck],
                start_const[stuck],
                missed[stuck],
            )
            cells = np.ix_(stuck, columns)
            better = found < values[cells]
            values[cells] = np.where(better, found, values[cells])
            coeffs[cells] = np.where(better[:, :, None], found_coeffs, coeffs[cells])
    return values, coeffs, scores, tried


def _crown_rows(
    net: Network,
    bounds: list[tuple[np.ndarray, np.ndarray]],
    shares: list[np.ndarray],
    layer: int,
    start: np.ndarray,
    start_const: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    owner: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CROWN's bound of the rows ``start . h + start_const``, the smallest over the adaptive
    lower lines and those of ``_LOWER_LINES`` (with enough inputs): the bounds ``(B, R)``, their
    input coefficients ``(B, R, n)`` and the adaptive pass's slack by input dimension
    (:func:`back_substitute`; with ``owner``, one entry per (leaf, row) pair, ``B`` the pairs)."""
    low, high = (lower, upper) if owner is None else (lower[owner], upper[owner])
    row_coeffs, const, slack = back_substitute(
        net, bounds, shares, layer, start, start_const, owner=owner
    )
    crown = leaf_alpha.maximum_over_leaf(row_coeffs, const, low, high)
    for lower_choice in _LOWER_LINES if lower.shape[1] >= LOWER_LINES_MIN_INPUTS else ():
        found, found_const, _ = back_substitute(
            net, bounds, None, layer, start, start_const, lower_choice, owner
        )
        found_crown = leaf_alpha.maximum_over_leaf(found, found_const, low, high)
        better = found_crown < crown
        crown = np.where(better, found_crown, crown)
        row_coeffs = np.where(better[:, :, None], found, row_coeffs)
    return crown, row_coeffs, slack


def back_substitute(
    net: Network,
    bounds: list[tuple[np.ndarray, np.ndarray]],
    shares: list[np.ndarray] | None,
    layer: int,
    coeffs: np.ndarray,
    const: np.ndarray,
    lower_choice: float | str | None = None,
    owner: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """CROWN for ``R`` rows ``coeffs (B, R, n_{layer-1}) . h_{layer-1} + const`` on ``B`` leaves.

    Each ReLU with ``l < 0 < u`` on a leaf takes the triangle's upper line where the row's
    coefficient is positive and the adaptive lower line (``h >= y`` if ``u > -l``, else
    ``h >= 0``) where it is negative, as in :func:`onnx_exact.bounds.relu_relaxation`, or, with
    ``lower_choice`` given, for every unstable neuron the lower line of that slope (a float in
    ``[0, 1]``) or parallel to its upper line (``"chord"``, slope ``u / (u - l)``). Besides the
    input coefficients and constants of the linear upper bounds, returns their *slack by input
    dimension* ``(B, R, n)``: every relaxed neuron's largest gap (``-a l`` for the upper line,
    ``min(-l, u)`` for the lower one) times the row's coefficient magnitude, spread over the
    input dimensions by the neuron's ``shares``. Splitting the dimension that carries the most
    slack narrows the relaxed neurons most; the linear part alone (``|c_m| w_m``) misses a
    dimension the bound does not depend on linearly but whose width keeps neurons unstable.
    With ``shares`` None the slack is not computed (returned as None). With ``owner`` given,
    ``coeffs`` and ``const`` have one entry per *pair* instead, ``owner (P,)`` its leaf in
    ``bounds``: each leaf's relaxation is computed once and gathered for its pairs.
    """
    batch, rows = coeffs.shape[:2]
    # the rows are over the input itself when ``layer`` is 0 (no shares below it)
    inputs = shares[0].shape[1] if shares else coeffs.shape[2]
    slack = None if shares is None else np.zeros((batch, rows, inputs))
    for j in range(layer - 1, -1, -1):
        lo, hi = bounds[j][0].T, bounds[j][1].T
        if net.layers[j].relu:
            unstable = (lo < 0.0) & (hi > 0.0)
            span = np.where(unstable, hi - lo, 1.0)
            upper_slope = np.where(unstable, hi / span, (lo >= 0.0).astype(np.float64))
            upper_intercept = np.where(unstable, -upper_slope * lo, 0.0)
            if lower_choice is None:
                adaptive = (hi > -lo).astype(np.float64)
            else:
                adaptive = upper_slope if lower_choice == "chord" else lower_choice
            lower_slope = np.where(unstable, adaptive, upper_slope)
            if owner is not None:
                upper_slope, upper_intercept = upper_slope[owner], upper_intercept[owner]
                lower_slope = lower_slope[owner]
            # upper line where the coefficient is positive, lower line where negative; written
            # with ``coeffs`` and its positive part only (fewer passes over the large arrays)
            positive = np.maximum(coeffs, 0.0)
            const = const + np.matmul(positive, upper_intercept[:, :, None])[:, :, 0]
            if slack is not None:
                lower_gap = np.where(unstable, np.minimum(-lo, hi), 0.0)
                if owner is not None:
                    lower_gap = lower_gap[owner]
                gaps = positive * (upper_intercept + lower_gap)[:, None, :]
                gaps -= coeffs * lower_gap[:, None, :]
                # a matrix product per leaf (einsum's loop over this contraction is ~20x slower)
                by_leaf = shares[j].transpose(2, 0, 1)
                slack += np.matmul(gaps, by_leaf if owner is None else by_leaf[owner])
            positive *= (upper_slope - lower_slope)[:, None, :]
            coeffs = coeffs * lower_slope[:, None, :]
            coeffs += positive
        weight, bias = net.layers[j].weight, net.layers[j].bias
        flat = coeffs.reshape(batch * rows, -1)
        const = const + (flat @ bias).reshape(batch, rows)
        coeffs = (flat @ weight).reshape(batch, rows, -1)
    return coeffs, const, slack
