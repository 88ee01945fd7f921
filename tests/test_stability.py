"""The tiered stability pipeline is sound (a dense grid never contradicts a proof) and complete."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_MODELS

from onnx_exact.core.box import Box
from onnx_exact.core.errors import DomainError, UsageError
from onnx_exact.core.network import DenseLayer, InputMap, Network
from onnx_exact.core.verdicts import NeuronState, Tier
from onnx_exact.io.onnx_reader import read_model
from onnx_exact.progress import ProgressEvent
from onnx_exact.search.witness import observe
from onnx_exact.stability import analyze_stability, policy, state
from onnx_exact.stability import tiers as stability_tiers


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


def grid(box: Box, per_axis: int) -> np.ndarray:
    axes = [np.linspace(lo, hi, per_axis) for lo, hi in zip(box.lower, box.upper, strict=True)]
    return np.stack([a.ravel() for a in np.meshgrid(*axes, indexing="ij")], axis=1)


def assert_sound(net: Network, box: Box, result, points: np.ndarray) -> None:
    """Proofs never flip on ``points``; every UNSTABLE neuron's witnesses show both signs."""
    assert np.all((result.witnesses >= box.lower) & (result.witnesses <= box.upper))
    replay = observe(net, result.witnesses)
    for k, (layer, y) in enumerate(zip(result.layers, net.preactivations(points), strict=True)):
        if not net.layers[k].relu:
            assert np.all(layer.states == NeuronState.ACTIVE)
            assert np.all(layer.decided_by == "linear")
            continue
        active = layer.states == NeuronState.ACTIVE
        inactive = layer.states == NeuronState.INACTIVE
        unstable = layer.states == NeuronState.UNSTABLE
        assert np.all(y[:, active] >= 0.0)
        assert np.all(y[:, inactive] <= 0.0)
        assert np.all(replay.seen_pos[k][unstable] & replay.seen_neg[k][unstable])
        assert np.all(layer.lower <= y.min(axis=0) + 1e-9)
        assert np.all(layer.upper >= y.max(axis=0) - 1e-9)
        assert np.all(layer.decided_by[layer.states != NeuronState.UNDECIDED] != "")


def small_cases() -> list[tuple[Network, Box]]:
    rng = np.random.default_rng(2021)
    cases = []
    for n_in, hidden in itertools.product((2, 3), ([8, 8], [6, 6, 6])):
        for _ in range(3):
            net = random_network(rng, [n_in, *hidden, 2])
            lower = rng.uniform(-1.0, 0.5, n_in)
            cases.append((net, Box(lower, lower + rng.uniform(0.05, 1.0, n_in))))
    return cases


def oracle_points(box: Box) -> np.ndarray:
    return grid(box, 200 if box.size == 2 else 40)


@pytest.mark.parametrize("case", range(12))
def test_tiers_without_solver_are_sound(case: int) -> None:
    net, box = small_cases()[case]
    result = analyze_stability(net, box, tiers=())
    assert_sound(net, box, result, oracle_points(box))
    assert not result.time_limit_hit


@pytest.mark.parametrize("case", range(12))
def test_full_pipeline_is_sound_and_complete(case: int) -> None:
    net, box = small_cases()[case]
    result = analyze_stability(net, box)
    assert_sound(net, box, result, oracle_points(box))
    assert result.complete and not result.time_limit_hit
    assert result.counts()["UNDECIDED"] == 0


def test_labels_match_the_baselines_on_random_nets() -> None:
    rng = np.random.default_rng(7)
    for _ in range(3):
        net = random_network(rng, [5, 12, 12, 3])
        centre = rng.uniform(-1, 1, 5)
        box = Box(centre - 0.3, centre + 0.3)
        tiered = analyze_stability(net, box)
        for method in ("per-neuron", "isa"):
            baseline = analyze_stability(net, box, method=method)
            assert tiered.complete and baseline.complete and baseline.method == method
            for ours, theirs in zip(tiered.layers, baseline.layers, strict=True):
                np.testing.assert_array_equal(ours.states, theirs.states)


def split_case(seed: int) -> tuple[Network, Box]:
    """A 2- or 3-input net, 3 x 16 ReLUs: CROWN leaves directions open, input splitting closes them."""
    rng = np.random.default_rng(seed)
    n_in = 2 + seed % 2
    net = random_network(rng, [n_in, 16, 16, 16, 2])
    lower = rng.uniform(-1.0, 0.5, n_in)
    return net, Box(lower, lower + rng.uniform(0.3, 1.0, n_in))


@pytest.mark.parametrize("seed", range(4))
def test_input_splitting_proves_what_crown_cannot_and_matches_per_neuron(seed: int) -> None:
    net, box = split_case(seed)
    cheap = analyze_stability(net, box, tiers=())
    split = analyze_stability(net, box, tiers=("split",))
    assert cheap.counts()["UNDECIDED"] > 0
    assert split.complete and not split.time_limit_hit
    assert any(np.any(layer.decided_by == "split") for layer in split.layers)
    assert_sound(net, box, split, oracle_points(box))
    baseline = analyze_stability(net, box, method="per-neuron")
    assert baseline.complete
    for ours, theirs in zip(split.layers, baseline.layers, strict=True):
        np.testing.assert_array_equal(ours.states, theirs.states)


