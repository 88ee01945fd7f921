"""The batched input-space branch and bound is sound, refutes with real witnesses, and is exact."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_exact import report
from onnx_exact.bounds import input_split, leaf_alpha, leaf_crown
from onnx_exact.bounds.crown import interval_bounds, symbolic_bounds
from onnx_exact.core.box import Box
from onnx_exact.core.network import DenseLayer, InputMap, Network
from onnx_exact.core.verdicts import NeuronState
from onnx_exact.stability import analyze_stability, policy


def random_network(rng: np.random.Generator, sizes: list[int]) -> Network:
    layers = [
        DenseLayer(
            rng.normal(size=(n_out, n_in)) / np.sqrt(n_in),
            rng.normal(size=n_out) * 0.5,
            relu=k < len(sizes) - 2,
            name=f"fc{k}",
        )
        for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False))
    ]
    return Network(layers, InputMap.identity(sizes[0]))


def case(seed: int) -> tuple[Network, Box]:
    """A 2- or 3-input net with three hidden layers of 12 ReLUs on a box of width 0.3-1."""
    rng = np.random.default_rng(seed)
    n_in = 2 + seed % 2
    net = random_network(rng, [n_in, 12, 12, 12, 2])
    lower = rng.uniform(-1.0, 0.5, n_in)
    return net, Box(lower, lower + rng.uniform(0.3, 1.0, n_in))


def dense_grid(box: Box) -> np.ndarray:
    per_axis = 300 if box.size == 2 else 50
    axes = [np.linspace(lo, hi, per_axis) for lo, hi in zip(box.lower, box.upper, strict=True)]
    return np.stack([a.ravel() for a in np.meshgrid(*axes, indexing="ij")], axis=1)


def decide(net: Network, box: Box, layers, neurons, signs, max_leaves: int):
    """The input search on these directions over ``box``, with a 1e-9 margin each."""
    return input_split.decide_directions(
        net,
        box.lower,
        box.upper,
        interval_bounds(net, box),
        layers,
        neurons,
        signs,
        np.full(len(layers), 1e-9),
        max_leaves=max_leaves,
    )


def all_directions(net: Network) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    layers, neurons, signs = [], [], []
    for k in net.relu_layer_indices:
        for sign in (1, -1):
            layers.append(np.full(net.layers[k].out_features, k))
            neurons.append(np.arange(net.layers[k].out_features))
            signs.append(np.full(net.layers[k].out_features, sign))
    return tuple(np.concatenate(part) for part in (layers, neurons, signs))


@pytest.mark.parametrize("seed", range(4))
def test_leaf_bounds_enclose_every_point_of_each_leaf(seed: int) -> None:
    net, box = case(seed)
    rng = np.random.default_rng(seed)
    centre = rng.uniform(box.lower, box.upper, (64, box.size))
    radius = rng.uniform(0.0, 0.2, (64, box.size)) * (box.upper - box.lower)
    lower, upper = np.maximum(centre - radius, box.lower), np.minimum(centre + radius, box.upper)
    top = len(net.layers) - 1
    bounds, _ = leaf_crown.leaf_bounds(net, lower, upper, interval_bounds(net, box), top)
    for leaf in range(0, 64, 8):
        points = rng.uniform(lower[leaf], upper[leaf], (500, box.size))
        for (lo, hi), y in zip(bounds, net.preactivations(points), strict=True):
            assert np.all(y >= lo[:, leaf] - 1e-9) and np.all(y <= hi[:, leaf] + 1e-9)


def leaf_batch(seed: int) -> tuple:
    """:func:`case`'s net and box, 64 random leaves of the box, a generator for sampling them,
    and the arguments of ``direction_bounds`` after the leaves for every direction:
    ``(outer, top, asked, layers, neurons, signs)`` with interval ``outer`` bounds."""
    net, box = case(seed)
    rng = np.random.default_rng(seed)
    centre = rng.uniform(box.lower, box.upper, (64, box.size))
    radius = rng.uniform(0.0, 0.3, (64, box.size)) * (box.upper - box.lower)
    lower, upper = np.maximum(centre - radius, box.lower), np.minimum(centre + radius, box.upper)
    layers, neurons, signs = all_directions(net)
    asked = (interval_bounds(net, box), int(layers.max()), np.arange(layers.size))
    return net, rng, lower, upper, (*asked, layers, neurons, signs)


def assert_bounds_every_point(net, rng, lower, upper, values, asked) -> None:
    """``values (B, R)`` bound ``s * y`` of every direction on 200 points of each leaf."""
    layers, neurons, signs = asked[3:]
    for leaf in range(lower.shape[0]):
        points = rng.uniform(lower[leaf], upper[leaf], (200, lower.shape[1]))
        y = net.preactivations(points)
        signed = np.stack([y[k][:, i] for k, i in zip(layers, neurons, strict=True)], 1) * signs
        assert np.all(signed <= values[leaf] + 1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("lines", [(0.0, 0.5, 1.0), ("chord",)])
def test_direction_bounds_with_other_lower_lines_enclose_every_point(
    seed, lines, monkeypatch
) -> None:
    """CROWN of each row with other lower ReLU lines (fixed slopes, or parallel to the upper
    line: the cheap α-steps) stays an upper bound of ``s * y`` on every sampled point of each
    leaf, and tightens some bounds."""
    net, rng, lower, upper, asked = leaf_batch(seed)
    monkeypatch.setattr(leaf_crown, "LOWER_LINES_MIN_INPUTS", 1)
    monkeypatch.setattr(leaf_crown, "_LOWER_LINES", ())
    adaptive, *_ = leaf_crown.direction_bounds(net, lower, upper, *asked)
    monkeypatch.setattr(leaf_crown, "_LOWER_LINES", lines)
    values, *_ = leaf_crown.direction_bounds(net, lower, upper, *asked)
    assert np.all(values <= adaptive) and np.any(values < adaptive - 1e-9)
    assert_bounds_every_point(net, rng, lower, upper, values, asked)


def test_the_other_lower_lines_need_enough_inputs(monkeypatch) -> None:
    """Below ``LOWER_LINES_MIN_INPUTS`` input features the second CROWN pass does not run: the
    bounds are the adaptive pass's alone; from it on, it runs and tightens some."""
    net, box = case(0)
    rng = np.random.default_rng(0)
    lower = rng.uniform(box.lower, (box.lower + box.upper) / 2.0, (64, box.size))
    upper = lower + (box.upper - box.lower) / 4.0
    layers, neurons, signs = all_directions(net)
    outer, asked, top = interval_bounds(net, box), np.arange(layers.size), int(layers.max())
    context = (layers, neurons, signs)

    def values(lines, min_inputs):
        monkeypatch.setattr(leaf_crown, "_LOWER_LINES", lines)
        monkeypatch.setattr(leaf_crown, "LOWER_LINES_MIN_INPUTS", min_inputs)
        return leaf_crown.direction_bounds(net, lower, upper, outer, top, asked, *context)[0]

    adaptive = values((), 1)
    assert np.array_equal(values(("chord",), box.size + 1), adaptive)
    with_chord = values(("chord",), box.size)
    assert np.all(with_chord <= adaptive) and np.any(with_chord < adaptive - 1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tightened", [False, True])
def test_crown_on_the_open_pairs_alone_gives_their_dense_bounds(seed, tightened) -> None:
    """With ``open_pairs`` sparse enough, CROWN runs pair by pair on the open (leaf, row) pairs
    only; each open pair gets the bound, coefficients and split scores the dense pass gives it,
    up to the rounding of a differently shaped matrix product, and every other pair keeps its
    sound forward bound."""
    net, rng, lower, upper, asked = leaf_batch(seed)
    open_pairs = rng.random((64, asked[2].size)) < 0.3
    targets = np.where(open_pairs, 0.0, np.inf) if tightened else None
    dense = leaf_crown.direction_bounds(net, lower, upper, *asked, targets)
    paired = leaf_crown.direction_bounds(net, lower, upper, *asked, targets, open_pairs)
    scale = 1e-9 * (1.0 + np.abs(dense[0]))
    assert np.all(np.abs(paired[0] - dense[0])[open_pairs] <= scale[open_pairs])
    for dense_part, paired_part in zip(dense[1:3], paired[1:3], strict=True):
        assert np.allclose(paired_part[open_pairs], dense_part[open_pairs], rtol=1e-9, atol=1e-12)
    assert np.all(paired[0][~open_pairs] >= dense[0][~open_pairs] - scale[~open_pairs])
    assert_bounds_every_point(net, rng, lower, upper, paired[0], asked)


@pytest.mark.parametrize("seed", range(4))
def test_proved_directions_never_flip_on_a_dense_grid_and_refutations_are_real(seed: int) -> None:
    net, box = case(seed)
    layers, neurons, signs = all_directions(net)
    outcome = decide(net, box, layers, neurons, signs, max_leaves=200_000)
    assert not np.any(outcome.proved & outcome.refuted)
    assert np.all(outcome.proved | outcome.refuted)  # small nets: everything decided
    preactivations = net.preactivations(dense_grid(box))
    witness_values = net.preactivations(outcome.witnesses)
    for d in range(layers.size):
        signed = signs[d] * preactivations[layers[d]][:, neurons[d]]
        if outcome.proved[d]:
            assert signed.max() <= outcome.worst[d] + 1e-12 <= 1e-12
        else:
            shown = signs[d] * witness_values[layers[d]][:, neurons[d]]
            assert shown.max() > 0.0
    assert np.all((outcome.witnesses >= box.lower) & (outcome.witnesses <= box.upper))


def diagonal_net() -> tuple[Network, Box]:
    """``a = relu(x1 + x2)``, ``b = relu(x1 - x2)`` on [-1, 1]^2: ``a + b - 2.5 <= -0.5``, but the
    triangle relaxation of the whole box bounds it by ``+0.5``: only splitting proves it."""
    diagonals = np.array([[1.0, 1.0], [1.0, -1.0]])
    layers = [
        DenseLayer(diagonals, np.zeros(2), relu=True, name="fc0"),
        DenseLayer(diagonals, np.array([-2.5, 0.0]), relu=True, name="fc1"),
        DenseLayer(np.ones((1, 2)), np.zeros(1), relu=False, name="out"),
    ]
    return Network(layers, InputMap.identity(2)), Box(-np.ones(2), np.ones(2))


def test_splitting_proves_what_the_whole_box_relaxation_cannot() -> None:
    net, box = diagonal_net()
    outer = interval_bounds(net, box)
    args = (net, box.lower, box.upper, outer, [1], [0], [1], [1e-12])
    root = input_split.decide_directions(*args, max_leaves=1)
    assert not root.proved[0] and not root.refuted[0]  # the root leaf alone does not close it
    outcome = input_split.decide_directions(*args, max_leaves=1000)
    assert outcome.proved[0] and -0.5 <= outcome.worst[0] < 0.0  # the true maximum is -0.5
    assert outcome.leaves > 1


def test_a_sign_in_a_sliver_is_refuted_by_a_leaf_point() -> None:
    """``relu(x) - 0.999`` on [0, 1]: positive only on (0.999, 1]; the leaf vertices find it."""
    layers = [
        DenseLayer(np.ones((1, 1)), np.zeros(1), relu=True, name="fc0"),
        DenseLayer(np.ones((1, 1)), np.array([-0.999]), relu=True, name="fc1"),
        DenseLayer(np.ones((1, 1)), np.zeros(1), relu=False, name="out"),
    ]
    net, box = Network(layers, InputMap.identity(1)), Box(np.zeros(1), np.ones(1))
    outcome = input_split.decide_directions(
        net, box.lower, box.upper, interval_bounds(net, box), [1], [0], [1], [1e-12], max_leaves=64
    )
    assert outcome.refuted[0] and not outcome.proved[0]
    assert net.preactivations(outcome.witnesses)[1][0, 0] > 0.0


def test_outcome_is_deterministic() -> None:
    net, box = case(3)
    layers, neurons, signs = all_directions(net)
    runs = [
        input_split.decide_directions(
            net,
            box.lower,
            box.upper,
            interval_bounds(net, box),
            layers,
            neurons,
            signs,
            np.full(layers.size, 1e-9),
            max_leaves=3000,
        )
        for _ in range(2)
    ]
    for field in ("proved", "refuted", "worst", "witnesses"):
        np.testing.assert_array_equal(getattr(runs[0], field), getattr(runs[1], field))
    assert runs[0].leaves == runs[1].leaves


def test_worker_pool_gives_the_serial_outcome() -> None:
    net, box = case(3)
    layers, neurons, signs = all_directions(net)
    args = (net, box.lower, box.upper, interval_bounds(net, box), layers, neurons, signs)
    margins = np.full(layers.size, 0.05)  # directions whose extreme is within it keep splitting
    serial = input_split.decide_directions(*args, margins, max_leaves=3000)
    pooled = input_split.decide_directions(*args, margins, max_leaves=3000, jobs=2)
    assert serial.leaves == 3000  # the later batches were bounded in two parts
    for field in ("proved", "refuted", "worst", "witnesses"):
        np.testing.assert_array_equal(getattr(serial, field), getattr(pooled, field))


@pytest.mark.parametrize("seed", range(4))
def test_split_tier_labels_equal_the_per_neuron_milps(seed: int) -> None:
    net, box = case(seed)
    split = analyze_stability(net, box, tiers=("split",))
    assert split.complete and not split.time_limit_hit
    baseline = analyze_stability(net, box, method="per-neuron")
    assert baseline.complete
    for ours, theirs in zip(split.layers, baseline.layers, strict=True):
        np.testing.assert_array_equal(ours.states, theirs.states)
    proved = [layer.decided_by == "split" for layer in split.layers]
    grid_values = net.preactivations(dense_grid(box))
    for layer, chosen, y in zip(split.layers, proved, grid_values, strict=True):
        active = chosen & (layer.states == NeuronState.ACTIVE)
        inactive = chosen & (layer.states == NeuronState.INACTIVE)
        assert np.all(y[:, active] >= 0.0) and np.all(y[:, inactive] <= 0.0)


def test_split_tier_budget_hands_directions_on(monkeypatch) -> None:
    net, box = diagonal_net()
    monkeypatch.setattr(policy, "SPLIT_BOXES_PER_LAYER", 1)
    starved = analyze_stability(net, box, tiers=("split",))
    assert starved.layers[1].states[0] == NeuronState.UNDECIDED
    monkeypatch.setattr(policy, "SPLIT_BOXES_PER_LAYER", 1000)
    full = analyze_stability(net, box, tiers=("split",))
    assert full.layers[1].states[0] == NeuronState.INACTIVE
    assert full.layers[1].decided_by[0] == "split"


def test_a_search_resumes_and_never_proves_what_the_caller_dropped() -> None:
    net, box = diagonal_net()
    args = (net, box.lower, box.upper, interval_bounds(net, box), [1, 1], [0, 1], [1, 1])
    search = input_split.InputSearch(*args, [1e-12, 1e-12])
    first = search.run(1)
    assert first.leaves == 1 and not first.proved.any()
    second = search.run(1000)  # continues from the two halves of the root
    assert second.proved[0] and second.refuted[1]  # a + b - 2.5 < 0; a - b > 0 somewhere
    dropped = input_split.InputSearch(*args, [1e-12, 1e-12])
    outcome = dropped.run(1000, asked=np.array([False, True]))
    assert not outcome.proved[0] and not outcome.refuted[0] and outcome.refuted[1]


@pytest.mark.parametrize("seed", [0, 2])
def test_the_proved_share_and_the_open_leaves_make_up_the_box(seed: int) -> None:
    """Leaves are disjoint and cover the box, so for every direction still open its proved share
    (the volume of its closed leaves) and the volume of the leaves holding it open add up to the
    whole box; the share only grows, and is 1 once the direction is proved."""
    net, box = deep_case(seed)
    layers, neurons, signs = all_directions(net)
    outer = interval_bounds(net, box)
    margins = np.full(layers.size, 1e-9)
    search = input_split.InputSearch(
        net, box.lower, box.upper, outer, layers, neurons, signs, margins
    )
    before = np.zeros(layers.size)
    for _ in range(6):
        outcome = search.run(4)
        live = ~(outcome.proved | outcome.refuted | search.dropped)
        pool = search.pool
        volume = input_split._volume_shares(pool.lower, pool.upper, search.extent, search.flat)
        left = volume @ pool.open
        assert np.allclose(outcome.covered[live] + left[live], 1.0, rtol=0.0, atol=1e-9)
        assert np.all(outcome.covered[outcome.proved] == 1.0)
        assert np.all((outcome.covered >= before - 1e-12) & (outcome.covered <= 1.0))
        before = outcome.covered
    assert (before[live] > 0.0).any() and (before[live] < 1.0).any()  # a partial proof was seen


def test_an_undecided_neuron_reports_the_share_of_the_box_the_search_proved(monkeypatch) -> None:
    net, box = diagonal_net()
    monkeypatch.setattr(policy, "SPLIT_BOXES_PER_LAYER", 3)  # the root and its two halves
    result = analyze_stability(net, box, tiers=("split",))
    assert result.layers[1].states[0] == NeuronState.UNDECIDED
    share = result.layers[1].proved_share[0]
    # a + b - 2.5 <= -0.5 needs the quarters of [-1, 1]^2; halves close none or half of it
    assert 0.0 <= share < 1.0
    assert np.isnan(result.layers[1].proved_share[1])  # b is unstable: decided, no share
    assert any("input splitting proved them on" in note for note in result.notes)
    summary = report.summarize_layers(net, result)[1].to_json()
    assert summary["undecided"] == [0] and summary["undecided_proved_share"] == [share]


def test_a_refined_search_keeps_the_tighter_bounds_and_stays_sound() -> None:
    """``refine`` intersects the search's bounds with newer sound ones (here CROWN's, tighter than
    the interval bounds the search started from); the search goes on from them and its proofs
    still hold on a dense grid."""
    net, box = deep_case(1)
    layers, neurons, signs = all_directions(net)
    outer = interval_bounds(net, box)
    tighter = [bound.copy() for bound in outer]
    for k in range(len(net.layers)):
        symbolic, _ = symbolic_bounds(net, box, tighter, k)
        tighter[k] = tighter[k].intersect(symbolic)
        tighter = interval_bounds(net, box, tighter)
    margins = np.full(layers.size, 1e-9)
    search = input_split.InputSearch(
        net, box.lower, box.upper, outer, layers, neurons, signs, margins
    )
    search.run(8)
    search.worker = "started"  # stands for a worker context built from the current bounds
    search.refine(outer)  # nothing tighter: the workers keep their context
    assert search.worker == "started"
    before = [bound.copy() for bound in search.outer]  # with the search's own proofs
    search.refine(tighter)
    assert search.worker is None
    for mine, old, new in zip(search.outer, before, tighter, strict=True):
        assert np.array_equal(mine.upper, np.minimum(old.upper, new.upper))
        assert np.array_equal(mine.lower, np.maximum(old.lower, new.lower))
    assert any((new.upper < old.upper).any() for old, new in zip(outer, tighter, strict=True))
    outcome = search.run(100_000)
    assert np.all(outcome.proved | outcome.refuted)
    grid = net.preactivations(dense_grid(box))
    signed = np.stack(
        [sign * grid[k][:, i] for k, i, sign in zip(layers, neurons, signs, strict=True)]
    )
    assert np.all(signed[outcome.proved].max(axis=1) <= 1e-9)
    assert np.all(signed[outcome.refuted].max(axis=1) > 0.0)


def test_directions_of_the_first_layer_alone_are_decided() -> None:
    """Asked only about first-layer neurons (``top`` = 0, so no layer below gives split shares),
    the search decides them; it failed with an IndexError when building the split slack."""
    net, box = case(1)
    layers, neurons, signs = all_directions(net)
    first = layers == 0
    layers, neurons, signs = layers[first], neurons[first], signs[first]
    outcome = decide(net, box, layers, neurons, signs, max_leaves=10_000)
    assert np.all(outcome.proved | outcome.refuted) and not np.any(outcome.proved & outcome.refuted)
    signed = signs[:, None] * net.preactivations(dense_grid(box))[0][:, neurons].T
    assert np.all(signed[outcome.proved].max(axis=1) <= 1e-12)


def no_alpha_bound(net, bounds, lower, upper, layer, coeffs, const, wanted=None):
    """A stand-in for :func:`leaf_alpha.bound_rows` that bounds nothing (the α stage off)."""
    return np.full(coeffs.shape[:2], np.inf), np.zeros((*coeffs.shape[:2], lower.shape[1]))


def deep_case(seed: int) -> tuple[Network, Box]:
    """A 2-input net with five hidden layers of 16 ReLUs: deep enough that the forward
    relaxation's intermediate bounds, not the leaf size, limit what a leaf proves."""
    rng = np.random.default_rng(seed)
    net = random_network(rng, [2, 16, 16, 16, 16, 16, 2])
    return net, Box(-np.ones(2), np.ones(2))


@pytest.mark.parametrize("seed", range(3))
def test_tightened_leaf_bounds_enclose_every_point_and_are_tighter(seed: int) -> None:
    """CROWN of the intermediate rows through each leaf's own bounds (``tighten``) stays sound on
    sampled points of every leaf and narrows the forward relaxation's bounds on a deep net (in
    total: with other ReLU lines below it, a single bound may come out looser)."""
    net, box = deep_case(seed)
    rng = np.random.default_rng(seed)
    centre = rng.uniform(box.lower, box.upper, (64, box.size))
    radius = rng.uniform(0.0, 0.3, (64, box.size)) * (box.upper - box.lower)
    lower, upper = np.maximum(centre - radius, box.lower), np.minimum(centre + radius, box.upper)
    top, outer = len(net.layers) - 1, interval_bounds(net, box)
    forward, _ = leaf_crown.leaf_bounds(net, lower, upper, outer, top)
    tight, _ = leaf_crown.leaf_bounds(net, lower, upper, outer, top, tighten=True)
    width = sum(float(np.sum(hi - lo)) for lo, hi in forward)
    tight_width = sum(float(np.sum(hi - lo)) for lo, hi in tight)
    assert tight_width < 0.9 * width
    for leaf in range(0, 64, 4):
        points = rng.uniform(lower[leaf], upper[leaf], (400, box.size))
        for (lo, hi), y in zip(tight, net.preactivations(points), strict=True):
            assert np.all(y >= lo[:, leaf] - 1e-9) and np.all(y <= hi[:, leaf] + 1e-9)


def test_a_leaf_is_bounded_alike_alone_and_in_any_batch(monkeypatch) -> None:
    """Tightened bounds and direction bounds of a leaf are the same, up to the last bits of
    round-off of the matrix products, whether it is bounded alone, in a batch of 300 (cut into
    cache-sized chunks, several sizes) or in another order: which neurons are tightened on a leaf
    depends on that leaf alone, so what a search proves does not depend on how its batches
    were cut (``jobs``, chunk sizes)."""

    def same(found, expected):
        np.testing.assert_allclose(found, expected, rtol=1e-12, atol=1e-12)

    net, box = deep_case(2)
    rng = np.random.default_rng(5)
    centre = rng.uniform(box.lower, box.upper, (300, box.size))
    radius = rng.uniform(0.0, 0.4, (300, box.size)) * (box.upper - box.lower)
    lower, upper = np.maximum(centre - radius, box.lower), np.minimum(centre + radius, box.upper)
    top, outer = len(net.layers) - 2, interval_bounds(net, box)
    layers, neurons, signs = all_directions(net)
    asked = np.flatnonzero(layers == top)
    targets = np.full((300, asked.size), -0.01)

    def both(lo, up, goal):
        bounds, _ = leaf_crown.leaf_bounds(net, lo, up, outer, top, tighten=True)
        found = leaf_crown.direction_bounds(
            net, lo, up, outer, top, asked, layers, neurons, signs, goal
        )
        return bounds, found

    whole = both(lower, upper, targets)
    assert sum(int(((lo < 0) & (hi > 0)).any(axis=0).sum()) for lo, hi in whole[0][1:]) > 0
    for cache, row_cache in ((1_000, 1_000), (40_000, 50_000), (10**9, 10**9)):
        monkeypatch.setattr(leaf_crown, "_CACHE_VALUES", cache)
        monkeypatch.setattr(leaf_crown, "_ROW_CACHE_VALUES", row_cache)
        order = rng.permutation(300)
        shuffled = both(lower[order], upper[order], targets[order])
        for (lo, hi), (s_lo, s_hi) in zip(whole[0], shuffled[0], strict=True):
            same(lo[:, order], s_lo)
            same(hi[:, order], s_hi)
        for part, s_part in zip(whole[1], shuffled[1], strict=True):
            same(part[order], s_part)
    for leaf in (0, 17, 299):
        alone = both(lower[leaf : leaf + 1], upper[leaf : leaf + 1], targets[leaf : leaf + 1])
        for (lo, hi), (a_lo, a_hi) in zip(whole[0], alone[0], strict=True):
            same(lo[:, leaf : leaf + 1], a_lo)
            same(hi[:, leaf : leaf + 1], a_hi)
        for part, a_part in zip(whole[1][:2], alone[1][:2], strict=True):
            same(part[leaf : leaf + 1], a_part)


def test_tightening_closes_leaves_sooner_and_keeps_the_verdicts(monkeypatch) -> None:
    """On a deep net, tightening every leaf the forward relaxation leaves open proves the same
    directions with fewer leaves than never tightening (only the probes), and both agree with
    the dense grid (α-CROWN off)."""
    monkeypatch.setattr(leaf_alpha, "bound_rows", no_alpha_bound)
    net, box = deep_case(0)
    layers, neurons, signs = all_directions(net)
    deep = layers >= 3
    layers, neurons, signs = layers[deep], neurons[deep], signs[deep]
    monkeypatch.setattr(input_split, "TIGHTEN_RATE", 0.0)
    always = decide(net, box, layers, neurons, signs, max_leaves=200_000)
    monkeypatch.setattr(input_split, "TIGHTEN_RATE", 2.0)
    monkeypatch.setattr(input_split, "_TIGHTEN_PROBES", 1)
    seldom = decide(net, box, layers, neurons, signs, max_leaves=200_000)
    for outcome in (always, seldom):
        assert np.all(outcome.proved | outcome.refuted)
    np.testing.assert_array_equal(always.proved, seldom.proved)
    assert always.leaves < seldom.leaves
    grid = net.preactivations(dense_grid(box))
    for d in np.flatnonzero(always.proved):
        assert (signs[d] * grid[layers[d]][:, neurons[d]]).max() <= always.worst[d]


def test_tightened_batches_in_the_worker_pool_give_the_serial_outcome(monkeypatch) -> None:
    """Every open leaf tightened (rate 0), large batches bounded in two worker parts: the same
    verdicts, bounds and witnesses as one process."""
    monkeypatch.setattr(input_split, "TIGHTEN_RATE", 0.0)
    net, box = deep_case(1)
    layers, neurons, signs = all_directions(net)
    args = (net, box.lower, box.upper, interval_bounds(net, box), layers, neurons, signs)
    margins = np.full(layers.size, 0.05)
    serial = input_split.decide_directions(*args, margins, max_leaves=3000)
    pooled = input_split.decide_directions(*args, margins, max_leaves=3000, jobs=2)
    assert serial.leaves == pooled.leaves
    for field in ("proved", "refuted", "worst", "witnesses"):
        np.testing.assert_array_equal(getattr(serial, field), getattr(pooled, field))


def alpha_problem(seed: int, radius: float):
    """Leaves of a 3-input net with three hidden layers of 12 ReLUs, their tightened bounds, and
    the rows of the top hidden layer (both signs)."""
    rng = np.random.default_rng(seed)
    net = random_network(rng, [3, 12, 12, 12, 2])
    box = Box(-np.ones(3), np.ones(3))
    centre = rng.uniform(-1.0, 1.0, (8, 3))
    lower, upper = np.maximum(centre - radius, -1.0), np.minimum(centre + radius, 1.0)
    top = 2
    bounds, _ = leaf_crown.leaf_bounds(net, lower, upper, interval_bounds(net, box), top, True)
    weight, bias = net.layers[top].weight, net.layers[top].bias
    start = np.broadcast_to(np.concatenate([weight, -weight]), (8, 24, 12))
    const = np.broadcast_to(np.concatenate([bias, -bias]), (8, 24))
    return net, bounds, lower, upper, top, start, const


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 1.0))
def test_alpha_bounds_are_sound_and_never_looser_than_crown(seed: int, radius: float) -> None:
    """α-CROWN's bound of every row on every leaf is at least the largest value of the row on
    points sampled in the leaf and at most the adaptive CROWN bound through the same leaf
    bounds (its first iterate); bounding only some (leaf, row) pairs, each its own batch entry,
    gives those pairs the same bounds (the optimisation is per pair) and the others ``inf``."""
    net, bounds, lower, upper, top, start, const = alpha_problem(seed, radius)
    crown_coeffs, crown_const, _ = leaf_crown.back_substitute(net, bounds, None, top, start, const)
    crown = leaf_alpha.maximum_over_leaf(crown_coeffs, crown_const, lower, upper)
    every, _ = leaf_alpha.optimise(net, bounds, lower, upper, top, start, const)
    # the two back-substitutions sum in different orders: equal up to round-off
    assert np.all(every <= crown + 1e-12 * (1.0 + np.abs(crown)))
    rng = np.random.default_rng(seed)
    for leaf in range(8):
        points = rng.uniform(lower[leaf], upper[leaf], (400, 3))
        y = net.preactivations(points)[top]
        signed = np.concatenate([y, -y], axis=1).max(axis=0)
        assert np.all(signed <= every[leaf] + 1e-9)
    wanted = rng.random(every.shape) < 0.3
    some, _ = leaf_alpha.bound_rows(net, bounds, lower, upper, top, start, const, wanted)
    np.testing.assert_allclose(some[wanted], every[wanted], rtol=1e-9, atol=1e-12)
    assert np.all(np.isinf(some[~wanted]))


