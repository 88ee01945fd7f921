"""Witnesses: concrete inputs that show a neuron's pre-activation in each sign.

One input whose float64 forward pass gives ``y_{k,i} > 0`` refutes "neuron i is stably inactive";
one with ``y_{k,i} < 0`` refutes "stably active". A neuron with both is unstable, whatever any bound
says. Refuting is cheap and decisive, so the analysis collects witnesses first and from every tier:

* :func:`sample_inputs` — the box centre, uniform points and Bernoulli corners
  ``where(rand < p, hi, lo)`` for ``p`` in {0.1, 0.5, 0.9} (uniform points of a high-dimensional box
  concentrate near its centre; biased corners reach the extremes);
* :func:`first_layer_extremes` — the vertices attaining each first-layer neuron's max and min exactly;
* bound corners (the concretisation vertices of :func:`onnx_exact.bounds.crown.symbolic_bounds`);
* :func:`corner_ascent` — Frank–Wolfe steps over the box toward the unobserved sign;
* :func:`gradient_ascent` — projected sign-gradient steps (PGD) for signs shown only inside the box;
* :func:`multistart_ascent` — the same PGD from many random starts per direction, for the
  directions every single-start search missed;
* LP/MILP solution points.

Every candidate is judged only by :func:`observe`, i.e. by an exact float64 forward pass, never by
what a bound or a solver claims. Callers must pass points inside the box.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from onnx_exact.core.box import Box
from onnx_exact.core.network import Network

# Upper limit on float64 values materialised per forward-pass chunk (about 32 MB).
CHUNK_VALUES = 4_000_000
_BERNOULLI_PROBS = (0.1, 0.5, 0.9)
# Gradient ascent step: first step 1/4 of the box width, the last 1/1024 of it.
_PGD_FIRST_STEP, _PGD_DECAY = 0.25, 1.0 / 256.0
# Multi-start PGD: 300 steps from 1/4 of the box width down to 1/4000 of it, then refinement
# rounds from the best eighth of the end points, each 300 steps from 1/100 down to 1/10^6 of it.
_MULTISTART_STEPS = 300
_MULTISTART_SCHEDULE = (0.25, 1.0 / 1000.0)
_REFINE_SCHEDULE = (0.01, 1.0 / 10_000.0)
_REFINE_ROUNDS, _REFINE_FRACTION = 8, 8


@dataclass
class Observation:
    """What float64 forward passes have shown so far.

    Attributes
    ----------
    seen_pos, seen_neg : per layer of the network, bool arrays: some observed input gave
        ``y > 0`` (resp. ``y < 0``) strictly.
    witnesses : ``(m, n_in)`` network-space inputs, each of which was the first to show at least one
        (neuron, sign); kept so that verification can replay them (they sit near ReLU kinks).
    """

    seen_pos: list[np.ndarray]
    seen_neg: list[np.ndarray]
    witnesses: np.ndarray

    @classmethod
    def empty(cls, net: Network) -> Observation:
        return cls(
            seen_pos=[np.zeros(layer.out_features, dtype=bool) for layer in net.layers],
            seen_neg=[np.zeros(layer.out_features, dtype=bool) for layer in net.layers],
            witnesses=np.empty((0, net.in_features)),
        )


def _chunk_rows(net: Network) -> int:
    """Rows per forward-pass chunk so that one chunk's activations stay within ``CHUNK_VALUES``."""
    width = net.in_features + sum(layer.out_features for layer in net.layers)
    return int(np.clip(CHUNK_VALUES // width, 1, 8192))


def observe(net: Network, inputs: np.ndarray, obs: Observation | None = None) -> Observation:
    """Forward-pass network-space inputs and record which signs they show.

    The batch is streamed in chunks (bounded memory). An input is kept as a witness only if it shows
    some (neuron, sign) that neither an earlier observation nor an earlier row did; per new
    (neuron, sign) the first such row is kept.

    Parameters
    ----------
    net : the network.
    inputs : ``(batch, n_in)`` or ``(n_in,)`` network-space points inside the box.
    obs : the observation to update in place; a fresh one when ``None``.

    Returns
    -------
    The updated observation (``obs`` itself when given).
    """
    obs = Observation.empty(net) if obs is None else obs
    inputs = np.asarray(inputs, dtype=np.float64)
    if inputs.ndim == 1:
        inputs = inputs[None, :]
    step = _chunk_rows(net)
    kept = [obs.witnesses]
    for start in range(0, inputs.shape[0], step):
        chunk = inputs[start : start + step]
        revealing = np.zeros(chunk.shape[0], dtype=bool)
        for k, y in enumerate(net.preactivations(chunk)):
            for strict_sign, seen in ((y > 0.0, obs.seen_pos[k]), (y < 0.0, obs.seen_neg[k])):
                new = strict_sign & ~seen
                new_columns = new.any(axis=0)
                if new_columns.any():
                    revealing[np.argmax(new[:, new_columns], axis=0)] = True
                    seen |= new_columns
        if revealing.any():
            kept.append(chunk[revealing])
    obs.witnesses = np.concatenate(kept) if len(kept) > 1 else obs.witnesses
    return obs


def sample_inputs(box: Box, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` points of the box: its centre, then uniform points and Bernoulli corners.

    The ``n - 1`` non-centre points are split evenly between uniform sampling and the Bernoulli
    corners ``where(rand < p, hi, lo)`` for ``p`` in {0.1, 0.5, 0.9}. Features with ``lo == hi`` stay
    at that value in every point.
    """
    lo, hi = np.asarray(box.lower, dtype=np.float64), np.asarray(box.upper, dtype=np.float64)
    groups = np.array_split(np.arange(max(n - 1, 0)), 1 + len(_BERNOULLI_PROBS))
    parts = [box.center[None, :]]
    uniform = lo + rng.random((groups[0].size, lo.size)) * (hi - lo)
    parts.append(np.clip(uniform, lo, hi))
    for prob, group in zip(_BERNOULLI_PROBS, groups[1:], strict=True):
        parts.append(np.where(rng.random((group.size, lo.size)) < prob, hi, lo))
    return np.concatenate(parts)[:n]


def first_layer_extremes(
    net: Network, box: Box, open_only: Observation | None = None
) -> np.ndarray:
    """The vertices where each first-layer pre-activation attains its max and its min.

    ``y_i = W_i x + b_i`` is linear, so over a box its maximum sits at ``where(W_i > 0, hi, lo)`` and
    its minimum at the opposite vertex. Forward-passing them decides every first-layer direction
    that interval arithmetic leaves open: first-layer neurons never need a solver.

    Parameters
    ----------
    open_only : with an observation, only the vertices of the directions it has not shown yet
        and whose extreme can show the sign (``max y_i > 0`` for the maximising vertex,
        ``min y_i < 0`` for the minimising one, by the exact interval bound of the linear
        layer). Each vertex is a whole forward pass: on a CNN, whose first layer has thousands
        of neurons (positions x channels) and whose passes cost millions of MACs, passing
        every vertex would cost more than all the sampling.

    Returns
    -------
    ``(m, n_in)``: the maximising vertices, then the minimising ones (``m = 2 * n_0`` without
    ``open_only``).
    """
    layer = net.layers[0]
    lo, hi = np.asarray(box.lower, dtype=np.float64), np.asarray(box.upper, dtype=np.float64)
    maximising, minimising = np.arange(layer.out_features), np.arange(layer.out_features)
    if open_only is not None:
        centre, radius = (lo + hi) / 2.0, (hi - lo) / 2.0
        middle = layer.weight @ centre + layer.bias
        spread = abs(layer.weight) @ radius
        # a vertex is skipped only where the bound excludes the sign by far more than the
        # interval tier's proof margin (1e-12 of the neuron's scale), so every direction the
        # interval tier leaves open keeps its vertex
        peak = float(np.max(np.maximum(np.abs(lo), np.abs(hi)), initial=0.0))
        slack = 1e-9 * (layer.row_abs_sums() * peak + np.abs(layer.bias))
        maximising = np.flatnonzero(~open_only.seen_pos[0] & (middle + spread > -slack))
        minimising = np.flatnonzero(~open_only.seen_neg[0] & (middle - spread < slack))
    return np.concatenate(
        [
            np.where(layer.rows(maximising) > 0.0, hi, lo),
            np.where(layer.rows(minimising) > 0.0, lo, hi),
        ]
    )


def best_points(
    net: Network, layer: int, neurons: np.ndarray, signs: np.ndarray, pool: np.ndarray
) -> np.ndarray:
    """For each direction, the pool point with the largest ``sign * y_{layer, neuron}``.

    Good starting points for :func:`corner_ascent`: the input that came closest to showing the
    missing sign.
    """
    step = _chunk_rows(net)
    best_value = np.full(neurons.shape[0], -np.inf)
    best_index = np.zeros(neurons.shape[0], dtype=np.int64)
    for start in range(0, pool.shape[0], step):
        values = net.preactivations(pool[start : start + step])[layer][:, neurons] * signs
        chunk_best = np.argmax(values, axis=0)
        chunk_value = values[chunk_best, np.arange(neurons.shape[0])]
        better = chunk_value > best_value
        best_value[better] = chunk_value[better]
        best_index[better] = chunk_best[better] + start
    return pool[best_index]


def _value_and_gradient(
    net: Network, layer: int, neurons: np.ndarray, points: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``y_{layer, neurons[d]}`` at ``points[d]`` and its gradient in the point's linear region.

    Inside one activation pattern the network is affine: the gradient of ``y_{k,i}`` w.r.t. ``x`` is
    ``W_k[i]`` pushed back through ``diag(mask_j) W_j`` for ``j = k-1 .. 0``; one row per direction.
    """
    h = points
    masks = []
    for j in range(layer):
        current = net.layers[j]
        y = current.apply(h)
        if current.relu:
            mask = y > 0.0
            h = np.where(mask, y, 0.0)
        else:
            mask = np.ones_like(y, dtype=bool)
            h = y
        masks.append(mask)
    target = net.layers[layer]
    rows = target.rows(neurons)
    value = np.einsum("dn,dn->d", h, rows) + target.bias[neurons]
    gradient = rows
    for j in range(layer - 1, -1, -1):
        gradient = net.layers[j].pullback(gradient * masks[j])
    return value, gradient


def corner_ascent(
    net: Network,
    box: Box,
    layer: int,
    neurons: np.ndarray,
    signs: np.ndarray,
    start_points: np.ndarray,
    max_steps: int = 20,
    deadline: float = np.inf,
) -> np.ndarray:
    """Search the box for inputs with ``sign * y_{layer, neuron} > 0``, one search per direction.

    Frank–Wolfe on the box: the linearisation of ``sign * y`` at the current point (its gradient in
    the current activation pattern) is maximised by the vertex ``where(sign * g > 0, hi, lo)``
    (coordinates with ``g = 0`` stay). Jump there if that increases ``sign * y``, else try the
    points ``1/2`` and ``1/4`` of the way; stop a direction when nothing increases, when it shows the
    wanted sign, or after ``max_steps``. All directions advance together as matrix operations.

    Parameters
    ----------
    neurons, signs : ``(d,)`` neuron indices of layer ``layer`` and the wanted sign (+1 / -1).
    start_points : ``(d, n_in)`` points in the box.
    deadline : ``time.monotonic()`` after which no further step starts (the points so far are
        returned); on a big CNN one step of every direction takes a second or more.

    Returns
    -------
    ``(d, n_in)`` the final point of each search (inside the box); the caller forward-passes them
    with :func:`observe`, which alone decides what they show.
    """
    lo, hi = np.asarray(box.lower, dtype=np.float64), np.asarray(box.upper, dtype=np.float64)
    signs = np.asarray(signs, dtype=np.float64)
    points = np.clip(np.asarray(start_points, dtype=np.float64), lo, hi)
    value, gradient = _value_and_gradient(net, layer, neurons, points)
    running = signs * value <= 0.0
    for _ in range(max_steps):
        idx = np.flatnonzero(running)
        if idx.size == 0 or time.monotonic() > deadline:
            break
        current, toward = points[idx], signs[idx, None] * gradient[idx]
        vertex = np.where(toward > 0.0, hi, np.where(toward < 0.0, lo, current))
        improved = np.zeros(idx.size, dtype=bool)
        for fraction in (1.0, 0.5, 0.25):
            trying = np.flatnonzero(~improved)
            if trying.size == 0:
                break
            if fraction == 1.0:
                candidate = vertex[trying]
            else:
                candidate = current[trying] + fraction * (vertex[trying] - current[trying])
                candidate = np.clip(candidate, lo, hi)
            cand_value, cand_gradient = _value_and_gradient(
                net, layer, neurons[idx[trying]], candidate
            )
            better = signs[idx[trying]] * cand_value > signs[idx[trying]] * value[idx[trying]]
            accepted = idx[trying[better]]
            points[accepted] = candidate[better]
            value[accepted] = cand_value[better]
            gradient[accepted] = cand_gradient[better]
            improved[trying[better]] = True
        running[idx[~improved]] = False
        running &= signs * value <= 0.0
    return points


def gradient_ascent(
    net: Network,
    box: Box,
    layer: int,
    neurons: np.ndarray,
    signs: np.ndarray,
    start_points: np.ndarray,
    max_steps: int = 40,
    deadline: float = np.inf,
) -> np.ndarray:
    """Projected sign-gradient ascent (PGD) on ``sign * y_{layer, neuron}``, one search per direction.

    Corner ascent only visits vertices; a neuron that is positive only in a thin region inside the
    box (its extreme on a face or in the interior, where other ReLUs switch) needs small steps. Each
    step moves ``x <- clip(x + alpha * (hi - lo) * sign(sign * g), lo, hi)`` with ``g`` the gradient
    in the current linear region and ``alpha`` decaying geometrically from 1/4 to 1/1024 of the box
    width (coarse moves first, then precision to land in thin regions); the best point seen per
    direction is kept. A search stops once it shows the wanted sign, and every search at
    ``deadline`` (``time.monotonic()``).

    Returns
    -------
    ``(d, n_in)`` the best point of each search (inside the box); only :func:`observe` judges it.
    """
    lo, hi = np.asarray(box.lower, dtype=np.float64), np.asarray(box.upper, dtype=np.float64)
    points = np.clip(np.asarray(start_points, dtype=np.float64), lo, hi)
    schedule = (_PGD_FIRST_STEP, _PGD_DECAY)
    batch = (net, layer, neurons, np.asarray(signs, dtype=np.float64), lo, hi, max_steps, deadline)
    best, _ = _ascend_from_starts(*batch, points[:, None, :], schedule)
    return best[:, 0]


def multistart_ascent(
    net: Network,
    box: Box,
    layer: int,
    neurons: np.ndarray,
    signs: np.ndarray,
    rng: np.random.Generator,
    starts: int,
    start_points: np.ndarray | None = None,
    deadline: float = np.inf,
    seconds_per_direction: float = np.inf,
    max_steps: int = _MULTISTART_STEPS,
) -> np.ndarray:
    """PGD on ``sign * y_{layer, neuron}`` from ``starts`` points per direction, all batched.

    Why many starts: on deep ℓ1-free nets the region where a neuron shows its rare sign can be a
    thin sliver that the best point seen so far does not lead to, so a single-start search, an LP
    optimum or a MILP incumbent can all miss it while a few dozen uniform starts hit it (the
    measurement is in ``docs/benchmarks.md``, "Why the constants are what they are"). Each start
    follows ``x <- clip(x + alpha_t (hi - lo) sign(sign * g), lo, hi)`` with ``g`` the gradient in the
    current linear region and ``alpha_t`` falling geometrically from 1/4 to 1/4000 over
    ``max_steps`` steps.

    Why refinement rounds: sign steps of a fixed size zig-zag across the kinks of a narrow ridge,
    so the coarse pass ends a little short of the sliver even from a thousand starts. Restarting
    the best eighth of the end points with small steps (1/100 down to 1/10^6 of the width) climbs
    further each round. A direction's searches all stop once one shows the wanted sign.

    Parameters
    ----------
    neurons, signs : ``(d,)`` neuron indices of layer ``layer`` and the wanted sign (+1 / -1).
    rng : source of the uniform starts.
    starts : starts per direction (at least 1).
    start_points : optional ``(d, n_in)`` points in the box, each replacing the first uniform
        start of its direction (e.g. the best point seen so far).
    deadline : ``time.monotonic()`` value at which the searches stop; directions not reached
        return their first start.
    seconds_per_direction : time budget of a batch of directions, per direction: a batch of
        ``b`` directions stops after ``b * seconds_per_direction`` seconds (or at ``deadline``),
        keeping the best points found so far.

    Returns
    -------
    ``(d, n_in)`` the best point found per direction (inside the box); only :func:`observe`
    judges it.
    """
    lo, hi = np.asarray(box.lower, dtype=np.float64), np.asarray(box.upper, dtype=np.float64)
    signs = np.asarray(signs, dtype=np.float64)
    starts = max(int(starts), 1)
    kept = max(starts // _REFINE_FRACTION, 1)
    best = np.empty((neurons.shape[0], lo.size))
    per_batch = max(_chunk_rows(net) // starts, 1)
    for first in range(0, neurons.shape[0], per_batch):
        chosen = np.arange(first, min(first + per_batch, neurons.shape[0]))
        points = lo + rng.random((chosen.size, starts, lo.size)) * (hi - lo)
        if start_points is not None:
            points[:, 0] = start_points[chosen]
        best[chosen] = points[:, 0]
        stop = min(deadline, time.monotonic() + seconds_per_direction * chosen.size)
        if time.monotonic() >= stop:
            continue
        batch = (net, layer, neurons[chosen], signs[chosen], lo, hi, max_steps, stop)
        points, values = _ascend_from_starts(*batch, np.clip(points, lo, hi), _MULTISTART_SCHEDULE)
        for _ in range(_REFINE_ROUNDS):
            if (values.max(axis=1) > 0.0).all() or time.monotonic() >= stop:
                break
            top = np.argsort(values, axis=1)[:, -kept:]
            top_points = np.take_along_axis(points, top[:, :, None], axis=1)
            refined, refined_values = _ascend_from_starts(*batch, top_points, _REFINE_SCHEDULE)
            if not (refined_values > np.take_along_axis(values, top, axis=1)).any():
                break  # a search's best is never below its start: no round loses ground
            np.put_along_axis(points, top[:, :, None], refined, axis=1)
            np.put_along_axis(values, top, refined_values, axis=1)
        winner = np.argmax(values, axis=1)
        best[chosen] = points[np.arange(chosen.size), winner]
    return best


def _ascend_from_starts(
    net: Network,
    layer: int,
    neurons: np.ndarray,
    signs: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    max_steps: int,
    stop: float,
    points: np.ndarray,
    schedule: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """PGD on one batch of :func:`multistart_ascent`: ``points`` is ``(d, starts, n_in)``.

    ``schedule`` is (first step, last step / first step) as fractions of the box width; no step
    begins after ``time.monotonic()`` reaches ``stop``. Returns
    the best point of each search and its ``sign * y``, shaped ``(d, starts, n_in)`` and
    ``(d, starts)``; a direction stops once one of its searches shows ``sign * y > 0``.
    """
    d, starts, n_in = points.shape
    first_step, decay = schedule
    points = points.reshape(d * starts, n_in).copy()
    row_neurons, row_signs = np.repeat(neurons, starts), np.repeat(signs, starts)
    value, gradient = _value_and_gradient(net, layer, row_neurons, points)
    best, best_value = points.copy(), row_signs * value
    running = np.repeat((best_value.reshape(d, starts) <= 0.0).all(axis=1), starts)
    for iteration in range(max_steps):
        idx = np.flatnonzero(running)
        if idx.size == 0 or time.monotonic() >= stop:
            break
        alpha = first_step * decay ** (iteration / max(max_steps - 1, 1))
        moved = np.clip(
            points[idx] + alpha * (hi - lo) * np.sign(row_signs[idx, None] * gradient[idx]), lo, hi
        )
        value_idx, gradient_idx = _value_and_gradient(net, layer, row_neurons[idx], moved)
        points[idx], gradient[idx] = moved, gradient_idx
        better = row_signs[idx] * value_idx > best_value[idx]
        best[idx[better]] = moved[better]
        best_value[idx[better]] = row_signs[idx[better]] * value_idx[better]
        running = np.repeat((best_value.reshape(d, starts) <= 0.0).all(axis=1), starts)
    return best.reshape(d, starts, n_in), best_value.reshape(d, starts)
