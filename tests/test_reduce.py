"""The exact compression rules of ``reduce.py``.

Stability verdicts are built by hand from interval bound propagation (IBP), which is sound: a neuron
called ACTIVE/INACTIVE here truly is on the box. Nets are built so that the wanted states hold by
construction (biases far beyond ``||w||_1 max|h|``), and every reduction is checked for output
equality on dense samples and the box corners, for its bookkeeping invariants and for idempotence.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_exact.core.errors import UsageError
from onnx_exact.core.network import DenseLayer, InputMap, Network
from onnx_exact.core.verdicts import LayerStability, NeuronState, StabilityResult
from onnx_exact.reduce import Reduction, reduce_network

ACTIVE, INACTIVE = NeuronState.ACTIVE, NeuronState.INACTIVE
UNSTABLE, UNDECIDED = NeuronState.UNSTABLE, NeuronState.UNDECIDED


# ----------------------------------------------------------------------------------- helpers
def make_net(layers: list[tuple[np.ndarray, np.ndarray, bool]], input_map=None) -> Network:
    dense = [
        DenseLayer(np.asarray(w, float), np.asarray(b, float), relu, f"layer{k}")
        for k, (w, b, relu) in enumerate(layers)
    ]
    n_in = dense[0].in_features
    return Network(
        dense,
        input_map if input_map is not None else InputMap.identity(n_in),
        input_name="x",
        output_name="y",
        meta={"source": "test"},
    )


def stability_of(net: Network, states: list[np.ndarray]) -> StabilityResult:
    layers = [
        LayerStability(
            index=k,
            name=layer.name,
            states=np.asarray(s, dtype=np.int64),
            decided_by=np.full(len(s), "test"),
            lower=np.full(len(s), -np.inf),
            upper=np.full(len(s), np.inf),
        )
        for k, (layer, s) in enumerate(zip(net.layers, states, strict=True))
    ]
    return StabilityResult(layers=layers, witnesses=np.zeros((0, net.in_features)))


def ibp_states(net: Network, lower: np.ndarray, upper: np.ndarray) -> list[np.ndarray]:
    """Sound states from interval arithmetic on the raw box; unknown neurons are UNSTABLE."""
    lo = net.input_map.apply(lower[None])[0]
    hi = net.input_map.apply(upper[None])[0]
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    states = []
    for layer in net.layers:
        centre, radius = (lo + hi) / 2, (hi - lo) / 2
        mid = layer.weight @ centre + layer.bias
        spread = np.abs(layer.weight) @ radius
        y_lo, y_hi = mid - spread, mid + spread
        s = np.full(layer.out_features, int(UNSTABLE))
        if layer.relu:
            s[y_lo >= 0] = ACTIVE
            s[y_hi <= 0] = INACTIVE
            lo, hi = np.maximum(y_lo, 0), np.maximum(y_hi, 0)
        else:
            s[:] = ACTIVE
            lo, hi = y_lo, y_hi
        states.append(s)
    return states


def box_points(lower: np.ndarray, upper: np.ndarray, rng: np.random.Generator, n: int = 2000):
    """Uniform samples, Bernoulli corners and (for small inputs) every corner of the box."""
    uniform = rng.uniform(lower, upper, size=(n, lower.size))
    corners = np.where(rng.random((n, lower.size)) < 0.5, upper, lower)
    points = [uniform, corners, ((lower + upper) / 2)[None]]
    if lower.size <= 8:
        every = np.array(list(itertools.product([0, 1], repeat=lower.size)), dtype=bool)
        points.append(np.where(every, upper, lower))
    return np.concatenate(points)


def assert_same_outputs(original: Network, reduced: Network, points: np.ndarray) -> None:
    expected = original.forward(points)
    got = reduced.forward(points)
    scale = 1.0 + np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9 * scale)


def assert_invariants(original: Network, reduction: Reduction) -> None:
    reduced = reduction.network
    hosts = reduction.hosts
    assert len(hosts) == len(reduced.layers)
    assert all(a < b for a, b in itertools.pairwise(hosts))
    assert hosts[-1] == len(original.layers) - 1
    for layer, host in zip(reduced.layers, hosts, strict=True):
        assert layer.relu == original.layers[host].relu
        assert layer.name == original.layers[host].name
        assert layer.weight.dtype == np.float64
    assert reduced.in_features == original.in_features
    assert reduced.out_features == original.out_features
    assert reduced.param_count <= original.param_count
    assert reduced.input_name == original.input_name
    assert reduced.output_name == original.output_name
    assert reduced.meta == original.meta
    np.testing.assert_array_equal(reduced.input_map.scale, original.input_map.scale)
    np.testing.assert_array_equal(reduced.input_map.shift, original.input_map.shift)
    assert len(reduction.layers) == len(original.layers)
    for k, record in enumerate(reduction.layers):
        assert record.index == k and record.size == original.layers[k].out_features
        parts = [
            record.kept,
            record.removed_inactive,
            record.removed_dependent,
            record.removed_other,
            record.folded_neurons,
        ]
        together = np.concatenate(parts)
        assert np.array_equal(np.sort(together), np.arange(record.size)), record
        assert record.folded == (record.folded_neurons.size > 0 or record.size == 0)
        assert not (record.folded and k in hosts)
    if not reduction.constant_output:
        for layer, host in zip(reduced.layers, hosts, strict=True):
            assert layer.out_features == reduction.layers[host].kept.size
    np.testing.assert_array_equal(reduction.layers[-1].kept, np.arange(original.out_features))


def carried_stability(
    original: StabilityResult, reduction: Reduction, net: Network
) -> StabilityResult:
    """The original verdicts of the neurons that survived (the synthetic constant neuron is 0)."""
    states = []
    for j, host in enumerate(reduction.hosts):
        if reduction.constant_output and j < len(reduction.hosts) - 1:
            states.append(np.array([int(INACTIVE)]))
        else:
            states.append(original.layers[host].states[reduction.layers[host].kept])
    return stability_of(net, states)


def reduce_and_check(
    net: Network, states: list[np.ndarray], lower: np.ndarray, upper: np.ndarray, seed: int = 0
) -> Reduction:
    """Reduce, then assert equivalence on the box, the invariants and idempotence."""
    stability = stability_of(net, states)
    before = [(layer.weight.copy(), layer.bias.copy()) for layer in net.layers]
    reduction = reduce_network(net, stability)
    for layer, (weight, bias) in zip(net.layers, before, strict=True):  # the input is not touched
        np.testing.assert_array_equal(layer.weight, weight)
        np.testing.assert_array_equal(layer.bias, bias)
    assert_invariants(net, reduction)
    assert_same_outputs(
        net, reduction.network, box_points(lower, upper, np.random.default_rng(seed))
    )
    again = reduce_network(
        reduction.network, carried_stability(stability, reduction, reduction.network)
    )
    assert again.hosts == list(range(len(reduction.network.layers)))
    assert again.constant_output == reduction.constant_output
    for first, second in zip(reduction.network.layers, again.network.layers, strict=True):
        np.testing.assert_array_equal(second.weight, first.weight)
        np.testing.assert_array_equal(second.bias, first.bias)
    if not reduction.constant_output:
        for record in again.layers:
            assert record.kept.size == record.size and not record.folded
    return reduction


def unit_box(n: int) -> tuple[np.ndarray, np.ndarray]:
    return -np.ones(n), np.ones(n)


def big(weight: np.ndarray, sign: float) -> np.ndarray:
    """A bias that makes every row stably of the given sign for inputs in [-1, 1]."""
    return sign * (np.abs(weight).sum(axis=1) + 5.0)


# ----------------------------------------------------------------------------- rule 1: inactive
def test_inactive_neurons_are_deleted_and_nothing_else() -> None:
    rng = np.random.default_rng(1)
    w0, w1, w2 = rng.normal(size=(6, 3)), rng.normal(size=(4, 6)), rng.normal(size=(2, 4))
    b0 = rng.normal(scale=0.1, size=6)
    b0[[1, 4]] = big(w0[[1, 4]], -1)
    net = make_net([(w0, b0, True), (w1, np.zeros(4), True), (w2, np.zeros(2), False)])
    lower, upper = unit_box(3)
    states = ibp_states(net, lower, upper)
    assert list(states[0]) == [UNSTABLE, INACTIVE, UNSTABLE, UNSTABLE, INACTIVE, UNSTABLE]
    reduction = reduce_and_check(net, states, lower, upper)
    record = reduction.layers[0]
    np.testing.assert_array_equal(record.removed_inactive, [1, 4])
    np.testing.assert_array_equal(record.kept, [0, 2, 3, 5])
    assert record.removed_dependent.size == record.removed_other.size == 0
    assert reduction.hosts == [0, 1, 2]
    np.testing.assert_array_equal(reduction.network.layers[0].weight, w0[[0, 2, 3, 5]])
    np.testing.assert_array_equal(reduction.network.layers[1].weight, w1[:, [0, 2, 3, 5]])
    assert reduction.network.param_count == net.param_count - 2 * 4 - 2 * 4


# ------------------------------------------------------------------- rule 4: dependent active
def test_more_active_neurons_than_inputs_keep_a_basis() -> None:
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=(8, 3))
    b0 = big(w0, +1)
    b0[7] = 0.0  # one unstable neuron blocks folding, so only the rank rule can act
    w1 = rng.normal(size=(5, 8))
    net = make_net(
        [(w0, b0, True), (w1, np.zeros(5), True), (rng.normal(size=(2, 5)), [0, 0], False)]
    )
    lower, upper = unit_box(3)
    states = ibp_states(net, lower, upper)
    assert (states[0][:7] == ACTIVE).all() and states[0][7] == UNSTABLE
    reduction = reduce_and_check(net, states, lower, upper)
    record = reduction.layers[0]
    assert record.removed_dependent.size == 4  # rank 3 among the 7 active rows
    assert record.kept.size == 4 and 7 in record.kept
    assert not record.folded


def test_a_relation_that_amplifies_round_off_is_not_used() -> None:
    """``h_1 = 2x + 7 = 2 h_0 - 1993`` with ``h_0 = x + 1000``: exactly dependent, but removing
    ``h_1`` would move ``2 W_next[:, 1]`` onto ``h_0`` (~1000) and ``-1993 W_next[:, 1]`` into the
    bias, a cancellation whose float32 rounding is ~270x that of ``W_next[:, 1] h_1`` itself
    (amplification above ``MAX_AMPLIFICATION``): the row stays, so the written model keeps the
    input's round-off."""
    from onnx_exact.reduce import MAX_AMPLIFICATION, dependent_rows

    weight, bias = np.array([[1.0], [2.0]]), np.array([1000.0, 7.0])
    basis, dependent, _ = dependent_rows(weight, bias)
    assert basis.tolist() == [0] and dependent.size == 0
    amplification = 2.0 * np.hypot(1.0, 1000.0) / np.hypot(2.0, 7.0)
    assert amplification > MAX_AMPLIFICATION
    basis, dependent, alpha = dependent_rows(weight, np.array([1000.0, 2000.0]))
    assert dependent.tolist() == [1] and alpha.tolist() == [[2.0]]  # proportional: no cancellation


