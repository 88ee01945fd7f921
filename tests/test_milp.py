"""Tests of the HiGHS models: LP safe bounds, cuts, decision MILPs, ISA and per-neuron baselines.

Oracles: a dense grid over 2-input boxes (exact enough to compare with exact solvers away from
zero) and dense random / Bernoulli-corner sampling for 10-input nets (a sampled extreme is a lower
bound on the true one, so no proof may contradict it).
"""

from __future__ import annotations

import time

import highspy
import numpy as np
import pytest

from onnx_exact.bounds.crown import LayerBounds
from onnx_exact.core.box import Box
from onnx_exact.core.directions import Direction, DirectionResult
from onnx_exact.core.network import DenseLayer, InputMap, Network
from onnx_exact.core.verdicts import NeuronState
from onnx_exact.search import region_search
from onnx_exact.solvers import baselines, exact_tiers, highs_model, lp_relaxation, milp_encoding

MARGIN = 1e-9


def _interval_bounds(net: Network, box: Box) -> list[LayerBounds]:
    """Plain interval propagation (the tests' own bounds, independent of bounds.py)."""
    lo, hi, out = box.lower, box.upper, []
    for layer in net.layers:
        centre, radius = (lo + hi) / 2, (hi - lo) / 2
        mid = layer.weight @ centre + layer.bias
        spread = np.abs(layer.weight) @ radius
        out.append(LayerBounds(mid - spread, mid + spread))
        lo, hi = mid - spread, mid + spread
        if layer.relu:
            lo, hi = np.maximum(lo, 0.0), np.maximum(hi, 0.0)
    return out


def _random_net(seed: int, sizes: list[int], bias_scale: float = 0.5) -> Network:
    rng = np.random.default_rng(seed)
    layers = [
        DenseLayer(
            rng.normal(size=(n_out, n_in)) / np.sqrt(n_in),
            rng.normal(size=n_out) * bias_scale,
            relu=j < len(sizes) - 2,
            name=f"fc{j}",
        )
        for j, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False))
    ]
    return Network(layers, InputMap.identity(sizes[0]))


def _grid(box: Box, per_axis: int = 301) -> np.ndarray:
    axes = [np.linspace(lo, hi, per_axis) for lo, hi in zip(box.lower, box.upper, strict=True)]
    return np.stack(np.meshgrid(*axes), axis=-1).reshape(-1, box.size)


