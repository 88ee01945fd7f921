"""Tests of the CROWN branch and bound tier (:mod:`onnx_exact.bounds.relu_bab`).

Oracles: finite differences for the bound's gradient; samples filtered by a node's split
constraints for node bounds (a sampled maximum is a lower bound on the node's true maximum, so no
node bound may be below it); a dense grid over 2- and 3-input boxes for the labels.
"""

from __future__ import annotations

import itertools
import time
import types

import numpy as np
import pytest
from test_milp import (
    MARGIN,
    SMALL_NETS,
    _all_directions,
    _grid,
    _grid_states,
    _interval_bounds,
    _random_net,
    _samples,
    _tiered_states,
)

from onnx_exact.bounds import relu_bab
from onnx_exact.core.box import Box
from onnx_exact.core.verdicts import NeuronState
from onnx_exact.solvers import lp_relaxation
from onnx_exact.stability import analyze_stability
from onnx_exact.stability.tiers import lp_dive_for


def _undecided(net, layer):
    return [np.full(net.layers[j].out_features, NeuronState.UNDECIDED) for j in range(layer)]


def _problem(seed: int = 3, sizes=(5, 16, 16, 16, 2), layer: int = 3):
    net = _random_net(seed, list(sizes))
    box = Box(-np.ones(sizes[0]), np.ones(sizes[0]))
    bounds = _interval_bounds(net, box)
    sub = relu_bab.SubNetwork.below(net, box, bounds, _undecided(net, layer), layer)
    return net, box, bounds, sub


def _random_nodes(sub, rng, count=5):
    phase = np.full((count, sub.count), -1, dtype=np.int8)
    for row in range(1, count):
        chosen = rng.choice(sub.count, size=min(6, sub.count), replace=False)
        phase[row, chosen] = rng.integers(0, 2, size=chosen.size)
    alpha = rng.random((count, sub.count))
    multipliers = rng.random((count, 2 * sub.neurons)) * 0.3
    return phase, alpha, multipliers


def test_gradient_matches_finite_differences():
    net, _, _, sub = _problem()
    rng = np.random.default_rng(0)
    phase, alpha, multipliers = _random_nodes(sub, rng)
    target, offset = net.layers[3].weight[0], float(net.layers[3].bias[0])
    exact = relu_bab.bound_nodes(sub, target, offset, phase, alpha, multipliers)
    step = 1e-6
    for name, values, gradient in (
        ("alpha", alpha, exact.grad_alpha),
        ("multipliers", multipliers, exact.grad_multipliers),
    ):
        for column in rng.choice(values.shape[1], size=25, replace=False):
            moved = values.copy()
            moved[:, column] += step
            args = (moved, multipliers) if name == "alpha" else (alpha, moved)
            value = relu_bab.bound_nodes(sub, target, offset, phase, *args, gradient=False).value
            np.testing.assert_allclose(
                (value - exact.value) / step, gradient[:, column], atol=1e-4, rtol=1e-4
            )


@pytest.mark.parametrize("seed", range(3))
def test_node_bounds_enclose_every_sample_of_the_node(seed):
    """Any slopes in [0, 1] and multipliers >= 0 give a bound above every point of the node."""
    net, box, _, sub = _problem(seed)
    rng = np.random.default_rng(seed)
    phase, alpha, multipliers = _random_nodes(sub, rng, count=8)
    points = _samples(box, seed, 30000)
    pre = net.preactivations(points)
    columns = [(j, i) for j, idx in enumerate(sub.unstable) for i in idx]
    for neuron in range(2):
        for sign in (1, -1):
            target = sign * net.layers[3].weight[neuron]
            offset = sign * float(net.layers[3].bias[neuron])
            bound = relu_bab.bound_nodes(sub, target, offset, phase, alpha, multipliers).value
            optimised, *_ = relu_bab.optimise_nodes(
                sub, target, offset, phase, alpha, multipliers, 15
            )
            for row in range(phase.shape[0]):
                inside = np.ones(points.shape[0], dtype=bool)
                for m, (j, i) in enumerate(columns):
                    if phase[row, m] == 1:
                        inside &= pre[j][:, i] >= 0
                    elif phase[row, m] == 0:
                        inside &= pre[j][:, i] <= 0
                if inside.any():
                    sampled = (sign * pre[3][inside, neuron]).max()
                    assert bound[row] >= sampled - 1e-9
                    assert optimised[row] >= sampled - 1e-9


def test_optimisation_tightens_the_root_bound():
    net, _, _, sub = _problem()
    target, offset = net.layers[3].weight[1], float(net.layers[3].bias[1])
    root = np.full((1, sub.count), -1, dtype=np.int8)
    start = (sub.initial_alphas()[None, :], np.zeros((1, 2 * sub.neurons)))
    deep_poly, *_ = relu_bab.optimise_nodes(sub, target, offset, root, *start, 1)
    optimised, *_ = relu_bab.optimise_nodes(sub, target, offset, root, *start, 60)
    assert optimised[0] < deep_poly[0]