def test_input_splitting_hands_directions_over_its_budget_to_the_solvers(monkeypatch) -> None:
    net, box = split_case(0)
    monkeypatch.setattr(policy, "SPLIT_BOXES_PER_LAYER", 1)
    starved = analyze_stability(net, box, tiers=("split",))
    assert starved.counts()["UNDECIDED"] > 0 and not starved.time_limit_hit
    assert_sound(net, box, starved, oracle_points(box))
    full = analyze_stability(net, box)
    assert full.complete and "split" in full.timings_s
    monkeypatch.setattr(policy, "SPLIT_MAX_INPUTS", 1)
    assert "split" not in analyze_stability(net, box).timings_s


def diagonal_net() -> tuple[Network, Box]:
    """``a = relu(x1 + x2)``, ``b = relu(x1 - x2)`` on [-1, 1]^2; ``a + b - 2.5`` is stably inactive.

    ``a + b <= 2`` on the box, but the triangle relaxation (hence α-CROWN, whose optimum it is
    for the second layer) bounds it by 3: only a split of the input or of a ReLU proves it.
    """
    diagonals = np.array([[1.0, 1.0], [1.0, -1.0]])
    layers = [
        DenseLayer(diagonals, np.zeros(2), relu=True, name="fc0"),
        DenseLayer(diagonals, np.array([-2.5, 0.0]), relu=True, name="fc1"),
        DenseLayer(np.ones((1, 2)), np.zeros(1), relu=False, name="out"),
    ]
    return Network(layers, InputMap.identity(2)), Box(-np.ones(2), np.ones(2))


def test_subdivision_proves_what_the_box_wide_tiers_cannot(monkeypatch) -> None:
    """With the split tier starved (one sub-box), the LP-free tiers leave ``a + b - 2.5`` open;
    pieces of the box, each with its own focused analysis (and split budget), prove it."""
    net, box = diagonal_net()
    monkeypatch.setattr(policy, "SPLIT_BOXES_PER_LAYER", 1)
    starved = analyze_stability(net, box, tiers=("split",))
    assert starved.layers[1].states[0] == NeuronState.UNDECIDED
    result = analyze_stability(net, box, tiers=("split", "subdivide"))
    assert result.complete and not result.time_limit_hit
    assert result.layers[1].states[0] == NeuronState.INACTIVE
    assert result.layers[1].decided_by[0] == "subdivide"
    assert result.layers[1].upper[0] <= 0.0  # the largest bound over the pieces
    assert result.layers[1].states[1] == NeuronState.UNSTABLE
    assert_sound(net, box, result, oracle_points(box))


@pytest.mark.parametrize("seed", range(4))
def test_subdivision_is_sound_and_matches_per_neuron(monkeypatch, seed: int) -> None:
    net, box = split_case(seed)
    monkeypatch.setattr(policy, "SPLIT_BOXES_PER_LAYER", 1)
    result = analyze_stability(net, box, tiers=("split", "subdivide"))
    assert result.complete and not result.time_limit_hit
    assert_sound(net, box, result, oracle_points(box))
    baseline = analyze_stability(net, box, method="per-neuron")
    for ours, theirs in zip(result.layers, baseline.layers, strict=True):
        np.testing.assert_array_equal(ours.states, theirs.states)


def test_subdivision_in_worker_processes_gives_the_serial_labels(monkeypatch) -> None:
    net, box = split_case(3)
    monkeypatch.setattr(policy, "SPLIT_BOXES_PER_LAYER", 1)  # the parent's split only
    serial = analyze_stability(net, box, tiers=("split", "subdivide"))
    parallel = analyze_stability(net, box, tiers=("split", "subdivide"), jobs=2)
    assert serial.complete and parallel.complete
    assert any(np.any(layer.decided_by == "subdivide") for layer in parallel.layers)
    for ours, theirs in zip(parallel.layers, serial.layers, strict=True):
        np.testing.assert_array_equal(ours.states, theirs.states)


def test_subdivision_needs_few_inputs_and_an_open_direction(monkeypatch) -> None:
    net, box = split_case(1)
    assert "subdivide" not in analyze_stability(net, box).timings_s  # split decides it all
    monkeypatch.setattr(policy, "SPLIT_BOXES_PER_LAYER", 1)
    monkeypatch.setattr(policy, "SPLIT_MAX_INPUTS", 1)
    result = analyze_stability(net, box, tiers=("split", "subdivide"))
    assert "subdivide" not in result.timings_s and "split" not in result.timings_s


