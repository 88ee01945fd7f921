"""The exact tiers on one interface: ``decide_directions`` over ``lp``, ``cuts``, ``bab`` and ``milp``.

A batch of directions goes through the tiers in order; every candidate input is forward-passed
and refutes open directions; bounds prove them past their margins (see :mod:`onnx_exact.solvers`).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import highspy
import numpy as np

from onnx_exact import parallel
from onnx_exact.core.box import Box
from onnx_exact.core.directions import (
    FEED_POLL_SECONDS,
    Direction,
    DirectionBook,
    DirectionResult,
    WitnessFeed,
)
from onnx_exact.core.network import Network
from onnx_exact.core.verdicts import TIERS, Tier
from onnx_exact.interrupts import raise_if_interrupted
from onnx_exact.parallel import can_start_workers
from onnx_exact.solvers.highs_model import (
    BOUND_STATUSES,
    FLOAT_EPS,
    INF,
    MODEL_STATUS,
    add_rows,
    new_highs,
    seconds_left,
    set_options,
    time_limit_option,
)
from onnx_exact.solvers.lp_relaxation import (
    CUT_ROUNDS,
    Binaries,
    DirectionObjective,
    LayerRelaxation,
    branching_neuron,
    direction_objective,
)
from onnx_exact.solvers.milp_encoding import NetworkEncoding, layer_encoding, milp_slack

MILP_ROUND_SIZE = 8
"""Decision MILPs solved between two exchanges of witnesses (fixed, so jobs=1 and jobs=n agree)."""


DIRECTION_TIME_LIMIT = TIERS[Tier.MILP].direction_seconds
"""Cap in seconds on one decision MILP (from the tier table, :data:`core.verdicts.TIERS`)."""


MILP_CUT_POOL = 2000
"""``mip_pool_soft_limit`` of a decision MILP (HiGHS's default is 10,000), which also runs without
primal heuristics (``mip_heuristic_effort = 0``).

Why: the decision MILP is there for proofs; witnesses come far more cheaply from the attack tier,
and every MILP incumbent is still harvested. With HiGHS's defaults the root cut loop fills the pool
with thousands of dense cuts and a silent sub-MIP heuristic phase allocates more on top, so the
memory of one MILP grows with its run time; a smaller pool ends the root loop sooner and, with the
heuristics off, keeps memory flat while the dual bound is as good (the measurement is in
``docs/benchmarks.md``, "Why the constants are what they are")."""


MILP_HEURISTIC_EFFORT = 0.0


BAB_NODE_LIMIT = TIERS[Tier.BAB].direction_nodes


BAB_TIME_LIMIT = TIERS[Tier.BAB].direction_seconds
"""Caps on the LP branch and bound of one direction (nodes, seconds), from the tier table."""


_TIERS = ("lp", "cuts", "bab", "milp")


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


def run_min(
    highs: highspy.Highs,
    enc: NetworkEncoding,
    obj: DirectionObjective,
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
    set_options(
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
    if run_status == highspy.HighsStatus.kError or status not in BOUND_STATUSES:
        return -np.inf, harvested, status  # the solve failed: it proves nothing
    if status == MODEL_STATUS.kInfeasible:
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
    highs = new_highs()
    enc = layer_encoding(
        highs, net, context.box, context.bounds, context.states, layer, integral=True
    )
    if highs.getNumCol() == context.cut_columns:  # else the rows would constrain other columns
        for cut in context.cuts:
            add_rows(highs, *cut)
    obj = direction_objective(enc, net, layer, direction.neuron, direction.sign)
    if not enc.has_binaries:
        relaxation = LayerRelaxation(net, layer, highs, enc)
        lower_bound, x, _ = relaxation.solve(obj, obj.offset + margin, deadline)
        points = np.empty((0, net.in_features)) if x is None else x[None, :]
        bound = obj.offset - lower_bound
        return _MilpOutcome(bound <= -margin, bound, points)
    set_options(
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
        time_limit = min(seconds_left(deadline), time_cap)
        if time_limit <= 0:
            break
        lower_bound, harvested, status = run_min(
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
        if status != MODEL_STATUS.kObjectiveTarget:
            break
        target = -INF
    points = np.concatenate(all_points) if all_points else np.empty((0, net.in_features))
    return _MilpOutcome(proved, best_bound, points)


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
            if seconds_left(deadline) <= 0:
                return
            d = book.directions[j]
            obj = direction_objective(relaxation.enc, net, layer, d.neuron, d.sign)
            rounds = CUT_ROUNDS if tier == "cuts" else 0
            for round_index in range(rounds + 1):
                lower_bound, x, primal = relaxation.solve(
                    obj, obj.offset + book.margins[j], deadline
                )
                book.record_bound(
                    j, obj.offset - lower_bound + 2 * FLOAT_EPS * abs(obj.offset), method
                )
                if x is not None:
                    book.absorb(x[None, :], method)
                if book.status[j] != "undecided" or primal is None or round_index == rounds:
                    break
                if relaxation.separate(primal) == 0:
                    break


def _bab_direction(
    book: DirectionBook,
    j: int,
    relaxation: LayerRelaxation,
    binaries: Binaries,
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
    obj = direction_objective(relaxation.enc, net, layer, d.neuron, d.sign)
    margin = float(book.margins[j])
    n = binaries.z.shape[0]
    queue = [(-np.inf, 0, np.full(n, -1, dtype=np.int8))]
    counter, worst_leaf = 1, -np.inf
    try:
        while queue:
            if counter > node_limit or seconds_left(deadline) <= 0:
                return
            _, _, phase = heapq.heappop(queue)
            relaxation.set_column_bounds(
                binaries.z, (phase == 1).astype(np.float64), (phase != 0).astype(np.float64)
            )
            lower_bound, x, primal = relaxation.solve(obj, obj.offset + margin, deadline)
            if x is None or primal is None:
                return
            bound = obj.offset - lower_bound + 2 * FLOAT_EPS * abs(obj.offset)
            book.absorb(x[None, :], "bab")
            if book.status[j] != "undecided":
                return
            if bound <= -margin:
                worst_leaf = max(worst_leaf, bound)
                continue
            branch = branching_neuron(binaries, phase, primal, relaxation.row_dual)
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


def _bab_tier(
    book: DirectionBook,
    relaxation: LayerRelaxation,
    deadline: float,
    time_cap: float,
    node_limit: int,
) -> None:
    """Branch and bound for every open direction in turn, each capped by time and nodes."""
    binaries = Binaries.of(relaxation)
    for j in book.open():
        if book.status[j] != "undecided":
            continue
        if seconds_left(deadline) <= 0:
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
    while pending and seconds_left(deadline) > 0:
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
    if not directions or seconds_left(deadline) <= 0:
        return book.results(tiers)
    tiers = tuple(tiers)
    first_method = "lp" if ("lp" in tiers or "cuts" in tiers) else tiers[0]
    book.absorb(box.center[None, :], first_method)
    if ("lp" in tiers or "cuts" in tiers) and seconds_left(deadline) > 0:
        if relaxation is None:
            relaxation = LayerRelaxation.build(net, box, bounds, states, layer)
        _lp_tiers(book, relaxation, tiers, deadline)
    if "bab" in tiers and seconds_left(deadline) > 0:
        if relaxation is None:
            relaxation = LayerRelaxation.build(net, box, bounds, states, layer)
        _bab_tier(book, relaxation, deadline, BAB_TIME_LIMIT * effort, int(BAB_NODE_LIMIT * effort))
    if "milp" in tiers and seconds_left(deadline) > 0:
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