def test_exact_combination_is_removed_but_a_near_combination_is_kept() -> None:
    rng = np.random.default_rng(3)
    w0 = rng.normal(size=(6, 6))
    w0[3] = 0.5 * w0[0] - 2.0 * w0[1]  # dependent
    w0[4] = w0[0] + w0[2] + 1e-6 * rng.normal(size=6)  # independent, barely: joins the basis
    w0[5] = w0[1] - w0[2] + 1e-10 * rng.normal(size=6)  # 1e-10 off: kept, as a basis row
    b0 = big(w0, +1)
    w1 = rng.normal(size=(4, 6))
    extra = rng.normal(size=(1, 6))  # an unstable neuron so that the layer cannot fold
    net = make_net(
        [
            (np.vstack([w0, extra]), np.append(b0, 0.0), True),
            (np.column_stack([w1, rng.normal(size=4)]), np.zeros(4), True),
            (rng.normal(size=(1, 4)), [0.0], False),
        ]
    )
    lower, upper = unit_box(6)
    states = ibp_states(net, lower, upper)
    reduction = reduce_and_check(net, states, lower, upper)
    record = reduction.layers[0]
    assert record.removed_dependent.size == 1
    assert record.removed_dependent[0] in (0, 1, 3)
    assert {2, 4, 5} <= set(record.kept.tolist())


