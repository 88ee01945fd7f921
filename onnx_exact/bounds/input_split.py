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
A direction still open keeps ``covered``, the fraction of the box's volume on which its closed
leaves prove it (the leaves are disjoint, so their volumes add up): what is left to prove when a
budget runs out, since a leaf count says little when the box has many leaves to its proof.

Bounds of a batch of leaves: :mod:`onnx_exact.bounds.leaf_crown` (forward linear relaxation,
CROWN for the asked rows; with targets, CROWN-tightened intermediate bounds and α-CROWN where
that is likely to close a leaf).

When to tighten: tightening costs several times the forward bound. On a deep net it closes most
of the deep leaves the forward bound cannot; elsewhere it costs more than the splits it saves.
So a search tightens every leaf the forward bound leaves open while tightening closes at least
``TIGHTEN_RATE`` (half) of the leaves it is tried on (running mean), and otherwise only a sample
of ``_TIGHTEN_PROBES`` leaves per batch, which keeps the rate measured as the leaves shrink. Why
half: a halved leaf that tightening closes with probability ``p`` leaves ``2 (1 - p)`` open
children on average, so from ``p = 1/2`` on the tightened tree stops growing, whatever the
forward bound does. A leaf that got α-CROWN counts as left open by tightening. The proof of a
direction does not depend on which leaves got which bound (all are sound).

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
from onnx_exact.bounds import leaf_crown
from onnx_exact.bounds.crown import LayerBounds
from onnx_exact.core.network import Network

LEAF_BATCH = 4096  # leaves bounded together at most
_BATCH_VALUES = 2e7  # float64 values of one layer's pair of linear forms, at most (~160 MB)
_PART_LEAVES = 256  # leaves per worker's part of a batch, at least
TIGHTEN_RATE = 0.5  # share of tightened leaves closed above which every open leaf is tightened
_TIGHTEN_PROBES = 64  # open leaves per batch tightened below it (the rate stays measured)
_CANDIDATES_PER_LEAF = 4  # forward-passed points per bounded leaf with open directions, at most