@pytest.fixture
def step_clock(monkeypatch):
    """Make the tier's time accounting count calls instead of seconds.

    The LP dive gets :data:`relu_bab.DIVE_SHARE` of the search's *measured* time, so on a loaded
    machine (a dive step preempted, the search not) the dive could be starved and a sign it would
    have found stayed undecided. With every ``perf_counter()`` call one millisecond later than
    the last, the dive and the search take turns the same way at any speed. The real deadlines
    (``time.monotonic``) stay; the per-direction cap is lifted so that only they, far away for
    these small nets, could end a search.
    """
    ticks = itertools.count()
    clock = types.SimpleNamespace(perf_counter=lambda: next(ticks) * 1e-3, monotonic=time.monotonic)
    monkeypatch.setattr(relu_bab, "time", clock)
    monkeypatch.setattr(relu_bab, "TIME_LIMIT", 3600.0)
    return clock


def _crown_bab_states(net, box, bounds, relaxation: bool):
    """Labels from the CROWN branch and bound alone, with or without the layer's LP for the dive."""

    def decide(k, states, directions, margins, deadline):
        lp = (
            lp_relaxation.LayerRelaxation.build(net, box, bounds, states, k)
            if relaxation and k
            else None
        )
        dive = lp_dive_for(lp) if lp is not None else None
        return relu_bab.decide_directions(
            net, box, bounds, states, k, directions, margins, deadline, dive=dive
        )

    return _tiered_states(net, box, bounds, decide=decide)


@pytest.mark.parametrize("relaxation", [False, True])
@pytest.mark.parametrize(("seed", "sizes"), SMALL_NETS)
def test_labels_match_the_grid(seed, sizes, relaxation, step_clock):
    """Every decided neuron is labelled as the grid labels it. With the LP dive none is left
    undecided; alone, CROWN's witnesses are box vertices, so a sign shown only inside the box
    stays undecided (kept, never wrong). The dive's share is counted in steps
    (``step_clock``): with wall-clock shares a loaded machine starved it (seed 2)."""
    net = _random_net(seed, sizes)
    box = Box(-np.ones(sizes[0]), np.ones(sizes[0]))
    bounds = _interval_bounds(net, box)
    oracle = _grid_states(net, _grid(box, 301 if sizes[0] == 2 else 41), gap=0.05)
    states = _crown_bab_states(net, box, bounds, relaxation)
    for k, expected in enumerate(oracle):
        decided = states[k] != NeuronState.UNDECIDED
        if expected is not None:
            np.testing.assert_array_equal(states[k][decided], expected[decided])
        if relaxation and net.layers[k].relu:
            assert decided.all()


def test_slow_dive_steps_do_not_change_the_labels(monkeypatch, step_clock):
    """Seed 2 needs the dive: with its steps slowed down (as on a loaded machine) it still decides
    every neuron, because its share is counted in steps, not seconds."""
    seed, sizes = SMALL_NETS[2]
    net = _random_net(seed, sizes)
    box = Box(-np.ones(sizes[0]), np.ones(sizes[0]))
    bounds = _interval_bounds(net, box)
    fast = _crown_bab_states(net, box, bounds, relaxation=True)
    dive = lp_relaxation.lp_dive

    def slow_dive(*args, **kwargs):
        for step in dive(*args, **kwargs):
            time.sleep(0.05)
            yield step

    monkeypatch.setattr(lp_relaxation, "lp_dive", slow_dive)
    slow = _crown_bab_states(net, box, bounds, relaxation=True)
    for ours, theirs in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert all((states != NeuronState.UNDECIDED).all() for states in slow)


def test_node_limit_leaves_directions_undecided_never_wrong(monkeypatch):
    """With a one-node budget only the roots decide; the rest stay undecided, and every proof and
    bound still holds on 40k samples."""
    net = _random_net(7, [10, 20, 20, 20, 2])
    box = Box(np.zeros(10), np.ones(10))
    bounds = _interval_bounds(net, box)
    pre = net.preactivations(_samples(box, 7))
    states = [np.full(20, NeuronState.UNDECIDED) for _ in range(2)]
    outcomes = {}
    for limit in (1, relu_bab.NODE_LIMIT):
        monkeypatch.setattr(relu_bab, "NODE_LIMIT", limit)
        results = relu_bab.decide_directions(
            net,
            box,
            bounds,
            states,
            2,
            _all_directions(net, 2),
            np.full(20, MARGIN),
            time.monotonic() + 60,
        )
        for r in results:
            sampled = (r.direction.sign * pre[2][:, r.direction.neuron]).max()
            assert not (r.status == "proved" and sampled > 0)
            assert r.bound >= sampled - 1e-9
            if r.status == "refuted":
                assert (
                    r.direction.sign * net.preactivations(r.witness)[2][0, r.direction.neuron] > 0
                )
        outcomes[limit] = [r.status for r in results]
    assert outcomes[1].count("undecided") > outcomes[relu_bab.NODE_LIMIT].count("undecided")


