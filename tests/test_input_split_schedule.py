"""How the schedule hands the input search's time between layers (few-input networks)."""

from __future__ import annotations

import numpy as np

from onnx_exact.core.box import Box
from onnx_exact.core.network import DenseLayer, InputMap, Network
from onnx_exact.core.verdicts import NeuronState, Tier
from onnx_exact.stability import analyze_stability, policy
from onnx_exact.stability import tiers as stability_tiers


def sink_net() -> tuple[Network, Box]:
    """Layer 1 holds directions no leaf can close; layer 2's neuron needs splitting.

    ``-relu(x0)`` has maximum exactly 0 and ``relu(x0 + x1)`` minimum exactly 0 on
    ``[-1, 1]^2``: neither is provable beyond the margin nor refutable, so their search never
    ends. ``relu(x0 + x1) + relu(x0 - x1) - 2.5 <= -0.5`` is stably inactive, but the triangle
    relaxation of the whole box bounds it by ``+0.5``: only splitting the input proves it.
    """
    layers = [
        DenseLayer(np.array([[1.0, 1.0], [1.0, -1.0], [1.0, 0.0]]), np.zeros(3), True, "fc0"),
        DenseLayer(
            np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
            np.zeros(3),
            True,
            "fc1",
        ),
        DenseLayer(np.array([[0.0, 1.0, 1.0]]), np.array([-2.5]), True, "fc2"),
        DenseLayer(np.ones((1, 1)), np.zeros(1), False, "out"),
    ]
    return Network(layers, InputMap.identity(2)), Box(-np.ones(2), np.ones(2))


def test_a_layer_whose_search_never_ends_leaves_the_layers_above_their_share(monkeypatch):
    """Under a time limit a layer's first-pass subdivide stops at its share of the time left
    (equal shares for it and each layer above), so a layer above a search that never ends still
    gets its turn before the deadline; without the share layer 1 took all the time."""
    net, box = sink_net()
    monkeypatch.setattr(policy, "SPLIT_BOXES_PER_LAYER", 1)
    monkeypatch.setattr(policy, "SUBDIVIDE_LEAVES", 10**9)  # only time stops layer 1's search
    monkeypatch.setitem(stability_tiers.TIER_FUNCTIONS, Tier.ATTACK, lambda *args: None)
    result = analyze_stability(net, box, tiers=("split", "subdivide"), time_limit=4)
    assert result.time_limit_hit
    assert result.layers[1].states[0] == NeuronState.UNDECIDED
    assert result.layers[2].states[0] == NeuronState.INACTIVE
    assert result.layers[2].decided_by[0] == "subdivide"
    assert result.layers[2].upper[0] <= 0.0
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 101)] * 2), axis=-1).reshape(-1, 2)
    assert net.preactivations(grid)[2].max() <= result.layers[2].upper[0]


def sliver_net() -> tuple[Network, Box]:
    """A second-layer neuron positive only where ``x0 > 0.9999`` (4e-5 of ``[0, 1]^2``).

    ``h = relu(x0 - 0.9999)`` is at most ``1e-4``; ``y = 1e4 h - 0.6`` is positive only for
    ``x0 > 0.99996``. The second input only makes the box two-dimensional, and a second unit
    ``relu(x1 - 2)`` (dead) keeps a direction open however many points show ``y``'s signs.
    """
    layers = [
        DenseLayer(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([-0.9999, -2.0]), True, "fc0"),
        DenseLayer(np.array([[1e4, 0.0], [0.0, 1.0]]), np.array([-0.6, 0.0]), True, "fc1"),
        DenseLayer(np.ones((1, 2)), np.zeros(1), False, "out"),
    ]
    return Network(layers, InputMap.identity(2)), Box(np.zeros(2), np.ones(2))


def test_few_inputs_are_sampled_densely_past_idle_rounds():
    """With few inputs the witness sample runs to ``SAMPLE_MAX_FEW_INPUTS`` points although its
    rounds show no new sign for long (the sliver direction comes late), and so the sliver's
    sign is shown by the sample itself: with the general cap, ``SAMPLE_MAX`` points, it would
    be expected only 0.3 times."""
    net, box = sliver_net()
    events = []
    result = analyze_stability(net, box, tiers=(), progress=events.append)
    sampled = max(event.done for event in events if event.phase == Tier.WITNESS)
    assert sampled == policy.SAMPLE_MAX_FEW_INPUTS
    assert result.layers[1].states[0] == NeuronState.UNSTABLE
    assert result.layers[1].decided_by[0] == Tier.WITNESS


def test_with_the_search_alone_a_probe_precedes_it_and_one_attack_round_follows(monkeypatch):
    """When the input search is the only tier after the split (few inputs), a probe, not an
    attack, runs before each layer's first instalment, one attack round only on what the
    instalment left, and one round after each retried instalment: the search refutes as it
    proves. Layer 1's directions never close (see :func:`sink_net`), layer 2's are proved by
    the search, so no attack is spent on layer 2."""
    net, box = sink_net()
    monkeypatch.setattr(policy, "SPLIT_BOXES_PER_LAYER", 1)
    monkeypatch.setattr(policy, "SUBDIVIDE_LEAVES", 200)
    calls: list[tuple[str, int, float]] = []

    def recorded(tier):
        function = stability_tiers.TIER_FUNCTIONS[tier]

        def call(analysis, k, effort=1.0):
            calls.append((tier.value, k, effort))
            function(analysis, k, effort)

        return call

    for tier in (Tier.PROBE, Tier.ATTACK, Tier.SUBDIVIDE):
        monkeypatch.setitem(stability_tiers.TIER_FUNCTIONS, tier, recorded(tier))
    result = analyze_stability(net, box, tiers=("split", "subdivide"), time_limit=3)
    first = [call for call in calls if call[2] == 1.0][:4]
    assert first[:3] == [("probe", 1, 1.0), ("subdivide", 1, 1.0), ("attack", 1, 1.0)]
    assert ("attack", 2, 1.0) not in calls
    assert result.layers[2].decided_by[0] == "subdivide"
    retried = [i for i, call in enumerate(calls) if call[0] == "subdivide" and call[2] > 1.0]
    assert retried
    for i in retried:
        if i + 1 < len(calls):
            assert calls[i + 1] == ("attack", 1, policy.SEARCH_ATTACK_EFFORT)