def needle_network(n: int = 24) -> tuple[Network, Box]:
    """Layer-1 neuron 0 is positive only within 1e-3 of one vertex of the box (see test_witness)."""
    signs = np.where(np.arange(n) % 3 == 0, -1.0, 1.0)
    lower, upper = np.full(n, 0.1), np.ones(n)
    peak = np.maximum(signs, 0) @ upper + np.minimum(signs, 0) @ lower
    net = Network(
        [
            DenseLayer(np.eye(n), np.zeros(n), relu=True, name="identity"),
            DenseLayer(signs[None, :], np.array([1e-3 - peak]), relu=True, name="needle"),
            DenseLayer(np.ones((1, 1)), np.zeros(1), relu=False, name="out"),
        ],
        InputMap.identity(n),
    )
    return net, Box(lower, upper)


def test_a_needle_is_found_and_credited_to_a_cheap_tier() -> None:
    net, box = needle_network()
    events: list[ProgressEvent] = []
    result = analyze_stability(net, box, tiers=(), progress=events.append)
    calls = [(event.phase, event.done, event.total) for event in events]
    assert ("bounds", 2, 2) in calls and all(done <= total for _, done, total in calls)
    assert result.layers[1].states[0] == NeuronState.UNSTABLE
    assert result.layers[1].decided_by[0] in ("symbolic", "ascent")
    assert np.all(result.layers[0].states == NeuronState.ACTIVE)
    assert set(result.timings_s) >= {"witness", "interval", "symbolic"}


def test_user_inputs_are_clipped_and_count_as_witnesses() -> None:
    net, box = needle_network()
    needle = np.where(
        net.layers[1].weight[0] > 0, 5.0, -5.0
    )  # outside the box: clipped to the vertex
    result = analyze_stability(net, box, tiers=(), user_inputs=needle[None, :])
    assert result.layers[1].states[0] == NeuronState.UNSTABLE
    assert result.layers[1].decided_by[0] == "witness"
    with pytest.raises(UsageError, match="user_inputs"):
        analyze_stability(net, box, user_inputs=np.zeros((2, 3)))


def test_a_tiny_time_limit_leaves_neurons_undecided_never_wrong() -> None:
    net, box = needle_network()
    result = analyze_stability(net, box, time_limit=1e-9)
    assert result.time_limit_hit
    assert result.layers[1].states[0] == NeuronState.UNDECIDED
    assert any("time limit" in note for note in result.notes)
    points = np.random.default_rng(0).uniform(box.lower, box.upper, size=(2000, box.size))
    assert_sound(net, box, result, points)


def test_zero_rows_are_inactive_and_wrong_arguments_are_rejected() -> None:
    weight = np.array([[0.0, 0.0], [1.0, 1.0], [-1.0, -1.0]])
    net = Network(
        [
            DenseLayer(weight, np.array([0.0, 0.5, -0.5]), relu=True, name="fc0"),
            DenseLayer(np.ones((1, 3)), np.zeros(1), relu=False, name="out"),
        ],
        InputMap.identity(2),
    )
    box = Box(np.zeros(2), np.ones(2))
    result = analyze_stability(net, box)
    np.testing.assert_array_equal(
        result.layers[0].states, [NeuronState.INACTIVE, NeuronState.ACTIVE, NeuronState.INACTIVE]
    )
    assert list(result.layers[0].decided_by) == ["interval"] * 3
    assert result.counts() == {"UNSTABLE": 0, "ACTIVE": 1, "INACTIVE": 2, "UNDECIDED": 0}
    with pytest.raises(UsageError, match="method"):
        analyze_stability(net, box, method="fastest")
    with pytest.raises(UsageError, match="time_limit"):
        analyze_stability(net, box, time_limit=0)
    with pytest.raises(DomainError, match="3 features"):
        analyze_stability(net, Box(np.zeros(3), np.ones(3)))


def shared_case(model: str, box_file: str) -> tuple[Network, Box]:
    """A shared third-party model and one of its boxes, mapped to network space."""
    path = SHARED_MODELS / model
    if not path.exists():
        pytest.skip(f"shared model {path} is absent")
    net = read_model(path).network
    box_npz = np.load(path.parent / box_file)
    return net, Box(box_npz["lower"], box_npz["upper"]).to_network(net.input_map)


@pytest.mark.parametrize("box_file", ["cartpole.case_safe_14.npz", "cartpole.case_safe_27.npz"])
def test_labels_match_the_per_neuron_baseline_on_shared_models(box_file: str) -> None:
    net, box = shared_case("rl/cartpole.onnx", box_file)
    tiered = analyze_stability(net, box, time_limit=120)
    baseline = analyze_stability(net, box, method="per-neuron", time_limit=120)
    assert tiered.complete and baseline.complete
    for ours, theirs in zip(tiered.layers, baseline.layers, strict=True):
        np.testing.assert_array_equal(ours.states, theirs.states)


def test_a_shared_model_is_decided_completely_and_soundly() -> None:
    """dubinsrejoin (tf2onnx MLP, 8-256-256-8, 512 ReLUs): the baselines time out at 300 s here."""
    net, box = shared_case("rl/dubinsrejoin.onnx", "dubinsrejoin.case_safe_1.npz")
    result = analyze_stability(net, box, time_limit=120)
    assert result.complete and not result.time_limit_hit
    points = np.random.default_rng(0).uniform(box.lower, box.upper, size=(20000, box.size))
    vertices = np.where(
        np.random.default_rng(1).random((20000, box.size)) < 0.5, box.upper, box.lower
    )
    assert_sound(net, box, result, np.concatenate([points, vertices, result.witnesses]))