def _samples(box: Box, seed: int, count: int = 20000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    uniform = rng.uniform(box.lower, box.upper, size=(count, box.size))
    corners = np.where(rng.random((count, box.size)) < 0.5, box.upper, box.lower)
    return np.concatenate([uniform, corners])


def _all_directions(net: Network, layer: int) -> list[Direction]:
    return [
        Direction(layer, i, sign) for i in range(net.layers[layer].out_features) for sign in (1, -1)
    ]


def _states_from(results: list[DirectionResult], width: int) -> np.ndarray:
    """NeuronState per neuron from the two directions' results (the pipeline's rule)."""
    proved = {(r.direction.neuron, r.direction.sign) for r in results if r.status == "proved"}
    refuted = {(r.direction.neuron, r.direction.sign) for r in results if r.status == "refuted"}
    states = np.full(width, NeuronState.UNDECIDED, dtype=np.int64)
    for i in range(width):
        if (i, 1) in proved:
            states[i] = NeuronState.INACTIVE
        elif (i, -1) in proved:
            states[i] = NeuronState.ACTIVE
        elif (i, 1) in refuted and (i, -1) in refuted:
            states[i] = NeuronState.UNSTABLE
    return states


def _tiered_states(net, box, bounds, tiers=("lp", "cuts", "milp"), jobs=1, decide=None):
    """Labels of every layer, bottom-up, from one exact decision function per layer.

    ``decide(k, states, directions, margins, deadline)`` defaults to
    :func:`exact_tiers.decide_directions` with ``tiers`` and ``jobs``.
    """

    def milp_tiers(k, states, directions, margins, deadline):
        return exact_tiers.decide_directions(
            net, box, bounds, states, k, directions, margins, deadline, tiers=tiers, jobs=jobs
        )

    decide = decide or milp_tiers
    states: list[np.ndarray] = []
    for k, layer in enumerate(net.layers):
        if not layer.relu:
            states.append(np.full(layer.out_features, NeuronState.ACTIVE, dtype=np.int64))
            continue
        results = decide(
            k,
            states,
            _all_directions(net, k),
            np.full(layer.out_features, MARGIN),
            time.monotonic() + 60,
        )
        states.append(_states_from(results, layer.out_features))
    return states


def _grid_states(net: Network, points: np.ndarray, gap: float) -> list[np.ndarray | None]:
    """Oracle labels, or None for a layer with a neuron whose extreme is within ``gap`` of 0."""
    out = []
    for k, pre in enumerate(net.preactivations(points)):
        top, bottom = pre.max(axis=0), pre.min(axis=0)
        if not net.layers[k].relu:
            out.append(np.full(pre.shape[1], NeuronState.ACTIVE))
            continue
        if np.any(np.abs(top) < gap) or np.any(np.abs(bottom) < gap):
            out.append(None)
            continue
        states = np.full(pre.shape[1], NeuronState.UNSTABLE)
        states[top < 0] = NeuronState.INACTIVE
        states[bottom > 0] = NeuronState.ACTIVE
        out.append(states)
    return out


SMALL_NETS = [(seed, [2, 8, 8, 1]) for seed in range(4)] + [
    (10 + s, [3, 6, 6, 6, 2]) for s in range(2)
]


@pytest.mark.parametrize(("seed", "sizes"), SMALL_NETS[:4])
def test_lp_bounds_are_sound_against_grid(seed, sizes):
    net = _random_net(seed, sizes)
    box = Box(-np.ones(sizes[0]), np.ones(sizes[0]))
    bounds = _interval_bounds(net, box)
    pre = net.preactivations(_grid(box))
    states: list[np.ndarray] = []
    for k in range(len(sizes) - 2):
        results = exact_tiers.decide_directions(
            net,
            box,
            bounds,
            states,
            k,
            _all_directions(net, k),
            np.full(sizes[k + 1], MARGIN),
            time.monotonic() + 30,
            tiers=("lp",),
        )
        for r in results:
            sampled_max = (r.direction.sign * pre[k][:, r.direction.neuron]).max()
            assert r.bound >= sampled_max - 1e-12
        states.append(_states_from(results, sizes[k + 1]))
        if k == 0:  # the first layer's LP is exact: its bound is the extreme, attained at a corner
            corner_pre = net.preactivations(_grid(box, 2))[0]
            for r in results:
                exact = (r.direction.sign * corner_pre[:, r.direction.neuron]).max()
                assert r.bound == np.inf or r.bound == pytest.approx(exact, abs=1e-12)
                assert (r.status == "proved") == (exact <= -MARGIN)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decisions_never_contradict_sampling(seed):
    net = _random_net(100 + seed, [10, 20, 20, 3], bias_scale=1.0)
    box = Box(np.zeros(10), np.full(10, 0.6))
    bounds = _interval_bounds(net, box)
    pre = net.preactivations(_samples(box, seed))
    states: list[np.ndarray] = []
    for k in range(2):
        results = exact_tiers.decide_directions(
            net,
            box,
            bounds,
            states,
            k,
            _all_directions(net, k),
            np.full(20, MARGIN),
            time.monotonic() + 60,
        )
        for r in results:
            d = r.direction
            sampled_max = (d.sign * pre[k][:, d.neuron]).max()
            assert r.bound >= sampled_max - 1e-9
            if r.status == "proved":
                assert sampled_max <= 0
            if r.status == "refuted":
                assert np.all(r.witness >= box.lower) and np.all(r.witness <= box.upper)
                assert d.sign * net.preactivations(r.witness)[k][0, d.neuron] > 0
            assert r.status != "undecided"  # nothing is close to zero here and there is time
        states.append(_states_from(results, 20))


@pytest.mark.parametrize("tier", ["milp", "bab"])
@pytest.mark.parametrize(("seed", "sizes"), SMALL_NETS)
def test_one_exact_tier_alone_matches_grid(seed, sizes, tier):
    """The decision MILP alone, or LP branch and bound on ReLU phases alone, labels every neuron
    as the grid does; branch and bound (no MILP slack) leaves none undecided."""
    net = _random_net(seed, sizes)
    box = Box(-np.ones(sizes[0]), np.ones(sizes[0]))
    bounds = _interval_bounds(net, box)
    grid = _grid(box, 301 if sizes[0] == 2 else 41)
    oracle = _grid_states(net, grid, gap=0.05)
    states = _tiered_states(net, box, bounds, tiers=(tier,))
    for k, expected in enumerate(oracle):
        if expected is not None:
            np.testing.assert_array_equal(states[k], expected)
        if tier == "bab" and net.layers[k].relu:
            assert np.all(states[k] != NeuronState.UNDECIDED)


def test_branch_and_bound_never_contradicts_samples_and_restores_the_lp(monkeypatch):
    """Proofs hold on 40k samples, a node limit leaves directions undecided (never wrong), and
    the shared relaxation gets its [0, 1] indicator bounds back."""
    net = _random_net(7, [10, 20, 20, 2])
    box = Box(np.zeros(10), np.ones(10))
    bounds = _interval_bounds(net, box)
    states = [np.full(20, NeuronState.UNDECIDED, dtype=np.int64)]
    pre = net.preactivations(_samples(box, 7))[1]
    directions = _all_directions(net, 1)
    outcomes = {}
    for node_limit in (1, exact_tiers.BAB_NODE_LIMIT):
        monkeypatch.setattr(exact_tiers, "BAB_NODE_LIMIT", node_limit)
        relaxation = lp_relaxation.LayerRelaxation.build(net, box, bounds, states, 1)
        results = exact_tiers.decide_directions(
            net,
            box,
            bounds,
            states,
            1,
            directions,
            np.full(20, MARGIN),
            time.monotonic() + 60,
            tiers=("bab",),
            relaxation=relaxation,
        )
        _, _, _, col_lo, col_hi, _, _ = relaxation._lp_arrays()
        z_cols = relaxation.enc.z[0][relaxation.enc.z[0] >= 0]
        assert np.all(col_lo[z_cols] == 0) and np.all(col_hi[z_cols] == 1)
        lp = relaxation.highs.getLp()
        assert np.all(np.asarray(lp.col_lower_)[z_cols] == 0)
        assert np.all(np.asarray(lp.col_upper_)[z_cols] == 1)
        for r in results:
            sampled_max = (r.direction.sign * pre[:, r.direction.neuron]).max()
            assert not (r.status == "proved" and sampled_max > 0)
            assert r.bound >= sampled_max - 1e-9
        outcomes[node_limit] = [r.status for r in results]
    assert "undecided" not in outcomes[exact_tiers.BAB_NODE_LIMIT]
    assert outcomes[1].count("undecided") > 0  # a root LP alone cannot decide all of them


@pytest.mark.parametrize(("seed", "sizes"), SMALL_NETS)
def test_baselines_agree_with_tiers_and_grid(seed, sizes):
    net = _random_net(seed, sizes)
    box = Box(-np.ones(sizes[0]), np.ones(sizes[0]))
    bounds = _interval_bounds(net, box)
    margins = [np.full(layer.out_features, MARGIN) for layer in net.layers]
    deadline = time.monotonic() + 60
    per_neuron, _, per_neuron_late = baselines.per_neuron_stability(
        net, box, bounds, margins, deadline
    )
    nothing = [np.zeros(layer.out_features, bool) for layer in net.layers]
    isa, isa_witnesses, isa_late = baselines.isa_stability(
        net, box, bounds, nothing, [a.copy() for a in nothing], margins, deadline
    )
    tiered = _tiered_states(net, box, bounds)
    assert not per_neuron_late and not isa_late
    for k in range(len(net.layers)):
        np.testing.assert_array_equal(per_neuron[k], isa[k])
        np.testing.assert_array_equal(per_neuron[k], tiered[k])
    for k, expected in enumerate(_grid_states(net, _grid(box, 301 if sizes[0] == 2 else 41), 0.05)):
        if expected is not None:
            np.testing.assert_array_equal(isa[k], expected)
    # every ISA witness is in the box and was the first to show some sign
    assert np.all(isa_witnesses >= box.lower) and np.all(isa_witnesses <= box.upper)


def test_isa_uses_preprocessing_and_random_10_20_20():
    net = _random_net(7, [10, 20, 20, 2], bias_scale=1.0)
    box = Box(np.zeros(10), np.full(10, 0.5))
    bounds = _interval_bounds(net, box)
    margins = [np.full(layer.out_features, MARGIN) for layer in net.layers]
    pre = net.preactivations(_samples(box, 3, 2000))
    seen_pos = [(p > 0).any(axis=0) for p in pre]
    seen_neg = [(p < 0).any(axis=0) for p in pre]
    deadline = time.monotonic() + 60
    isa, _, late = baselines.isa_stability(net, box, bounds, seen_pos, seen_neg, margins, deadline)
    per_neuron, _, _ = baselines.per_neuron_stability(net, box, bounds, margins, deadline)
    assert not late
    np.testing.assert_array_equal(isa[2], per_neuron[2])
    for k in range(2):
        np.testing.assert_array_equal(isa[k], per_neuron[k])
        assert np.all(isa[k] != NeuronState.UNDECIDED)
        # never stable against a sampled sign
        assert not np.any((isa[k] == NeuronState.INACTIVE) & seen_pos[k])
        assert not np.any((isa[k] == NeuronState.ACTIVE) & seen_neg[k])


def test_parallel_equals_serial():
    net = _random_net(21, [10, 20, 20, 2], bias_scale=1.0)
    box = Box(np.zeros(10), np.full(10, 0.4))
    bounds = _interval_bounds(net, box)
    layer0 = exact_tiers.decide_directions(
        net, box, bounds, [], 0, _all_directions(net, 0), np.full(20, MARGIN), time.monotonic() + 30
    )
    states = [_states_from(layer0, 20)]
    runs = [
        exact_tiers.decide_directions(
            net,
            box,
            bounds,
            states,
            1,
            _all_directions(net, 1),
            np.full(20, MARGIN),
            time.monotonic() + 60,
            tiers=("milp",),
            jobs=jobs,
        )
        for jobs in (1, 2)
    ]
    assert [(r.status, r.bound, r.method) for r in runs[0]] == [
        (r.status, r.bound, r.method) for r in runs[1]
    ]
    assert all(r.status != "undecided" for r in runs[0])


def test_past_deadline_is_undecided_never_wrong():
    net = _random_net(5, [10, 20, 20, 2])
    box = Box(np.zeros(10), np.ones(10))
    bounds = _interval_bounds(net, box)
    past = time.monotonic() - 1.0
    results = exact_tiers.decide_directions(
        net, box, bounds, [], 0, _all_directions(net, 0), np.full(20, MARGIN), past
    )
    assert all(r.status == "undecided" and r.bound == np.inf for r in results)
    margins = [np.full(layer.out_features, MARGIN) for layer in net.layers]
    nothing = [np.zeros(layer.out_features, bool) for layer in net.layers]
    for states, _, late in (
        baselines.per_neuron_stability(net, box, bounds, margins, past),
        baselines.isa_stability(net, box, bounds, nothing, nothing, margins, past),
    ):
        assert late
        proved_by_bounds = [
            np.where(
                b.upper <= -MARGIN,
                NeuronState.INACTIVE,
                np.where(b.lower >= MARGIN, NeuronState.ACTIVE, -1),
            )
            for b in bounds
        ]
        for k in range(2):
            stable = (states[k] == NeuronState.ACTIVE) | (states[k] == NeuronState.INACTIVE)
            np.testing.assert_array_equal(states[k][stable], proved_by_bounds[k][stable])


def test_tiny_weights_stay_sound():
    """Entries below HiGHS's small_matrix_value are moved into the row bounds, not lost."""
    net = _random_net(3, [2, 8, 8, 1])
    net.layers[1].weight[:, ::2] = 3e-13
    net.layers[0].weight[0, 0] = -5e-14
    box = Box(-np.ones(2), np.ones(2))
    bounds = _interval_bounds(net, box)
    pre = net.preactivations(_grid(box))
    results = exact_tiers.decide_directions(
        net, box, bounds, [], 1, _all_directions(net, 1), np.full(8, MARGIN), time.monotonic() + 30
    )
    for r in results:
        sampled_max = (r.direction.sign * pre[1][:, r.direction.neuron]).max()
        assert r.bound >= sampled_max - 1e-12
        assert not (r.status == "proved" and sampled_max > 0)


def test_shared_input_encoding_proves_self_equivalence():
    """Two copies of a network over one input: the MILP max of their output difference is 0."""
    net = _random_net(11, [3, 6, 6, 1])
    box = Box(-np.ones(3), np.ones(3))
    bounds = _interval_bounds(net, box)
    highs = highs_model.new_highs()
    first = milp_encoding.add_network_encoding(highs, net, box, bounds, [], 2)
    second = milp_encoding.add_network_encoding(
        highs, net.copy(), box, bounds, [], 2, input_cols=first.x
    )
    np.testing.assert_array_equal(first.x, second.x)
    out_a, out_b = int(first.y[2][0]), int(second.y[2][0])
    highs.changeColsCost(2, np.array([out_a, out_b], dtype=np.int32), np.array([-1.0, 1.0]))
    highs.run()
    assert highs.getModelStatus() == highspy.HighsModelStatus.kOptimal
    assert abs(highs.getInfo().objective_function_value) <= 1e-6
    assert highs.getInfo().mip_dual_bound >= -1e-6


def test_region_ascent_crosses_a_wall_to_the_wanted_sign():
    """y = 4 relu(x - 0.5) + relu(x) - 2.9 on [0, 1]: from x = 0.1 the first region's LP stops at
    the wall x = 0.5 (y = -2.4); only the neighbour region reaches y(1) = +0.1."""
    hidden = DenseLayer(np.array([[1.0], [1.0]]), np.array([-0.5, 0.0]), relu=True, name="h")
    target = DenseLayer(np.array([[4.0, 1.0]]), np.array([-2.9]), relu=False, name="y")
    net = Network([hidden, target], InputMap.identity(1))
    box = Box(np.zeros(1), np.ones(1))
    found = region_search.region_ascent(
        net, box, 1, np.array([0]), np.array([1.0]), np.array([[0.1]]), seconds_per_direction=10
    )
    np.testing.assert_allclose(found, [[1.0]], atol=1e-9)
    assert net.preactivations(found)[1][0, 0] > 0


@pytest.mark.parametrize("seed", range(4))
def test_region_ascent_never_loses_ground_and_stays_in_the_box(seed):
    """From starts of the wrong sign, the point returned is in the box, at least as good as the
    start, and (unless it shows the sign) at least as good as every sample of the start's own
    linear region, whose maximum the first LP finds."""
    net = _random_net(seed, [3, 10, 10, 10, 1])
    box = Box(-np.ones(3), np.ones(3))
    rng = np.random.default_rng(seed)
    starts = rng.uniform(-1, 1, size=(6, 3))
    neurons = rng.integers(0, 10, size=6)
    signs = -np.sign(net.preactivations(starts)[2][np.arange(6), neurons])  # unseen at the start
    found = region_search.region_ascent(
        net, box, 2, neurons, signs, starts, seconds_per_direction=5
    )
    assert np.all(found >= box.lower) and np.all(found <= box.upper)
    rows = np.arange(6)
    before = signs * net.preactivations(starts)[2][rows, neurons]
    after = signs * net.preactivations(found)[2][rows, neurons]
    assert np.all(after >= before - 1e-12)
    samples = _samples(box, seed)
    pre = net.preactivations(samples)
    for d in rows:
        start_pre = net.preactivations(starts[d : d + 1])
        same_region = np.ones(samples.shape[0], dtype=bool)
        for j in range(2):
            same_region &= ((pre[j] > 0) == (start_pre[j][0] > 0)).all(axis=1)
        if same_region.any():
            best_sample = (signs[d] * pre[2][same_region, neurons[d]]).max()
            assert after[d] >= min(best_sample, 0.0) - 1e-9


def test_pattern_search_leaves_a_local_maximum_that_stops_the_region_walk():
    """y = x - 2 relu(x - 0.2) + 3 relu(x - 0.6) - 0.3 on [0, 1] rises to -0.1 at x = 0.2, falls
    to -0.5 at 0.6 and rises again to +0.3 at 1. The region walk from x = 0.1 stops at 0.2: no
    neighbour region beats -0.1. One pattern-search step frees both kinks and lands on x = 1."""
    # the third hidden unit, relu(x), carries x itself (it is active on all of [0, 1])
    weight, bias = np.ones((3, 1)), np.array([-0.2, -0.6, 0.0])
    hidden = DenseLayer(weight, bias, relu=True, name="h")
    target = DenseLayer(np.array([[-2.0, 3.0, 1.0]]), np.array([-0.3]), relu=False, name="y")
    net = Network([hidden, target], InputMap.identity(1))
    box = Box(np.zeros(1), np.ones(1))
    bounds = _interval_bounds(net, box)
    start = np.array([[0.1]])
    walked = region_search.region_ascent(net, box, 1, np.array([0]), np.array([1.0]), start, 10)
    assert net.preactivations(walked)[1][0, 0] == pytest.approx(-0.1, abs=1e-9)
    found = region_search.pattern_search(net, box, bounds, [], 1, 0, 1, walked[0], seconds=10)
    np.testing.assert_allclose(found, [1.0], atol=1e-9)
    assert net.preactivations(found[None, :])[1][0, 0] == pytest.approx(0.3, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_pattern_search_never_loses_ground_and_stays_in_the_box(seed):
    """From starts of the wrong sign the point returned lies in the box and is at least as good
    as the start; a direction it shows is confirmed by the forward pass alone."""
    net = _random_net(seed, [3, 10, 10, 10, 1])
    box = Box(-np.ones(3), np.ones(3))
    bounds = _interval_bounds(net, box)
    rng = np.random.default_rng(seed)
    for start in rng.uniform(-1, 1, size=(4, 3)):
        neuron = int(rng.integers(0, 10))
        sign = -int(np.sign(net.preactivations(start[None, :])[2][0, neuron]))
        found = region_search.pattern_search(
            net, box, bounds, [], 2, neuron, sign, start, seconds=5
        )
        assert np.all(found >= box.lower) and np.all(found <= box.upper)
        before = sign * net.preactivations(start[None, :])[2][0, neuron]
        after = sign * net.preactivations(found[None, :])[2][0, neuron]
        assert after >= before - 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folding_the_first_layers_active_neurons_keeps_the_lp_bound(seed):
    """A layer-1 relaxation without rows for the first layer's active neurons (their bounds are
    implied by the box) has the LP optimum of the full triangle LP, in a smaller matrix; a
    deeper relaxation folds nothing (folding would densify the next layer's rows)."""
    net = _random_net(seed, [10, 30, 20, 2], bias_scale=1.5)
    box = Box(np.zeros(10), np.ones(10))
    bounds = _interval_bounds(net, box)
    states = [np.full(30, NeuronState.UNDECIDED, dtype=np.int64)]
    active = bounds[0].lower >= 0
    assert active.any() and not active.all()
    folded = lp_relaxation.LayerRelaxation.build(net, box, bounds, states, 1)
    assert np.array_equal(folded.enc.folded, active)
    highs = highs_model.new_highs()
    encoding = milp_encoding.add_network_encoding(
        highs, net, box, bounds, states, 0, integral=False
    )
    full = lp_relaxation.LayerRelaxation(net, 1, highs, encoding)
    assert not full.enc.folded.any()
    assert folded.highs.getNumNz() < full.highs.getNumNz()
    assert folded.highs.getNumRow() == full.highs.getNumRow() - int(active.sum())
    for neuron in range(20):
        for sign in (1, -1):
            bounds_of = []
            for relaxation in (folded, full):
                objective = lp_relaxation.direction_objective(relaxation.enc, net, 1, neuron, sign)
                lower_bound, _, _ = relaxation.solve(objective, np.inf, np.inf)
                bounds_of.append(objective.offset - lower_bound)
            assert bounds_of[0] == pytest.approx(bounds_of[1], rel=1e-7, abs=1e-9)
    undecided = np.full(20, NeuronState.UNDECIDED, dtype=np.int64)
    deeper = lp_relaxation.LayerRelaxation.build(net, box, bounds, states + [undecided], 2)
    assert not deeper.enc.folded.any()


@pytest.mark.parametrize("seed", [0, 1])
def test_the_decision_milp_numbers_its_columns_like_the_relaxation_whose_cuts_it_adds(seed):
    """The MILP of a layer adds the relaxation's cut rows by column index, so both must encode
    the same columns in the same order (first-layer folding included), and the MILP's proofs
    with those cuts must hold on samples; a relaxation with other columns gets no cuts."""
    net = _random_net(seed, [10, 30, 20, 2], bias_scale=1.5)
    box = Box(np.zeros(10), np.ones(10))
    bounds = _interval_bounds(net, box)
    states = [np.full(30, NeuronState.UNDECIDED, dtype=np.int64)]
    relaxation = lp_relaxation.LayerRelaxation.build(net, box, bounds, states, 1)
    assert relaxation.enc.folded.any()
    directions = _all_directions(net, 1)
    margins = np.full(20, MARGIN)
    exact_tiers.decide_directions(
        net, box, bounds, states, 1, directions, margins, time.monotonic() + 60,
        tiers=("cuts",), relaxation=relaxation,
    )  # fmt: skip
    assert relaxation.cuts, "no cut was separated"
    highs = highs_model.new_highs()
    encoding = milp_encoding.layer_encoding(highs, net, box, bounds, states, 1, integral=True)
    assert highs.getNumCol() == relaxation.highs.getNumCol()
    assert np.array_equal(encoding.x, relaxation.enc.x)
    for name in ("y", "h", "z"):
        ours, theirs = getattr(encoding, name), getattr(relaxation.enc, name)
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))
    ours, theirs = highs.getLp(), relaxation.highs.getLp()
    assert np.array_equal(ours.col_lower_, theirs.col_lower_)
    assert np.array_equal(ours.col_upper_, theirs.col_upper_)
    results = exact_tiers.decide_directions(
        net, box, bounds, states, 1, directions, margins, time.monotonic() + 60,
        tiers=("milp",), relaxation=relaxation,
    )  # fmt: skip
    pre = net.preactivations(_samples(box, seed))[1]
    for r in results:
        sampled_max = (r.direction.sign * pre[:, r.direction.neuron]).max()
        assert not (r.status == "proved" and sampled_max > 0)


