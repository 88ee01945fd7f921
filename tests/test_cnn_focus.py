"""The structural focus of a CNN's analysis: the costly tiers pursue only what can change the
structure, and the structure found is the one the unfocused analysis finds.

A conv channel goes only when every position is proved INACTIVE and a ReLU only when every
neuron of its layer is proved ACTIVE (:mod:`onnx_exact.channels`), so once a witness shows a
channel positive somewhere (or its layer negative somewhere) the other positions' proofs cannot
change the written model. The unfocused reference is the same network with its ``channels``
dropped (analysed as an MLP would be), or ``Analysis.structural`` patched to allow everything.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from cnn_fixtures import VALID_BUILDERS

from onnx_exact import AnalysisOptions, DomainSpec, compress
from onnx_exact.bounds import relu_bab
from onnx_exact.channels import channel_summaries
from onnx_exact.core.box import Box
from onnx_exact.core.network import Network
from onnx_exact.core.verdicts import NeuronState, Tier
from onnx_exact.io.onnx_reader import read_model
from onnx_exact.report import summarize_layers
from onnx_exact.stability import state as state_module
from onnx_exact.stability import tiers as tier_module
from onnx_exact.stability.schedule import analyze_stability


def _setup(name: str, half_width: float):
    """The fixture's network, the box ``centre ± half_width`` (network space) and its MLP twin."""
    fixture = VALID_BUILDERS[name]()
    net = read_model(fixture.model).network
    centre = (fixture.lower + fixture.upper) / 2
    lower = np.maximum(fixture.lower, centre - half_width)
    upper = np.minimum(fixture.upper, centre + half_width)
    box = Box(lower, upper, net.input_name, "test").to_network(net.input_map)
    flat = Network(
        [dataclasses.replace(layer, channels=None) for layer in net.layers],
        net.input_map,
        net.input_name,
        net.output_name,
    )
    return fixture, net, box, flat


class _HandedToCrownBab:
    """Counts the directions handed to CROWN branch and bound (``conv``: of conv layers), and
    those among them that could not change the structure when they were handed (a channel-mate
    already seen positive or proved ACTIVE; for an ACTIVE direction, a neuron of the layer
    already seen negative or proved INACTIVE)."""

    def __init__(self, monkeypatch, net: Network):
        self.net, self.analysis = net, None
        self.handed = self.needless = self.conv = 0
        tier = tier_module.TIER_FUNCTIONS[Tier.CROWN_BAB]
        decide = relu_bab.decide_directions

        def patched_tier(analysis, k, effort=1.0):
            self.analysis = analysis
            return tier(analysis, k, effort)

        def patched_decide(net_, box, bounds, states, k, directions, *args, **kwargs):
            self.count(k, directions)
            return decide(net_, box, bounds, states, k, directions, *args, **kwargs)

        monkeypatch.setitem(tier_module.TIER_FUNCTIONS, Tier.CROWN_BAB, patched_tier)
        monkeypatch.setattr(relu_bab, "decide_directions", patched_decide)

    def count(self, k: int, directions) -> None:
        layer = self.net.layers[k]
        # a dense layer of the head has one neuron per channel
        channels = np.arange(layer.out_features) if layer.channels is None else layer.channels
        obs, states = self.analysis.obs, self.analysis.states[k]
        for direction in directions:
            self.handed += 1
            self.conv += layer.channels is not None
            if direction.sign > 0:
                mates = channels == channels[direction.neuron]
                shown = obs.seen_pos[k][mates].any()
                shown |= (states[mates] == NeuronState.ACTIVE).any()
            else:
                shown = obs.seen_neg[k].any() | (states == NeuronState.INACTIVE).any()
            self.needless += int(shown)


def _structure(net: Network, result) -> list[tuple[list[int], bool]]:
    """Per ReLU layer: the dead channels and whether the ReLU is the identity (all active)."""
    return [(s.dead, len(s.active) == s.count) for s in channel_summaries(net, result)]