def test_acas_xu_is_decided_by_input_splitting_without_solvers() -> None:
    """ACAS Xu (5 inputs, 6 x 50 ReLUs), prop_4 box: the MILP tier needed 18 s; splitting ~1 s."""
    net, box = shared_case(
        "acasxu/ACASXU_run2a_1_1_batch_2000.onnx", "ACASXU_run2a_1_1_batch_2000.prop_4.npz"
    )
    result = analyze_stability(net, box, time_limit=120, tiers=("split",))
    assert result.complete and not result.time_limit_hit
    assert any(np.any(layer.decided_by == "split") for layer in result.layers)
    rng = np.random.default_rng(0)
    points = rng.uniform(box.lower, box.upper, size=(20000, box.size))
    vertices = np.where(rng.random((20000, box.size)) < 0.5, box.upper, box.lower)
    assert_sound(net, box, result, np.concatenate([points, vertices, result.witnesses]))


def test_time_limit_inside_the_last_tier_is_reported_as_the_reason():
    """Directions left open because the deadline passed are flagged as a time limit, not a margin."""
    rng = np.random.default_rng(7)
    layers = [
        DenseLayer(rng.normal(size=(40, 30)), rng.normal(size=40) * 0.1, True, "r1"),
        DenseLayer(rng.normal(size=(40, 40)) / 6, rng.normal(size=40) * 0.1, True, "r2"),
        DenseLayer(rng.normal(size=(3, 40)), np.zeros(3), False, "out"),
    ]
    net = Network(layers=layers, input_map=InputMap.identity(30))
    centre = rng.uniform(0.2, 0.8, size=30)
    box = Box(centre - 0.05, centre + 0.05)
    result = analyze_stability(net, box, time_limit=1e-3)
    undecided = sum(int(np.sum(layer.states == NeuronState.UNDECIDED)) for layer in result.layers)
    assert undecided > 0
    assert result.time_limit_hit
    assert all("time limit" in note for note in result.notes if "undecided" in note)


def _no_attack(analysis, k, effort=1.0):
    """Stands in for the attack tier where a test is about the order of the tiers."""


def _replace_tier(monkeypatch, tier, function):
    """Run ``function(analysis, k, effort)`` wherever the schedule runs ``tier``."""
    monkeypatch.setitem(stability_tiers.TIER_FUNCTIONS, tier, function)


def _replace_solver_tiers(monkeypatch, function):
    """Run ``function(analysis, k, tier, effort)`` in place of every LP, CROWN/LP bab, MILP tier."""
    for tier in (Tier.LP, Tier.CUTS, Tier.CROWN_BAB, Tier.BAB, Tier.MILP):

        def replaced(analysis, k, effort=1.0, tier=tier):
            return function(analysis, k, tier, effort)

        _replace_tier(monkeypatch, tier, replaced)


def test_directions_the_capped_tiers_leave_open_are_retried_under_a_time_limit(monkeypatch):
    """With one node per branch and bound, a first pass leaves directions open; under a time
    limit the retries (4x, 16x the caps) decide more of them, soundly; without one, none run."""
    from onnx_exact.solvers import exact_tiers

    net = random_network(np.random.default_rng(7), [10, 20, 20, 2])
    box = Box(np.zeros(10), np.ones(10))
    monkeypatch.setattr(exact_tiers, "BAB_NODE_LIMIT", 1)
    calls: list[float] = []
    original = exact_tiers.decide_directions

    def counting(*args, **kwargs):
        calls.append(kwargs.get("effort", 1.0))
        return original(*args, **kwargs)

    monkeypatch.setattr(exact_tiers, "decide_directions", counting)
    # the attack after each retried tier would get 4-16x its cap and eat the time limit here
    _replace_tier(monkeypatch, Tier.ATTACK, _no_attack)
    once = analyze_stability(net, box, tiers=("bab",))
    assert set(calls) == {1.0} and once.counts()["UNDECIDED"] > 0
    calls.clear()
    retried = analyze_stability(net, box, tiers=("bab",), time_limit=10)
    assert {4.0, 16.0} & set(calls)
    assert retried.counts()["UNDECIDED"] < once.counts()["UNDECIDED"]
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.uniform(box.lower, box.upper, (20000, 10)), box.lower[None]])
    assert_sound(net, box, retried, points)