@pytest.mark.parametrize("seed", range(3))
def test_alpha_tightens_crown_on_wide_leaves(seed: int) -> None:
    """Where leaves are wide (many unstable neurons) the optimised slopes lower the bounds."""
    net, bounds, lower, upper, top, start, const = alpha_problem(seed, 0.5)
    crown_coeffs, crown_const, _ = leaf_crown.back_substitute(net, bounds, None, top, start, const)
    crown = leaf_alpha.maximum_over_leaf(crown_coeffs, crown_const, lower, upper)
    every, _ = leaf_alpha.bound_rows(net, bounds, lower, upper, top, start, const)
    assert np.sum(crown - every) > 0.05 * np.sum(np.abs(crown))


def test_alpha_gradient_is_the_derivative_of_the_bound() -> None:
    """The reverse pass gives the bound's derivative by each unstable neuron's lower slope
    (central differences where the bound is smooth in it)."""
    net, bounds, lower, upper, top, start, const = alpha_problem(7, 0.5)
    relaxed = [leaf_alpha._relaxation(lo.T, hi.T) for lo, hi in bounds[:top]]
    rng = np.random.default_rng(0)
    slopes = {
        j: np.where(r[0][:, None, :], rng.uniform(0, 1, (8, 24, 12)), r[3][:, None, :])
        for j, r in enumerate(relaxed)
    }
    args = (net, relaxed)
    value, final, tops = leaf_alpha._substitute(*args, slopes, top, start, const, lower, upper)
    grads = leaf_alpha._gradient(*args, slopes, top, tops, final, lower, upper)
    checked = 0
    for j, (unstable, *_rest) in enumerate(relaxed):
        leaves, neurons = np.nonzero(unstable)
        for leaf, neuron in zip(leaves[:6], neurons[:6], strict=True):
            moved = []
            for step in (1e-7, -1e-7):
                shifted = {i: a.copy() for i, a in slopes.items()}
                shifted[j][leaf, :, neuron] += step
                moved.append(
                    leaf_alpha._substitute(*args, shifted, top, start, const, lower, upper)[0]
                )
            numeric = (moved[0][leaf] - moved[1][leaf]) / 2e-7
            np.testing.assert_allclose(grads[j][leaf, :, neuron], numeric, rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked >= 6


def test_alpha_closes_a_direction_the_plain_search_leaves_open(monkeypatch) -> None:
    """A stable neuron of the top hidden layer of a deep 2-input net (its largest value on a
    dense grid is about -0.0035): with α-CROWN on the leaves the tightened bound leaves open,
    40 leaves prove it; without (the α stage returning no bound) they do not (it takes 55)."""
    rng = np.random.default_rng(36)
    net = random_network(rng, [2, 16, 16, 16, 16, 2])
    box = Box(-np.ones(2), np.ones(2))
    args = (net, box, [3], [6], [1])
    with_alpha = decide(*args, max_leaves=40)
    assert with_alpha.proved[0]
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 400)] * 2), -1).reshape(-1, 2)
    assert net.preactivations(grid)[3][:, 6].max() <= with_alpha.worst[0] < 0.0
    monkeypatch.setattr(leaf_alpha, "bound_rows", no_alpha_bound)
    plain = decide(*args, max_leaves=40)
    assert not plain.proved[0] and not plain.refuted[0]