def test_dependent_rule_needs_every_neuron_active() -> None:
    """A row that is a combination of *unstable* rows is not linear on the box: keep it."""
    rng = np.random.default_rng(4)
    w0 = rng.normal(size=(3, 2))
    net = make_net(
        [
            (w0, [0.1, -0.2, 0.05], True),
            (rng.normal(size=(2, 3)), [0, 0], True),
            (np.ones((1, 2)), [0], False),
        ]
    )
    lower, upper = unit_box(2)
    states = ibp_states(net, lower, upper)
    assert (states[0] == UNSTABLE).all()
    reduction = reduce_and_check(net, states, lower, upper)
    assert reduction.layers[0].kept.size == 3


# ------------------------------------------------------------------------------- rule 6: fold
def test_all_active_layer_folds_into_the_next() -> None:
    rng = np.random.default_rng(5)
    w0 = rng.normal(size=(3, 4))
    w1, w2 = rng.normal(size=(5, 3)), rng.normal(size=(2, 5))
    net = make_net([(w0, big(w0, +1), True), (w1, rng.normal(size=5), True), (w2, [0, 0], False)])
    lower, upper = unit_box(4)
    states = ibp_states(net, lower, upper)
    assert (states[0] == ACTIVE).all()
    states[1][:] = UNSTABLE  # forgetting proofs is sound; it keeps layer 1 from folding further
    reduction = reduce_and_check(net, states, lower, upper)
    assert reduction.hosts == [1, 2]
    assert reduction.layers[0].folded
    np.testing.assert_array_equal(reduction.layers[0].folded_neurons, [0, 1, 2])
    assert reduction.network.layers[0].weight.shape == (5, 4)
    np.testing.assert_allclose(reduction.network.layers[0].weight, w1 @ w0, rtol=1e-14)