def test_retries_start_only_after_every_layer_had_its_first_pass(monkeypatch):
    """A direction no tier decides must not starve the layers above it: every layer's capped
    tiers run (bottom-up) before any retry, and each retry round again goes bottom-up."""
    net = random_network(np.random.default_rng(7), [10, 20, 20, 20, 2])
    box = Box(np.zeros(10), np.ones(10))
    calls: list[tuple[float, int]] = []

    def undecided(analysis, k, tier, effort=1.0):  # a tier that never decides anything
        calls.append((effort, k))

    _replace_solver_tiers(monkeypatch, undecided)
    _replace_tier(monkeypatch, Tier.ATTACK, _no_attack)
    result = analyze_stability(net, box, tiers=("bab",), time_limit=120)
    open_layers = sorted({k for effort, k in calls if effort == 1.0})
    assert len(open_layers) >= 2 and result.counts()["UNDECIDED"] > 0
    assert calls == sorted(calls), "retries (effort > 1) ran before a layer's first pass"
    assert [k for effort, k in calls if effort == 4.0] == open_layers
    assert [k for effort, k in calls if effort == 16.0] == open_layers


def test_the_attack_tier_refutes_what_one_node_branch_and_bound_leaves_open(monkeypatch):
    """With one node per LP branch and bound, the directions bab gives up on reach the attack
    tier (PGD rounds polished by region LPs); it settles some as unstable, by witnesses the
    forward pass confirms, and is credited with them. (Seed 2: on seed 0 the first pass's CROWN
    vertices and the corner ascent now find that sign before the attack runs; its 10 inputs are
    taken as many, or the dense sample of few-input networks finds it first.)"""
    from onnx_exact.solvers import exact_tiers

    net = random_network(np.random.default_rng(2), [10, 20, 20, 20, 2])
    box = Box(np.zeros(10), np.ones(10))
    monkeypatch.setattr(exact_tiers, "BAB_NODE_LIMIT", 1)
    monkeypatch.setattr(policy, "SPLIT_MAX_INPUTS", 8)
    result = analyze_stability(net, box, tiers=("bab",))
    credited = np.concatenate([layer.decided_by for layer in result.layers])
    assert (credited == "attack").any()
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.uniform(box.lower, box.upper, (20000, 10)), box.lower[None]])
    assert_sound(net, box, result, points)


def test_each_retried_tier_is_followed_by_an_attack_of_equal_time(monkeypatch):
    """In the retry rounds the directions a retried tier leaves open get one attack second each
    for each second the tier could spend on them (its per-direction cap times the retry's
    effort), so a rarely refutable unstable direction is not starved by proofs that give up."""
    net = random_network(np.random.default_rng(7), [10, 20, 20, 20, 2])
    box = Box(np.zeros(10), np.ones(10))
    calls: list[tuple[str, float, int]] = []

    def undecided(analysis, k, tier, effort=1.0):
        calls.append((tier, effort, k))

    def attack(analysis, k, effort=1.0):
        calls.append(("attack", effort, k))

    _replace_solver_tiers(monkeypatch, undecided)
    _replace_tier(monkeypatch, Tier.ATTACK, attack)
    tiers = ("crown-bab", "bab", "milp")
    analyze_stability(net, box, tiers=tiers, time_limit=60)
    round_seconds = policy.ATTACK_SECONDS + policy.POLISH_SECONDS + policy.PATTERN_SECONDS
    retried = [i for i, (tier, effort, _) in enumerate(calls) if tier in tiers and effort > 1]
    assert {calls[i][0] for i in retried} == set(tiers)
    for i in retried:
        tier, effort, k = calls[i]
        seconds = policy.tier_direction_seconds(tier) * effort
        assert calls[i + 1] == ("attack", seconds / round_seconds, k)


def test_retries_go_on_until_the_deadline_while_their_tiers_keep_working(monkeypatch):
    """Under a time limit the last retry effort repeats until the deadline: an undecided
    direction gets every second the user allowed, not just two retry rounds."""
    net = random_network(np.random.default_rng(7), [10, 20, 20, 20, 2])
    box = Box(np.zeros(10), np.ones(10))
    calls: list[tuple[float, int]] = []

    def working(analysis, k, tier, effort=1.0):  # a tier that spends time but decides nothing
        calls.append((effort, k))
        time.sleep(0.02)

    _replace_solver_tiers(monkeypatch, working)
    _replace_tier(monkeypatch, Tier.ATTACK, _no_attack)
    monkeypatch.setattr(policy, "IDLE_ROUND_SECONDS", 0.01)
    result = analyze_stability(net, box, tiers=("bab",), time_limit=3)
    open_layers = sorted({k for effort, k in calls if effort == 1.0})
    last_rounds = [k for effort, k in calls if effort == policy.RETRY_EFFORTS[-1]]
    assert len(last_rounds) > 2 * len(open_layers)
    assert result.time_limit_hit and result.counts()["UNDECIDED"] > 0


