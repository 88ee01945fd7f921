"""Witness searches over activation regions: LP ascent across regions and pattern search.

They find inputs (each checked by a float64 forward pass) and prove nothing; the LPs and sub-MILPs
are built with :mod:`onnx_exact.solvers.highs_model`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnx_exact.core.box import Box
from onnx_exact.core.network import Network
from onnx_exact.interrupts import raise_if_interrupted
from onnx_exact.solvers.highs_model import (
    FLOAT_EPS,
    INF,
    MODEL_STATUS,
    HighsBasis,
    add_columns,
    add_rows,
    new_highs,
    set_options,
    time_limit_option,
)
from onnx_exact.solvers.lp_relaxation import direction_objective
from onnx_exact.solvers.milp_encoding import layer_encoding

REGION_FLIPS_PER_STEP = 32
"""Neighbouring regions :func:`region_ascent` tries per step (largest row duals first).

Why a cap: each try is one warm LP. More tries per step find an improving neighbour more often
but make every step slower; trying every tight wall spends the time per direction on walks that
do not reach the wanted sign, while too few tries miss the improving wall of a near miss, which
can rank low by dual value. (The measurement that set 32 is in ``docs/benchmarks.md``, "Why the
constants are what they are".)"""


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
    basis: HighsBasis  # warm start for a neighbouring region's LP


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
    basis: HighsBasis | None = None,
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
    upper[~rows.any(axis=1)] = INF  # a constant wall does not depend on x (nor its rounding)
    highs = new_highs()
    set_options(highs, presolve="off", time_limit=max(stop - time.monotonic(), 1e-3))
    x_cols = add_columns(highs, box.lower, box.upper)
    entry_rows, entry_cols = np.nonzero(rows)
    absmax = np.maximum(np.abs(box.lower), np.abs(box.upper))
    add_rows(
        highs,
        np.full(upper.shape[0], -INF),
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
    if highs.getModelStatus() != MODEL_STATUS.kOptimal or not solution.value_valid:
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
    ℓ1-free nets that is often where the rare sign is: the best of hundreds of PGD starts can still
    show the common sign while the LP over that point's activation region reaches the rare one.
    Inside the activation pattern of a point the network below ``layer`` is
    affine, so the LP of :func:`_region_lp` finds the region's maximum. At its optimum some region
    walls ``y_ji = 0`` are tight; crossing one flips neuron ``(j, i)`` and, as ``y`` is continuous,
    the neighbour's maximum is at least the current one. Each step tries the walls in order of
    their row duals (the first-order gain of relaxing them), at most ``REGION_FLIPS_PER_STEP``,
    and moves to the first neighbour that is strictly better. It stops at a local maximum, at the
    wanted sign, or after ``seconds_per_direction``.

    Proves nothing: only :func:`onnx_exact.search.witness.observe` judges the points returned.

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

Why 10: a step is a sub-MILP over ``2^k`` patterns solved at its root, so it must finish within
``PATTERN_STEP_SECONDS``; with a few tens of free indicators the root alone takes longer, while
ten already let a step cross from a near miss to the wanted sign. (The measurement is in
``docs/benchmarks.md``, "Why the constants are what they are".)"""


PATTERN_STEP_SECONDS = 3.0
"""HiGHS time limit of one :func:`pattern_search` step: a few times the presolve of a deep layer's
decision MILP, so that the root of the neighbourhood sub-MILP can finish."""


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
    which is where the rare sign of a deep ℓ1-free net can hide (PGD and region LPs can end at the
    same small common-sign value round after round). A step here
    solves the decision MILP of the layers below ``layer`` (:func:`layer_encoding`) with every
    indicator fixed to the phase it has at the current point except the
    ``PATTERN_FREE_NEURONS`` whose pre-activations are nearest their kink relative to their
    bound width ``U - L``: the exact maximum over the ``2^10`` patterns of that neighbourhood
    (a sub-MILP HiGHS solves at its root), started from the current point. The step's optimum
    becomes the next centre; the search stops at the wanted sign (``objective_target``), when a
    step does not improve, or after ``seconds``. (Local branching, Fischetti and Lodi 2003, on
    the network's own indicators.)

    Proves nothing: only :func:`onnx_exact.search.witness.observe` judges the point returned.

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
    highs = new_highs()
    enc = layer_encoding(highs, net, box, bounds, states, layer, integral=True)
    z_cols = np.concatenate([z[z >= 0] for z in enc.z])
    if not z_cols.size:
        return best  # the model is an LP: the region LPs already found its optimum
    width = np.concatenate(
        [(bounds[j].upper - bounds[j].lower)[z >= 0] for j, z in enumerate(enc.z)]
    )
    width = np.maximum(width, FLOAT_EPS)
    obj = direction_objective(enc, net, layer, neuron, sign)
    highs.changeColsCost(obj.cols.shape[0], obj.cols.astype(np.int32), obj.costs)
    # min obj <= offset - 1e-9 means sign * y >= 1e-9 at the step's optimum: stop there.
    set_options(highs, mip_heuristic_run_feasibility_jump=False, objective_target=obj.offset - 1e-9)
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
        set_options(
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