def test_bottleneck_layer_is_not_folded_when_that_would_add_parameters() -> None:
    rng = np.random.default_rng(6)
    w0 = rng.normal(size=(2, 10))
    w1, w2 = rng.normal(size=(10, 2)), rng.normal(size=(1, 10))
    net = make_net([(w0, big(w0, +1), True), (w1, rng.normal(size=10), True), (w2, [0], False)])
    lower, upper = unit_box(10)
    states = ibp_states(net, lower, upper)
    states[1][:] = UNSTABLE
    reduction = reduce_and_check(net, states, lower, upper)
    assert reduction.hosts == [0, 1, 2]
    assert not reduction.layers[0].folded
    assert reduction.network.param_count == net.param_count


def test_mixed_stable_layer_drops_inactive_then_folds_last_hidden_into_output() -> None:
    rng = np.random.default_rng(7)
    w0 = rng.normal(size=(4, 3))
    w1 = rng.normal(size=(6, 4))
    b1 = np.concatenate([big(w1[:3], +1) * 20, big(w1[3:], -1) * 20])  # |h0| <= ~20 on the box
    w2 = rng.normal(size=(2, 6))
    net = make_net([(w0, np.zeros(4), True), (w1, b1, True), (w2, [0.3, -0.1], False)])
    lower, upper = unit_box(3)
    states = ibp_states(net, lower, upper)
    assert list(states[1]) == [ACTIVE] * 3 + [INACTIVE] * 3
    reduction = reduce_and_check(net, states, lower, upper)
    assert reduction.hosts == [0, 2]
    record = reduction.layers[1]
    assert record.folded
    np.testing.assert_array_equal(record.removed_inactive, [3, 4, 5])
    np.testing.assert_array_equal(record.folded_neurons, [0, 1, 2])
    assert reduction.network.layers[1].weight.shape == (2, 4)


