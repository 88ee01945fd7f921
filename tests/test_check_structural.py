"""The structural proof of ``check``: ``B`` is ``A`` with units removed (what channel pruning
writes), proved from ``A``'s verdicts on the removed units alone, with a bound of exactly 0."""

from __future__ import annotations

import numpy as np
from cnn_fixtures import VALID_BUILDERS

from onnx_exact import AnalysisOptions, DomainSpec, compress
from onnx_exact.core.box import Box
from onnx_exact.core.network import DenseLayer, InputMap, Network
from onnx_exact.equivalence import canonical, correspondence
from onnx_exact.equivalence import check as check_module
from onnx_exact.equivalence.canonical import Canonical
from onnx_exact.equivalence.check import check_equivalence
from onnx_exact.equivalence.prover import prove_equivalence
from onnx_exact.equivalence.structural import align
from onnx_exact.io.onnx_reader import read_model


def _mlp(sizes, seed=0, dead=()) -> Network:
    """Random float32-valued layers; the hidden units ``dead`` (layer, unit) get bias -100."""
    rng = np.random.default_rng(seed)
    layers = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        weight = rng.normal(0, 1 / np.sqrt(n_in), (n_out, n_in)).astype(np.float32)
        bias = rng.normal(0, 0.3, n_out).astype(np.float32)
        for layer, unit in dead:
            if layer == k:
                bias[unit] = -100.0
        layers.append(DenseLayer(weight, bias, k < len(sizes) - 2, f"L{k}"))
    return Network(layers, InputMap.identity(sizes[0]))


def _without(net: Network, layer: int, units) -> Network:
    """``net`` with hidden ``units`` of ``layer`` deleted (their row and the next layer's column)."""
    layers = [DenseLayer(la.weight.copy(), la.bias.copy(), la.relu, la.name) for la in net.layers]
    keep = np.setdiff1d(np.arange(layers[layer].out_features), units)
    current, following = layers[layer], layers[layer + 1]
    layers[layer] = DenseLayer(current.weight[keep], current.bias[keep], True, current.name)
    layers[layer + 1] = DenseLayer(
        following.weight[:, keep], following.bias, following.relu, following.name
    )
    return Network(layers, net.input_map)


def _box(n: int) -> Box:
    return Box(-np.ones(n), np.ones(n), "x", "test")


def test_align_finds_the_removed_units_and_refuses_a_changed_weight():
    a = _mlp((5, 12, 8, 3), dead=[(0, 2), (0, 7), (1, 4)])
    b = _without(_without(a, 0, [2, 7]), 1, [4])
    alignment = align(a, b)
    assert alignment is not None and alignment.removed(a) == 3
    assert {k: v.tolist() for k, v in alignment.targets().items()} == {0: [2, 7], 1: [4]}
    assert alignment.layers[0].rows.tolist() == [0, 1, 3, 4, 5, 6, 8, 9, 10, 11]
    changed = _without(_without(a, 0, [2, 7]), 1, [4])
    changed.layers[1].weight[3, 2] = np.nextafter(changed.layers[1].weight[3, 2], np.inf)
    assert align(a, changed) is None  # one ulp is a different function: no structural proof
    swapped = _without(a, 0, [])
    swapped.layers[2].weight[[0, 1]] = swapped.layers[2].weight[[1, 0]]
    assert align(a, swapped) is None  # output coordinates must stay in place


def test_a_pruned_pair_is_proved_exactly_and_a_live_unit_removed_is_not():
    a = _mlp((5, 12, 8, 3), dead=[(0, 2), (1, 4)])
    box = _box(5)
    pruned = _without(_without(a, 0, [2]), 1, [4])
    proof = prove_equivalence(a, pruned, box, 1e-5)
    assert proof.status == "proved" and proof.bound == 0.0 and proof.tiers == ["stable-units"]
    assert proof.binaries == 0 and "milp" not in proof.timings_s
    assert any("structural correspondence" in note for note in proof.notes)
    assert proof.correspondence.count("stable", "A") == 2
    assert proof.correspondence.count("one_sided") == 0
    swapped = prove_equivalence(pruned, a, box, 1e-5)  # check small.onnx big.onnx
    assert swapped.status == "proved" and swapped.bound == 0.0
    assert swapped.correspondence.count("stable", "B") == 2
    assert swapped.correspondence.count("stable", "A") == 0
    assert "A is B with 2 hidden units removed" in swapped.notes[-1]
    live = _without(a, 0, [0])  # unit 0 of layer 0 is not dead: removing it changes f
    assert prove_equivalence(a, live, box, 1e-5).status != "proved"