def test_the_probe_runs_once_per_layer_before_crown_bab_and_never_in_retries(monkeypatch):
    """The probe (one short attack round) runs between a layer's LP tiers and its CROWN branch
    and bound in the first pass; the full attack still precedes bab, and the retry rounds have
    no probe."""
    net = random_network(np.random.default_rng(7), [10, 20, 20, 20, 2])
    box = Box(np.zeros(10), np.ones(10))
    calls: list[tuple[str, int]] = []

    def undecided(analysis, k, tier, effort=1.0):
        calls.append((tier if effort == 1.0 else f"{tier} retry", k))

    _replace_solver_tiers(monkeypatch, undecided)
    _replace_tier(
        monkeypatch, Tier.PROBE, lambda analysis, k, effort=1.0: calls.append(("probe", k))
    )
    _replace_tier(
        monkeypatch,
        Tier.ATTACK,
        lambda analysis, k, effort=1.0: undecided(analysis, k, "attack", effort),
    )
    analyze_stability(net, box, tiers=("lp", "cuts", "crown-bab", "bab"), time_limit=5)
    first_pass = [call for call in calls if "retry" not in call[0]]
    layers = sorted({k for _, k in first_pass})
    assert layers, "no layer reached the solver tiers"
    for k in layers:
        own = [tier for tier, layer in first_pass if layer == k]
        assert own == ["lp", "cuts", "probe", "crown-bab", "attack", "bab"]
    assert [call for call in calls if "retry" in call[0]], "no retry round ran"
    assert sum(tier == "probe" for tier, _ in calls) == len(layers), "a retry round probed"


def test_the_probe_refutes_soundly_and_is_credited(monkeypatch):
    """With a CROWN branch and bound that decides nothing, the probe's PGD and region LPs refute
    unstable directions by witnesses the forward pass confirms, credited to "probe"; proofs
    stay sound."""
    net = random_network(np.random.default_rng(2), [10, 20, 20, 20, 2])
    box = Box(np.zeros(10), np.ones(10))
    # its 10 inputs taken as many: the dense few-input sample would find the sign first
    monkeypatch.setattr(policy, "SPLIT_MAX_INPUTS", 8)
    _replace_solver_tiers(monkeypatch, lambda analysis, k, tier, effort=1.0: None)
    _replace_tier(monkeypatch, Tier.ALPHA_CROWN, lambda analysis, k, effort=1.0: None)
    result = analyze_stability(net, box, tiers=("crown-bab",))
    credited = np.concatenate([layer.decided_by for layer in result.layers])
    assert (credited == "probe").any()
    assert "probe" in result.timings_s
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.uniform(box.lower, box.upper, (20000, 10)), box.lower[None]])
    assert_sound(net, box, result, points)


def test_a_background_attack_refutes_while_the_exact_tiers_work(monkeypatch):
    """With spare jobs, a layer whose open directions reach the costly tiers gets an attack in
    a second process instead of the attack tier; its witnesses, forward-passed here, refute
    the unstable directions (credited to "attack") while the tiers work; proofs stay sound."""
    net = random_network(np.random.default_rng(2), [10, 20, 20, 20, 2])
    box = Box(np.zeros(10), np.ones(10))
    # its 10 inputs taken as many: the dense few-input sample would find the sign first
    monkeypatch.setattr(policy, "SPLIT_MAX_INPUTS", 8)
    truth = analyze_stability(net, box, tiers=("crown-bab", "bab", "milp"))
    unstable = [layer.states == NeuronState.UNSTABLE for layer in truth.layers]

    def waiting_tier(analysis, k, tier, effort=1.0):
        """Proves nothing; waits (at most 20 s) while an unstable direction is open."""
        stop = time.monotonic() + 20.0
        while analysis.has_open(k) and time.monotonic() < stop:
            if not unstable[k][analysis.open_directions(k)[0]].any():
                return
            time.sleep(0.05)

    _replace_solver_tiers(monkeypatch, waiting_tier)
    _replace_tier(monkeypatch, Tier.PROBE, lambda analysis, k, effort=1.0: None)
    _replace_tier(monkeypatch, Tier.ALPHA_CROWN, lambda analysis, k, effort=1.0: None)
    in_process: list[int] = []
    _replace_tier(monkeypatch, Tier.ATTACK, lambda analysis, k, effort=1.0: in_process.append(k))
    result = analyze_stability(net, box, tiers=("crown-bab", "bab"), jobs=64)
    credited = np.concatenate([layer.decided_by for layer in result.layers])
    assert (credited == "attack").any()
    assert not in_process, "the attack tier ran although the background attack covered it"
    assert result.timings_s["background"] > 0
    for layer, truly_unstable in zip(result.layers, unstable, strict=True):
        assert np.all(layer.states[truly_unstable] == NeuronState.UNSTABLE)
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.uniform(box.lower, box.upper, (20000, 10)), box.lower[None]])
    assert_sound(net, box, result, points)


def test_a_background_attack_needs_a_spare_job():
    """With jobs=1 (or as many open directions as jobs) no background attack starts."""
    net = random_network(np.random.default_rng(0), [10, 20, 20, 20, 2])
    box = Box(np.zeros(10), np.ones(10))
    analysis = state.Analysis(net, box, np.inf, 0, 1, None)
    stability_tiers.interval(analysis)
    analysis.start_background_attack(2)
    assert analysis.background is None
    analysis.jobs = int(analysis.open_directions(2)[0].size)
    analysis.start_background_attack(2)
    assert analysis.background is None


