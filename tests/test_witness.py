"""Witnesses are real: observations match forward passes, samples stay in the box, ascent flips."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_exact.bounds.crown import interval_bounds
from onnx_exact.core.box import Box
from onnx_exact.core.network import DenseLayer, InputMap, Network
from onnx_exact.search import witness
from onnx_exact.search.witness import (
    Observation,
    best_points,
    corner_ascent,
    first_layer_extremes,
    gradient_ascent,
    multistart_ascent,
    observe,
    sample_inputs,
)


def random_network(rng: np.random.Generator, sizes: list[int]) -> Network:
    layers = [
        DenseLayer(rng.normal(size=(n_out, n_in)), rng.normal(size=n_out), relu=k < len(sizes) - 2)
        for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False))
    ]
    return Network(layers, InputMap.identity(sizes[0]))


def test_observe_matches_forward_pass_and_keeps_only_revealing_inputs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(0)
    net = random_network(rng, [4, 8, 8, 3])
    points = rng.uniform(-1, 1, size=(500, 4))
    monkeypatch.setattr(witness, "CHUNK_VALUES", 7 * (4 + 8 + 8 + 3))  # 7-row chunks
    obs = observe(net, points)
    for y, pos, neg in zip(net.preactivations(points), obs.seen_pos, obs.seen_neg, strict=True):
        np.testing.assert_array_equal(pos, (y > 0).any(axis=0))
        np.testing.assert_array_equal(neg, (y < 0).any(axis=0))
    # The kept witnesses alone reproduce the masks, and there are at most one per (neuron, sign).
    replay = observe(net, obs.witnesses)
    for a, b in zip(replay.seen_pos + replay.seen_neg, obs.seen_pos + obs.seen_neg, strict=True):
        np.testing.assert_array_equal(a, b)
    n_signs = sum(int(m.sum()) for m in obs.seen_pos + obs.seen_neg)
    assert 0 < obs.witnesses.shape[0] <= n_signs
    # Observing the same points again reveals nothing and keeps nothing new.
    again = observe(net, points, obs)
    assert again is obs and obs.witnesses.shape[0] == replay.witnesses.shape[0]


def test_observe_zero_is_not_a_sign() -> None:
    net = Network(
        [DenseLayer(np.array([[1.0, -1.0]]), np.zeros(1), relu=True)], InputMap.identity(2)
    )
    obs = observe(net, np.array([[0.5, 0.5], [0.0, 0.0]]))
    assert not obs.seen_pos[0][0] and not obs.seen_neg[0][0]
    assert obs.witnesses.shape == (0, 2)
    assert Observation.empty(net).witnesses.shape == (0, 2)


def test_sample_inputs_cover_centre_interior_and_vertices() -> None:
    rng = np.random.default_rng(1)
    lower = np.array([0.0, -1.0, 2.0, 0.5])
    upper = np.array([1.0, 1.0, 2.0, 0.75])  # feature 2 is degenerate
    box = Box(lower, upper)
    points = sample_inputs(box, rng, 401)
    assert points.shape == (401, 4)
    np.testing.assert_array_equal(points[0], box.center)
    assert np.all((points >= lower) & (points <= upper))
    np.testing.assert_array_equal(points[:, 2], 2.0)
    is_vertex = np.all((points == lower) | (points == upper), axis=1)
    assert 250 <= is_vertex.sum() <= 310  # three of the four groups are Bernoulli corners
    vertices = points[is_vertex]
    share_hi = (vertices[:, 0] == upper[0]).mean()
    assert 0.35 < share_hi < 0.65  # p = 0.1, 0.5, 0.9 average to one half
    assert sample_inputs(box, rng, 1).shape == (1, 4)


def test_first_layer_extremes_attain_the_interval_bounds() -> None:
    rng = np.random.default_rng(2)
    net = random_network(rng, [6, 5, 2])
    box = Box(rng.uniform(-1, 0, 6), rng.uniform(0, 1, 6))
    extremes = first_layer_extremes(net, box)
    assert extremes.shape == (10, 6)
    y = net.preactivations(extremes)[0]
    bounds = interval_bounds(net, box)[0]
    np.testing.assert_allclose(y[np.arange(5), np.arange(5)], bounds.upper, rtol=1e-13)
    np.testing.assert_allclose(y[5 + np.arange(5), np.arange(5)], bounds.lower, rtol=1e-13)


def test_first_layer_extremes_open_only_keeps_every_direction_still_to_show() -> None:
    """With an observation, only the vertices of unshown signs the bound allows are passed."""
    rng = np.random.default_rng(3)
    net = random_network(rng, [6, 40, 2])
    net.layers[0].bias[:4] = [50.0, -50.0, 50.0, -50.0]  # stably active / inactive neurons
    box = Box(rng.uniform(-1, 0, 6), rng.uniform(0, 1, 6))
    obs = observe(net, sample_inputs(box, rng, 16))
    chosen = first_layer_extremes(net, box, open_only=obs)
    assert chosen.shape[0] < 80  # the samples showed some signs; the stable ones need none
    replay = observe(net, chosen, obs)
    everything = observe(net, first_layer_extremes(net, box), observe(net, obs.witnesses))
    # every first-layer sign some vertex shows, the chosen vertices show
    np.testing.assert_array_equal(replay.seen_pos[0], everything.seen_pos[0])
    np.testing.assert_array_equal(replay.seen_neg[0], everything.seen_neg[0])
    assert not replay.seen_pos[0][1] and not replay.seen_neg[0][0]


def _needle_network(n: int, rng: np.random.Generator) -> tuple[Network, Box, np.ndarray]:
    """Layer-1 neuron 0 is positive only within 1e-3 of one box vertex; neuron 1 only negative there.

    Layer 0 is active on the whole box (identity), so the layer-1 neurons are linear with maxima
    ``1e-3`` above zero at the vertex ``where(w > 0, hi, lo)``: sampling essentially never finds it.
    """
    signs = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    lower, upper = np.full(n, 0.1), np.ones(n)
    peak = np.maximum(signs, 0) @ upper + np.minimum(signs, 0) @ lower
    net = Network(
        [
            DenseLayer(np.eye(n), np.zeros(n), relu=True),
            DenseLayer(np.stack([signs, -signs]), np.array([1e-3 - peak, peak - 1e-3]), relu=True),
            DenseLayer(np.ones((1, 2)), np.zeros(1), relu=False),
        ],
        InputMap.identity(n),
    )
    return net, Box(lower, upper), np.where(signs > 0, upper, lower)


def test_corner_ascent_finds_a_needle_vertex_that_sampling_misses() -> None:
    rng = np.random.default_rng(3)
    net, box, needle = _needle_network(24, rng)
    samples = observe(net, sample_inputs(box, rng, 4000))
    assert not samples.seen_pos[1][0] and not samples.seen_neg[1][1]
    found = corner_ascent(
        net, box, 1, np.array([0, 1]), np.array([1, -1]), np.tile(box.center, (2, 1))
    )
    np.testing.assert_array_equal(found[0], needle)
    obs = observe(net, found)
    assert obs.seen_pos[1][0] and obs.seen_neg[1][1]


def test_corner_ascent_never_loses_ground_and_stays_in_box() -> None:
    rng = np.random.default_rng(4)
    net = random_network(rng, [5, 12, 12, 12, 2])
    box = Box(np.full(5, -1.0), np.full(5, 1.0))
    neurons = np.arange(12).repeat(2)
    signs = np.tile([1, -1], 12)
    pool = sample_inputs(box, rng, 64)
    starts = best_points(net, 2, neurons, signs, pool)
    start_values = net.preactivations(starts)[2][np.arange(24), neurons] * signs
    pool_best = (net.preactivations(pool)[2][:, neurons] * signs).max(axis=0)
    np.testing.assert_array_equal(start_values, pool_best)
    found = corner_ascent(net, box, 2, neurons, signs, starts)
    assert np.all((found >= box.lower) & (found <= box.upper))
    found_values = net.preactivations(found)[2][np.arange(24), neurons] * signs
    assert np.all(found_values >= start_values)


def test_ascents_past_their_deadline_take_no_step() -> None:
    """A deadline already passed returns the (clipped) starts: no step of either ascent begins,
    while without one both move the same starts (so the deadline, not a stall, stopped them)."""
    rng = np.random.default_rng(5)
    net, box, _ = _needle_network(24, rng)
    neurons, signs = np.array([0, 1]), np.array([1, -1])
    starts = np.tile(box.center, (2, 1))
    for ascent in (corner_ascent, gradient_ascent):
        stopped = ascent(net, box, 1, neurons, signs, starts, deadline=0.0)
        np.testing.assert_array_equal(stopped, starts)
        assert not np.array_equal(ascent(net, box, 1, neurons, signs, starts), starts)


def test_gradient_ascent_lands_in_an_interior_bump_that_corner_ascent_misses() -> None:
    """``y = 0.02 - ||x - c||_1`` is positive only in a small diamond around an interior point."""
    for n in (6, 20):
        centre = np.random.default_rng(n).uniform(0.2, 0.8, n)
        net = Network(
            [
                DenseLayer(
                    np.concatenate([np.eye(n), -np.eye(n)]),
                    np.concatenate([-centre, centre]),
                    True,
                    "split",
                ),
                DenseLayer(-np.ones((1, 2 * n)), np.array([0.02]), True, "bump"),
                DenseLayer(np.ones((1, 1)), np.zeros(1), False, "out"),
            ],
            InputMap.identity(n),
        )
        box = Box(np.zeros(n), np.ones(n))
        starts = np.stack([box.center, box.lower, box.upper])
        neurons, signs = np.zeros(3, dtype=np.int64), np.ones(3)
        vertices = corner_ascent(net, box, 1, neurons, signs, starts)
        assert np.all(net.preactivations(vertices)[1][:, 0] < 0)
        found = gradient_ascent(net, box, 1, neurons, signs, starts)
        assert np.all((found >= box.lower) & (found <= box.upper))
        assert np.all(net.preactivations(found)[1][:, 0] > 0)
        assert observe(net, found).seen_pos[1][0]


def _decoy_network(n: int) -> tuple[Network, Box]:
    """Layer-2 neuron 0 computes ``y = max(f1, f2)`` on ``[0, 1]^n`` with two L1 bumps.

    ``f1 = -0.1 - 0.05 ||x - 0.2||_1`` is a gentle negative decoy; ``f2 = 0.02 - 0.2 ||x - 0.8||_1``
    is positive near ``0.8 * 1``. From the box centre ``f1`` is the larger, so every single-start
    ascent climbs to the decoy's peak ``-0.1``; starts in ``f2``'s basin (about a quarter of the box
    for ``n = 3``) reach ``y = 0.02``. As ReLUs: layer 0 splits ``x - c`` into its positive and
    negative parts, layer 1 holds ``relu(f1 - f2)``, ``relu(f2)`` and ``relu(-f2)``, and
    ``y = relu(f2) - relu(-f2) + relu(f1 - f2)``.
    """
    eye = np.eye(n)
    c1, c2 = np.full(n, 0.2), np.full(n, 0.8)
    split = DenseLayer(
        np.concatenate([eye, -eye, eye, -eye]), np.concatenate([-c1, c1, -c2, c2]), True, "abs"
    )
    dist1 = np.concatenate([np.ones(2 * n), np.zeros(2 * n)])  # ||x - c1||_1 from layer 0
    dist2 = np.concatenate([np.zeros(2 * n), np.ones(2 * n)])
    f1_w, f1_b = -0.05 * dist1, -0.1
    f2_w, f2_b = -0.2 * dist2, 0.02
    parts = DenseLayer(
        np.stack([f1_w - f2_w, f2_w, -f2_w]), np.array([f1_b - f2_b, f2_b, -f2_b]), True, "parts"
    )
    target = DenseLayer(np.array([[1.0, 1.0, -1.0]]), np.zeros(1), True, "max")
    out = DenseLayer(np.ones((1, 1)), np.zeros(1), False, "out")
    return Network([split, parts, target, out], InputMap.identity(n)), Box(np.zeros(n), np.ones(n))


def test_multistart_ascent_escapes_a_decoy_that_single_start_ascent_climbs() -> None:
    net, box = _decoy_network(3)
    neurons, signs = np.zeros(1, dtype=np.int64), np.ones(1)
    start = box.center[None, :]
    np.testing.assert_allclose(net.preactivations(start)[2][0, 0], -0.1 - 0.05 * 0.9)
    single = gradient_ascent(net, box, 2, neurons, signs, start, max_steps=300)
    assert net.preactivations(single)[2][0, 0] < 0  # stuck on the decoy
    found = multistart_ascent(
        net, box, 2, neurons, signs, np.random.default_rng(0), starts=64, start_points=start
    )
    assert np.all((found >= box.lower) & (found <= box.upper))
    assert net.preactivations(found)[2][0, 0] > 0
    assert observe(net, found).seen_pos[2][0]


def test_multistart_ascent_keeps_the_best_point_and_honours_its_time_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(5)
    net = random_network(rng, [5, 12, 12, 12, 2])
    box = Box(np.full(5, -1.0), np.full(5, 1.0))
    neurons, signs = np.arange(12).repeat(2), np.tile([1, -1], 12)
    starts = best_points(net, 2, neurons, signs, sample_inputs(box, rng, 64))
    start_values = net.preactivations(starts)[2][np.arange(24), neurons] * signs
    monkeypatch.setattr(witness, "CHUNK_VALUES", 16 * (5 + 12 + 12 + 12 + 2))  # 2 directions
    found = multistart_ascent(net, box, 2, neurons, signs, rng, starts=8, start_points=starts)
    assert np.all((found >= box.lower) & (found <= box.upper))
    found_values = net.preactivations(found)[2][np.arange(24), neurons] * signs
    assert np.all(found_values >= start_values)
    # Past the deadline no search is begun: each direction returns its given start.
    late = multistart_ascent(
        net, box, 2, neurons, signs, rng, starts=8, start_points=starts, deadline=0.0
    )
    np.testing.assert_array_equal(late, starts)
    unfunded = multistart_ascent(
        net, box, 2, neurons, signs, rng, starts=8, start_points=starts, seconds_per_direction=0.0
    )
    np.testing.assert_array_equal(unfunded, starts)