def test_quick_stability_with_targets_runs_crown_only_up_to_the_deepest_target(monkeypatch):
    net = _mlp((6, 30, 30, 30, 30, 3), seed=5)
    calls = []
    crown = correspondence.symbolic_bounds

    def counting(net, box, bounds, k, rows):
        calls.append((k, rows.tolist()))
        return crown(net, box, bounds, k, rows)

    monkeypatch.setattr(correspondence, "symbolic_bounds", counting)
    full = correspondence.quick_stability(net, _box(6))
    assert sorted({k for k, _ in calls}) == [1, 2, 3]  # open rows in every hidden layer
    target = np.array(next(rows for k, rows in calls if k == 2)[:3])
    calls.clear()
    result = correspondence.quick_stability(net, _box(6), targets={2: target})
    assert max(k for k, _ in calls) == 2
    assert all(set(rows) <= set(target.tolist()) for k, rows in calls if k == 2)
    # the layers below the target got CROWN as before, so the target's verdicts are as tight
    np.testing.assert_array_equal(result.layers[2].upper[target], full.layers[2].upper[target])
    calls.clear()
    late = correspondence.quick_stability(net, _box(6), targets={2: target}, deadline=-np.inf)
    assert not calls  # past the deadline: interval verdicts only, the time limit holds
    assert np.all(late.layers[2].upper[target] >= result.layers[2].upper[target])


def test_check_of_a_pruned_residual_cnn_analyses_only_the_reference(monkeypatch):
    """``check IN OUT`` on what ``compress`` wrote for a residual CNN: proved structurally with a
    bound of 0, one bounds pass (of A, up to its deepest removed unit) and no analysis of B; the
    correspondence counts the graph's units, never the auxiliary passthrough neurons."""
    fixture = VALID_BUILDERS["resnet_blocks"]()
    domain = DomainSpec(lower=fixture.lower, upper=fixture.upper)
    written = compress(fixture.model, None, domain, AnalysisOptions(time_limit=5, jobs=1)).model
    analysed = []
    quick = check_module.quick_stability

    def recording(net, box, seed=0, targets=None, deadline=np.inf):
        analysed.append(targets)
        return quick(net, box, seed, targets, deadline)

    monkeypatch.setattr(check_module, "quick_stability", recording)
    box = Box(fixture.lower, fixture.upper, "input", "test")
    report = check_equivalence(fixture.model, written, box, samples=200, time_limit=60)
    proof = report.proof
    assert report.passed and proof.status == "proved" and proof.bound == 0.0
    assert len(analysed) == 1 and analysed[0]  # A only, with the removed units as targets
    net_a = read_model(fixture.model).network
    layers = proof.correspondence.to_json()["layers"]
    for entry in (e for e in layers if e["network"] == "A"):
        assert entry["size"] == int(net_a.layers[entry["layer"]].real.sum())
    removed = proof.correspondence.count("stable", "A")
    assert removed > 0 and f"B is A with {removed} hidden units removed" in proof.notes[-1]
    analysed.clear()
    reverse = check_equivalence(written, fixture.model, box, samples=200, time_limit=60)
    assert reverse.proof.status == "proved" and reverse.proof.bound == 0.0
    assert len(analysed) == 1 and analysed[0]  # the full model (B here) only
    assert reverse.proof.correspondence.count("stable", "B") == removed
    analysed.clear()
    sampled_only = check_equivalence(fixture.model, written, box, samples=200, prove=False)
    assert sampled_only.passed and sampled_only.proof is None
    assert len(analysed) == 1 and analysed[0]  # witnesses from A's targets, B not analysed