def test_with_a_background_attack_the_labels_are_those_of_one_job():
    """The background attack changes where witnesses come from, never a label."""
    net = random_network(np.random.default_rng(4), [12, 24, 24, 24, 2])
    box = Box(np.zeros(12), np.ones(12))
    tiers = ("lp", "cuts", "crown-bab", "bab", "milp")
    serial = analyze_stability(net, box, tiers=tiers)
    parallel = analyze_stability(net, box, tiers=tiers, jobs=64)
    assert parallel.timings_s["background"] > 0, "no background attack ran"
    for one, two in zip(serial.layers, parallel.layers, strict=True):
        assert not (one.states == NeuronState.UNDECIDED).any()
        np.testing.assert_array_equal(one.states, two.states)


_ORPHAN_SCRIPT = """
import os, sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_stability import random_network
from onnx_exact.search.attack import AttackLimits, AttackTarget, BackgroundAttack
from onnx_exact.bounds.crown import interval_bounds
from onnx_exact.core.box import Box

if __name__ == "__main__":
    net = random_network(np.random.default_rng(0), [10, 20, 20, 2])
    box = Box(np.zeros(10), np.ones(10))
    bounds = interval_bounds(net, box)
    # neuron 0 of layer 1 gets a bias no input can overcome: its +1 direction is never refuted
    net.layers[1].bias[0] = -1e6
    target = AttackTarget(net, box, bounds, [np.zeros(20, np.int8)], 1)
    limits = AttackLimits(64, 1.0, 3.0, 3.0, 0.05)
    attack = BackgroundAttack(
        target, np.array([0]), np.array([1]), (0,), np.inf,
        limits=limits, polish_quantile=0.75, warmup_rounds=4,
    )
    print(attack.process.pid, flush=True)
    os._exit(0)  # dies like a killed process: no clean-up, no atexit
"""


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_a_background_attack_ends_when_its_analysis_is_killed(tmp_path):
    """A killed analysis (SIGKILL, an out-of-memory kill) runs no clean-up, and may die before
    its background attack has even started; the attack, which never refutes its stable
    direction, must end with it and leave no temporary file."""
    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN_SCRIPT.format(tests=str(Path(__file__).parent)))
    temp = tmp_path / "temp"
    temp.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(temp)},
    )
    assert proc.returncode == 0, proc.stderr
    pid = proc.stdout.strip()
    give_up = time.monotonic() + 60.0
    while _running(int(pid)) and time.monotonic() < give_up:
        time.sleep(0.2)
    assert not _running(int(pid)), "the background attack outlived its analysis"
    assert list(temp.iterdir()) == [], "the attack left temporary files behind"


def _analyse_in_child(conn, net, box, tiers) -> None:
    try:
        result = analyze_stability(net, box, tiers=tiers, jobs=64)
        conn.send([layer.states for layer in result.layers])
    except Exception as exc:  # noqa: BLE001 - reported to the test
        conn.send(repr(exc))


def test_jobs_in_a_daemonic_process_run_serially_instead_of_failing():
    """A daemonic process (a ``multiprocessing.Pool`` worker, a daemonic benchmark child) may
    not start processes; with jobs > 1 the analysis there runs without workers, same labels."""
    import multiprocessing

    net = random_network(np.random.default_rng(4), [12, 24, 24, 24, 2])
    box = Box(np.zeros(12), np.ones(12))
    tiers = ("lp", "cuts", "crown-bab", "bab", "milp")
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_analyse_in_child, args=(sender, net, box, tiers), daemon=True)
    child.start()
    assert receiver.poll(120), "the daemonic analysis did not answer"
    answer = receiver.recv()
    child.join(timeout=30)
    assert not isinstance(answer, str), answer
    serial = analyze_stability(net, box, tiers=tiers)
    for states, layer in zip(answer, serial.layers, strict=True):
        np.testing.assert_array_equal(states, layer.states)