def test_linear_layer_without_relu_folds() -> None:
    rng = np.random.default_rng(8)
    w0, w1, w2 = rng.normal(size=(2, 3)), rng.normal(size=(4, 2)), rng.normal(size=(1, 4))
    net = make_net([(w0, [0.5, -0.5], False), (w1, np.zeros(4), True), (w2, [0], False)])
    lower, upper = unit_box(3)
    states = [np.full(2, int(UNDECIDED)), np.full(4, int(UNSTABLE)), np.full(1, int(ACTIVE))]
    reduction = reduce_and_check(net, states, lower, upper)
    assert reduction.hosts == [1, 2]
    assert reduction.layers[0].folded


# ------------------------------------------------------------------- rule 7: constant output
@pytest.mark.parametrize("output_relu", [False, True])
def test_all_inactive_layer_makes_the_output_constant(output_relu: bool) -> None:
    rng = np.random.default_rng(9)
    w0, w1, w2 = rng.normal(size=(4, 3)), rng.normal(size=(3, 4)), rng.normal(size=(2, 3))
    b1 = big(w1, -1) * 10
    b2 = np.array([0.7, -0.4])
    net = make_net([(w0, np.zeros(4), True), (w1, b1, True), (w2, b2, output_relu)])
    lower, upper = unit_box(3)
    states = ibp_states(net, lower, upper)
    if output_relu:
        states[2] = np.array([ACTIVE, INACTIVE])
    assert (states[1] == INACTIVE).all()
    reduction = reduce_and_check(net, states, lower, upper)
    assert reduction.constant_output
    assert reduction.hosts == [0, 2]
    first, output = reduction.network.layers
    assert first.weight.shape == (1, 3) and not first.weight.any() and not first.bias.any()
    assert output.weight.shape == (2, 1) and not output.weight.any()
    np.testing.assert_array_equal(output.bias, [0.7, 0.0] if output_relu else b2)
    np.testing.assert_array_equal(reduction.layers[1].removed_inactive, [0, 1, 2])
    np.testing.assert_array_equal(reduction.layers[0].removed_other, [0, 1, 2, 3])
    assert reduction.layers[0].kept.size == 0


def test_constant_output_hosted_after_a_linear_prefix() -> None:
    rng = np.random.default_rng(10)
    w0, w1, w2 = rng.normal(size=(3, 2)), rng.normal(size=(2, 3)), rng.normal(size=(1, 2))
    net = make_net([(w0, np.zeros(3), False), (w1, big(w1, -1) * 10, True), (w2, [1.5], False)])
    lower, upper = unit_box(2)
    reduction = reduce_and_check(net, ibp_states(net, lower, upper), lower, upper)
    assert reduction.constant_output and reduction.hosts == [1, 2]


def test_constant_output_without_hidden_relu_does_not_grow() -> None:
    """All output units dead behind a width-1 linear layer: the constant form must stay small."""
    w0 = np.array([[-1.0, -2.0, 2.0, -2.0, 0.0]])
    w1 = np.array([[2.0], [2.0], [1.0]])
    net = make_net([(w0, [-240.0], False), (w1, [149.6, -149.7, -100.2], True)])
    lower, upper = -np.ones(5), np.ones(5)
    states = ibp_states(net, lower, upper)
    assert (states[1] == INACTIVE).all()
    reduction = reduce_and_check(net, states, lower, upper)
    assert reduction.constant_output and reduction.hosts == [0, 1]
    assert reduction.network.param_count == 5 + 1 + 2 * 3 == net.param_count