def test_the_canonical_correspondence_does_not_count_auxiliary_neurons():
    """The canonical walk (the fallback) shares the passthrough neurons like any other, but
    the correspondence's layer sizes and role counts are the graph's units only."""
    fixture = VALID_BUILDERS["resnet_blocks"]()
    net = read_model(fixture.model).network
    assert any(layer.auxiliary is not None for layer in net.layers)
    box = Box(fixture.lower, fixture.upper, "input", "test")
    stability = correspondence.quick_stability(net, box)
    canonical = Canonical(box)
    canonical.add_network(net, stability, "A")
    canonical.add_network(net, stability, "B")
    matches = correspondence.correspondence_of(canonical)
    for layer in matches.layers:
        assert layer.size == int(net.layers[layer.layer].real.sum()), layer.name
    units = sum(int(net.layers[k].real.sum()) for k in net.relu_layer_indices)
    assert sum(layer.size for layer in matches.layers) == 2 * units


def test_compress_prove_on_a_cnn_reuses_its_analysis_for_the_structural_proof():
    """``compress --prove`` hands its own verdicts to the proof: the pruned CNN is proved with
    bound 0 from them (no other analysis, no MILP)."""
    fixture = VALID_BUILDERS["residual_block"]()
    domain = DomainSpec(lower=fixture.lower, upper=fixture.upper)
    options = AnalysisOptions(time_limit=5, jobs=1)
    report = compress(fixture.model, None, domain, options, prove=True).report
    proof = report.proof
    assert report.passed and proof.status == "proved" and proof.bound == 0.0
    assert any("structural correspondence" in note for note in proof.notes)
    assert set(proof.timings_s) == {"stability"}  # no exact tier, no canonical walk, no MILP


def test_a_canonical_walk_beyond_its_memory_limit_is_not_proved_instead_of_run(monkeypatch):
    """A pair that is not one pruned from the other goes to the canonical walk; when that walk
    would exceed ``WALK_MAX_BYTES`` the proof says "not proved" (exit 4) before allocating."""
    a = _mlp((5, 12, 8, 3), seed=2)
    b = _without(a, 0, [])
    b.layers[0].weight[3] *= 2.0  # unit 3 rescaled by 2, its outgoing column by 1/2: same f
    b.layers[0].bias[3] *= 2.0
    b.layers[1].weight[:, 3] /= 2.0
    assert align(a, b) is None
    box = _box(5)
    assert prove_equivalence(a, b, box, 1e-5).status == "proved"
    monkeypatch.setattr(canonical, "WALK_MAX_BYTES", 10_000)
    proof = prove_equivalence(a, b, box, 1e-5)
    assert proof.status == "not proved" and not proof.proved
    assert any("canonical form" in note for note in proof.notes)
    assert {d.status for d in proof.directions} == {"open"}


def _dead_beyond_bounds() -> tuple[Network, Network]:
    """``A``: ``h = relu(x0), relu(x0), relu(x1)``, then ``relu(h0 - h1 - 0.1)`` (dead: always
    -0.1, but no interval or CROWN bound shows it) and ``relu(h2 + 0.2)``; ``B`` without it."""
    identity = InputMap.identity(2)
    first = DenseLayer(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), np.zeros(3), True, "L0")
    a = Network(
        [
            first,
            DenseLayer(np.array([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]]), [-0.1, 0.2], True, "L1"),
            DenseLayer(np.array([[1.0, 1.0]]), [0.0], False, "L2"),
        ],
        identity,
    )
    return a, _without(a, 1, [0])


def test_a_removed_unit_only_an_exact_tier_proves_dead_is_proved_or_not_proved_in_time():
    a, b = _dead_beyond_bounds()
    box = _box(2)
    assert {k: v.tolist() for k, v in align(a, b).targets().items()} == {1: [0]}
    proof = prove_equivalence(a, b, box, 1e-5)
    assert proof.status == "proved" and proof.bound == 0.0 and "stable-units" in proof.timings_s
    late = prove_equivalence(a, b, box, 1e-5, time_limit=0.0)
    assert late.status == "not proved" and late.time_limit_hit
    assert any("not proved inactive within the time limit" in note for note in late.notes)