def test_the_tier_table_holds_the_order_the_flags_and_the_solver_caps():
    """One row per tier replaces the parallel tuples: the exact tiers run in table order, an
    UNSTABLE neuron is credited by the rank of its ``decided_by`` name ("cuts" settles as
    "lp+cuts"), the solvers read their per-direction caps from the table, and every tier a layer
    runs is dispatched through TIER_FUNCTIONS."""
    from onnx_exact.bounds import relu_bab
    from onnx_exact.core.verdicts import CREDIT_ORDER, SOLVER_TIERS, TIERS
    from onnx_exact.solvers import exact_tiers

    assert SOLVER_TIERS == ("split", "lp", "cuts", "crown-bab", "bab", "milp", "subdivide")
    ranked = sorted(CREDIT_ORDER, key=CREDIT_ORDER.get)
    assert ranked.index("lp+cuts") == ranked.index("lp") + 1
    assert CREDIT_ORDER["probe"] < CREDIT_ORDER["crown-bab"] < CREDIT_ORDER["attack"]
    assert CREDIT_ORDER["attack"] < CREDIT_ORDER["bab"] < CREDIT_ORDER["milp"]
    assert [t for t in TIERS if TIERS[t].retried] == ["crown-bab", "bab", "milp", "subdivide"]
    assert [t for t in TIERS if TIERS[t].attacked_before] == ["bab", "milp", "subdivide"]
    assert [t for t in TIERS if TIERS[t].background] == ["crown-bab", "bab", "milp"]
    assert [t for t in TIERS if TIERS[t].probed_before] == ["crown-bab"]
    assert relu_bab.TIME_LIMIT == TIERS[Tier.CROWN_BAB].direction_seconds
    assert relu_bab.NODE_LIMIT == TIERS[Tier.CROWN_BAB].direction_nodes
    assert exact_tiers.BAB_TIME_LIMIT == TIERS[Tier.BAB].direction_seconds
    assert exact_tiers.BAB_NODE_LIMIT == TIERS[Tier.BAB].direction_nodes
    assert exact_tiers.DIRECTION_TIME_LIMIT == TIERS[Tier.MILP].direction_seconds
    assert policy.tier_direction_seconds("subdivide") is None
    solver_tiers = {Tier(name) for name in SOLVER_TIERS}
    assert solver_tiers <= set(stability_tiers.TIER_FUNCTIONS)
    assert {Tier.ISA, Tier.PER_NEURON} == set(stability_tiers.BASELINES)
    assert f"{Tier.CROWN_BAB}" == "crown-bab" and str(Tier.CUTS) == "cuts"


def test_tightening_under_a_time_limit_ends_at_half_of_the_layers_share(monkeypatch):
    """tighten_previous gives α-CROWN at most half of layer k's equal share of the time left
    (k and each ReLU layer above it get one), so the tiers that decide k keep the rest."""
    net = random_network(np.random.default_rng(6), [6, 16, 16, 16, 16, 2])
    box = Box(np.zeros(6), np.ones(6))
    analysis = state.Analysis(net, box, time.monotonic() + 600.0, 0, 1, None)
    stability_tiers.interval(analysis)
    given: list[float] = []

    def record(analysis, k, rows, deadline=None):
        given.append(deadline)
        return np.zeros((0, net.in_features))

    monkeypatch.setattr(stability_tiers, "_optimise_rows", record)
    started = time.monotonic()
    stability_tiers.tighten_previous(analysis, 2)
    layers_left = sum(1 for j in net.relu_layer_indices if j >= 2)
    assert given, "no layer below 2 was tightened"
    share = (analysis.deadline - started) / (2 * layers_left)
    assert all(deadline <= started + share + 1.0 for deadline in given)
    assert all(deadline < analysis.deadline - 100.0 for deadline in given)


def test_no_background_attack_copies_a_network_over_the_weight_limit(monkeypatch):
    """A background process gets its own copy of the network: over
    ``BACKGROUND_MAX_WEIGHT_BYTES`` of dense weights (a CNN's conv matrices) none starts, and
    the run says why; under it one does."""
    net = random_network(np.random.default_rng(0), [10, 20, 20, 20, 2])
    box = Box(np.zeros(10), np.ones(10))
    weight_bytes = 8 * sum(layer.weight.size for layer in net.layers)
    monkeypatch.setattr(policy, "BACKGROUND_MAX_WEIGHT_BYTES", weight_bytes - 1)
    analysis = state.Analysis(net, box, np.inf, 0, 1, None)
    stability_tiers.interval(analysis)
    analysis.jobs = int(analysis.open_directions(2)[0].size) + 1
    analysis.start_background_attack(2)
    assert analysis.background is None
    assert any("background attack not started" in note for note in analysis.notes)
    monkeypatch.setattr(policy, "BACKGROUND_MAX_WEIGHT_BYTES", weight_bytes)
    with analysis.background_attack(2):
        analysis.start_background_attack(2)
        assert analysis.background is not None
    assert analysis.background is None


def test_a_layer_whose_tightening_was_cut_short_is_tightened_again_later(monkeypatch):
    """The share ends inside α-CROWN: its bounds are kept, but the layer stays untightened so a
    later call goes on with it (a fake clock jumps past the share during the first layer)."""
    net = random_network(np.random.default_rng(6), [6, 16, 16, 16, 16, 2])
    box = Box(np.zeros(6), np.ones(6))
    real = time.monotonic
    analysis = state.Analysis(net, box, real() + 600.0, 0, 1, None)
    stability_tiers.interval(analysis)
    jump = [0.0]

    def clock():
        return real() + jump[0]

    def record(analysis, k, rows, deadline=None):
        jump[0] = 300.0  # past the share (600 s / (2 * 3 layers)), before the analysis deadline
        return np.zeros((0, net.in_features))

    monkeypatch.setattr(stability_tiers, "_optimise_rows", record)
    monkeypatch.setattr(stability_tiers.time, "monotonic", clock)
    stability_tiers.tighten_previous(analysis, 3)
    assert 1 not in analysis.tightened and 2 not in analysis.tightened