# --------------------------------------------------------------- rules 2, 3, 5: domain-free
def test_zero_rows_and_columns_are_removed_on_any_domain() -> None:
    rng = np.random.default_rng(11)
    w0 = rng.normal(size=(5, 3))
    w0[1] = 0.0  # constant relu(0.7) = 0.7
    w0[3] = 0.0  # constant relu(-0.3) = 0
    b0 = np.array([0.1, 0.7, -0.2, -0.3, 0.05])
    w1 = rng.normal(size=(3, 5))
    w1[:, 2] = 0.0  # neuron 2 feeds nothing
    net = make_net(
        [(w0, b0, True), (w1, np.zeros(3), True), (rng.normal(size=(2, 3)), [0, 0], False)]
    )
    lower, upper = unit_box(3)
    states = [np.full(5, int(UNDECIDED)), np.full(3, int(UNSTABLE)), np.full(2, int(ACTIVE))]
    reduction = reduce_and_check(net, states, lower, upper)
    np.testing.assert_array_equal(reduction.layers[0].removed_other, [1, 2, 3])
    np.testing.assert_allclose(reduction.network.layers[1].bias, 0.7 * w1[:, 1])
    # nothing used the box: the reduction is exact far outside it as well
    wide = box_points(-100 * np.ones(3), 100 * np.ones(3), np.random.default_rng(0))
    assert_same_outputs(net, reduction.network, wide)


def test_removing_a_neuron_cascades_into_the_previous_layer() -> None:
    """Deleting an inactive neuron of layer 1 leaves a zero column: layer-0 neuron 0 goes too."""
    w0 = np.array([[1.0, 0.5], [-0.5, 1.0], [0.3, -0.7]])
    w1 = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, -1.0], [0.0, 1.0, 2.0]])
    b1 = np.array([-100.0, 0.0, 0.1])
    net = make_net([(w0, np.zeros(3), True), (w1, b1, True), (np.ones((1, 3)), [0], False)])
    lower, upper = unit_box(2)
    states = [np.full(3, int(UNSTABLE)), np.full(3, int(UNSTABLE)), np.full(1, int(ACTIVE))]
    states[1][0] = INACTIVE
    reduction = reduce_and_check(net, states, lower, upper)
    np.testing.assert_array_equal(reduction.layers[1].removed_inactive, [0])
    assert 0 not in reduction.layers[0].kept.tolist()


@pytest.mark.parametrize(
    ("relu", "factor", "merged"),
    [(True, 2.5, True), (True, -2.0, False), (False, -2.0, True), (False, 0.25, True)],
)
def test_proportional_duplicates(relu: bool, factor: float, merged: bool) -> None:
    rng = np.random.default_rng(12)
    w0 = rng.normal(size=(4, 3))
    b0 = rng.normal(scale=0.1, size=4)
    w0[3], b0[3] = factor * w0[1], factor * b0[1]
    w1 = rng.normal(size=(3, 4))
    net = make_net([(w0, b0, relu), (w1, np.zeros(3), True), (rng.normal(size=(1, 3)), [0], False)])
    states = [np.full(4, int(UNSTABLE)), np.full(3, int(UNSTABLE)), np.full(1, int(ACTIVE))]
    if not relu:
        states[0][:] = ACTIVE
        # keep the linear layer from folding and from rank reduction: 4 rows in R^3 are
        # dependent, so only check that the result stays exact
    lower, upper = -50 * np.ones(3), 50 * np.ones(3)
    reduction = reduce_and_check(net, states, lower, upper)
    if relu:
        removed = reduction.layers[0].removed_other
        assert (removed.tolist() == [3]) == merged
        if merged:
            np.testing.assert_allclose(
                reduction.network.layers[1].weight[:, 1], w1[:, 1] + factor * w1[:, 3]
            )
    else:
        assert reduction.network.param_count < net.param_count


def test_proportional_duplicate_in_a_wide_linear_layer() -> None:
    """No rank deficiency (more inputs than rows), no fold: the duplicate rule alone acts."""
    rng = np.random.default_rng(13)
    w0 = rng.normal(size=(3, 8))
    w0[2] = -3.0 * w0[0]
    b0 = np.array([0.2, 0.1, -0.6])
    w1 = rng.normal(size=(8, 3))
    net = make_net(
        [(w0, b0, False), (w1, np.zeros(8), True), (rng.normal(size=(4, 8)), np.zeros(4), False)]
    )
    states = [np.full(3, int(ACTIVE)), np.full(8, int(UNSTABLE)), np.full(4, int(ACTIVE))]
    lower, upper = unit_box(8)
    reduction = reduce_and_check(net, states, lower, upper)
    record = reduction.layers[0]
    assert record.removed_other.tolist() + record.removed_dependent.tolist() == [2]
    assert not record.folded