def test_the_focus_skips_directions_that_cannot_change_the_structure(monkeypatch):
    """torch legacy CNN, box centre ± 0.5, CROWN branch and bound as the only costly tier:
    unfocused, it is handed directions of channels already witnessed positive; focused, none,
    and the dead channels and identity ReLUs are the same. The neurons so left open are
    reported as not pursued, not as undecided."""
    _fixture, net, box, flat = _setup("torch_legacy_plain", 0.5)
    counter = _HandedToCrownBab(monkeypatch, net)
    unfocused = analyze_stability(flat, box, tiers=("crown-bab",))
    assert counter.needless > 0  # the check below is not vacuous
    assert unfocused.complete
    counter.handed = counter.needless = 0
    focused = analyze_stability(net, box, tiers=("crown-bab",))
    assert counter.needless == 0
    assert _structure(net, focused) == _structure(net, unfocused)
    skipped = [layer.not_pursued for layer in focused.layers if layer.not_pursued is not None]
    assert sum(int(mask.sum()) for mask in skipped) > 0
    summaries = summarize_layers(net, focused)
    assert sum(len(s.not_pursued) for s in summaries) == sum(int(m.sum()) for m in skipped)
    assert all(not s.undecided for s in summaries)
    undecided = sum(int((layer.states == NeuronState.UNDECIDED).sum()) for layer in focused.layers)
    assert undecided == sum(int(m.sum()) for m in skipped)


def test_the_focus_still_hands_open_structural_directions_on(monkeypatch):
    """torch legacy CNN with AveragePool, box centre ± 0.25: a conv direction that can still
    remove a channel does reach CROWN branch and bound, none that cannot, and the structure
    equals the unfocused analysis's."""
    _fixture, net, box, flat = _setup("torch_legacy_avgpool", 0.25)
    counter = _HandedToCrownBab(monkeypatch, net)
    focused = analyze_stability(net, box, tiers=("crown-bab",))
    assert counter.conv > 0 and counter.needless == 0
    unfocused = analyze_stability(flat, box, tiers=("crown-bab",))
    assert _structure(net, focused) == _structure(net, unfocused)


def test_the_compressed_cnn_is_the_same_with_and_without_the_focus(monkeypatch):
    """The written model (graph and metadata) does not depend on the focus."""
    fixture, _net, _box, _flat = _setup("torch_legacy_plain", 0.5)
    centre = (fixture.lower + fixture.upper) / 2
    domain = DomainSpec(
        lower=np.maximum(fixture.lower, centre - 0.5), upper=np.minimum(fixture.upper, centre + 0.5)
    )
    focused = compress(fixture.model, None, domain, AnalysisOptions())
    assert sum(len(layer.not_pursued) for layer in focused.report.layers) > 0

    def everything(self, k):
        size = self.net.layers[k].out_features
        return np.ones(size, dtype=bool), np.ones(size, dtype=bool)

    monkeypatch.setattr(state_module.Analysis, "structural", everything)
    unfocused = compress(fixture.model, None, domain, AnalysisOptions())
    assert sum(len(layer.not_pursued) for layer in unfocused.report.layers) == 0
    assert focused.model.graph == unfocused.model.graph
    assert focused.model.metadata_props == unfocused.model.metadata_props
    assert [x.channels.removed for x in focused.report.layers] == [
        x.channels.removed for x in unfocused.report.layers
    ]


def test_an_mlp_is_analysed_without_focus(monkeypatch):
    """No layer carries ``channels``: the focus never applies and nothing is 'not pursued'."""
    _fixture, _net, box, flat = _setup("torch_legacy_plain", 0.5)
    seen = []
    structural = state_module.Analysis.structural

    def spy(self, k):
        pos, neg = structural(self, k)
        seen.append(bool(pos.all() and neg.all()))
        return pos, neg

    monkeypatch.setattr(state_module.Analysis, "structural", spy)
    result = analyze_stability(flat, box, tiers=("crown-bab",))
    assert seen and all(seen)
    assert all(layer.not_pursued is None for layer in result.layers)
