"""One warm triangle-LP relaxation per layer, its ideal cuts and rigorous dual bounds, and LP dives.

See :mod:`onnx_exact.solvers` for the soundness policy of LP proofs (Neumaier-Shcherbina bounds).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import highspy
import numpy as np

from onnx_exact.core.box import Box
from onnx_exact.core.directions import DirectionBook
from onnx_exact.core.network import Network
from onnx_exact.interrupts import raise_if_interrupted
from onnx_exact.solvers.highs_model import (
    FLOAT_EPS,
    INF,
    IPM_NONZEROS,
    add_rows,
    check_status,
    new_highs,
    seconds_left,
    set_options,
    time_limit_option,
)
from onnx_exact.solvers.milp_encoding import NetworkEncoding, layer_encoding

CUT_ROUNDS = 3


CUTS_PER_ROUND = 20


CUT_POOL_MAX = 200
"""Cut rows one layer relaxation may hold: the pool is shared by all directions of the layer, and
past a few hundred rows every warm LP solve slows down more than the cuts tighten the bound, so an
unbounded pool turns the cuts tier into the slowest tier of a run."""


@dataclass
class DirectionObjective:
    """``min costs . v[cols]``, which bounds ``max sign * y = offset - min``."""

    cols: np.ndarray
    costs: np.ndarray
    offset: float


def direction_objective(
    enc: NetworkEncoding, net: Network, layer: int, neuron: int, sign: int
) -> DirectionObjective:
    """``max sign * y_{layer, neuron}`` as a minimisation over the encoding's columns.

    Folded first-layer neurons (``enc.folded``) contribute ``w_i (W_0[i] . x + b_0[i])``:
    costs on the input columns and a constant.
    """
    live, cols, _, _ = enc.input_cols(layer)
    weight = net.layers[layer].weight[neuron]
    costs = -sign * weight[live]
    offset = float(sign * net.layers[layer].bias[neuron])
    if layer == 1 and enc.folded.any():
        first = net.layers[0]
        folded_weight = weight[enc.folded]
        cols = np.concatenate([cols, enc.x])
        costs = np.concatenate([costs, -sign * (folded_weight @ first.weight[enc.folded])])
        offset += float(sign * (folded_weight @ first.bias[enc.folded]))
    return DirectionObjective(cols, costs, offset)


class LayerRelaxation:
    """The triangle LP of the layers below ``layer``, shared by every direction of that layer.

    Build it once per layer (:meth:`build`) and pass it to every :func:`decide_directions` call of
    that layer: only the costs change between directions, so each solve restarts warm from the
    last basis, and Anderson cuts accumulate in one pool (they are valid for every objective).

    The first solve is cold and runs interior point with crossover (primal simplex below
    ``IPM_NONZEROS``): dual simplex from the slack basis stalls on these degenerate LPs, and
    primal simplex, though it does not stall, is slower than interior point on deep networks (the
    timings are in ``docs/benchmarks.md``, "Why the constants are what they are").
    Warm solves run dual simplex, the faster warm method in those timings and the natural one after
    cut rows are added (the previous optimal basis stays dual feasible).
    """

    def __init__(self, net: Network, layer: int, highs: highspy.Highs, enc: NetworkEncoding):
        self.net, self.layer, self.highs, self.enc = net, layer, highs, enc
        self._cold = True
        cold_solver = "ipm" if highs.getNumNz() > IPM_NONZEROS else "simplex"
        set_options(highs, presolve="off", solver=cold_solver, simplex_strategy=4)
        self.cuts: list[tuple[np.ndarray, ...]] = []
        self.row_dual = np.empty(0)  # of the last successful solve
        self._matrix: tuple[np.ndarray, ...] | None = None
        self._cost_cols = np.empty(0, dtype=np.int64)

    @classmethod
    def build(
        cls, net: Network, box: Box, bounds: Sequence, states: Sequence, layer: int
    ) -> LayerRelaxation:
        """A fresh relaxation of the layers below ``layer``."""
        highs = new_highs()
        enc = layer_encoding(highs, net, box, bounds, states, layer, integral=False)
        return cls(net, layer, highs, enc)

    def _append_rows(self, added: tuple[np.ndarray, ...]) -> None:
        """Extend the cached matrix by rows just added (as returned by :func:`add_rows`)."""
        lower, upper, row_ids, cols, vals = added
        rows, old_cols, old_vals, col_lo, col_hi, row_lo, row_hi = self._lp_arrays()
        self._matrix = (
            np.concatenate([rows, row_ids + row_lo.shape[0]]),
            np.concatenate([old_cols, cols]),
            np.concatenate([old_vals, vals]),
            col_lo,
            col_hi,
            np.concatenate([row_lo, lower]),
            np.concatenate([row_hi, upper]),
        )

    def _lp_arrays(self) -> tuple[np.ndarray, ...]:
        """(entry rows, entry cols, values, col bounds, row bounds) of the model as HiGHS holds it."""
        if self._matrix is None:
            lp = self.highs.getLp()
            a = lp.a_matrix_
            start = np.asarray(a.start_, dtype=np.int64)
            index = np.asarray(a.index_, dtype=np.int64)
            outer = np.repeat(np.arange(start.shape[0] - 1), np.diff(start))
            rowwise = a.format_ == highspy.MatrixFormat.kRowwise
            rows, cols = (outer, index) if rowwise else (index, outer)
            self._matrix = (
                rows,
                cols,
                np.asarray(a.value_),
                np.array(lp.col_lower_, dtype=np.float64),
                np.array(lp.col_upper_, dtype=np.float64),
                np.asarray(lp.row_lower_),
                np.asarray(lp.row_upper_),
            )
        return self._matrix

    def safe_lower_bound(self, obj: DirectionObjective, row_dual: np.ndarray) -> float:
        """Neumaier-Shcherbina lower bound on ``min costs . v`` over the LP, from any row duals.

        For any ``y``, ``c.v = y.(A v) + (c - A^T y).v >= sum_r min(y_r r_lo, y_r r_up)
        + sum_j min(d_j v_lo_j, d_j v_up_j)``. Duals of the wrong sign for an infinite row side are
        zeroed; the result is lowered by ``gamma * sum |terms|`` (``gamma = (n + 2) eps``, ``n`` the
        longest float sum), which bounds the rounding of the float evaluation.
        """
        rows, cols, vals, col_lo, col_hi, row_lo, row_hi = self._lp_arrays()
        n_cols = col_lo.shape[0]
        dual = np.array(row_dual, dtype=np.float64)
        dual[~np.isfinite(dual)] = 0.0
        dual[(dual > 0) & ~np.isfinite(row_lo)] = 0.0
        dual[(dual < 0) & ~np.isfinite(row_hi)] = 0.0
        costs = np.zeros(n_cols)
        np.add.at(costs, obj.cols, obj.costs)
        a_t_y = np.bincount(cols, weights=vals * dual[rows], minlength=n_cols)
        abs_a_t_y = np.bincount(cols, weights=np.abs(vals * dual[rows]), minlength=n_cols)
        reduced = costs - a_t_y
        row_side = np.where(dual > 0, row_lo, row_hi)
        row_terms = np.zeros_like(dual)
        np.multiply(dual, row_side, out=row_terms, where=dual != 0)
        col_side = np.where(reduced > 0, col_lo, col_hi)
        col_terms = np.zeros(n_cols)
        np.multiply(reduced, col_side, out=col_terms, where=reduced != 0)
        total = row_terms.sum() + col_terms.sum()
        if not np.isfinite(total):
            return -np.inf
        longest = n_cols + dual.shape[0] + (np.bincount(cols).max() if cols.size else 0) + 2
        magnitude = np.abs(row_terms).sum() + np.sum(
            (np.abs(costs) + abs_a_t_y) * np.maximum(np.abs(col_lo), np.abs(col_hi))
        )
        return float(total - 1.01 * longest * FLOAT_EPS * magnitude)

    def solve(
        self, obj: DirectionObjective, stop_at: float, deadline: float
    ) -> tuple[float, np.ndarray | None, np.ndarray | None]:
        """Minimise ``obj``; return (safe lower bound, input point, full primal point).

        ``stop_at`` is the ``objective_bound``: dual simplex stops once its (dual) objective
        exceeds it, which already settles a proof.
        """
        remaining = seconds_left(deadline)
        if remaining <= 0:
            return -np.inf, None, None
        highs = self.highs
        if self._cost_cols.size:
            zeros = np.zeros(self._cost_cols.shape[0])
            highs.changeColsCost(self._cost_cols.shape[0], self._cost_cols.astype(np.int32), zeros)
        highs.changeColsCost(obj.cols.shape[0], obj.cols.astype(np.int32), obj.costs)
        self._cost_cols = obj.cols
        set_options(
            highs,
            objective_bound=float(stop_at),
            time_limit=time_limit_option(highs, remaining, mip=False),
        )
        highs.run()
        raise_if_interrupted()
        if self._cold:  # the cold basis warm-starts dual simplex from now on
            self._cold = False
            set_options(highs, solver="simplex", simplex_strategy=1)
        solution = highs.getSolution()
        primal = np.asarray(solution.col_value)
        if not solution.dual_valid or primal.shape[0] != highs.getNumCol():
            return -np.inf, None, None
        self.row_dual = np.asarray(solution.row_dual)
        lower_bound = self.safe_lower_bound(obj, self.row_dual)
        box = self.enc.box
        x = np.clip(primal[self.enc.x], box.lower, box.upper)
        return lower_bound, x, primal

    def set_column_bounds(self, cols: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> None:
        """Change column bounds in HiGHS and in the arrays the safe bound reads."""
        _, _, _, col_lo, col_hi, _, _ = self._lp_arrays()
        col_lo[cols], col_hi[cols] = lower, upper
        check_status(
            self.highs.changeColsBounds(
                cols.shape[0],
                cols.astype(np.int32),
                np.asarray(lower, dtype=np.float64),
                np.asarray(upper, dtype=np.float64),
            ),
            "change column bounds",
        )

    def separate(self, primal: np.ndarray) -> int:
        """Add up to ``CUTS_PER_ROUND`` most violated Anderson et al. ideal cuts; return how many.

        Nothing is added once the pool holds ``CUT_POOL_MAX`` rows.

        For ``h = relu(w.v + b)`` with ``v`` in ``[vl, vu]``, ``L_i = vl_i if w_i >= 0 else vu_i``
        and ``U_i`` the other end: at the LP point, ``A_i = w_i (v_i - L_i (1 - z))``,
        ``C_i = w_i U_i z``, ``I = {A_i < C_i}``; the cut
        ``h <= sum_{i in I} w_i (v_i - L_i (1 - z)) + (b + sum_{i not in I} w_i U_i) z`` is valid
        for every network point and violated iff ``h > sum_i min(A_i, C_i) + b z``.
        """
        enc, candidates = self.enc, []
        room = CUT_POOL_MAX - sum(int(cut[0].shape[0]) for cut in self.cuts)
        if room <= 0:
            return 0
        for m in range(self.layer):
            binary = enc.z[m] >= 0
            if not binary.any():
                continue
            live, in_cols, in_lo, in_hi = enc.input_cols(m)
            weight = self.net.layers[m].weight[binary][:, live]
            bias = self.net.layers[m].bias[binary]
            v, h, z = primal[in_cols], primal[enc.h[m][binary]], primal[enc.z[m][binary]]
            low_end = np.where(weight >= 0, in_lo, in_hi)
            high_end = np.where(weight >= 0, in_hi, in_lo)
            a_terms = weight * (v - low_end * (1.0 - z)[:, None])
            c_terms = weight * high_end * z[:, None]
            in_set = a_terms < c_terms
            violation = h - (np.minimum(a_terms, c_terms).sum(axis=1) + bias * z)
            in_absmax = np.maximum(np.abs(in_lo), np.abs(in_hi))
            scale = 1.0 + np.abs(weight) @ in_absmax + np.abs(bias)
            relative = violation / scale
            for j in np.flatnonzero(relative > 1e-7):
                candidates.append((relative[j], m, j, binary, in_set[j], weight[j], bias[j]))
        candidates.sort(key=lambda c: -c[0])
        chosen = candidates[: min(CUTS_PER_ROUND, room)]
        parts: list[tuple[np.ndarray, ...]] = []
        for row, (_, m, j, binary, in_set, weight, bias) in enumerate(chosen):
            live, in_cols, in_lo, in_hi = enc.input_cols(m)
            low_end = np.where(weight >= 0, in_lo, in_hi)
            high_end = np.where(weight >= 0, in_hi, in_lo)
            h_col, z_col = enc.h[m][binary][j], enc.z[m][binary][j]
            in_sum = float(np.sum(weight[in_set] * low_end[in_set]))
            z_coef = -(in_sum + bias + float(np.sum(weight[~in_set] * high_end[~in_set])))
            cols = np.concatenate([[h_col], in_cols[in_set], [z_col]])
            vals = np.concatenate([[1.0], -weight[in_set], [z_coef]])
            absmax = np.concatenate(
                [
                    [enc.h_upper[m][binary][j]],
                    np.maximum(np.abs(in_lo), np.abs(in_hi))[in_set],
                    [1.0],
                ]
            )
            parts.append(
                (
                    np.array([-INF]),
                    np.array([-in_sum]),
                    np.full(cols.shape[0], row, dtype=np.int64),
                    cols,
                    vals,
                    absmax,
                )
            )
        cut = tuple(np.concatenate(column) for column in zip(*parts, strict=True))
        if chosen:
            self._append_rows(add_rows(self.highs, *cut))
            self.cuts.append(cut)
        return len(chosen)


@dataclass
class Binaries:
    """The indicator columns of a relaxation, flattened over its layers, for branching."""

    z: np.ndarray
    h: np.ndarray
    y: np.ndarray
    upper_rows: np.ndarray  # (2, n)
    span: np.ndarray  # U - L of each neuron's pre-activation

    @classmethod
    def of(cls, relaxation: LayerRelaxation) -> Binaries:
        enc = relaxation.enc
        pick = [z >= 0 for z in enc.z]
        empty = [np.empty(0, dtype=np.int64)]
        z, h, y = (
            np.concatenate(empty + [c[m] for c, m in zip(cols, pick, strict=True)])
            for cols in (enc.z, enc.h, enc.y)
        )
        rows = np.concatenate(
            [np.empty((2, 0), dtype=np.int64)]
            + [r[:, m] for r, m in zip(enc.upper_rows, pick, strict=True)],
            axis=1,
        )
        _, _, _, col_lo, col_hi, _, _ = relaxation._lp_arrays()
        return cls(z, h, y, rows, col_hi[y] - col_lo[y])


def lp_dive(
    book: DirectionBook, j: int, relaxation: LayerRelaxation, deadline: float, method: str
) -> Iterator[None]:
    """Dive down the LP branch-and-bound tree of direction ``j`` toward a witness, step by step.

    A generator: each ``next`` is one step. The first solves the root LP; every later one takes
    the neuron :func:`branching_neuron` would split at the current node, solves both children
    and moves to the one with the larger bound (where a witness, if any, is likelier). Every LP
    optimum is forward-passed. As the triangles the LP point uses get fixed it becomes a real
    network point, so a sign that shows only in a thin region is reached in a few dozen LPs,
    where best-first search would first bound every node above it. Proves nothing; it ends at a
    refutation, when both children clear the margin, when no triangle is loose, at the deadline
    or on a failed LP. The indicator bounds are restored whenever it ends or is closed.
    Refutations are credited to ``method`` (the tier the dive serves).
    """
    d = book.directions[j]
    binaries = Binaries.of(relaxation)
    n = binaries.z.shape[0]
    obj = direction_objective(relaxation.enc, book.net, book.layer, d.neuron, d.sign)
    margin = float(book.margins[j])

    def solve(phase: np.ndarray) -> tuple[float, np.ndarray | None, np.ndarray]:
        relaxation.set_column_bounds(
            binaries.z, (phase == 1).astype(np.float64), (phase != 0).astype(np.float64)
        )
        lower_bound, x, primal = relaxation.solve(obj, obj.offset + margin, deadline)
        if x is not None:
            book.absorb(x[None, :], method)
        return obj.offset - lower_bound, primal, relaxation.row_dual.copy()

    phase = np.full(n, -1, dtype=np.int8)
    try:
        bound, primal, dual = solve(phase)
        while primal is not None and book.status[j] == "undecided" and bound > -margin:
            yield
            branch = branching_neuron(binaries, phase, primal, dual)
            if branch < 0 or seconds_left(deadline) <= 0:
                return
            children = []
            for value in (0, 1):
                child = phase.copy()
                child[branch] = value
                child_bound, child_primal, child_dual = solve(child)
                if book.status[j] != "undecided":
                    return
                if child_primal is not None:
                    children.append((child_bound, child, child_primal, child_dual))
            if not children:
                return
            bound, phase, primal, dual = max(children, key=lambda c: c[0])
    finally:
        relaxation.set_column_bounds(binaries.z, np.zeros(n), np.ones(n))


def branching_neuron(
    binaries: Binaries, phase: np.ndarray, primal: np.ndarray, row_dual: np.ndarray
) -> int:
    """The free neuron whose triangle costs the LP bound most, or -1 if every triangle is tight.

    At the LP optimum neuron ``i`` is relaxed by ``gap_i = h_i - max(y_i, 0)``; the duals of its
    two upper rows price how much that slack is worth to the objective (a BaBSR-like score
    ``gap_i * (|dual_1| + |dual_2|)``). When no relaxed neuron is priced, the largest relative gap
    is split. A gap below ``1e-9 * (1 + span)`` counts as tight (solver tolerance).
    """
    if not binaries.z.size:
        return -1
    h, y = primal[binaries.h], primal[binaries.y]
    gap = h - np.maximum(y, 0.0)
    open_gap = (phase < 0) & (gap > 1e-9 * (1.0 + binaries.span))
    if not open_gap.any():
        return -1
    price = np.abs(row_dual[binaries.upper_rows]).sum(axis=0)
    score = np.where(open_gap, gap * price, -1.0)
    if score.max() <= 0:
        score = np.where(open_gap, gap / (1.0 + binaries.span), -1.0)
    return int(score.argmax())