def test_several_duplicates_merge_into_one_representative() -> None:
    rng = np.random.default_rng(18)
    base = rng.normal(size=3)
    w0 = np.vstack([base, 2.0 * base, rng.normal(size=3), 0.5 * base, 3.0 * base])
    b0 = np.array([0.2, 0.4, -0.1, 0.1, 0.6])
    w1 = rng.normal(size=(2, 5))
    net = make_net([(w0, b0, True), (w1, [0, 0], True), (np.ones((1, 2)), [0], False)])
    states = [np.full(5, int(UNSTABLE)), np.full(2, int(UNSTABLE)), np.full(1, int(ACTIVE))]
    reduction = reduce_and_check(net, states, *unit_box(3))
    np.testing.assert_array_equal(reduction.layers[0].removed_other, [1, 3, 4])
    merged = w1[:, 0] + 2.0 * w1[:, 1] + 0.5 * w1[:, 3] + 3.0 * w1[:, 4]
    np.testing.assert_allclose(reduction.network.layers[1].weight[:, 0], merged, rtol=1e-14)


def test_near_duplicates_do_not_chain() -> None:
    """k ~ m and m ~ m0 within tolerance but k !~ m0: merging k into m while m merges into m0
    would lose k; only m may go, k stays (round-off tolerance is not transitive)."""
    step = 0.8e-12
    w0 = np.array([[1.0, 0.0], [1.0, step], [1.0, 2 * step], [0.0, 1.0]])
    w1 = np.array([[1.0, 2.0, 3.0, 0.5], [-1.0, 0.5, 2.0, 1.0]])
    net = make_net([(w0, np.zeros(4), True), (w1, [0.1, 0.2], True), (np.ones((1, 2)), [0], False)])
    states = [np.full(4, int(UNSTABLE)), np.full(2, int(UNSTABLE)), np.full(1, int(ACTIVE))]
    lower, upper = unit_box(2)
    reduction = reduce_and_check(net, states, lower, upper)
    np.testing.assert_array_equal(reduction.layers[0].removed_other, [1])
    np.testing.assert_array_equal(reduction.layers[0].kept, [0, 2, 3])


# ------------------------------------------------------------------ rule 8: output layer ReLU
def test_inactive_output_unit_is_zeroed_not_removed() -> None:
    rng = np.random.default_rng(14)
    w0, w1 = rng.normal(size=(4, 3)), rng.normal(size=(3, 4))
    b1 = np.array([0.0, -1000.0, 1000.0])
    net = make_net([(w0, np.zeros(4), True), (w1, b1, True)])
    lower, upper = unit_box(3)
    states = ibp_states(net, lower, upper)
    assert list(states[1]) == [UNSTABLE, INACTIVE, ACTIVE]
    reduction = reduce_and_check(net, states, lower, upper)
    output = reduction.network.layers[-1]
    assert output.relu and output.out_features == 3
    assert not output.weight[1].any() and output.bias[1] == 0.0
    np.testing.assert_array_equal(output.weight[[0, 2]], w1[[0, 2]])
    assert any("stably inactive" in note for note in reduction.notes)


# ----------------------------------------------------------------------- states and errors
def test_undecided_is_treated_exactly_like_unstable() -> None:
    rng = np.random.default_rng(15)
    w0 = rng.normal(size=(6, 2))
    net = make_net(
        [
            (w0, rng.normal(size=6), True),
            (rng.normal(size=(3, 6)), np.zeros(3), True),
            (rng.normal(size=(1, 3)), [0], False),
        ]
    )
    lower, upper = unit_box(2)
    unstable = [np.full(6, int(UNSTABLE)), np.full(3, int(UNSTABLE)), np.full(1, int(ACTIVE))]
    undecided = [np.full(6, int(UNDECIDED)), np.full(3, int(UNDECIDED)), np.full(1, int(ACTIVE))]
    first = reduce_and_check(net, unstable, lower, upper)
    second = reduce_and_check(net, undecided, lower, upper)
    assert first.hosts == second.hosts == [0, 1, 2]
    for a, b in zip(first.network.layers, second.network.layers, strict=True):
        np.testing.assert_array_equal(a.weight, b.weight)
        np.testing.assert_array_equal(a.bias, b.bias)
    assert first.network.param_count == net.param_count


