"""Every HiGHS model of onnx-exact: LP (triangle), ideal cuts, decision MILP, ISA and baselines.

A *direction* ``(k, i, sign)`` asks "can ``sign * y_{k,i}`` be positive on the box?". A "no" proves
neuron ``i`` of layer ``k`` stably inactive (``sign = +1``) or stably active (``sign = -1``); a "yes"
is shown by one input whose float64 forward pass (:meth:`Network.preactivations`) gives
``sign * y > 0``. Every answer of this module is one of those two kinds of evidence, or "undecided".

Encoding (big-M, one binary per uncertain ReLU)
    Layer ``k`` gets columns ``y_k`` with its proved bounds ``[L, U]`` and rows
    ``y_k - W_k h_{k-1} = b_k``. A ReLU neuron with ``L < 0 < U`` gets ``h`` in ``[0, U]`` and
    ``z`` in ``[0, 1]`` (integer for a MILP) with ``h >= y``, ``h <= U z`` and
    ``h <= y - L (1 - z)``; with ``z`` continuous this is exactly the triangle relaxation. Proved
    active neurons use ``h = y``, proved inactive ones ``h = 0`` (no column), layers without ReLU are
    linear. The ISA baseline moves the indicator's threshold from 0 to ``t`` (see
    :func:`add_network_encoding`).

Soundness policy
    * HiGHS drops matrix entries below ``small_matrix_value``; it is lowered to 1e-12 and entries
      still below are taken out of the matrix by us, widening the row's bounds by
      ``|w| max(|lo|, |hi|)`` of the dropped term, so the model stays a relaxation of the network.
    * LP proofs are rigorous: the bound is re-derived from the row duals with the
      Neumaier-Shcherbina bound (every column is boxed), minus a forward error bound of the float
      sums. A direction is proved iff ``bound <= -margin``.
    * Branch and bound on ReLU phases (:func:`_bab_direction`) fixes indicator columns of the
      same LP to 0 or 1; every node's bound is that rigorous LP bound, and a direction is proved
      when every leaf clears the margin, so no MILP slack applies.
    * MILP dual bounds are not certifiable. A MILP proof needs ``bound <= -margin`` with
      ``bound = sign b - dual_bound + slack`` and ``slack = 1e-6 (sum_j |W_ij| max(|lo_j|, |hi_j|)
      + |b_i|)``: the change of ``y`` that the MIP feasibility tolerance (1e-6 per row and bound)
      allows, scaled to the neuron. Extremes closer to 0 than ``margin + slack`` stay undecided.
    * A witness is an input inside the box (solver points are clipped to it) whose float64 forward
      pass shows the sign; solver values of ``z``, ``p`` or the objective never count.
    * A time limit leaves a direction undecided.
"""

from __future__ import annotations

import heapq
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import highspy
import numpy as np

from onnx_exact import parallel
from onnx_exact.bounds import crown as _bounds
from onnx_exact.core.box import Box
from onnx_exact.core.errors import SolverError
from onnx_exact.core.network import Network
from onnx_exact.core.verdicts import NeuronState
from onnx_exact.parallel import can_start_workers
from onnx_exact.resources import raise_if_interrupted

SMALL_MATRIX_VALUE = 1e-12
"""Smallest matrix entry HiGHS accepts; smaller ones are moved into the row bounds."""

FEASIBILITY_TOLERANCE = 1e-6
"""``mip_feasibility_tolerance`` of every MILP, the basis of the MILP slack."""

CUT_ROUNDS = 3
CUTS_PER_ROUND = 20
CUT_POOL_MAX = 200
"""Cut rows one layer relaxation may hold: the pool is shared by all directions of the layer, and
past a few hundred rows every warm LP solve slows down more than the cuts help (measured on
mnistfc prop_1_0.05: 82 s in the cuts tier with an unbounded pool)."""
MILP_ROUND_SIZE = 8
"""Decision MILPs solved between two exchanges of witnesses (fixed, so jobs=1 and jobs=n agree)."""

DIRECTION_TIME_LIMIT = 60.0
"""Cap in seconds on one decision MILP."""

MILP_CUT_POOL = 2000
"""``mip_pool_soft_limit`` of a decision MILP (HiGHS's default is 10,000), which also runs without
primal heuristics (``mip_heuristic_effort = 0``).

Why: the decision MILP is there for proofs; witnesses come far more cheaply from the attack tier,
and every MILP incumbent is still harvested. With HiGHS's defaults one 240 s decision MILP (MNIST
5x100 ℓ1 = 0, fourth layer, neuron 61 +1: 300 binaries, 100,800 entries) grew to a 415 MiB peak:
its root cut loop filled the pool to about 10,000 dense cuts (278 MiB after 45 s), and a 67 s
sub-MIP heuristic phase (no log line meanwhile) added 120 MiB near the end. With a 2,000-cut
pool the root loop ended in 48 s instead of 92 s and the peak was 304 MiB; with the heuristics off
as well it stayed at 203 MiB from 30 s on, explored 1,305 nodes instead of 606, and reached the
same dual bound (22.21 against 22.09 with the defaults)."""
MILP_HEURISTIC_EFFORT = 0.0

BAB_NODE_LIMIT = 2000
BAB_TIME_LIMIT = 20.0
"""Caps on the LP branch and bound of one direction (nodes, seconds)."""

IPM_NONZEROS = 40_000
"""LP relaxations with more matrix entries solve their first LP with the interior-point method.

Measured on 784-400-400 (layer-2 LP, 317k entries): a cold dual simplex took 16 s, IPM 3-4 s per
LP, and IPM (with crossover) once followed by warm dual simplex 4.6 s, then 0.8-2.3 s per LP.
Measured on the MNIST zoo's first LP of each layer (50k-240k entries, 11 cold solves; dual
simplex / primal simplex / IPM with crossover): dual 0.07-0.76 s but 9.7 s and over 20 s on two;
primal 0.07-0.79 s; IPM 0.14-0.21 s, 0.41-0.52 s on the 239k-entry 2x400 LP. Below 40k entries
(ACAS Xu, the pieces of a subdivided box) primal simplex is kept: those LPs solve in milliseconds.
"""

WitnessFeed = Callable[[], np.ndarray]
"""Inputs found by a search that runs beside the exact tiers (the background attack of
:mod:`onnx_exact.stability`): each call returns the ``(m, n_in)`` network-space inputs found since
the last call, possibly none. Tiers forward-pass them like their own candidates."""

FEED_POLL_SECONDS = 0.25
"""How often a :class:`DirectionBook` (and a decision MILP, from HiGHS's interrupt callback) asks
its feed for new inputs: often enough that a refuted direction's tier stops within a fraction of
a second, rarely enough that the queue reads cost nothing against a node's bound."""

_EPS = np.finfo(np.float64).eps
_INF = highspy.kHighsInf
_MODEL = highspy.HighsModelStatus
_TIERS = ("lp", "cuts", "bab", "milp")
#: Model statuses after which HiGHS's dual bound is a valid bound (the solve ran and stopped
#: cleanly); after any other status (errors, a solve that never ran) nothing is proved.
_BOUND_STATUSES = frozenset(
    {
        _MODEL.kOptimal,
        _MODEL.kInfeasible,
        _MODEL.kObjectiveBound,
        _MODEL.kObjectiveTarget,
        _MODEL.kTimeLimit,
        _MODEL.kIterationLimit,
        _MODEL.kSolutionLimit,
        _MODEL.kInterrupt,
    }
)


@dataclass(frozen=True)
class Direction:
    """One sign question about one neuron: can ``sign * y[layer][neuron]`` be positive?"""

    layer: int
    neuron: int
    sign: int


@dataclass
class DirectionResult:
    """The answer to one :class:`Direction`.

    ``bound`` is a sound upper bound on ``max sign * y`` over the box (``inf`` if none was found);
    ``witness`` is set exactly when ``status == "refuted"``.
    """

    direction: Direction
    status: str
    bound: float
    method: str
    witness: np.ndarray | None = None