def test_the_decision_milp_caps_its_cut_pool_and_runs_no_primal_heuristics(monkeypatch):
    """The memory estimate's MILP term assumes a pool of ``MILP_CUT_POOL`` cuts and no sub-MIPs
    (with HiGHS's defaults one 240 s MILP grew to twice as much); witnesses come from the attack."""
    created = []
    new_highs = highs_model.new_highs
    monkeypatch.setattr(
        exact_tiers, "new_highs", lambda: created.append(new_highs()) or created[-1]
    )
    net = _random_net(3, [10, 20, 20, 2], bias_scale=1.0)
    box = Box(np.zeros(10), np.ones(10))
    bounds = _interval_bounds(net, box)
    states = [np.full(20, NeuronState.UNDECIDED, dtype=np.int64)]
    results = exact_tiers.decide_directions(
        net, box, bounds, states, 1, _all_directions(net, 1), np.full(20, MARGIN),
        time.monotonic() + 60, tiers=("milp",),
    )  # fmt: skip
    mips = [h for h in created if h.getLp().integrality_]
    assert mips, "no decision MILP was built"
    for highs in mips:
        assert highs.getOptionValue("mip_pool_soft_limit")[1] == exact_tiers.MILP_CUT_POOL
        assert highs.getOptionValue("mip_heuristic_effort")[1] == 0.0
    pre = net.preactivations(_samples(box, 3))[1]
    for r in results:
        assert not (
            r.status == "proved" and (r.direction.sign * pre[:, r.direction.neuron]).max() > 0
        )


