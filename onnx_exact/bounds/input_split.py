"""Batched input-space branch and bound: every open direction of every layer, few input features.

Why: a controller (ACAS Xu, an RL policy, a learned index) has a handful of inputs and is analysed
over its whole operating envelope. There, every relaxation of the whole box is loose, while the
network restricted to a small part of the input box is nearly linear: splitting the *input* box
makes the bounds exact in the limit, and with ``n`` inputs a leaf of depth ``d`` is only ``2^-d/n``
of the box wide in each dimension. Thousands of leaves are bounded at once by array operations.

Directions
----------
A direction ``(k, i, s)`` asks "can ``s * y_{k,i}`` be ``> 0`` on the box?". Each leaf (a sub-box
``lower[b] <= x <= upper[b]``) carries the directions still open on it. A direction is *closed* on
a leaf when the leaf's sound bound clears its margin, ``max s * y_{k,i} <= -margin``; it is *proved*
when no leaf holds it open (the closed leaves cover the box and the largest of their bounds,
``worst``, bounds it on the whole box); it is *refuted* as soon as a float64 forward pass of a point
of a leaf (its centre, or the vertex that maximises the direction's linear upper bound on the leaf)
shows ``s * y_{k,i} > 0`` strictly. A leaf whose open directions are all closed or refuted is
dropped; the others are halved and their halves inherit the directions still open.

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
bound closes most of its deep leaves. Elsewhere tightening costs more than the splits it saves.
So a search tightens every such leaf while tightening closes at least ``TIGHTEN_RATE`` (half)
of the leaves it is tried on (running mean), and otherwise only a sample of ``_TIGHTEN_PROBES``
leaves per batch, which keeps the rate measured as the leaves shrink. Why half: a halved leaf
that tightening closes with probability ``p`` leaves ``2 (1 - p)`` open children on average,
so from ``p = 1/2`` on the tightened tree stops growing, whatever the forward bound does.
A leaf the tightened bound leaves open gets α-CROWN for its open rows
(:mod:`onnx_exact.bounds.leaf_alpha`: lower ReLU lines optimised per (leaf, row)) if that is
likely to close it: every bound ``v`` still above its target is at most ``ALPHA_GATE`` times
the gap ``v - y_c`` to the row's value at the leaf's centre (α-CROWN removes up to about half
of that gap; the others seldom close). The tightening rate counts such a leaf as left open.
The proof of a direction does not depend on which leaves got which bound (all are sound).

Split choice: for each open direction of a leaf, the *slack by input dimension*: every relaxed
neuron's largest gap, weighted by the direction's CROWN coefficient on it, spread over the input
dimensions in proportion to ``|c_m| w_m`` of the neuron's own linear bound (``w`` the leaf's
widths), plus the direction's own ``|c_m| w_m / 2``. Normalised per direction and summed over the
leaf's open directions, the largest share picks the dimension halved at its midpoint (a
dimension the bound does not depend on linearly but whose width keeps neurons unstable is split
too). Leaves are taken best first: largest ``bound / margin`` over their open directions (where a
witness is most likely, and the bounds hardest to close).

Soundness: float64 throughout on the exact weights; a computed bound can be off by rounding of the
order of ``1e-16`` times the magnitudes involved, which the caller's margin (``1e-12 * s_i``, see
:mod:`onnx_exact.stability`) covers. A leaf of zero width in its split dimension cannot be halved:
the directions it holds open are given up (left open), never proved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from onnx_exact import parallel
from onnx_exact.bounds import leaf_alpha
from onnx_exact.bounds.crown import LayerBounds
from onnx_exact.core.network import Network

LEAF_BATCH = 4096  # leaves bounded together at most
_BATCH_VALUES = 2e7  # float64 values of one layer's pair of linear forms, at most (~160 MB)
_PART_LEAVES = 256  # leaves per worker's part of a batch, at least
_CACHE_VALUES = 100_000  # pairs x 2 x width of one tightening back-substitution, at most
_ROW_CACHE_VALUES = 300_000  # leaves x rows x width of one CROWN of the asked rows, at most
TIGHTEN_RATE = 0.5  # share of tightened leaves closed above which every open leaf is tightened
_TIGHTEN_PROBES = 64  # open leaves per batch tightened below it (the rate stays measured)
ALPHA_GATE = 0.5  # α-CROWN for a leaf whose every missed bound v has v <= this * (v - centre)
_CANDIDATES_PER_LEAF = 4  # forward-passed points per bounded leaf with open directions, at most
# CROWN lower ReLU lines tried per row besides the adaptive one: a slope in [0, 1], or "chord"
# (every unstable neuron's lower line parallel to its upper line, slope u / (u - l))
_LOWER_LINES: tuple[float | str, ...] = ("chord",)


@dataclass
class SplitOutcome:
    """What :func:`decide_directions` established, per direction asked (aligned arrays ``(D,)``).

    ``proved``: closed on every leaf of a cover of the box, ``worst`` (the largest leaf bound on
    ``s * y``) then bounds it on the box. ``refuted``: a point of the box shows the sign strictly;
    ``witnesses`` holds one such point per refuted direction (network space, duplicates removed).
    ``leaves``: leaves bounded. Directions neither proved nor refuted were open when the leaf
    budget or the deadline ran out, or could not be split further.
    """

    proved: np.ndarray
    refuted: np.ndarray
    worst: np.ndarray
    witnesses: np.ndarray
    leaves: int


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
    tighten : also bound every neuron of layers ``1 .. top - 1`` that is unstable on some leaf
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
    the layers below (:func:`_back_substitute`), both signs at once; every bound stays sound, so
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
        coeffs, const, _ = _back_substitute(
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


def batch_size(net: Network, top: int) -> int:
    """Leaves per batch: a layer's pair of linear forms stays within ``_BATCH_VALUES`` values."""
    widest = max(layer.out_features for layer in net.layers[: top + 1])
    per_leaf = 2 * widest * (net.in_features + 1)
    return int(np.clip(_BATCH_VALUES // per_leaf, 16, LEAF_BATCH))


def decide_directions(
    net: Network,
    lower: np.ndarray,
    upper: np.ndarray,
    outer: list[LayerBounds],
    layers: np.ndarray,
    neurons: np.ndarray,
    signs: np.ndarray,
    margins: np.ndarray,
    *,
    max_leaves: int,
    deadline: float = np.inf,
    jobs: int = 1,
) -> SplitOutcome:
    """Branch and bound over the input box for the directions ``(layers, neurons, signs)``.

    One call of a fresh :class:`InputSearch` (see there for the arguments).
    """
    search = InputSearch(net, lower, upper, outer, layers, neurons, signs, margins, jobs=jobs)
    return search.run(max_leaves, deadline)


class InputSearch:
    """A resumable branch and bound over the input box for some directions of a network.

    Parameters
    ----------
    net : the network (network space).
    lower, upper : ``(n,)`` the box.
    outer : sound bounds of every layer up to the highest asked over the whole box; copied, and
        tightened (on the copy) by each direction proved on the way, so later leaves use them.
    layers, neurons, signs : ``(D,)`` the directions (signs ``+1`` / ``-1``).
    margins : ``(D,)`` what a leaf bound must clear, ``max s * y <= -margin``.
    jobs : with ``jobs >= 2`` a batch's leaves are bounded in that many parts in the run's worker
        pool (:func:`onnx_exact.parallel.worker_pool`); a leaf's bounds do not depend on the part
        it is in, so the outcome is the same for any ``jobs``.

    :meth:`run` continues where the previous call stopped (the open leaves are kept), so a
    caller can give a search its budget in instalments. Deterministic for given arguments and
    budgets (no randomness; time matters only where the deadline stops a call).
    """

    def __init__(
        self,
        net: Network,
        lower: np.ndarray,
        upper: np.ndarray,
        outer: list[LayerBounds],
        layers: np.ndarray,
        neurons: np.ndarray,
        signs: np.ndarray,
        margins: np.ndarray,
        *,
        jobs: int = 1,
    ) -> None:
        self.net, self.jobs = net, jobs
        self.layers = np.asarray(layers, dtype=np.int64)
        self.neurons = np.asarray(neurons, dtype=np.int64)
        self.signs = np.asarray(signs, dtype=np.int64)
        self.margins = np.asarray(margins, dtype=np.float64)
        self.outer = [bound.copy() for bound in outer]
        count = self.layers.size
        self.proved, self.refuted = np.zeros(count, dtype=bool), np.zeros(count, dtype=bool)
        self.dropped = np.zeros(count, dtype=bool)  # given up, or no longer asked by the caller
        self.worst = np.full(count, -np.inf)
        self.extent = np.where(upper > lower, upper - lower, 1.0)
        self.lower = np.asarray(lower, dtype=np.float64)[None, :].copy()
        self.upper = np.asarray(upper, dtype=np.float64)[None, :].copy()
        self.open = np.ones((1, count), dtype=bool)
        self.priority = np.full(1, np.inf)
        self.tightening = 0.0  # running share of tightened leaves that tightening closed
        self.worker = None

    def run(
        self, max_leaves: int, deadline: float = np.inf, asked: np.ndarray | None = None
    ) -> SplitOutcome:
        """Bound at most ``max_leaves`` more leaves before ``deadline`` (``time.monotonic()``).

        ``asked`` (``(D,)`` bool, optional): the directions the caller still wants; the others
        (settled elsewhere) are dropped from every leaf for good and never reported proved.
        Returns the cumulative verdicts, with the witnesses and leaves of this call only.
        """
        if asked is not None:
            self.dropped |= ~np.asarray(asked, dtype=bool)
        net, layers, neurons, signs = self.net, self.layers, self.neurons, self.signs
        margins, outer, n = self.margins, self.outer, self.lower.shape[1]
        scale = np.maximum(margins, 1e-300)
        executor = None
        if self.jobs > 1 and parallel.can_start_workers():
            executor = parallel.worker_pool(self.jobs)
        witnesses: list[np.ndarray] = []
        spent = 0
        while layers.size and spent < max_leaves and time.monotonic() < deadline:
            self.open &= ~(self.proved | self.refuted | self.dropped)
            keep = self.open.any(axis=1)
            self.lower, self.upper = self.lower[keep], self.upper[keep]
            self.open, self.priority = self.open[keep], self.priority[keep]
            if not self.priority.size:
                break
            top = int(layers[self.open.any(axis=0)].max())
            size = min(batch_size(net, top), max_leaves - spent)
            chosen = np.zeros(self.priority.size, dtype=bool)
            if self.priority.size > size:
                chosen[np.argpartition(-self.priority, size - 1)[:size]] = True
            else:
                chosen[:] = True
            b_lower, b_upper, b_open = self.lower[chosen], self.upper[chosen], self.open[chosen]
            self.lower, self.upper = self.lower[~chosen], self.upper[~chosen]
            self.open, self.priority = self.open[~chosen], self.priority[~chosen]
            spent += b_open.shape[0]

            rows = np.flatnonzero(b_open.any(axis=0))
            values, coeffs, scores, _ = self._bound(executor, b_lower, b_upper, top, rows)
            was_open = b_open[:, rows]
            closed = was_open & (values <= -margins[rows])
            again = np.flatnonzero((was_open & ~closed).any(axis=1))
            if top > 1 and again.size:
                if self.tightening < TIGHTEN_RATE:  # a sample keeps the rate measured
                    again = again[:: max(again.size // _TIGHTEN_PROBES, 1)]
                targets = np.where(was_open[again], -margins[rows], np.inf)
                tight = self._bound(executor, b_lower[again], b_upper[again], top, rows, targets)
                values[again] = np.minimum(values[again], tight[0])
                coeffs[again], scores[again] = tight[1], tight[2]
                closed = was_open & (values <= -margins[rows])
                # the rate of tightening alone: a leaf that got α-CROWN was left open by it
                rate = 1.0 - ((was_open[again] & ~closed[again]).any(axis=1) | tight[3]).mean()
                self.tightening = (self.tightening + rate) / 2.0
            self.worst[rows] = np.maximum(
                self.worst[rows], np.where(closed, values, -np.inf).max(axis=0)
            )
            still = was_open & ~closed
            busy = still.any(axis=1)
            if busy.any():
                b_lower, b_upper, still = b_lower[busy], b_upper[busy], still[busy]
                values, coeffs, scores = values[busy], coeffs[busy], scores[busy]
                points = _candidates(b_lower, b_upper, still, values / scale[rows], coeffs)
                shown, first = _signs_shown(net, points, layers[rows], neurons[rows], signs[rows])
                newly = shown & ~self.refuted[rows]
                if newly.any():
                    self.refuted[rows[newly]] = True
                    witnesses.append(points[np.unique(first[newly])])
                still &= ~shown[None, :]
                busy = still.any(axis=1)
                b_lower, b_upper, still = b_lower[busy], b_upper[busy], still[busy]
                values, scores = values[busy], scores[busy]
            if b_lower.shape[0]:
                left_upper, right_lower, stuck = _halves(
                    b_lower, b_upper, still, scores, self.extent
                )
                self.dropped[rows[still[stuck].any(axis=0)]] = True
                grow = ~stuck
                child_open = np.zeros((int(grow.sum()), layers.size), dtype=bool)
                child_open[:, rows] = still[grow]
                child_priority = np.where(still[grow], values[grow] / scale[rows], -np.inf)
                child_priority = child_priority.max(axis=1)
                self.lower = np.concatenate([self.lower, b_lower[grow], right_lower[grow]])
                self.upper = np.concatenate([self.upper, left_upper[grow], b_upper[grow]])
                self.open = np.concatenate([self.open, child_open, child_open])
                self.priority = np.concatenate([self.priority, child_priority, child_priority])
            done = ~(self.proved | self.refuted | self.dropped) & ~self.open.any(axis=0)
            if done.any():
                self.proved |= done
                _tighten(outer, layers[done], neurons[done], signs[done], self.worst[done])
                self.worker = None  # the workers need the tightened bounds
        points = np.concatenate(witnesses) if witnesses else np.empty((0, n))
        return SplitOutcome(
            self.proved.copy(), self.refuted.copy(), self.worst.copy(), points, spent
        )

    def _bound(
        self,
        executor,
        lower: np.ndarray,
        upper: np.ndarray,
        top: int,
        rows: np.ndarray,
        targets: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:func:`_direction_bounds` of a batch, in parts on the worker pool when it is large
        (tightened, with α-CROWN where ``targets`` are missed, when they are given)."""
        parts = min(self.jobs, lower.shape[0] // _PART_LEAVES) if executor is not None else 1
        context = (self.net, self.outer, self.layers, self.neurons, self.signs)
        if parts < 2:
            return _direction_bounds(
                self.net, lower, upper, self.outer, top, rows, *context[2:], targets
            )
        if self.worker is None:
            self.worker = parallel.with_context(_bounds_in_worker, parallel.TaskContext(context))
        pieces = np.array_split(np.arange(lower.shape[0]), parts)
        results = list(
            executor.map(
                self.worker,
                [lower[piece] for piece in pieces],
                [upper[piece] for piece in pieces],
                [top] * parts,
                [rows] * parts,
                [None if targets is None else targets[piece] for piece in pieces],
            )
        )
        return tuple(np.concatenate(part) for part in zip(*results, strict=True))


def _bounds_in_worker(
    context: tuple,
    lower: np.ndarray,
    upper: np.ndarray,
    top: int,
    asked: np.ndarray,
    targets: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_direction_bounds` for part of a batch, in a worker of the run's pool."""
    net, outer, layers, neurons, signs = context
    return _direction_bounds(net, lower, upper, outer, top, asked, layers, neurons, signs, targets)


def _direction_bounds(
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
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per leaf, bounds on ``s * y`` of the ``asked`` directions, and where to split for them.

    Returns ``values (B, R)``, the smaller of the forward bound and CROWN (back-substitution of
    the row through each leaf's own relaxations, :func:`_back_substitute`). CROWN runs with the
    adaptive lower ReLU lines and again with every unstable neuron's lower line ``h >= a y``
    chosen by each rule of ``_LOWER_LINES`` (a fixed slope, or ``"chord"``: ``a = u / (u - l)``,
    parallel to the upper line; sound for any ``a`` in ``[0, 1]``: a cheap α-CROWN step), and
    each (leaf, row) keeps the smallest bound; ``coeffs (B, R, n)``,
    the input coefficients of that linear bound (its maximising vertex is a witness candidate);
    ``scores (B, R, n)``, how much of each row's bound each input dimension accounts for. With
    ``targets (B, R)`` (the bounds each (leaf, row) must reach, ``inf`` where none) the leaves'
    intermediate bounds are CROWN-tightened first (:func:`leaf_bounds`), and a leaf that still
    misses targets, each by at most ``ALPHA_GATE`` of the row's gap to its value at the leaf's
    centre, gets α-CROWN (:func:`onnx_exact.bounds.leaf_alpha.bound_rows`) for those rows;
    ``tried (B,)`` says which leaves did.
    """
    # leaves are independent: a chunk at a time, the (leaves, rows, width) arrays of CROWN
    # stay in cache
    widest = max(layer.out_features for layer in net.layers[: top + 1])
    chunk = max(_ROW_CACHE_VALUES // (asked.size * widest), 16)
    if lower.shape[0] > chunk:
        parts = [
            _direction_bounds(
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
        row_coeffs, const, slack = _back_substitute(net, bounds, shares, int(k), start, start_const)
        crown = leaf_alpha.maximum_over_leaf(row_coeffs, const, lower, upper)
        for lower_choice in _LOWER_LINES:
            found, found_const, _ = _back_substitute(
                net, bounds, None, int(k), start, start_const, lower_choice
            )
            found_crown = leaf_alpha.maximum_over_leaf(found, found_const, lower, upper)
            better = found_crown < crown
            crown = np.where(better, found_crown, crown)
            row_coeffs = np.where(better[:, :, None], found, row_coeffs)
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


def _back_substitute(
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
                slack += np.matmul(gaps, shares[j].transpose(2, 0, 1))
            positive *= (upper_slope - lower_slope)[:, None, :]
            coeffs = coeffs * lower_slope[:, None, :]
            coeffs += positive
        weight, bias = net.layers[j].weight, net.layers[j].bias
        flat = coeffs.reshape(batch * rows, -1)
        const = const + (flat @ bias).reshape(batch, rows)
        coeffs = (flat @ weight).reshape(batch, rows, -1)
    return coeffs, const, slack


def _candidates(
    lower: np.ndarray, upper: np.ndarray, still: np.ndarray, rank: np.ndarray, coeffs: np.ndarray
) -> np.ndarray:
    """Points to forward-pass: every leaf's centre, then the maximising vertices of the linear
    upper bounds of its open directions, the most promising first (largest normalised bound), at
    most ``_CANDIDATES_PER_LEAF`` points per leaf in all."""
    centres = (lower + upper) / 2.0
    budget = (_CANDIDATES_PER_LEAF - 1) * lower.shape[0]
    leaf, column = np.nonzero(still)
    if leaf.size > budget:
        order = np.argpartition(-rank[leaf, column], budget - 1)[:budget]
        leaf, column = leaf[np.sort(order)], column[np.sort(order)]
    vertices = np.where(coeffs[leaf, column] > 0.0, upper[leaf], lower[leaf])
    return np.concatenate([centres, vertices])


def _signs_shown(
    net: Network, points: np.ndarray, layers: np.ndarray, neurons: np.ndarray, signs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Which directions some point shows strictly (float64 forward pass), and the first such point."""
    shown = np.zeros(layers.size, dtype=bool)
    first = np.zeros(layers.size, dtype=np.int64)
    h = points
    for k, layer in enumerate(net.layers[: int(layers.max()) + 1]):
        y = layer.apply(h)
        columns = np.flatnonzero(layers == k)
        if columns.size:
            signed = y[:, neurons[columns]] * signs[columns]
            positive = signed > 0.0
            shown[columns] = positive.any(axis=0)
            first[columns] = np.argmax(positive, axis=0)
        h = np.maximum(y, 0.0) if layer.relu else y
    return shown, first


def _halves(
    lower: np.ndarray, upper: np.ndarray, still: np.ndarray, scores: np.ndarray, extent: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each leaf halved along the dimension with the largest share of its open bounds' slack.

    ``scores (B, R, n)`` say how much of each direction's bound each dimension accounts for; they
    are normalised per direction (every open direction weighs the same) and summed over the
    leaf's open directions. Returns the upper corner of the left halves, the lower corner of the
    right halves, and which leaves cannot be halved (their midpoint rounds onto an end point).
    """
    width = upper - lower
    share = scores / np.maximum(scores.sum(axis=2, keepdims=True), 1e-300)
    score = (share * still[:, :, None]).sum(axis=1)
    score = np.where(np.any(score > 0.0, axis=1, keepdims=True), score, width / extent)
    leaves = np.arange(lower.shape[0])
    dim = np.argmax(score, axis=1)
    middle = (lower[leaves, dim] + upper[leaves, dim]) / 2.0
    stuck = ~((middle > lower[leaves, dim]) & (middle < upper[leaves, dim]))
    left_upper, right_lower = upper.copy(), lower.copy()
    left_upper[leaves, dim] = middle
    right_lower[leaves, dim] = middle
    return left_upper, right_lower, stuck


def _tighten(
    outer: list[LayerBounds],
    layers: np.ndarray,
    neurons: np.ndarray,
    signs: np.ndarray,
    worst: np.ndarray,
) -> None:
    """Intersect the whole-box bounds with what the proved directions established (kept ordered)."""
    for k, i, sign, value in zip(layers, neurons, signs, worst, strict=True):
        bound = outer[k]
        if sign > 0:
            bound.upper[i] = max(min(bound.upper[i], value), bound.lower[i])
        else:
            bound.lower[i] = min(max(bound.lower[i], -value), bound.upper[i])