def test_states_of_layers_without_relu_are_ignored() -> None:
    """A layer without ReLU is linear everywhere: an INACTIVE label there must not delete it."""
    rng = np.random.default_rng(16)
    w0 = rng.normal(size=(2, 3))
    net = make_net([(w0, [0.5, -0.5], False), (rng.normal(size=(2, 2)), [0, 0], False)])
    lower, upper = unit_box(3)
    states = [np.full(2, int(INACTIVE)), np.full(2, int(INACTIVE))]
    reduction = reduce_and_check(net, states, lower, upper)
    assert reduction.layers[0].removed_inactive.size == 0


def test_input_map_names_and_meta_carry_over() -> None:
    rng = np.random.default_rng(17)
    w0 = rng.normal(size=(3, 2))
    input_map = InputMap(scale=np.array([2.0, 0.5]), shift=np.array([-1.0, 0.25]))
    net = make_net(
        [(w0, [100.0, -100.0, 0.0], True), (rng.normal(size=(1, 3)), [0], False)], input_map
    )
    lower, upper = np.zeros(2), np.ones(2)
    reduction = reduce_and_check(net, ibp_states(net, lower, upper), lower, upper)
    assert reduction.layers[0].removed_inactive.tolist() == [1]


def test_mismatched_stability_is_a_usage_error() -> None:
    net = make_net([(np.ones((2, 2)), [0, 0], True), (np.ones((1, 2)), [0], False)])
    short = stability_of(net, [np.zeros(2, int), np.zeros(1, int)])
    short.layers.pop()
    with pytest.raises(UsageError, match="1 layers but the network has 2"):
        reduce_network(net, short)
    wrong_width = stability_of(net, [np.zeros(2, int), np.zeros(1, int)])
    wrong_width.layers[0].states = np.zeros(3, dtype=np.int64)
    with pytest.raises(UsageError, match="'layer0' has 2 neurons but 3"):
        reduce_network(net, wrong_width)


# ------------------------------------------------------------------------ property: random nets
@st.composite
def stable_nets(draw):
    """Random nets whose biases often push neurons far into one state, integer-ish weights (so
    zero rows, duplicates and dependencies occur), random ReLU flags, and random box."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n_in = draw(st.integers(1, 5))
    widths = draw(st.lists(st.integers(1, 7), min_size=0, max_size=4))
    n_out = draw(st.integers(1, 3))
    sizes = [n_in, *widths, n_out]
    discrete = draw(st.booleans())
    layers = []
    for k, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if discrete:
            weight = rng.integers(-2, 3, size=(fan_out, fan_in)).astype(float)
        else:
            weight = rng.normal(size=(fan_out, fan_in))
        push = rng.choice([-1.0, 0.0, 1.0], size=fan_out) * (3.0 + 2.0 * k) * 10.0
        bias = push * (1 + np.abs(weight).sum(axis=1)) + rng.normal(scale=0.3, size=fan_out)
        is_output = k == len(sizes) - 2
        relu = bool(rng.random() < (0.3 if is_output else 0.85))
        layers.append((weight, bias, relu))
    lower = rng.uniform(-1, 0, size=n_in)
    upper = lower + rng.uniform(0.0, 1.5, size=n_in)
    forget = rng.random(len(layers)) < 0.2
    return make_net(layers), lower, upper, forget, seed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stable_nets())
def test_random_nets_stay_exact_and_never_grow(case) -> None:
    net, lower, upper, forget, seed = case
    states = ibp_states(net, lower, upper)
    for k in np.flatnonzero(forget):  # forgetting a proof is always sound
        states[k][:] = np.where(net.layers[k].relu, UNDECIDED, ACTIVE)
    reduce_and_check(net, states, lower, upper, seed=seed % 1000)