def test_a_reused_milp_instance_gets_the_seconds_asked_for_on_every_run():
    """HiGHS times a MIP run from its own start, not cumulatively like an LP: an option set to
    cumulative run time + seconds lets each re-run of one instance take all earlier runs' time
    again. A MILP that takes minutes, re-run 5 times with 0.5 s each: every run stops on its time
    limit, and the option HiGHS ran with is 0.5 s each time (read back from the instance, so the
    assertion does not depend on how loaded the machine is)."""
    from exporter_fixtures import gemm_mlp

    from onnx_exact.io.onnx_reader import read_model

    net = read_model(gemm_mlp((20, 60, 60, 60, 10), seed=1, pinned=False)).network
    box = Box(np.zeros(20), np.ones(20))
    bounds = _interval_bounds(net, box)
    states = [np.full(60, NeuronState.UNDECIDED, dtype=np.int64)] * 3
    highs = highs_model.new_highs()
    enc = milp_encoding.layer_encoding(highs, net, box, bounds, states, 3, integral=True)
    limits, statuses = [], []
    for neuron in range(5):
        obj = lp_relaxation.direction_objective(enc, net, 3, neuron, 1)
        _, _, status = exact_tiers.run_min(
            highs, enc, obj, highs_model.INF, -highs_model.INF, None, net, 0.5
        )
        limits.append(highs.getOptionValue("time_limit")[1])
        statuses.append(status)
    assert statuses[0] == highspy.HighsModelStatus.kTimeLimit, "the MILP must be hard to test this"
    assert limits == [0.5] * 5, limits


