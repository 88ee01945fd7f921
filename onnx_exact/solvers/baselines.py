"""The paper's baselines: the single ISA MILP and two MILPs per neuron (``method="isa"``, ``"per-neuron"``)."""

from __future__ import annotations

from collections.abc import Sequence

import highspy
import numpy as np

from onnx_exact.bounds import crown as _bounds
from onnx_exact.core.box import Box
from onnx_exact.core.network import Network
from onnx_exact.core.verdicts import NeuronState
from onnx_exact.interrupts import raise_if_interrupted
from onnx_exact.solvers.exact_tiers import run_min
from onnx_exact.solvers.highs_model import (
    BOUND_STATUSES,
    FLOAT_EPS,
    INF,
    MODEL_STATUS,
    add_columns,
    add_rows,
    new_highs,
    seconds_left,
    set_options,
    time_limit_option,
)
from onnx_exact.solvers.lp_relaxation import LayerRelaxation, direction_objective
from onnx_exact.solvers.milp_encoding import add_network_encoding, milp_slack


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
            timed_out = timed_out or seconds_left(deadline) <= 0
            continue
        highs = new_highs()
        enc = add_network_encoding(highs, net, box, bounds, [], k - 1, integral=True)
        if enc.has_binaries:
            set_options(highs, mip_heuristic_run_feasibility_jump=False)
        slack = milp_slack(net, box, bounds, k) if enc.has_binaries else np.zeros(n)
        relaxation = None
        if not enc.has_binaries:
            relaxation = LayerRelaxation(net, k, highs, enc)
        for i in range(n):
            for sign in (1, -1):
                if proved[sign][i]:
                    continue
                time_limit = seconds_left(deadline)
                if time_limit <= 0:
                    timed_out = True
                    break
                obj = direction_objective(enc, net, k, i, sign)
                if relaxation is not None:
                    lower_bound, x, _ = relaxation.solve(obj, INF, deadline)
                    points = [] if x is None else [x]
                else:
                    lower_bound, points, _ = run_min(
                        highs, enc, obj, INF, -INF, None, net, time_limit
                    )
                extreme = obj.offset - lower_bound + slack[i] + 2 * FLOAT_EPS * abs(obj.offset)
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
        time_limit = seconds_left(deadline)
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
        highs = new_highs()
        enc = add_network_encoding(
            highs, net, box, bounds, [], last, integral=True, thresholds=np.split(threshold, splits)
        )
        z = flat(enc.z, np.int64)
        p_z, q_z = z[has_p], z[has_q]
        n_p, n_q = p_z.shape[0], q_z.shape[0]
        pq = add_columns(highs, np.zeros(n_p + n_q), np.ones(n_p + n_q))
        ones = np.ones(n_p + n_q)
        add_rows(  # p - z <= 0 and q + z <= 1
            highs,
            np.full(n_p + n_q, -INF),
            np.concatenate([np.zeros(n_p), np.ones(n_q)]),
            np.repeat(np.arange(n_p + n_q), 2),
            np.stack([pq, np.concatenate([p_z, q_z])], axis=1).ravel(),
            np.stack([ones, np.concatenate([-np.ones(n_p), np.ones(n_q)])], axis=1).ravel(),
            np.ones(2 * (n_p + n_q)),
        )
        highs.changeColsCost(n_p + n_q, pq.astype(np.int32), -ones)
        set_options(
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
            trusted = run_status != highspy.HighsStatus.kError and status in BOUND_STATUSES
            if trusted and (status == MODEL_STATUS.kInfeasible or dual_bound >= -0.5):
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