@dataclass
class SplitOutcome:
    """What :func:`decide_directions` established, per direction asked (aligned arrays ``(D,)``).

    ``proved``: closed on every leaf of a cover of the box, ``worst`` (the largest leaf bound on
    ``s * y``) then bounds it on the box. ``refuted``: a point of the box shows the sign strictly;
    ``witnesses`` holds one such point per refuted direction (network space, duplicates removed).
    ``leaves``: leaves bounded. Directions neither proved nor refuted were open when the leaf
    budget or the deadline ran out, or could not be split further; ``covered`` is the fraction
    of the box's volume on which the closed leaves prove each direction (1 when proved).
    """

    proved: np.ndarray
    refuted: np.ndarray
    worst: np.ndarray
    witnesses: np.ndarray
    leaves: int
    covered: np.ndarray


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
        tightened (on the copy) by each direction proved on the way and by :meth:`refine`, so
        later leaves use them.
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
        self.flat = ~(np.asarray(upper) > np.asarray(lower))  # no volume along these dimensions
        self.covered = np.zeros(count)  # fraction of the box's volume closed, per direction
        self.pool = _LeafPool(lower, upper, count)
        self.tightening = 0.0  # running share of tightened leaves that tightening closed
        self.worker = None

    def refine(self, outer: list[LayerBounds]) -> None:
        """Intersect the search's whole-box bounds with other sound bounds of the same layers.

        Why: the caller's bounds tighten while a search waits for its next instalment (another
        layer's search proved some of its neurons stable); every leaf bounded afterwards
        starts from the tighter bounds, so fewer of its neurons are relaxed. Both are sound,
        so their intersection is; the verdicts already given stand.
        """
        changed = False
        for mine, theirs in zip(self.outer, outer, strict=False):
            tighter = mine.intersect(theirs)
            if not (
                np.array_equal(tighter.lower, mine.lower)
                and np.array_equal(tighter.upper, mine.upper)
            ):
                mine.lower, mine.upper = tighter.lower, tighter.upper
                changed = True
        if changed:
            self.worker = None  # the workers need the tightened bounds

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
        margins, outer, pool, n = self.margins, self.outer, self.pool, self.pool.lower.shape[1]
        scale = np.maximum(margins, 1e-300)
        executor = None
        if self.jobs > 1 and parallel.can_start_workers():
            executor = parallel.worker_pool(self.jobs)
        witnesses: list[np.ndarray] = []
        spent = 0
        while layers.size and spent < max_leaves and time.monotonic() < deadline:
            pool.forget(self.proved | self.refuted | self.dropped)
            if not pool.size:
                break
            top = int(layers[pool.counts > 0].max())
            size = min(batch_size(net, top), max_leaves - spent)
            b_lower, b_upper, b_open = pool.take(size)
            spent += b_open.shape[0]

            rows = np.flatnonzero(b_open.any(axis=0))
            was_open = b_open[:, rows]
            values, coeffs, scores, _ = self._bound(
                executor, b_lower, b_upper, top, rows, open_pairs=was_open
            )
            closed = was_open & (values <= -margins[rows])
            again = np.flatnonzero((was_open & ~closed).any(axis=1))
            if top > 1 and again.size:
                if self.tightening < TIGHTEN_RATE:  # a sample keeps the rate measured
                    again = again[:: max(again.size // _TIGHTEN_PROBES, 1)]
                targets = np.where(was_open[again], -margins[rows], np.inf)
                tight = self._bound(
                    executor, b_lower[again], b_upper[again], top, rows, targets, was_open[again]
                )
                values[again] = np.minimum(values[again], tight[0])
                coeffs[again], scores[again] = tight[1], tight[2]
                closed = was_open & (values <= -margins[rows])
                # the rate of tightening alone: a leaf that got α-CROWN was left open by it
                rate = 1.0 - ((was_open[again] & ~closed[again]).any(axis=1) | tight[3]).mean()
                self.tightening = (self.tightening + rate) / 2.0
            self.worst[rows] = np.maximum(
                self.worst[rows], np.where(closed, values, -np.inf).max(axis=0)
            )
            self.covered[rows] += _volume_shares(b_lower, b_upper, self.extent, self.flat) @ closed
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
                pool.add(
                    np.concatenate([b_lower[grow], right_lower[grow]]),
                    np.concatenate([left_upper[grow], b_upper[grow]]),
                    np.concatenate([child_open, child_open]),
                    np.concatenate([child_priority, child_priority]),
                )
            done = ~(self.proved | self.refuted | self.dropped) & (pool.counts == 0)
            if done.any():
                self.proved |= done
                _tighten(outer, layers[done], neurons[done], signs[done], self.worst[done])
                self.worker = None  # the workers need the tightened bounds
        points = np.concatenate(witnesses) if witnesses else np.empty((0, n))
        covered = np.where(self.proved, 1.0, np.minimum(self.covered, 1.0))
        return SplitOutcome(
            self.proved.copy(), self.refuted.copy(), self.worst.copy(), points, spent, covered
        )

    def _bound(
        self,
        executor,
        lower: np.ndarray,
        upper: np.ndarray,
        top: int,
        rows: np.ndarray,
        targets: np.ndarray | None = None,
        open_pairs: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:func:`onnx_exact.bounds.leaf_crown.direction_bounds` of a batch, in parts on the
        worker pool when it is large (tightened, with α-CROWN where ``targets`` are missed,
        when they are given; CROWN only on ``open_pairs`` when they are few)."""
        parts = min(self.jobs, lower.shape[0] // _PART_LEAVES) if executor is not None else 1
        context = (self.net, self.outer, self.layers, self.neurons, self.signs)
        if parts < 2:
            return leaf_crown.direction_bounds(
                self.net, lower, upper, self.outer, top, rows, *context[2:], targets, open_pairs
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
                [None if open_pairs is None else open_pairs[piece] for piece in pieces],
            )
        )
        return tuple(np.concatenate(part) for part in zip(*results, strict=True))


class _LeafPool:
    """The open leaves of a search: their boxes, open directions and priorities.

    Why a pool of its own: a long search holds millions of open leaves, and taking a batch or
    adding its children must cost in proportion to the batch, not to the pool (a copy of the
    whole pool per batch took a quarter of a long ACAS Xu search: docs/benchmarks.md). The
    arrays keep spare rows (doubled when full); a taken leaf's row is filled from the pool's
    end; children are appended. Leaves whose open directions were all decided are removed by
    :meth:`forget` only when a direction was decided since its last call. ``counts`` holds, per
    direction, the number of pool leaves that hold it open (exact for every direction not
    decided).
    """

    def __init__(self, lower: np.ndarray, upper: np.ndarray, directions: int) -> None:
        self._lower = np.asarray(lower, dtype=np.float64)[None, :].copy()
        self._upper = np.asarray(upper, dtype=np.float64)[None, :].copy()
        self._open = np.ones((1, directions), dtype=bool)
        self._priority = np.full(1, np.inf)
        self._born = np.zeros(1, dtype=np.int64)  # when each leaf was added: ties go oldest first
        self._added = 1
        self.size = 1
        self.counts = np.ones(directions, dtype=np.int64)
        self._decided = np.zeros(directions, dtype=bool)

    _FIELDS = ("_lower", "_upper", "_open", "_priority", "_born")  # one row per leaf each

    def _fields(self) -> list[np.ndarray]:
        return [getattr(self, name) for name in self._FIELDS]

    @property
    def lower(self) -> np.ndarray:
        """``(L, n)`` lower corners of the open leaves (a view)."""
        return self._lower[: self.size]

    @property
    def upper(self) -> np.ndarray:
        """``(L, n)`` upper corners of the open leaves (a view)."""
        return self._upper[: self.size]

    @property
    def open(self) -> np.ndarray:
        """``(L, D)`` which directions each open leaf holds open (a view)."""
        return self._open[: self.size]

    def forget(self, decided: np.ndarray) -> None:
        """Clear the ``decided`` directions from every leaf and drop the leaves left with none
        (a pass over the pool, only when a direction was decided since the last call)."""
        if not (decided & ~self._decided).any():
            return
        self._decided = decided.copy()
        live = self.open
        live &= ~decided
        keep = np.flatnonzero(live.any(axis=1))
        if keep.size < self.size:
            for rows in self._fields():
                rows[: keep.size] = rows[keep]
            self.size = keep.size
        self.counts = self.open.sum(axis=0)

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Remove the ``count`` leaves of highest priority (all of them when fewer; among equal
        priorities the oldest, so that a search whose leaves tie, as siblings do, goes breadth
        first) and return their ``lower, upper, open``, in pool order."""
        size = self.size
        if size > count:
            priority = self._priority[:size]
            threshold = np.partition(priority, size - count)[size - count]
            above = np.flatnonzero(priority > threshold)
            tied = np.flatnonzero(priority == threshold)
            need = count - above.size
            if tied.size > need:
                tied = tied[np.argpartition(self._born[tied], need - 1)[:need]]
            taken = np.sort(np.concatenate([above, tied]))
        else:
            taken = np.arange(size)
        out = (self._lower[taken], self._upper[taken], self._open[taken])
        rest = size - taken.size
        holes = taken[taken < rest]
        tail = np.ones(size - rest, dtype=bool)
        tail[taken[taken >= rest] - rest] = False
        movers = rest + np.flatnonzero(tail)
        for rows in self._fields():
            rows[holes] = rows[movers]
        self.size = rest
        self.counts -= out[2].sum(axis=0)
        return out

    def add(
        self, lower: np.ndarray, upper: np.ndarray, open_: np.ndarray, priority: np.ndarray
    ) -> None:
        """Append leaves (``(m, n)`` corners, ``(m, D)`` open directions, ``(m,)`` priority)."""
        end = self.size + lower.shape[0]
        if end > self._priority.size:
            capacity = max(end, 2 * self._priority.size)
            for name, rows in zip(self._FIELDS, self._fields(), strict=True):
                grown = np.empty((capacity, *rows.shape[1:]), dtype=rows.dtype)
                grown[: self.size] = rows[: self.size]
                setattr(self, name, grown)
        self._lower[self.size : end], self._upper[self.size : end] = lower, upper
        self._open[self.size : end], self._priority[self.size : end] = open_, priority
        self._born[self.size : end] = self._added + np.arange(end - self.size)
        self._added += end - self.size
        self.size = end
        self.counts += open_.sum(axis=0)


def _bounds_in_worker(
    context: tuple,
    lower: np.ndarray,
    upper: np.ndarray,
    top: int,
    asked: np.ndarray,
    targets: np.ndarray | None,
    open_pairs: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`onnx_exact.bounds.leaf_crown.direction_bounds` for part of a batch, in a worker
    of the run's pool."""
    net, outer, layers, neurons, signs = context
    return leaf_crown.direction_bounds(
        net, lower, upper, outer, top, asked, layers, neurons, signs, targets, open_pairs
    )


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


def _volume_shares(
    lower: np.ndarray, upper: np.ndarray, extent: np.ndarray, flat: np.ndarray
) -> np.ndarray:
    """Each leaf's share of the box's volume: the product of its widths over the box's, over the
    dimensions the box is not flat in (a flat dimension is never split)."""
    return np.where(flat, 1.0, (upper - lower) / extent).prod(axis=1)


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