@pytest.mark.parametrize("tier", ["lp", "bab", "milp"])
def test_a_feed_refutes_a_direction_for_every_tier_and_is_credited(tier):
    """Inputs from a search beside the tiers (the book's feed) are forward-passed like the
    tiers' own: a direction they show is refuted, credited to "attack", whatever tier runs."""
    net = _random_net(100, [10, 20, 20, 3], bias_scale=1.0)
    box = Box(np.zeros(10), np.full(10, 0.6))
    bounds = _interval_bounds(net, box)
    points = _samples(box, 0)
    pre = net.preactivations(points)[1]
    centre = net.preactivations(box.center[None, :])[1][0]
    neuron = next(i for i in range(20) if centre[i] <= 0 < pre[:, i].max())
    witness = points[np.argmax(pre[:, neuron])][None, :]
    fed: list[int] = []

    def feed() -> np.ndarray:
        fed.append(1)
        return witness if len(fed) == 1 else np.empty((0, 10))

    states = [np.full(20, NeuronState.UNSTABLE)]
    (result,) = exact_tiers.decide_directions(
        net,
        box,
        bounds,
        states,
        1,
        [Direction(1, neuron, 1)],
        np.full(20, MARGIN),
        time.monotonic() + 60,
        tiers=(tier,),
        feed=feed,
    )
    assert fed, "the feed was never asked"
    assert result.status == "refuted" and result.method == "attack"
    assert net.preactivations(result.witness)[1][0, neuron] > 0


def test_a_decision_milp_stops_when_told_and_proves_nothing_then(monkeypatch):
    """A serial decision MILP asks its ``stop`` from HiGHS's interrupt callback; stopped at
    once, its run proves nothing (the direction is left to the caller, who knows why)."""
    monkeypatch.setattr(exact_tiers, "FEED_POLL_SECONDS", 0.0)
    net = _random_net(3, [12, 30, 30, 30, 2])
    box = Box(np.zeros(12), np.ones(12))
    bounds = _interval_bounds(net, box)
    states = [np.full(30, NeuronState.UNSTABLE), np.full(30, NeuronState.UNSTABLE)]
    context = exact_tiers._MilpContext(net, box, bounds[:2], states, 2, [], 0)
    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return True

    outcome = exact_tiers._decision_milp(
        context, Direction(2, 0, 1), MARGIN, 0.0, None, time.monotonic() + 60, 60.0, stop
    )
    assert asked, "the MILP never asked whether to stop"
    assert not outcome.proved