@dataclass
class NetworkEncoding:
    """Column indices of a network encoded by :func:`add_network_encoding`.

    ``h[k][i] == -1`` means ``h`` is identically 0 (proved inactive; then ``y[k][i]`` is a free
    column in its bounds, its defining row omitted), or, where ``folded[i]``, a first-layer
    neuron proved active that has no column at all: ``h = W_0[i] x + b_0[i]`` enters the objective
    as that affine function of the input (``y[0][i] == -1`` too); for other proved active neurons
    and linear layers ``h[k][i] == y[k][i]``. ``z[k][i] == -1`` means the neuron has no indicator.
    ``h_lower``/``h_upper`` are the column bounds of ``h`` (0 where ``h`` is 0).
    """

    x: np.ndarray
    box: Box
    y: list[np.ndarray] = field(default_factory=list)
    h: list[np.ndarray] = field(default_factory=list)
    z: list[np.ndarray] = field(default_factory=list)
    h_lower: list[np.ndarray] = field(default_factory=list)
    h_upper: list[np.ndarray] = field(default_factory=list)
    thresholds: list[np.ndarray] = field(default_factory=list)
    upper_rows: list[np.ndarray] = field(default_factory=list)
    """Per layer, ``(2, n)`` row indices of ``h <= U z`` and ``h <= y - L (1 - z)`` (-1: none)."""
    folded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    """Mask over the first layer's neurons encoded as affine functions of ``x`` (see above)."""

    @property
    def has_binaries(self) -> bool:
        """Whether any neuron has an indicator (else the model is an LP)."""
        return any(bool(np.any(z >= 0)) for z in self.z)

    def input_cols(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Live input columns of ``layer``: (mask over its inputs, columns, lower, upper)."""
        if layer == 0:
            live = np.ones(self.x.shape[0], dtype=bool)
            return live, self.x, self.box.lower, self.box.upper
        cols = self.h[layer - 1]
        live = cols >= 0
        return live, cols[live], self.h_lower[layer - 1][live], self.h_upper[layer - 1][live]

    def solution_from_input(self, net: Network, x_net: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All column values of the network point of input ``x_net``, for ``Highs.setSolution``."""
        pre = net.preactivations(x_net)
        cols = [self.x]
        vals = [np.asarray(x_net, dtype=np.float64).reshape(-1)]
        for k, (y_cols, h_cols, z_cols) in enumerate(zip(self.y, self.h, self.z, strict=True)):
            y = pre[k][0]
            binary, encoded = z_cols >= 0, y_cols >= 0
            cols += [y_cols[encoded], h_cols[binary], z_cols[binary]]
            vals += [
                y[encoded],
                np.maximum(y[binary], 0.0),
                (y[binary] >= self.thresholds[k][binary]).astype(np.float64),
            ]
        return np.concatenate(cols).astype(np.int32), np.concatenate(vals)


# --------------------------------------------------------------------------- HiGHS basics


def _set_options(highs: highspy.Highs, **options) -> None:
    """Set HiGHS options, turning a rejected name or value into a :class:`SolverError`."""
    for name, value in options.items():
        if highs.setOptionValue(name, value) == highspy.HighsStatus.kError:
            raise SolverError(
                f"HiGHS rejected option {name}={value!r}; install highspy>=1.16 (pip install -U highspy)"
            )


_BANNER_SILENCED = False


def _silence_banner() -> None:
    """Construct the process's first Highs with fd 1 on /dev/null.

    HiGHS prints its copyright banner from C++ on the first construction in a process, before any
    option can be set; a command-line tool (and ``--quiet``) must not print it.
    """
    global _BANNER_SILENCED
    if _BANNER_SILENCED:
        return
    _BANNER_SILENCED = True
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _new_highs() -> highspy.Highs:
    """A silent single-threaded HiGHS instance that keeps matrix entries down to 1e-12."""
    _silence_banner()
    highs = highspy.Highs()
    _set_options(
        highs,
        output_flag=False,
        small_matrix_value=SMALL_MATRIX_VALUE,
        threads=1,
        random_seed=0,
        mip_feasibility_tolerance=FEASIBILITY_TOLERANCE,
    )
    return highs


def _check(status: highspy.HighsStatus, what: str) -> None:
    if status == highspy.HighsStatus.kError:
        raise SolverError(f"HiGHS failed to {what}; the affected neurons are kept")


def _add_columns(
    highs: highspy.Highs, lower: np.ndarray, upper: np.ndarray, integer: bool = False
) -> np.ndarray:
    """Append boxed columns and return their indices."""
    first = highs.getNumCol()
    count = int(lower.shape[0])
    if count == 0:
        return np.empty(0, dtype=np.int64)
    _check(highs.addVars(count, lower.astype(np.float64), upper.astype(np.float64)), "add columns")
    cols = np.arange(first, first + count)
    if integer:
        kinds = np.full(count, highspy.HighsVarType.kInteger)
        _check(highs.changeColsIntegrality(count, cols.astype(np.int32), kinds), "mark integers")
    return cols


def _add_rows(
    highs: highspy.Highs,
    lower: np.ndarray,
    upper: np.ndarray,
    row_ids: np.ndarray,
    cols: np.ndarray,
    vals: np.ndarray,
    entry_absmax: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Append rows ``lower <= sum vals * x[cols] <= upper`` given as row-sorted COO entries.

    Entries with ``|v| < SMALL_MATRIX_VALUE`` (HiGHS would drop them, or fail) are removed and
    their largest possible contribution ``|v| * entry_absmax`` (``entry_absmax`` = the largest
    magnitude of the entry's column) widens the row's bounds, outward by at least one ulp, so
    every point of the exact row still satisfies the relaxed one. Returns the rows as added:
    (lower, upper, row ids counted from 0, cols, vals).
    """
    count = int(lower.shape[0])
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    small = np.abs(vals) <= SMALL_MATRIX_VALUE
    if small.any():
        widen = np.bincount(
            row_ids[small], weights=np.abs(vals[small]) * entry_absmax[small], minlength=count
        )
        grow = widen > 0
        lower = np.where(grow, np.nextafter(lower - widen, -np.inf), lower)
        upper = np.where(grow, np.nextafter(upper + widen, np.inf), upper)
        row_ids, cols, vals = row_ids[~small], cols[~small], vals[~small]
    starts = np.searchsorted(row_ids, np.arange(count)).astype(np.int32)
    if count:
        status = highs.addRows(
            count, lower, upper, int(vals.shape[0]), starts, cols.astype(np.int32), vals
        )
        _check(status, "add rows")
    return lower, upper, row_ids, cols, vals


def _remaining(deadline: float) -> float:
    return deadline - time.monotonic()


def time_limit_option(highs: highspy.Highs, seconds: float, *, mip: bool) -> float:
    """The ``time_limit`` option value that allows ``seconds`` more for the next ``run()``.

    HiGHS (highspy 1.16) measures the two kinds of solve differently. An LP solve compares
    ``time_limit`` with the *cumulative* run time of the ``Highs`` object (HiGHS issues #1331,
    #1477; there is no ``zeroAllClocks``), so a model solved many times -- the warm per-layer
    relaxation -- would otherwise stop at once with ``kTimeLimit`` and a meaningless primal. A MIP
    solve compares it with the time since *that* run started: one MILP instance re-run with the
    option at cumulative run time + 3 s ran 11.3, 22.5 and 45.1 s (MNIST 5x100, fourth layer), and
    ``--method per-neuron --time-limit 60`` took 117 s on MNIST 4x100 ℓ1 = 3e-4.
    """
    if mip:
        return float(seconds)
    return float(highs.getRunTime() + seconds)


def _input_absmax(net: Network, box: Box, bounds: Sequence, layer: int) -> np.ndarray:
    """``max(|lo|, |hi|)`` of the inputs of ``layer`` (the box, or the previous layer's outputs)."""
    if layer == 0:
        return np.maximum(np.abs(box.lower), np.abs(box.upper))
    lo, hi = bounds[layer - 1].lower, bounds[layer - 1].upper
    if net.layers[layer - 1].relu:
        lo, hi = np.maximum(lo, 0.0), np.maximum(hi, 0.0)
    return np.maximum(np.abs(lo), np.abs(hi))


def milp_slack(net: Network, box: Box, bounds: Sequence, layer: int) -> np.ndarray:
    """Per-neuron slack added to MILP dual bounds of ``layer`` (see the module's policy).

    ``slack_i = 1e-6 * (sum_j |W_ij| max(|lo_j|, |hi_j|) + |b_i|)``: a MIP point may violate each
    bound and row by the feasibility tolerance, which moves ``y_i`` by at most about this much.
    """
    weight = net.layers[layer].weight
    scale = np.abs(weight) @ _input_absmax(net, box, bounds, layer) + np.abs(net.layers[layer].bias)
    return FEASIBILITY_TOLERANCE * scale


# --------------------------------------------------------------------------- encoding


def _relu_rows(
    highs: highspy.Highs,
    y: np.ndarray,
    h: np.ndarray,
    z: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    threshold: np.ndarray,
) -> None:
    """Big-M rows of ``h = relu(y)`` with an indicator ``z`` whose threshold is ``t``.

    ``z = 1`` allows exactly ``y >= t``, ``z = 0`` exactly ``y <= t``; with ``Lm = min(L, 0)``,
    ``Up = max(U, 0)``, ``t+ = max(t, 0)``, ``t- = min(t, 0)``::

        h - y >= 0
        h - (Up - t+) z <= t+                      (h <= U z when t <= 0)
        h - y - (Lm - t-) z <= -Lm                 (h <= y - L (1 - z) when t >= 0)
        y - (U - t) z <= t,   y - (t - L) z >= L   (only where t != 0; implied when t = 0)

    Every network point satisfies them with ``z = [y >= t]`` (for ``t < 0`` and ``y`` in
    ``[t, 0]``, ``h = 0 <= y - t``; for ``t > 0`` and ``y`` in ``[0, t]``, ``h = y <= t``), so the
    model stays a relaxation; ``t = 0`` gives the classic big-M and, relaxed, the triangle.
    """
    n = int(y.shape[0])
    if n == 0:
        return
    lm, up = np.minimum(lower, 0.0), np.maximum(upper, 0.0)
    t_pos, t_neg = np.maximum(threshold, 0.0), np.minimum(threshold, 0.0)
    y_abs = np.maximum(np.abs(lower), np.abs(upper))
    one, zero = np.ones(n), np.zeros(n)
    blocks = [  # (lower, upper, [(cols, vals, absmax), ...])
        (zero, np.full(n, _INF), [(h, one, up), (y, -one, y_abs)]),
        (np.full(n, -_INF), t_pos, [(h, one, up), (z, -(up - t_pos), one)]),
        (np.full(n, -_INF), -lm, [(h, one, up), (y, -one, y_abs), (z, -(lm - t_neg), one)]),
    ]
    shifted = threshold != 0
    if shifted.any():
        s = shifted
        blocks.append(
            (
                np.full(s.sum(), -_INF),
                threshold[s],
                [(y[s], one[s], y_abs[s]), (z[s], -(upper[s] - threshold[s]), one[s])],
            )
        )
        blocks.append(
            (
                lower[s],
                np.full(s.sum(), _INF),
                [(y[s], one[s], y_abs[s]), (z[s], -(threshold[s] - lower[s]), one[s])],
            )
        )
    offset = 0
    lows, ups, rows, cols, vals, absmax = [], [], [], [], [], []
    for block_lower, block_upper, terms in blocks:
        m = int(block_lower.shape[0])
        lows.append(block_lower)
        ups.append(block_upper)
        rows.append(np.repeat(np.arange(offset, offset + m), len(terms)))
        cols.append(np.stack([t[0] for t in terms], axis=1).ravel())
        vals.append(np.stack([t[1] for t in terms], axis=1).ravel())
        absmax.append(np.stack([t[2] for t in terms], axis=1).ravel())
        offset += m
    _add_rows(
        highs,
        np.concatenate(lows),
        np.concatenate(ups),
        np.concatenate(rows),
        np.concatenate(cols),
        np.concatenate(vals),
        np.concatenate(absmax),
    )


def add_network_encoding(
    highs: highspy.Highs,
    net: Network,
    box: Box,
    bounds: Sequence,
    states: Sequence[np.ndarray],
    upto_layer: int,
    input_cols: np.ndarray | None = None,
    *,
    integral: bool = True,
    thresholds: Sequence[np.ndarray] | None = None,
    fold_active_first_layer: bool = False,
) -> NetworkEncoding:
    """Encode layers ``0..upto_layer`` of ``net`` over the network-space ``box`` into ``highs``.

    Parameters
    ----------
    bounds : sound ``LayerBounds`` of layers ``0..upto_layer`` (they become the columns' bounds and
        the big-M constants).
    states : ``NeuronState`` arrays for a prefix of the layers; ACTIVE gives ``h = y`` (and clips
        ``L`` to 0), INACTIVE gives ``h = 0`` (and clips ``U`` to 0), anything else -- and layers
        beyond the prefix -- gets an indicator when ``L < t < U``, else follows its bounds.
    input_cols : existing input columns to share (two networks over one input); new ones otherwise.
    integral : binaries (MILP) or continuous ``z`` in ``[0, 1]`` (triangle LP).
    thresholds : per layer, the indicator threshold ``t`` (default 0) -- the ISA's margin shift.
    fold_active_first_layer : with ``upto_layer == 0``, give the first layer's proved-active
        neurons no column and no row (``NetworkEncoding.folded``); the objective of
        :func:`_objective` takes them as affine functions of ``x``. Why: their rows are redundant,
        the first layer's bounds being its exact interval bounds over the box, and they are most
        of the matrix (MNIST 2x400 ℓ1 = 3e-4: 243 of the 304 dense first-layer rows).
    """
    active_state, inactive_state = NeuronState.ACTIVE, NeuronState.INACTIVE
    if input_cols is None:
        x = _add_columns(highs, box.lower, box.upper)
    else:
        x = np.asarray(input_cols, dtype=np.int64)
    enc = NetworkEncoding(x=x, box=box)
    for k in range(upto_layer + 1):
        layer = net.layers[k]
        n = layer.out_features
        lower = np.array(bounds[k].lower, dtype=np.float64)
        upper = np.array(bounds[k].upper, dtype=np.float64)
        state = np.asarray(states[k]) if k < len(states) else np.full(n, NeuronState.UNDECIDED)
        if layer.relu:
            lower = np.where(state == active_state, np.maximum(lower, 0.0), lower)
            upper = np.where(state == inactive_state, np.minimum(upper, 0.0), upper)
            upper = np.maximum(upper, lower)
        threshold = np.zeros(n) if thresholds is None else np.asarray(thresholds[k], dtype=float)
        folded = np.zeros(n, dtype=bool)
        if layer.relu and fold_active_first_layer and k == 0 == upto_layer and thresholds is None:
            folded = (state == active_state) | ((lower >= 0) & (state != inactive_state))
            enc.folded = folded
        y = np.full(n, -1, dtype=np.int64)
        y[~folded] = _add_columns(highs, lower[~folded], upper[~folded])
        z = np.full(n, -1, dtype=np.int64)
        upper_rows = np.full((2, n), -1, dtype=np.int64)
        if layer.relu:
            proved = (state == active_state) | (state == inactive_state)
            binary = (lower < threshold) & (threshold < upper) & ~proved
            active = ~binary & ((state == active_state) | ((lower >= 0) & ~proved))
            inactive = ~binary & ~active
            if np.any(inactive & (upper > 0) & (state != inactive_state)):
                raise ValueError(
                    f"layer {k}: an indicator threshold lies outside its neuron's bounds"
                )
        else:
            inactive = np.zeros(n, dtype=bool)

        # y = W h_prev + b; an inactive neuron's row is omitted (its h is 0 whatever y is).
        live, in_cols, in_lo, in_hi = enc.input_cols(k)
        rows = np.flatnonzero(~inactive & ~folded)
        weight = layer.weight[rows][:, live]
        n_rows, m = int(rows.shape[0]), int(in_cols.shape[0])
        in_absmax = np.maximum(np.abs(in_lo), np.abs(in_hi))
        y_absmax = np.maximum(np.abs(lower), np.abs(upper))[rows]
        _add_rows(
            highs,
            layer.bias[rows],
            layer.bias[rows],
            np.repeat(np.arange(n_rows), m + 1),
            np.concatenate([y[rows, None], np.broadcast_to(in_cols, (n_rows, m))], axis=1).ravel(),
            np.concatenate([np.ones((n_rows, 1)), -weight], axis=1).ravel(),
            np.concatenate(
                [y_absmax[:, None], np.broadcast_to(in_absmax, (n_rows, m))], axis=1
            ).ravel(),
        )

        if not layer.relu:
            h, h_lo, h_hi = y, lower, upper
        else:
            h = np.where(active & ~folded, y, -1)
            h_binary = _add_columns(highs, np.zeros(binary.sum()), np.maximum(upper[binary], 0.0))
            z_binary = _add_columns(
                highs, np.zeros(binary.sum()), np.ones(binary.sum()), integer=integral
            )
            h[binary], z[binary] = h_binary, z_binary
            first_row, n_binary = highs.getNumRow(), int(binary.sum())
            upper_rows[:, binary] = (
                first_row + n_binary * np.arange(1, 3)[:, None] + np.arange(n_binary)
            )
            _relu_rows(
                highs,
                y[binary],
                h_binary,
                z_binary,
                lower[binary],
                upper[binary],
                threshold[binary],
            )
            h_lo = np.where(active, lower, 0.0)
            h_hi = np.where(active, upper, np.where(binary, np.maximum(upper, 0.0), 0.0))
        enc.y.append(y)
        enc.h.append(h)
        enc.z.append(z)
        enc.h_lower.append(h_lo)
        enc.h_upper.append(h_hi)
        enc.thresholds.append(threshold)
        enc.upper_rows.append(upper_rows)
    return enc


def layer_encoding(
    highs: highspy.Highs,
    net: Network,
    box: Box,
    bounds: Sequence,
    states: Sequence[np.ndarray],
    layer: int,
    *,
    integral: bool,
) -> NetworkEncoding:
    """The layers below ``layer``, as the tiers of that layer encode them (first-layer folding on).

    The triangle LP and the decision MILP of one layer must number their columns alike: the
    MILP adds the LP's cut rows (:attr:`LayerRelaxation.cuts`) by column index. Both build their
    model here, from the same bounds and states, so only the indicators' integrality differs.
    """
    return add_network_encoding(
        highs, net, box, bounds, states, layer - 1, integral=integral, fold_active_first_layer=True
    )


# --------------------------------------------------------------------------- LP relaxation


@dataclass
class _Objective:
    """``min costs . v[cols]``, which bounds ``max sign * y = offset - min``."""

    cols: np.ndarray
    costs: np.ndarray
    offset: float


def _objective(
    enc: NetworkEncoding, net: Network, layer: int, neuron: int, sign: int
) -> _Objective:
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
    return _Objective(cols, costs, offset)


class LayerRelaxation:
    """The triangle LP of the layers below ``layer``, shared by every direction of that layer.

    Build it once per layer (:meth:`build`) and pass it to every :func:`decide_directions` call of
    that layer: only the costs change between directions, so each solve restarts warm from the
    last basis, and Anderson cuts accumulate in one pool (they are valid for every objective).

    The first solve is cold and runs interior point with crossover (primal simplex below
    ``IPM_NONZEROS``): dual simplex from the slack basis stalls on these degenerate LPs (measured
    on the 2x400 zoo net: a median of 15 s and up to 340 s per cold solve, against 0.5 s primal),
    and primal simplex takes two to five times as long as IPM on the deeper zoo nets.
    Warm solves run dual simplex, which the measurements favour once a basis exists and which is
    the natural method after cut rows are added.
    """

    def __init__(self, net: Network, layer: int, highs: highspy.Highs, enc: NetworkEncoding):
        self.net, self.layer, self.highs, self.enc = net, layer, highs, enc
        self._cold = True
        cold_solver = "ipm" if highs.getNumNz() > IPM_NONZEROS else "simplex"
        _set_options(highs, presolve="off", solver=cold_solver, simplex_strategy=4)
        self.cuts: list[tuple[np.ndarray, ...]] = []
        self.row_dual = np.empty(0)  # of the last successful solve
        self._matrix: tuple[np.ndarray, ...] | None = None
        self._cost_cols = np.empty(0, dtype=np.int64)

    @classmethod
    def build(
        cls, net: Network, box: Box, bounds: Sequence, states: Sequence, layer: int
    ) -> LayerRelaxation:
        """A fresh relaxation of the layers below ``layer``."""
        highs = _new_highs()
        enc = layer_encoding(highs, net, box, bounds, states, layer, integral=False)
        return cls(net, layer, highs, enc)

    def _append_rows(self, added: tuple[np.ndarray, ...]) -> None:
        """Extend the cached matrix by rows just added (as returned by :func:`_add_rows`)."""
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

    def safe_lower_bound(self, obj: _Objective, row_dual: np.ndarray) -> float:
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
        return float(total - 1.01 * longest * _EPS * magnitude)

    def solve(
        self, obj: _Objective, stop_at: float, deadline: float
    ) -> tuple[float, np.ndarray | None, np.ndarray | None]:
        """Minimise ``obj``; return (safe lower bound, input point, full primal point).

        ``stop_at`` is the ``objective_bound``: dual simplex stops once its (dual) objective
        exceeds it, which already settles a proof.
        """
        remaining = _remaining(deadline)
        if remaining <= 0:
            return -np.inf, None, None
        highs = self.highs
        if self._cost_cols.size:
            zeros = np.zeros(self._cost_cols.shape[0])
            highs.changeColsCost(self._cost_cols.shape[0], self._cost_cols.astype(np.int32), zeros)
        highs.changeColsCost(obj.cols.shape[0], obj.cols.astype(np.int32), obj.costs)
        self._cost_cols = obj.cols
        _set_options(
            highs,
            objective_bound=float(stop_at),
            time_limit=time_limit_option(highs, remaining, mip=False),
        )
        highs.run()
        raise_if_interrupted()
        if self._cold:  # the cold basis warm-starts dual simplex from now on
            self._cold = False
            _set_options(highs, solver="simplex", simplex_strategy=1)
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
        _check(
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
                    np.array([-_INF]),
                    np.array([-in_sum]),
                    np.full(cols.shape[0], row, dtype=np.int64),
                    cols,
                    vals,
                    absmax,
                )
            )
        cut = tuple(np.concatenate(column) for column in zip(*parts, strict=True))
        if chosen:
            self._append_rows(_add_rows(self.highs, *cut))
            self.cuts.append(cut)
        return len(chosen)


# --------------------------------------------------------------------------- decision MILP


@dataclass
class _MilpContext:
    """Everything a decision MILP of one layer needs (a :class:`parallel.TaskContext` of its tasks)."""

    net: Network
    box: Box
    bounds: list
    states: list
    layer: int
    cuts: list
    cut_columns: int = 0
    """Columns of the relaxation the cuts index (the MILP adds them only if its count matches)."""


@dataclass
class _MilpOutcome:
    proved: bool
    bound: float
    points: np.ndarray  # (m, n_in) forward-pass candidates harvested from the solver


def _worker_milp(context: _MilpContext, task: tuple) -> _MilpOutcome:
    """A decision MILP in a worker of :func:`parallel.worker_pool`."""
    return _decision_milp(context, *task)


def _run_min(
    highs: highspy.Highs,
    enc: NetworkEncoding,
    obj: _Objective,
    cutoff: float,
    target: float,
    start: np.ndarray | None,
    net: Network,
    time_limit: float,
    stop: Callable[[], bool] | None = None,
) -> tuple[float, list[np.ndarray], highspy.HighsModelStatus]:
    """Minimise ``obj`` over a built MILP; return (lower bound, harvested inputs, status).

    ``stop`` (asked at most every ``FEED_POLL_SECONDS`` from HiGHS's interrupt callback) ends the
    run early when it returns True, e.g. once a search beside the solver refuted the direction;
    an interrupted run's dual bound is still valid.

    The lower bound is ``min(info.mip_dual_bound, cutoff)``; the status alone is not trusted.
    Nodes are pruned against the cutoff, so when everything was pruned HiGHS proved only
    ``min >= cutoff``: it may then report "Optimal" with a (start) incumbent beyond the cutoff and
    a dual bound equal to that incumbent, or "Infeasible" with a dual bound of ``-inf`` (the model
    always has points, so infeasible means pruned).
    """
    highs.changeColsCost(obj.cols.shape[0], obj.cols.astype(np.int32), obj.costs)
    _set_options(
        highs,
        objective_bound=float(cutoff),
        objective_target=float(target),
        time_limit=time_limit_option(highs, time_limit, mip=True),
    )
    harvested: list[np.ndarray] = []
    x_cols = enc.x

    def on_solution(event) -> None:
        harvested.append(np.array(event.data_out.mip_solution[x_cols], dtype=np.float64))

    asked = [time.monotonic()]

    def on_interrupt(event) -> None:
        if time.monotonic() - asked[0] >= FEED_POLL_SECONDS:
            asked[0] = time.monotonic()
            if stop():
                event.interrupt()

    highs.cbMipSolution.subscribe(on_solution)
    if stop is not None:
        highs.cbMipInterrupt.subscribe(on_interrupt)
    if start is not None:
        cols, vals = enc.solution_from_input(net, start)
        highs.setSolution(cols.shape[0], cols, vals)
    run_status = highs.run()
    raise_if_interrupted()  # highspy swallows a KeyboardInterrupt raised inside its callbacks
    highs.cbMipSolution.unsubscribe(on_solution)
    if stop is not None:
        highs.cbMipInterrupt.unsubscribe(on_interrupt)
    status = highs.getModelStatus()
    solution = highs.getSolution()
    if solution.value_valid:
        harvested.append(np.asarray(solution.col_value)[x_cols].copy())
    if run_status == highspy.HighsStatus.kError or status not in _BOUND_STATUSES:
        return -np.inf, harvested, status  # the solve failed: it proves nothing
    if status == _MODEL.kInfeasible:
        return cutoff, harvested, status
    dual_bound = float(highs.getInfo().mip_dual_bound)
    if np.isnan(dual_bound):
        dual_bound = -np.inf
    return min(dual_bound, cutoff), harvested, status


def _decision_milp(
    context: _MilpContext,
    direction: Direction,
    margin: float,
    slack: float,
    start: np.ndarray | None,
    deadline: float,
    time_cap: float,
    stop: Callable[[], bool] | None = None,
) -> _MilpOutcome:
    """Decide one direction with the MILP of the layers below it.

    Minimise ``-sign W_i . h`` with ``objective_bound = sign b + margin + slack`` (every node that
    cannot beat it is pruned: a proof) and ``objective_target = sign b - slack`` (stop at a likely
    witness). A stop at the target that the forward pass does not confirm is re-run without it.
    """
    net, layer = context.net, context.layer
    highs = _new_highs()
    enc = layer_encoding(
        highs, net, context.box, context.bounds, context.states, layer, integral=True
    )
    if highs.getNumCol() == context.cut_columns:  # else the rows would constrain other columns
        for cut in context.cuts:
            _add_rows(highs, *cut)
    obj = _objective(enc, net, layer, direction.neuron, direction.sign)
    if not enc.has_binaries:
        relaxation = LayerRelaxation(net, layer, highs, enc)
        lower_bound, x, _ = relaxation.solve(obj, obj.offset + margin, deadline)
        points = np.empty((0, net.in_features)) if x is None else x[None, :]
        bound = obj.offset - lower_bound
        return _MilpOutcome(bound <= -margin, bound, points)
    _set_options(
        highs,
        mip_heuristic_run_feasibility_jump=False,
        mip_pool_soft_limit=MILP_CUT_POOL,
        mip_heuristic_effort=MILP_HEURISTIC_EFFORT,
    )
    cutoff = obj.offset + margin + slack
    target = obj.offset - slack
    box = context.box
    all_points: list[np.ndarray] = []
    best_bound, proved = np.inf, False
    for _attempt in range(2):
        time_limit = min(_remaining(deadline), time_cap)
        if time_limit <= 0:
            break
        lower_bound, harvested, status = _run_min(
            highs, enc, obj, cutoff, target, start, net, time_limit, stop
        )
        best_bound = min(best_bound, obj.offset - lower_bound + slack)
        points = np.clip(np.array(harvested).reshape(-1, net.in_features), box.lower, box.upper)
        all_points.append(points)
        proved = lower_bound >= cutoff
        if proved:
            break
        if points.shape[0]:
            values = direction.sign * net.preactivations(points)[layer][:, direction.neuron]
            if values.max() > 0:
                break
        if status != _MODEL.kObjectiveTarget:
            break
        target = -_INF
    points = np.concatenate(all_points) if all_points else np.empty((0, net.in_features))
    return _MilpOutcome(proved, best_bound, points)


# --------------------------------------------------------------------------- the tiered decision


class DirectionBook:
    """Open directions of one layer, their best bounds and the best input seen for each.

    Shared by every exact tier (the HiGHS tiers here and :mod:`onnx_exact.relu_bab`): a direction
    is refuted by the first forward-passed input that shows its sign, whichever tier produced it.
    """

    def __init__(
        self,
        net: Network,
        layer: int,
        directions: Sequence[Direction],
        margins,
        feed: WitnessFeed | None = None,
    ):
        self.net, self.layer = net, layer
        self.feed, self.polled = feed, -np.inf
        self.directions = list(directions)
        self.neurons = np.array([d.neuron for d in directions], dtype=np.int64)
        self.signs = np.array([d.sign for d in directions], dtype=np.float64)
        self.margins = np.asarray(margins, dtype=np.float64)[self.neurons]
        count = len(directions)
        self.status = ["undecided"] * count
        self.method = [""] * count
        self.bound = np.full(count, np.inf)
        self.witness: list[np.ndarray | None] = [None] * count
        self.best_value = np.full(count, -np.inf)
        self.best_point: list[np.ndarray | None] = [None] * count

    def open(self) -> list[int]:
        return [j for j, s in enumerate(self.status) if s == "undecided"]

    def absorb(self, points: np.ndarray, method: str) -> None:
        """Forward-pass candidate inputs; refute every open direction one of them shows.

        Every tier absorbs its candidates at least once per node or step, so this is also where
        the inputs of the ``feed`` (a search running beside the tiers) are taken in.
        """
        self._forward(points, method)
        self.poll()

    def poll(self) -> None:
        """Absorb the ``feed``'s new inputs, at most every ``FEED_POLL_SECONDS``."""
        if self.feed is None or time.monotonic() - self.polled < FEED_POLL_SECONDS:
            return
        self.polled = time.monotonic()
        self._forward(self.feed(), "attack")

    def settled(self, j: int) -> bool:
        """Whether direction ``j`` is proved or refuted (after taking in the feed's inputs)."""
        self.poll()
        return self.status[j] != "undecided"

    def _forward(self, points: np.ndarray, method: str) -> None:
        if points.shape[0] == 0:
            return
        values = self.net.preactivations(points)[self.layer][:, self.neurons] * self.signs
        best = values.argmax(axis=0)
        best_values = values[best, np.arange(values.shape[1])]
        for j in np.flatnonzero(best_values > self.best_value):
            self.best_value[j] = best_values[j]
            self.best_point[j] = points[best[j]].copy()
            if best_values[j] > 0 and self.status[j] == "undecided":
                self.status[j], self.method[j] = "refuted", method
                self.witness[j] = points[best[j]].copy()

    def record_bound(self, j: int, bound: float, method: str, proved: bool = False) -> None:
        """Keep the tighter bound; ``proved`` marks a MILP that cleared its cutoff exactly."""
        self.bound[j] = min(self.bound[j], bound)
        proved = proved or self.bound[j] <= -self.margins[j]
        if self.status[j] == "undecided" and proved:
            self.status[j], self.method[j] = "proved", method

    def results(self, tiers: Sequence[str]) -> list[DirectionResult]:
        named = {"milp": "milp", "cuts": "lp+cuts", "lp": "lp"}
        fallback = next((named[t] for t in ("milp", "cuts", "lp") if t in tiers), tiers[-1])
        return [
            DirectionResult(
                d, self.status[j], float(self.bound[j]), self.method[j] or fallback, self.witness[j]
            )
            for j, d in enumerate(self.directions)
        ]


def _lp_tiers(
    book: DirectionBook, relaxation: LayerRelaxation, tiers: Sequence[str], deadline: float
) -> None:
    """Triangle LP for every open direction, then cut rounds for those still open."""
    net, layer = book.net, book.layer
    for tier in ("lp", "cuts"):
        if tier not in tiers:
            continue
        method = "lp" if tier == "lp" else "lp+cuts"
        for j in book.open():
            if book.status[j] != "undecided":
                continue
            if _remaining(deadline) <= 0:
                return
            d = book.directions[j]
            obj = _objective(relaxation.enc, net, layer, d.neuron, d.sign)
            rounds = CUT_ROUNDS if tier == "cuts" else 0
            for round_index in range(rounds + 1):
                lower_bound, x, primal = relaxation.solve(
                    obj, obj.offset + book.margins[j], deadline
                )
                book.record_bound(j, obj.offset - lower_bound + 2 * _EPS * abs(obj.offset), method)
                if x is not None:
                    book.absorb(x[None, :], method)
                if book.status[j] != "undecided" or primal is None or round_index == rounds:
                    break
                if relaxation.separate(primal) == 0:
                    break


@dataclass
class _Binaries:
    """The indicator columns of a relaxation, flattened over its layers, for branching."""

    z: np.ndarray
    h: np.ndarray
    y: np.ndarray
    upper_rows: np.ndarray  # (2, n)
    span: np.ndarray  # U - L of each neuron's pre-activation

    @classmethod
    def of(cls, relaxation: LayerRelaxation) -> _Binaries:
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


def _branching_neuron(
    binaries: _Binaries, phase: np.ndarray, primal: np.ndarray, row_dual: np.ndarray
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


def _bab_direction(
    book: DirectionBook,
    j: int,
    relaxation: LayerRelaxation,
    binaries: _Binaries,
    deadline: float,
    node_limit: int,
) -> None:
    """Decide direction ``j`` by branch and bound on ReLU phases over the LP relaxation.

    A node fixes some indicators: ``z_i = 1`` makes the triangle rows ``h = y >= 0``, ``z_i = 0``
    makes them ``h = 0 >= y``; the two children of a node cover its whole sub-domain, so the
    leaves' LP bounds (each the rigorous Neumaier-Shcherbina bound) bound ``max sign * y`` over the
    box. Best-first: the node with the largest parent bound is solved next; a node is pruned once
    its bound is ``<= -margin``, every LP optimum is forward-passed as a witness candidate. Unlike
    the decision MILP, no MIP tolerance slack enters, so extremes within ``(-margin - slack,
    -margin]`` become provable. It stops undecided at ``node_limit``, at the deadline, on a failed
    LP, or when a node's LP optimum is tight at every triangle yet neither proves nor refutes (the
    extreme lies within the margin).
    """
    d = book.directions[j]
    net, layer = book.net, book.layer
    obj = _objective(relaxation.enc, net, layer, d.neuron, d.sign)
    margin = float(book.margins[j])
    n = binaries.z.shape[0]
    queue = [(-np.inf, 0, np.full(n, -1, dtype=np.int8))]
    counter, worst_leaf = 1, -np.inf
    try:
        while queue:
            if counter > node_limit or _remaining(deadline) <= 0:
                return
            _, _, phase = heapq.heappop(queue)
            relaxation.set_column_bounds(
                binaries.z, (phase == 1).astype(np.float64), (phase != 0).astype(np.float64)
            )
            lower_bound, x, primal = relaxation.solve(obj, obj.offset + margin, deadline)
            if x is None or primal is None:
                return
            bound = obj.offset - lower_bound + 2 * _EPS * abs(obj.offset)
            book.absorb(x[None, :], "bab")
            if book.status[j] != "undecided":
                return
            if bound <= -margin:
                worst_leaf = max(worst_leaf, bound)
                continue
            branch = _branching_neuron(binaries, phase, primal, relaxation.row_dual)
            if branch < 0:
                return
            for value in (0, 1):
                child = phase.copy()
                child[branch] = value
                heapq.heappush(queue, (-bound, counter, child))
                counter += 1
        book.record_bound(j, worst_leaf, "bab", proved=True)
    finally:
        relaxation.set_column_bounds(binaries.z, np.zeros(n), np.ones(n))


def lp_dive(
    book: DirectionBook, j: int, relaxation: LayerRelaxation, deadline: float, method: str
) -> Iterator[None]:
    """Dive down the LP branch-and-bound tree of direction ``j`` toward a witness, step by step.

    A generator: each ``next`` is one step. The first solves the root LP; every later one takes
    the neuron :func:`_branching_neuron` would split at the current node, solves both children
    and moves to the one with the larger bound (where a witness, if any, is likelier). Every LP
    optimum is forward-passed. As the triangles the LP point uses get fixed it becomes a real
    network point, so a sign that shows only in a thin region is reached in a few dozen LPs,
    where best-first search would first bound every node above it. Proves nothing; it ends at a
    refutation, when both children clear the margin, when no triangle is loose, at the deadline
    or on a failed LP. The indicator bounds are restored whenever it ends or is closed.
    Refutations are credited to ``method`` (the tier the dive serves).
    """
    d = book.directions[j]
    binaries = _Binaries.of(relaxation)
    n = binaries.z.shape[0]
    obj = _objective(relaxation.enc, book.net, book.layer, d.neuron, d.sign)
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
            branch = _branching_neuron(binaries, phase, primal, dual)
            if branch < 0 or _remaining(deadline) <= 0:
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


REGION_FLIPS_PER_STEP = 32
"""Neighbouring regions :func:`region_ascent` tries per step (largest row duals first).

Measured on MNIST 4x100 ℓ1 = 0, fourth layer, neuron 66, from 10 PGD end points (64 starts each)
at 3 s per walk: 8 tries reached ``y > 0`` once in 5 s of walking, 32 twice in 13 s, all tight
walls three times in 23 s; 32 keeps the near misses (``y ~ -0.002``) in reach without spending
the budget of the hopeless ones."""


def _region_affine(
    net: Network, layer: int, active: list[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(A_j, c_j)`` with ``y_j = A_j x + c_j`` for ``j = 0 .. layer`` inside one activation pattern.

    With ``D_j = diag(active_j)`` (all ones for a layer without ReLU) the composition is
    ``A_0 = W_0, A_j = W_j D_{j-1} A_{j-1}`` and ``c_0 = b_0, c_j = W_j D_{j-1} c_{j-1} + b_j``.
    """
    maps = [(net.layers[0].weight, net.layers[0].bias)]
    for j in range(1, layer + 1):
        a_prev, c_prev = maps[-1]
        mask = active[j - 1].astype(np.float64)
        weight = net.layers[j].weight
        maps.append(((weight * mask) @ a_prev, (weight * mask) @ c_prev + net.layers[j].bias))
    return maps


@dataclass
class _RegionOptimum:
    """The LP optimum over one activation region (see :func:`_region_lp`)."""

    x: np.ndarray  # (n_in,) the optimal input, clipped into the box
    value: float  # sign * y at x by the region's affine map
    row_dual: np.ndarray  # one per region wall, in the order of :func:`_region_walls`
    basis: highspy.HighsBasis  # warm start for a neighbouring region's LP


def _region_walls(net: Network, layer: int) -> np.ndarray:
    """``(layer, neuron)`` of every region wall (ReLU below ``layer``), in the LPs' row order."""
    return np.array(
        [
            (j, i)
            for j in range(layer)
            if net.layers[j].relu
            for i in range(net.layers[j].out_features)
        ],
        dtype=np.int64,
    ).reshape(-1, 2)


def _region_lp(
    net: Network,
    box: Box,
    layer: int,
    neuron: int,
    sign: float,
    active: list[np.ndarray],
    stop: float,
    basis: highspy.HighsBasis | None = None,
) -> _RegionOptimum | None:
    """Maximise ``sign * y_{layer, neuron}`` over the box and one activation region, exactly.

    The region of pattern ``active`` is ``{x : s_ji (A_j x + c_j)_i >= 0}`` with ``s_ji = +1`` for
    an active and ``-1`` for an inactive ReLU of a layer below ``layer``; on it ``y`` is affine, so
    this LP finds the region's maximum (None if it is empty or the solve fails). Every region of
    the layer has the same rows (:func:`_region_walls`), so a neighbour's LP starts from
    ``basis``, its parent's optimal basis, whose point lies on their common wall: dual simplex
    then needs a few pivots instead of a cold solve.
    """
    maps = _region_affine(net, layer, active)
    relu_layers = [j for j in range(layer) if net.layers[j].relu]
    signs = [np.where(active[j], 1.0, -1.0) for j in relu_layers]
    rows = np.vstack(
        [-s[:, None] * maps[j][0] for s, j in zip(signs, relu_layers, strict=True)]
        + [np.empty((0, box.lower.size))]
    )
    upper = np.concatenate(
        [s * maps[j][1] for s, j in zip(signs, relu_layers, strict=True)] + [np.empty(0)]
    )
    upper[~rows.any(axis=1)] = _INF  # a constant wall does not depend on x (nor its rounding)
    highs = _new_highs()
    _set_options(highs, presolve="off", time_limit=max(stop - time.monotonic(), 1e-3))
    x_cols = _add_columns(highs, box.lower, box.upper)
    entry_rows, entry_cols = np.nonzero(rows)
    absmax = np.maximum(np.abs(box.lower), np.abs(box.upper))
    _add_rows(
        highs,
        np.full(upper.shape[0], -_INF),
        upper,
        entry_rows,
        x_cols[entry_cols],
        rows[entry_rows, entry_cols],
        absmax[entry_cols],
    )
    objective = sign * maps[layer][0][neuron]
    highs.changeColsCost(x_cols.shape[0], x_cols.astype(np.int32), -objective)
    if basis is not None:
        highs.setBasis(basis)
    highs.run()
    raise_if_interrupted()
    solution = highs.getSolution()
    if highs.getModelStatus() != _MODEL.kOptimal or not solution.value_valid:
        return None
    x = np.clip(np.asarray(solution.col_value), box.lower, box.upper)
    value = float(objective @ x + sign * maps[layer][1][neuron])
    return _RegionOptimum(x, value, np.asarray(solution.row_dual), highs.getBasis())


def region_ascent(
    net: Network,
    box: Box,
    layer: int,
    neurons: np.ndarray,
    signs: np.ndarray,
    points: np.ndarray,
    seconds_per_direction: float,
    deadline: float = np.inf,
) -> np.ndarray:
    """Exact local search over linear regions for ``sign * y_{layer, neuron} > 0``, per direction.

    Why: gradient steps approach a region's best vertex but stop short of it, and on deep
    ℓ1-free nets that is often where the rare sign is (MNIST 4x100, third layer, neuron 66: the
    best of 512 PGD starts had ``y = -0.011``; the LP over that point's activation region reached
    ``y = +4.7e-4``). Inside the activation pattern of a point the network below ``layer`` is
    affine, so the LP of :func:`_region_lp` finds the region's maximum. At its optimum some region
    walls ``y_ji = 0`` are tight; crossing one flips neuron ``(j, i)`` and, as ``y`` is continuous,
    the neighbour's maximum is at least the current one. Each step tries the walls in order of
    their row duals (the first-order gain of relaxing them), at most ``REGION_FLIPS_PER_STEP``,
    and moves to the first neighbour that is strictly better. It stops at a local maximum, at the
    wanted sign, or after ``seconds_per_direction``.

    Proves nothing: only :func:`onnx_exact.witness.observe` judges the points returned.

    Returns
    -------
    ``(d, n_in)`` the best point found per direction (``points[d]`` if no LP improved on it).
    """
    best = np.array(points, dtype=np.float64)
    walls = _region_walls(net, layer)
    for d, (neuron, sign) in enumerate(zip(neurons, signs, strict=True)):
        stop = min(deadline, time.monotonic() + seconds_per_direction)
        if time.monotonic() >= stop:
            break
        values = net.preactivations(best[d][None, :])
        active = [values[j][0] > 0.0 for j in range(layer)]
        current = float(sign * values[layer][0, neuron])
        if current > 0.0:
            continue
        optimum = _region_lp(net, box, layer, int(neuron), sign, active, stop)
        while optimum is not None:
            x = optimum.x
            observed = float(sign * net.preactivations(x[None, :])[layer][0, neuron])
            if observed > current:
                best[d], current = x, observed
            if current > 0.0:
                break
            step = None
            dual = optimum.row_dual
            for row in np.argsort(-np.abs(dual))[:REGION_FLIPS_PER_STEP]:
                if dual[row] == 0.0 or time.monotonic() >= stop:
                    break
                j, i = walls[row]
                neighbour = [mask.copy() for mask in active]
                neighbour[j][i] = not neighbour[j][i]
                found = _region_lp(
                    net, box, layer, int(neuron), sign, neighbour, stop, optimum.basis
                )
                if found is not None and found.value > optimum.value + 1e-9 * max(
                    1.0, abs(optimum.value)
                ):
                    active, step = neighbour, found
                    break
            optimum = step
    return best


PATTERN_FREE_NEURONS = 10
"""Indicators a :func:`pattern_search` step leaves free (the rest are fixed to the point's phases).

Measured on MNIST 4x100 ℓ1 = 0, fourth layer, neuron 66 +1, one search of three steps of at most
3 s from each of 16 PGD end points (64 starts, 1 s): with 10 free indicators 3 searches reached
``y > 0``, each in its first step, all three from end points with ``y`` in [-0.015, -0.006]; the
root of a step with 30 free indicators did not finish in 1 s."""

PATTERN_STEP_SECONDS = 3.0
"""HiGHS time limit of one :func:`pattern_search` step (presolve alone takes about 0.5 s there)."""


def pattern_search(
    net: Network,
    box: Box,
    bounds: Sequence,
    states: Sequence[np.ndarray],
    layer: int,
    neuron: int,
    sign: int,
    point: np.ndarray,
    seconds: float,
    deadline: float = np.inf,
) -> np.ndarray:
    """Large-neighbourhood search over activation patterns for ``sign * y_{layer, neuron} > 0``.

    Why: :func:`region_ascent` moves one wall at a time and stops where no single flip helps,
    which is where the rare sign of a deep ℓ1-free net hides (MNIST 4x100, fourth layer, neuron
    66: PGD and region LPs ended at ``y`` in [-0.057, -0.04] in 30 of 30 rounds). A step here
    solves the decision MILP of the layers below ``layer`` (:func:`layer_encoding`) with every
    indicator fixed to the phase it has at the current point except the
    ``PATTERN_FREE_NEURONS`` whose pre-activations are nearest their kink relative to their
    bound width ``U - L``: the exact maximum over the ``2^10`` patterns of that neighbourhood
    (a sub-MILP HiGHS solves at its root), started from the current point. The step's optimum
    becomes the next centre; the search stops at the wanted sign (``objective_target``), when a
    step does not improve, or after ``seconds``. (Local branching, Fischetti and Lodi 2003, on
    the network's own indicators.)

    Proves nothing: only :func:`onnx_exact.witness.observe` judges the point returned.

    Returns
    -------
    ``(n_in,)`` the best point found (``point`` if no step improved on it).
    """
    stop = min(deadline, time.monotonic() + seconds)
    best = np.clip(np.asarray(point, dtype=np.float64).reshape(-1), box.lower, box.upper)

    def value(x: np.ndarray) -> float:
        return float(sign * net.preactivations(x[None, :])[layer][0, neuron])

    current = value(best)
    if current > 0.0 or time.monotonic() >= stop:
        return best
    highs = _new_highs()
    enc = layer_encoding(highs, net, box, bounds, states, layer, integral=True)
    z_cols = np.concatenate([z[z >= 0] for z in enc.z])
    if not z_cols.size:
        return best  # the model is an LP: the region LPs already found its optimum
    width = np.concatenate(
        [(bounds[j].upper - bounds[j].lower)[z >= 0] for j, z in enumerate(enc.z)]
    )
    width = np.maximum(width, _EPS)
    obj = _objective(enc, net, layer, neuron, sign)
    highs.changeColsCost(obj.cols.shape[0], obj.cols.astype(np.int32), obj.costs)
    # min obj <= offset - 1e-9 means sign * y >= 1e-9 at the step's optimum: stop there.
    _set_options(
        highs, mip_heuristic_run_feasibility_jump=False, objective_target=obj.offset - 1e-9
    )
    n_free = min(PATTERN_FREE_NEURONS, z_cols.size)
    while time.monotonic() < stop:
        values = net.preactivations(best[None, :])
        pre = np.concatenate([values[j][0][z >= 0] for j, z in enumerate(enc.z)])
        phase = (pre >= 0.0).astype(np.float64)  # as solution_from_input sets z (threshold 0)
        free = np.zeros(z_cols.size, dtype=bool)
        free[np.argsort(np.abs(pre) / width, kind="stable")[:n_free]] = True
        highs.changeColsBounds(
            z_cols.size,
            z_cols.astype(np.int32),
            np.where(free, 0.0, phase),
            np.where(free, 1.0, phase),
        )
        cols, vals = enc.solution_from_input(net, best)
        highs.setSolution(cols.shape[0], cols, vals)
        _set_options(
            highs,
            time_limit=time_limit_option(
                highs, min(PATTERN_STEP_SECONDS, stop - time.monotonic()), mip=True
            ),
        )
        highs.run()
        raise_if_interrupted()
        solution = highs.getSolution()
        if not solution.value_valid:
            break
        x = np.clip(np.asarray(solution.col_value)[enc.x], box.lower, box.upper)
        found = value(x)
        if found <= current + 1e-9 * max(1.0, abs(current)):
            break
        best, current = x, found
        if current > 0.0:
            break
    return best


def _bab_tier(
    book: DirectionBook,
    relaxation: LayerRelaxation,
    deadline: float,
    time_cap: float,
    node_limit: int,
) -> None:
    """Branch and bound for every open direction in turn, each capped by time and nodes."""
    binaries = _Binaries.of(relaxation)
    for j in book.open():
        if book.status[j] != "undecided":
            continue
        if _remaining(deadline) <= 0:
            return
        cap = min(deadline, time.monotonic() + time_cap)
        _bab_direction(book, j, relaxation, binaries, cap, node_limit)


def _milp_tier(
    book: DirectionBook,
    context: _MilpContext,
    slack: np.ndarray,
    deadline: float,
    jobs: int,
    time_cap: float,
) -> None:
    """Decision MILPs for the open directions, in rounds of ``MILP_ROUND_SIZE``.

    After each round, every input harvested by its MILPs is forward-passed against the directions
    still open. The rounds do not depend on ``jobs``, so serial and parallel runs agree.
    """
    pending = book.open()
    if not pending:
        return
    executor = worker = None
    if jobs > 1 and len(pending) > 1 and can_start_workers():
        executor = parallel.worker_pool(jobs)
        worker = parallel.with_context(_worker_milp, parallel.TaskContext(context))
    while pending and _remaining(deadline) > 0:
        batch, pending = pending[:MILP_ROUND_SIZE], pending[MILP_ROUND_SIZE:]
        tasks = [
            (
                book.directions[j],
                float(book.margins[j]),
                float(slack[book.neurons[j]]),
                book.best_point[j],
                deadline,
                time_cap,
            )
            for j in batch
        ]
        if executor is None:  # a serial MILP stops once the book's feed refutes it
            outcomes = [
                _decision_milp(context, *task, stop=partial(book.settled, j) if book.feed else None)
                for j, task in zip(batch, tasks, strict=True)
            ]
        else:
            outcomes = list(executor.map(worker, tasks))
        for j, outcome in zip(batch, outcomes, strict=True):
            book.record_bound(j, outcome.bound, "milp", outcome.proved)
        for outcome in outcomes:
            book.absorb(outcome.points, "milp")
        pending = [j for j in pending if book.status[j] == "undecided"]


def decide_directions(
    net: Network,
    box: Box,
    bounds: Sequence,
    states: Sequence[np.ndarray],
    layer: int,
    directions: Sequence[Direction],
    margins: np.ndarray,
    deadline: float,
    *,
    tiers: Sequence[str] = _TIERS,
    jobs: int = 1,
    effort: float = 1.0,
    relaxation: LayerRelaxation | None = None,
    feed: WitnessFeed | None = None,
) -> list[DirectionResult]:
    """Prove or refute sign directions of one layer: LP, then LP + ideal cuts, then MILP.

    Parameters
    ----------
    box : the network-space box.
    bounds : sound ``LayerBounds`` for layers ``0..layer``; ``bounds[layer]`` is not used.
    states : ``NeuronState`` arrays for layers ``0..layer-1``.
    directions : all with ``direction.layer == layer``.
    margins : per neuron of ``layer``; a direction is proved iff its sound bound ``<= -margin``.
    deadline : a ``time.monotonic()`` value; directions still open then are "undecided".
    tiers : any of "lp", "cuts", "bab", "milp" (cuts and bab imply the LP they work on).
    jobs : workers of :func:`parallel.worker_pool` for the decision MILPs (results equal ``jobs=1``).
    effort : multiplies the per-direction caps (``DIRECTION_TIME_LIMIT`` seconds per decision
        MILP, ``BAB_TIME_LIMIT`` seconds and ``BAB_NODE_LIMIT`` nodes per branch and bound).
    relaxation : the layer's :class:`LayerRelaxation`, built over the same ``bounds`` and
        ``states``; reusing it across calls keeps the warm basis and the cut pool. Built here when
        omitted.
    feed : inputs found by a search running beside the tiers (see :data:`WitnessFeed`); a
        direction they refute is dropped by the tier working on it, a serial decision MILP
        included.

    Returns
    -------
    One :class:`DirectionResult` per direction, in the given order. Every candidate input met on
    the way (LP optima, MILP incumbents) is forward-passed against all open directions.
    """
    unknown = set(tiers) - set(_TIERS)
    if unknown:
        raise ValueError(f"unknown tiers {sorted(unknown)}; use a subset of {_TIERS}")
    if any(d.layer != layer or d.sign not in (1, -1) for d in directions):
        raise ValueError(f"every direction must have layer={layer} and sign +1 or -1")
    book = DirectionBook(net, layer, directions, margins, feed)
    if not directions or _remaining(deadline) <= 0:
        return book.results(tiers)
    tiers = tuple(tiers)
    first_method = "lp" if ("lp" in tiers or "cuts" in tiers) else tiers[0]
    book.absorb(box.center[None, :], first_method)
    if ("lp" in tiers or "cuts" in tiers) and _remaining(deadline) > 0:
        if relaxation is None:
            relaxation = LayerRelaxation.build(net, box, bounds, states, layer)
        _lp_tiers(book, relaxation, tiers, deadline)
    if "bab" in tiers and _remaining(deadline) > 0:
        if relaxation is None:
            relaxation = LayerRelaxation.build(net, box, bounds, states, layer)
        _bab_tier(book, relaxation, deadline, BAB_TIME_LIMIT * effort, int(BAB_NODE_LIMIT * effort))
    if "milp" in tiers and _remaining(deadline) > 0:
        context = _MilpContext(
            net,
            box,
            list(bounds[:layer]),
            list(states[:layer]),
            layer,
            relaxation.cuts if relaxation is not None else [],
            relaxation.highs.getNumCol() if relaxation is not None else 0,
        )
        slack = milp_slack(net, box, bounds, layer)
        _milp_tier(book, context, slack, deadline, jobs, DIRECTION_TIME_LIMIT * effort)
    return book.results(tiers)


# --------------------------------------------------------------------------- baselines


def _labels(
    relu: bool,
    inactive: np.ndarray,
    active: np.ndarray,
    seen_pos: np.ndarray,
    seen_neg: np.ndarray,
) -> np.ndarray:
    """NeuronState per neuron from proofs and witnesses (layers without ReLU are ACTIVE)."""
    state = NeuronState
    labels = np.full(inactive.shape[0], state.UNDECIDED, dtype=np.int64)
    if not relu:
        labels[:] = state.ACTIVE
        return labels
    labels[seen_pos & seen_neg] = state.UNSTABLE
    labels[active] = state.ACTIVE
    labels[inactive] = state.INACTIVE
    return labels


def per_neuron_stability(
    net: Network, box: Box, bounds: Sequence, margins: Sequence[np.ndarray], deadline: float
) -> tuple[list[np.ndarray], np.ndarray, bool]:
    """The old approach (Serra et al. 2020): two exact MILPs (max and min of ``y``) per neuron.

    Layer by layer, big-M with the interval ``bounds``, each layer's bounds tightened by the
    optima found for it before the next layer is encoded. A neuron is INACTIVE iff
    ``max y <= -margin`` (ACTIVE iff ``min y >= margin``) where the maximum is the MILP dual bound
    plus the slack of the module's policy (a rigorous LP bound for the first layer, which has no
    binaries); it is UNSTABLE iff the forward-passed optima show both signs. Directions already
    proved by ``bounds`` are not re-solved (their label cannot change).

    Returns
    -------
    (NeuronState arrays for every layer -- ACTIVE for layers without ReLU --, witnesses, timed out)
    """
    bounds = [
        _bounds.LayerBounds(np.array(b.lower, float), np.array(b.upper, float)) for b in bounds
    ]
    states: list[np.ndarray] = []
    witnesses: list[np.ndarray] = []
    timed_out = False
    for k, layer in enumerate(net.layers):
        n = layer.out_features
        seen_pos, seen_neg = np.zeros(n, bool), np.zeros(n, bool)
        margin = np.asarray(margins[k], dtype=np.float64)
        proved = {1: bounds[k].upper <= -margin, -1: bounds[k].lower >= margin}
        if not layer.relu or timed_out:
            states.append(_labels(layer.relu, proved[1], proved[-1], seen_pos, seen_neg))
            timed_out = timed_out or _remaining(deadline) <= 0
            continue
        highs = _new_highs()
        enc = add_network_encoding(highs, net, box, bounds, [], k - 1, integral=True)
        if enc.has_binaries:
            _set_options(highs, mip_heuristic_run_feasibility_jump=False)
        slack = milp_slack(net, box, bounds, k) if enc.has_binaries else np.zeros(n)
        relaxation = None
        if not enc.has_binaries:
            relaxation = LayerRelaxation(net, k, highs, enc)
        for i in range(n):
            for sign in (1, -1):
                if proved[sign][i]:
                    continue
                time_limit = _remaining(deadline)
                if time_limit <= 0:
                    timed_out = True
                    break
                obj = _objective(enc, net, k, i, sign)
                if relaxation is not None:
                    lower_bound, x, _ = relaxation.solve(obj, _INF, deadline)
                    points = [] if x is None else [x]
                else:
                    lower_bound, points, _ = _run_min(
                        highs, enc, obj, _INF, -_INF, None, net, time_limit
                    )
                extreme = obj.offset - lower_bound + slack[i] + 2 * _EPS * abs(obj.offset)
                proved[sign][i] = extreme <= -margin[i]
                if sign == 1:
                    bounds[k].upper[i] = min(bounds[k].upper[i], extreme)
                else:
                    bounds[k].lower[i] = max(bounds[k].lower[i], -extreme)
                if points:
                    x = np.clip(np.array(points[-1:]), box.lower, box.upper)
                    y = net.preactivations(x)[k][0, i]
                    if sign * y > 0:
                        (seen_pos if sign == 1 else seen_neg)[i] = True
                        witnesses.append(x[0])
            if timed_out:
                break
        bounds[k] = _bounds.LayerBounds(
            np.minimum(bounds[k].lower, bounds[k].upper),
            np.maximum(bounds[k].lower, bounds[k].upper),
        )
        states.append(_labels(True, proved[1], proved[-1], seen_pos, seen_neg))
    points = np.array(witnesses).reshape(-1, net.in_features)
    return states, points, timed_out


def isa_stability(
    net: Network,
    box: Box,
    bounds: Sequence,
    seen_pos: Sequence[np.ndarray],
    seen_neg: Sequence[np.ndarray],
    margins: Sequence[np.ndarray],
    deadline: float,
) -> tuple[list[np.ndarray], np.ndarray, bool]:
    """The paper's ISA (Serra et al. 2021) as closely as HiGHS allows.

    One MILP over all ReLU layers (big-M with the interval ``bounds``); candidates ``P`` (never
    seen ``y > 0``: maybe inactive) and ``Q`` (never seen ``y < 0``: maybe active) get continuous
    ``p_i <= z_i``, ``q_i <= 1 - z_i``; maximise ``sum p + sum q``. Each incumbent's input is
    forward-passed in float64 and updates the candidates. When the optimum is proved ``< 0.5``
    (objective cutoff), every candidate still in "prove" mode is stable.

    Margins (``s = margin + slack`` of the module's policy): a P candidate starts in *prove* mode,
    its indicator's threshold at ``-s`` (``p_i = 1`` needs ``y_i >= -s``), so the final proof means
    ``max y <= -margin`` like every other MILP proof here. An incumbent with ``y_i`` in ``(-s, 0]``
    shows it cannot be proved; it switches to *witness* mode (threshold ``+s``) to find out whether
    ``y_i > 0`` is possible, which decides UNSTABLE vs UNDECIDED as the per-direction engines do
    (only a maximum within ``(0, s)`` can be labelled differently). Q mirrors this. A neuron that
    is a candidate both ways with opposite thresholds uses 0.

    Differences from the paper: HiGHS has no lazy constraints, so the solve is interrupted at the
    first incumbent, candidates are updated and the MILP is rebuilt and re-solved (the paper keeps
    one branch-and-bound tree with lazy ``p_i = 0``); LP-relaxation points are not injected as
    heuristic solutions; the margin modes above are ours. Incumbents that the forward pass does
    not confirm drop the candidates they claim, so every round changes at least one candidate.

    Returns
    -------
    (NeuronState arrays for every layer -- ACTIVE for layers without ReLU --, witnesses, timed out)
    """
    n_layers = len(net.layers)
    relu_layers = net.relu_layer_indices
    last = max(relu_layers) if relu_layers else -1
    sizes = [layer.out_features for layer in net.layers[: last + 1]]
    splits = np.cumsum(sizes)[:-1]

    def flat(arrays, dtype) -> np.ndarray:
        """Layers ``0..last`` concatenated into one vector over all encoded neurons."""
        parts = [np.asarray(a, dtype) for a in arrays[: last + 1]]
        return np.concatenate(parts) if parts else np.empty(0, dtype)

    pos, neg = flat(seen_pos, bool), flat(seen_neg, bool)
    margin = flat(margins, np.float64)
    lower = flat([b.lower for b in bounds], np.float64)
    upper = flat([b.upper for b in bounds], np.float64)
    shift = margin + flat([milp_slack(net, box, bounds, k) for k in range(last + 1)], np.float64)
    relu = flat([np.full(n, net.layers[k].relu) for k, n in enumerate(sizes)], bool)
    inactive = relu & (upper <= -margin)
    active = relu & (lower >= margin)
    open_ = relu & ~inactive & ~active
    none_mode, prove_mode, witness_mode = 0, 1, 2
    p_mode = np.where(open_ & ~pos & (lower < -shift), prove_mode, none_mode)
    q_mode = np.where(open_ & ~neg & (upper > shift), prove_mode, none_mode)
    witnesses: list[np.ndarray] = []
    timed_out = False
    while np.any(p_mode) or np.any(q_mode):
        time_limit = _remaining(deadline)
        if time_limit <= 0:
            timed_out = True
            break
        has_p, has_q = p_mode != none_mode, q_mode != none_mode
        t_p = np.where(p_mode == prove_mode, -shift, shift)
        t_q = np.where(q_mode == prove_mode, shift, -shift)
        threshold = np.where(
            has_p & has_q,
            np.where(t_p == t_q, t_p, 0.0),
            np.where(has_p, t_p, np.where(has_q, t_q, 0.0)),
        )
        highs = _new_highs()
        enc = add_network_encoding(
            highs, net, box, bounds, [], last, integral=True, thresholds=np.split(threshold, splits)
        )
        z = flat(enc.z, np.int64)
        p_z, q_z = z[has_p], z[has_q]
        n_p, n_q = p_z.shape[0], q_z.shape[0]
        pq = _add_columns(highs, np.zeros(n_p + n_q), np.ones(n_p + n_q))
        ones = np.ones(n_p + n_q)
        _add_rows(  # p - z <= 0 and q + z <= 1
            highs,
            np.full(n_p + n_q, -_INF),
            np.concatenate([np.zeros(n_p), np.ones(n_q)]),
            np.repeat(np.arange(n_p + n_q), 2),
            np.stack([pq, np.concatenate([p_z, q_z])], axis=1).ravel(),
            np.stack([ones, np.concatenate([-np.ones(n_p), np.ones(n_q)])], axis=1).ravel(),
            np.ones(2 * (n_p + n_q)),
        )
        highs.changeColsCost(n_p + n_q, pq.astype(np.int32), -ones)
        _set_options(
            highs,
            objective_bound=-0.5,
            time_limit=time_limit_option(highs, time_limit, mip=True),
            mip_heuristic_run_feasibility_jump=False,
        )
        found: list[tuple[np.ndarray, np.ndarray]] = []

        def on_solution(event, found=found, pq=pq, x_cols=enc.x) -> None:
            if event.data_out.objective_function_value <= -0.5:
                solution = event.data_out.mip_solution
                found.append((np.array(solution[x_cols]), np.array(solution[pq])))

        def on_interrupt(event, found=found) -> None:
            if found:
                event.interrupt()

        highs.cbMipSolution.subscribe(on_solution)
        highs.cbMipInterrupt.subscribe(on_interrupt)
        run_status = highs.run()
        raise_if_interrupted()
        status = highs.getModelStatus()
        if not found:
            dual_bound = highs.getInfo().mip_dual_bound
            trusted = run_status != highspy.HighsStatus.kError and status in _BOUND_STATUSES
            if trusted and (status == _MODEL.kInfeasible or dual_bound >= -0.5):
                inactive |= p_mode == prove_mode
                active |= q_mode == prove_mode
                break
            # A time limit or a failed solve proves nothing: the open candidates are kept.
            timed_out = True
            break
        points = np.clip(np.array([f[0] for f in found]), box.lower, box.upper)
        values = np.concatenate(net.preactivations(points)[: last + 1], axis=1)
        new_sign = ((values > 0) & ~pos) | ((values < 0) & ~neg)
        witnesses.extend(points[new_sign.any(axis=1)])
        pos |= (values > 0).any(axis=0)
        neg |= (values < 0).any(axis=0)
        before = (p_mode.copy(), q_mode.copy())
        p_mode[pos] = none_mode
        q_mode[neg] = none_mode
        p_unprovable = (p_mode == prove_mode) & (values > -shift).any(axis=0)
        q_unprovable = (q_mode == prove_mode) & (values < shift).any(axis=0)
        p_mode[p_unprovable] = np.where(upper[p_unprovable] > shift[p_unprovable], witness_mode, 0)
        q_mode[q_unprovable] = np.where(lower[q_unprovable] < -shift[q_unprovable], witness_mode, 0)
        if np.array_equal(before[0], p_mode) and np.array_equal(before[1], q_mode):
            claimed = found[-1][1] >= 0.5
            p_mode[np.flatnonzero(has_p)[claimed[:n_p]]] = none_mode
            q_mode[np.flatnonzero(has_q)[claimed[n_p:]]] = none_mode
    split = [np.split(a, splits) if last >= 0 else [] for a in (inactive, active, pos, neg)]
    states = [
        _labels(net.layers[k].relu, *(part[k] for part in split))
        if k <= last
        else _labels(False, *(np.zeros(net.layers[k].out_features, bool),) * 4)
        for k in range(n_layers)
    ]
    return states, np.array(witnesses).reshape(-1, net.in_features), timed_out