def test_pipeline_with_crown_bab_alone_is_sound():
    """The auto pipeline restricted to this tier decides a 10-input net soundly."""
    net = _random_net(5, [10, 24, 24, 24, 3])
    box = Box(np.zeros(10), np.ones(10))
    result = analyze_stability(net, box, tiers=("crown-bab",))
    points = _samples(box, 5, 40000)
    pre = net.preactivations(points)
    for k, layer in enumerate(result.layers[:-1]):
        inactive = layer.states == NeuronState.INACTIVE
        active = layer.states == NeuronState.ACTIVE
        assert np.all(pre[k][:, inactive] <= 0)
        assert np.all(pre[k][:, active] >= 0)
    assert "crown-bab" in result.timings_s


def test_optimised_bounds_enclose_samples_and_beat_crown():
    """α-CROWN bounds of a whole layer hold on dense samples and are no looser than CROWN's."""
    from onnx_exact.bounds.crown import symbolic_bounds

    net = _random_net(11, [6, 20, 20, 20, 2])
    box = Box(np.zeros(6), np.ones(6))
    bounds = _interval_bounds(net, box)
    pre = net.preactivations(_samples(box, 11, 40000))
    for layer in (1, 2):
        crown, _ = symbolic_bounds(net, box, bounds, layer)
        neurons = np.arange(20)
        lower, upper, _ = relu_bab.optimised_bounds(
            net, box, bounds, _undecided(net, layer), layer, neurons
        )
        assert np.all(upper >= pre[layer].max(axis=0) - 1e-9)
        assert np.all(lower <= pre[layer].min(axis=0) + 1e-9)
        assert np.all(upper <= crown.upper + 1e-9) and np.all(lower >= crown.lower - 1e-9)
        assert np.sum(upper - lower) < np.sum(crown.upper - crown.lower)


def test_optimised_bounds_past_their_deadline_stop_after_one_step_and_stay_sound():
    """A deadline already passed leaves one evaluated iterate: valid, and no tighter than all."""
    net = _random_net(12, [6, 20, 20, 2])
    box = Box(np.zeros(6), np.ones(6))
    bounds = _interval_bounds(net, box)
    pre = net.preactivations(_samples(box, 12, 20000))[2]
    states, neurons = _undecided(net, 2), np.arange(2)
    full = relu_bab.optimised_bounds(net, box, bounds, states, 2, neurons)
    hurried = relu_bab.optimised_bounds(net, box, bounds, states, 2, neurons, deadline=0.0)
    assert np.all(hurried[1] >= pre.max(axis=0) - 1e-9)
    assert np.all(hurried[0] <= pre.min(axis=0) + 1e-9)
    assert np.all(hurried[1] >= full[1] - 1e-12) and np.all(hurried[0] <= full[0] + 1e-12)
    assert np.sum(hurried[1] - hurried[0]) > np.sum(full[1] - full[0])


def test_a_supplied_dive_refutes_what_crown_vertices_cannot(step_clock):
    """The witness search beside the branch and bound is whatever callable the caller supplies
    (relu_bab imports no solver): a dive that forward-passes grid points through the book settles
    the directions whose sign shows only inside the box; with none, some stay undecided (kept,
    never wrong), and what both decide agrees."""
    seed, sizes = SMALL_NETS[2]
    net = _random_net(seed, sizes)
    box = Box(-np.ones(sizes[0]), np.ones(sizes[0]))
    bounds = _interval_bounds(net, box)
    points = _grid(box, 41)
    dived: list[int] = []

    def grid_dive(book, j, deadline):
        dived.append(j)
        book.absorb(points, relu_bab.METHOD)
        yield

    def states_with(dive):
        def decide(k, states, directions, margins, deadline):
            return relu_bab.decide_directions(
                net, box, bounds, states, k, directions, margins, deadline, dive=dive
            )

        return _tiered_states(net, box, bounds, decide=decide)

    alone = states_with(None)
    with_dive = states_with(grid_dive)
    assert dived, "the branch and bound never called the dive"
    assert sum(int((s == NeuronState.UNDECIDED).sum()) for s in alone) > 0
    assert all((s != NeuronState.UNDECIDED).all() for s in with_dive)
    for ours, theirs in zip(alone, with_dive, strict=True):
        decided = ours != NeuronState.UNDECIDED
        np.testing.assert_array_equal(ours[decided], theirs[decided])