@pytest.mark.parametrize("seed", range(3))
def test_leaves_missing_their_targets_get_the_alpha_bound(seed: int, monkeypatch) -> None:
    """:func:`leaf_crown.direction_bounds` with targets no bound reaches: with every leaf let
    through the gate, every (leaf, row) gets a bound at most the tightened CROWN one (targets
    every bound reaches), smaller in total, and still above every sampled value; with the
    default gate, only leaves whose every row is within ``ALPHA_GATE`` of its gap to the centre
    value."""
    net, box = deep_case(seed)
    rng = np.random.default_rng(seed)
    centre = rng.uniform(-1.0, 1.0, (32, 2))
    lower, upper = np.maximum(centre - 0.3, -1.0), np.minimum(centre + 0.3, 1.0)
    layers, neurons, signs = all_directions(net)
    top = int(layers.max())
    asked = np.flatnonzero(layers == top)
    context = (net, lower, upper, interval_bounds(net, box), top, asked, layers, neurons, signs)
    reached = np.full((32, asked.size), np.inf)
    tight, *_ = leaf_crown.direction_bounds(*context, reached)
    gated, *_ = leaf_crown.direction_bounds(*context, -reached)
    y_centre = signs[asked] * net.preactivations((lower + upper) / 2.0)[top][:, neurons[asked]]
    changed = (gated < tight).any(axis=1)
    within = (tight <= leaf_crown.ALPHA_GATE * (tight - y_centre)).all(axis=1)
    assert np.all(gated <= tight) and np.all(within[changed])
    monkeypatch.setattr(leaf_crown, "ALPHA_GATE", np.inf)
    alpha, *_ = leaf_crown.direction_bounds(*context, -reached)
    assert np.all(alpha <= tight) and np.sum(tight - alpha) > 0.0
    for leaf in range(32):
        y = net.preactivations(rng.uniform(lower[leaf], upper[leaf], (300, 2)))[top]
        signed = signs[asked] * y[:, neurons[asked]]
        assert np.all(signed.max(axis=0) <= alpha[leaf] + 1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_the_leaf_pool_takes_the_best_leaves_and_keeps_the_others(seed: int) -> None:
    """After any sequence of additions, takes and forgets, the pool holds exactly the leaves
    added and not taken (less those left with no open direction), a take returns the leaves of
    highest priority and, among equal ones, the oldest, and ``counts`` is the number of pool
    leaves holding each direction open."""
    rng = np.random.default_rng(seed)
    directions = 6
    pool = input_split._LeafPool(np.zeros(2), np.ones(2), directions)
    kept = {0.0: (np.inf, np.ones(directions, dtype=bool))}  # lower corner's x -> the leaf
    decided = np.zeros(directions, dtype=bool)
    for step in range(40):
        if step % 7 == 6:
            decided[rng.integers(directions)] = True
            pool.forget(decided)
            kept = {x: (p, o & ~decided) for x, (p, o) in kept.items() if (o & ~decided).any()}
        count = int(rng.integers(1, 30))
        priority = rng.integers(0, 5, count).astype(float)  # many ties, as siblings have
        open_ = rng.random((count, directions)) < 0.4
        open_[:, 0] |= ~open_.any(axis=1)
        open_ &= ~decided
        keep = open_.any(axis=1)
        corner = step + 1 + np.arange(count) / count  # a leaf is known by its lower corner's x
        lower = np.stack([corner, np.zeros(count)], axis=1)[keep]
        pool.add(lower, lower + 1.0, open_[keep], priority[keep])
        added = zip(lower[:, 0], priority[keep], open_[keep], strict=True)
        kept.update({x: (p, o) for x, p, o in added})
        take = int(rng.integers(1, 25))
        best = sorted(kept, key=lambda x: (-kept[x][0], x))[:take]  # x grows with age
        lower, upper, taken_open = pool.take(take)
        assert sorted(lower[:, 0]) == sorted(best)
        assert np.array_equal(upper, lower + 1.0)
        for x, o in zip(lower[:, 0], taken_open, strict=True):
            assert np.array_equal(kept.pop(x)[1], o)
        assert sorted(pool.lower[:, 0]) == sorted(kept)
        held = np.array([kept[x][1] for x in pool.lower[:, 0]]).reshape(-1, directions)
        assert np.array_equal(pool.open, held)
        assert np.array_equal(pool.counts[~decided], held.sum(axis=0)[~decided])
