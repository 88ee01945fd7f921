"""The correspondence between two networks: matched, stable and one-sided units, and the method
each direction of the proof names (matched, stable-units, milp)."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console
from test_equivalence import gemm_mlp, random_weights, unit_box

from onnx_exact.core.box import Box
from onnx_exact.core.network import DenseLayer, InputMap, Network
from onnx_exact.core.verdicts import NeuronState
from onnx_exact.equivalence import correspondence
from onnx_exact.equivalence.canonical import Canonical
from onnx_exact.equivalence.check import check_equivalence
from onnx_exact.equivalence.correspondence import (
    correspondence_of,
    prove_units_stable,
    quick_stability,
)
from onnx_exact.equivalence.prover import prove_equivalence
from onnx_exact.equivalence.render import render_check
from onnx_exact.io.onnx_reader import read_model
from onnx_exact.stability import analyze_stability


def mlp(weights) -> Network:
    layers = [DenseLayer(w, b, k < len(weights) - 1, f"L{k}") for k, (w, b) in enumerate(weights)]
    return Network(layers, InputMap.identity(layers[0].in_features))


def permuted_rescaled(weights, seed=3):
    """Hidden units permuted and scaled by ``c > 0``; the next layer's columns absorb ``1/c``."""
    rng = np.random.default_rng(seed)
    out = [(np.array(w, np.float64), np.array(b, np.float64)) for w, b in weights]
    for k in range(len(out) - 1):
        w, b = out[k]
        perm = rng.permutation(w.shape[0])
        scale = rng.uniform(0.25, 4.0, w.shape[0])
        out[k] = ((w * scale[:, None])[perm], (b * scale)[perm])
        w_next, b_next = out[k + 1]
        out[k + 1] = ((w_next / scale[None, :])[:, perm], b_next)
    return [(w.astype(np.float32), b.astype(np.float32)) for w, b in out]


def cheap(net: Network, box) -> object:
    return analyze_stability(net, box, tiers=())


def test_permuted_and_rescaled_copy_is_matched_unit_for_unit():
    weights = random_weights((6, 20, 20, 4), seed=11)
    a = read_model(gemm_mlp(weights)).network
    b = read_model(gemm_mlp(permuted_rescaled(weights))).network
    box = unit_box(6, -1, 1)
    proof = prove_equivalence(a, b, box, 1e-5)
    assert proof.status == "proved" and proof.tiers == ["matched"] and proof.binaries == 0
    matches = proof.correspondence
    assert matches.complete and matches.targeted == 0
    assert matches.count("matched", "A") == matches.count("matched", "B") == 40
    assert proof.bound < 1e-5


def test_units_present_in_one_network_are_roles_of_the_walk():
    """B drops A's dead unit: in the walk it is A's stable unit, everything else is matched."""
    weights = random_weights((3, 8, 2), seed=5)
    (w1, b1), (w2, b2) = weights
    w1 = np.concatenate([w1, np.ones((1, 3), np.float32)])
    b1 = np.concatenate([b1, np.float32([-10.0])])  # dead on [-1, 1]^3
    w2 = np.concatenate([w2, np.full((2, 1), 5.0, np.float32)], axis=1)
    a, b = mlp([(w1, b1), (w2, b2)]), mlp(weights)
    box = unit_box(3, -1, 1)
    canonical = Canonical(box)
    canonical.add_network(a, cheap(a, box), "A")
    canonical.add_network(b, cheap(b, box), "B")
    matches = correspondence_of(canonical)
    layer_a = next(layer for layer in matches.layers if layer.network == "A")
    assert layer_a.stable.tolist() == [8]
    assert layer_a.one_sided.size == 0 and not matches.complete
    proof = prove_equivalence(a, b, box, 1e-6)
    assert proof.status == "proved" and proof.tiers == ["stable-units"]


def test_one_sided_units_the_cheap_tiers_leave_open_are_targeted_and_proved():
    """A's extra unit is dead on the box, but A's given analysis left it UNDECIDED: the proof
    runs the stability engine on exactly that unit and needs no binary."""
    weights = random_weights((4, 10, 10, 3), seed=2)
    (w1, b1), (w2, b2), (w3, b3) = weights
    extra = np.concatenate([w2, np.full((1, 10), 0.1, np.float32)])
    a = mlp(
        [
            (w1, b1),
            (extra, np.concatenate([b2, np.float32([-100.0])])),
            (np.concatenate([w3, np.full((3, 1), 7.0, np.float32)], axis=1), b3),
        ]
    )
    b = mlp(weights)
    box = unit_box(4, 0, 1)
    given = cheap(a, box)
    layer = given.layers[1]
    states, lower, upper = layer.states.copy(), layer.lower.copy(), layer.upper.copy()
    states[10], lower[10], upper[10] = NeuronState.UNDECIDED, -1e3, 1e3
    given.layers[1] = replace(layer, states=states, lower=lower, upper=upper)
    proof = prove_equivalence(a, b, box, 1e-6, stability_a=given, stability_b=cheap(b, box))
    assert proof.status == "proved" and proof.tiers == ["stable-units"]
    assert proof.correspondence.targeted == 1 and proof.correspondence.proved_stable == 1
    assert proof.binaries == 0
    assert given.layers[1].states[10] == NeuronState.UNDECIDED  # the caller's result is kept


def test_prove_units_stable_decides_only_the_targets_with_the_solver_tiers(monkeypatch):
    """(Its 3 inputs taken as many: few inputs go to the input splitting first, tested below.)"""
    monkeypatch.setattr(correspondence, "SPLIT_MAX_INPUTS", 0)
    weights = random_weights((3, 6, 6, 2), seed=4)
    (w1, b1), (w2, b2), (w3, b3) = weights
    b2 = b2.copy()
    b2[2] = -50.0  # dead
    net = mlp([(w1, b1), (w2, b2), (w3, b3)])
    box = unit_box(3, -1, 1)
    start = cheap(net, box)
    layer = start.layers[1]
    states, lower, upper = layer.states.copy(), layer.lower.copy(), layer.upper.copy()
    states[[2, 3]], lower[[2, 3]], upper[[2, 3]] = NeuronState.UNDECIDED, -1e3, 1e3
    start.layers[1] = replace(layer, states=states, lower=lower, upper=upper)
    merged, proved = prove_units_stable(net, box, start, {1: np.array([2])}, 30.0)
    assert proved == 1 and merged.layers[1].states[2] == NeuronState.INACTIVE
    assert merged.layers[1].decided_by[2] in ("lp", "lp+cuts", "bab", "milp")
    assert merged.layers[1].upper[2] < 0.0
    assert merged.layers[1].states[3] == NeuronState.UNDECIDED  # not a target: untouched
    assert start.layers[1].states[2] == NeuronState.UNDECIDED  # the input is not changed
    assert merged.layers[0] is start.layers[0]


def test_prove_units_stable_splits_the_input_of_a_few_input_network():
    """``relu(x0 + x1) + relu(x0 - x1) - 2.5 <= -0.5`` on ``[-1, 1]^2`` is dead, which the
    triangle relaxation of the whole box cannot show (it bounds it by +0.5); a few-input network
    gets the input splitting first, which proves it, with a sound bound below the margin."""
    first = (np.array([[1.0, 1.0], [1.0, -1.0]]), np.zeros(2))
    second = (np.array([[1.0, 1.0]]), np.array([-2.5]))
    net = mlp([first, second, (np.ones((1, 1)), np.zeros(1))])
    box = unit_box(2, -1, 1)
    start = cheap(net, box)
    layer = start.layers[1]
    states, lower, upper = layer.states.copy(), layer.lower.copy(), layer.upper.copy()
    states[0], lower[0], upper[0] = NeuronState.UNDECIDED, -1e3, 1e3
    start.layers[1] = replace(layer, states=states, lower=lower, upper=upper)
    merged, proved = prove_units_stable(net, box, start, {1: np.array([0])}, 30.0)
    assert proved == 1 and merged.layers[1].states[0] == NeuronState.INACTIVE
    assert merged.layers[1].decided_by[0] == "split"
    assert -0.5 - 1e-9 <= merged.layers[1].upper[0] < 0.0


def test_an_all_active_layer_folded_away_is_proved_by_stable_units():
    """A: L1 (all active on the box) -> ReLU -> L2 -> ReLU -> L3; B: (L2 o L1) -> ReLU -> L3."""
    rng = np.random.default_rng(8)
    w1 = rng.uniform(0.1, 1.0, (7, 4))
    b1 = rng.uniform(0.5, 1.0, 7)  # x in [0, 1]^4: every unit of L1 is positive
    (w2, b2), (w3, b3) = random_weights((7, 9, 3), seed=9)
    w2, b2, w3, b3 = (np.asarray(v, np.float64) for v in (w2, b2, w3, b3))
    a = mlp([(w1, b1), (w2, b2), (w3, b3)])
    b = mlp([(w2 @ w1, w2 @ b1 + b2), (w3, b3)])
    proof = prove_equivalence(a, b, unit_box(4), 1e-9)
    assert proof.status == "proved" and proof.tiers == ["stable-units"] and proof.binaries == 0
    assert proof.correspondence.count("stable", "A") >= 7


def test_targets_go_layer_by_layer_and_a_proved_layer_makes_the_next_one_match():
    """As above, with A's analysis leaving every unit of L1 and L2 undecided: once L1 is proved
    all active, L2 matches B's merged layer, so L2 is never targeted."""
    rng = np.random.default_rng(8)
    w1 = rng.uniform(0.1, 1.0, (7, 4))
    b1 = rng.uniform(0.5, 1.0, 7)
    (w2, b2), (w3, b3) = random_weights((7, 9, 3), seed=9)
    w2, b2, w3, b3 = (np.asarray(v, np.float64) for v in (w2, b2, w3, b3))
    a = mlp([(w1, b1), (w2, b2), (w3, b3)])
    b = mlp([(w2 @ w1, w2 @ b1 + b2), (w3, b3)])
    box = unit_box(4)
    given = cheap(a, box)
    for k in (0, 1):
        layer = given.layers[k]
        size = layer.states.size
        given.layers[k] = replace(
            layer,
            states=np.full(size, NeuronState.UNDECIDED, dtype=layer.states.dtype),
            lower=np.full(size, -1e3),
            upper=np.full(size, 1e3),
        )
    proof = prove_equivalence(a, b, box, 1e-9, stability_a=given)
    assert proof.status == "proved" and proof.tiers == ["stable-units"]
    assert proof.correspondence.targeted == 7 and proof.correspondence.proved_stable == 7


def signed_split_pair():
    """A unit always active in A (``h = y + 5``) is written in B as ``relu(y) - relu(-y) + 5``
    through two unstable units: equal, but no unit of B's pair matches A's, so only the MILP can
    prove it."""
    weights = random_weights((3, 6, 2), seed=6)
    (w1, b1), (w2, b2) = (tuple(np.asarray(v, np.float64) for v in pair) for pair in weights)
    active_w1 = np.concatenate([w1, w1[:1]])
    active_b1 = np.concatenate([b1, b1[:1] + 5.0])
    a_w2 = np.concatenate([w2, np.array([[2.0], [-1.0]])], axis=1)
    a_b2 = b2 - np.array([2.0, -1.0]) * 5.0
    a = mlp([(active_w1, active_b1), (a_w2, a_b2)])
    split_w1 = np.concatenate([w1, w1[:1], -w1[:1]])
    split_b1 = np.concatenate([b1, b1[:1], -b1[:1]])
    b_w2 = np.concatenate([w2, np.array([[2.0, -2.0], [-1.0, 1.0]])], axis=1)
    b = mlp([(split_w1, split_b1), (b_w2, b2)])
    return a, b


def test_the_milp_proves_what_is_not_matched_serially_and_in_workers():
    a, b = signed_split_pair()
    box = unit_box(3, -1, 1)
    x = np.random.default_rng(0).uniform(-1, 1, (200, 3))
    assert np.abs(a.forward(x) - b.forward(x)).max() < 1e-9
    serial = prove_equivalence(a, b, box, 1e-6)
    parallel = prove_equivalence(a, b, box, 1e-6, jobs=2)
    for proof in (serial, parallel):
        assert proof.status == "proved" and "milp" in proof.tiers and proof.binaries > 0
        assert proof.correspondence.count("one_sided") > 0
        assert not proof.open_directions
    seen = []
    prove_equivalence(a, b, box, 1e-6, progress=lambda *args: seen.append(args))
    assert seen and seen[-1][0] == "proof" and seen[-1][1] == seen[-1][2]


def test_json_names_the_method_per_direction_and_what_stayed_open():
    weights = random_weights((5, 12, 3), seed=12)
    model = gemm_mlp(weights)
    report = check_equivalence(
        model, gemm_mlp(permuted_rescaled(weights)), unit_box(5, -1, 1), samples=300
    )
    proof = json.loads(json.dumps(report.to_json()))["proof"]
    assert proof["status"] == "proved" and proof["open"] == []
    assert proof["methods"] == {"matched": 6, "stable-units": 0, "milp": 0}
    assert {d["tier"] for d in proof["directions"]} == {"matched"}
    assert proof["correspondence"]["one_sided"] == {"A": 0, "B": 0}
    console = Console(record=True, width=200)
    render_check(report, console)
    text = console.export_text()
    assert "by matched" in text and "correspondence: matched A 12, B 12" in text


# ---------------------------------------------------------------------------- bench/check.py pairs


def load_check_bench():
    path = Path(__file__).resolve().parent.parent / "bench" / "check.py"
    spec = importlib.util.spec_from_file_location("bench_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_pairs_are_what_they_claim(tmp_path):
    """The builders of ``bench/check.py`` on a 20-30-30-5 MLP: the equal pairs are equal (and
    proved with the method they exercise), the planted thin region differs only on a sliver that
    the proof finds."""
    bench = load_check_bench()
    weights = [
        (w.astype(np.float64), b.astype(np.float64))
        for w, b in random_weights((20, 30, 30, 5), seed=21)
    ]
    rng = np.random.default_rng(0)
    centre = rng.uniform(0.2, 0.8, 20)
    lo, hi = centre - 0.05, centre + 0.05
    box = Box(lo, hi, "x", "test")
    base = mlp(weights)
    x = rng.uniform(lo, hi, (500, 20))

    active = mlp(bench.with_active_layer(weights, (lo, hi)))
    assert np.abs(active.forward(x) - base.forward(x)).max() < 1e-9
    proof = prove_equivalence(active, base, box, 1e-6)
    assert proof.status == "proved" and proof.tiers == ["stable-units"]

    rescaled = mlp(bench.permuted_rescaled(weights))
    assert prove_equivalence(base, rescaled, box, 1e-6).tiers == ["matched"]

    thin = mlp(bench.differ_thin(weights, (lo, hi)))
    assert np.abs(thin.forward(x) - base.forward(x)).max() < 1e-12
    proof = prove_equivalence(base, thin, box, 1e-5)
    assert proof.status == "counterexample"
    assert proof.counterexample.exact_difference < -1e-3

    doc = tmp_path / "b.md"
    doc.write_text("# x\n\n<!-- bench:other:start -->\nkeep\n<!-- bench:other:end -->\n")
    bench.write_markdown(doc, "check", "## check\nold\n")
    bench.write_markdown(doc, "check", "## check\nnew\n")
    text = doc.read_text()
    assert "keep" in text and "new" in text and "old" not in text


def test_quick_stability_agrees_with_the_engine_where_both_decided():
    """Bounds and forward passes only: never a verdict the full analysis contradicts, most of
    its stable neurons, and witnesses inside the box."""
    weights = random_weights((6, 30, 30, 4), seed=13)
    net = mlp([(w, b + 0.5 * np.sign(b)) for w, b in weights])
    box = unit_box(6, -0.3, 0.3)
    quick = quick_stability(net, box)
    full = analyze_stability(net, box)
    stable = (NeuronState.ACTIVE, NeuronState.INACTIVE)
    found = 0
    for mine, theirs in zip(quick.layers[:-1], full.layers[:-1], strict=True):
        both = (mine.states != NeuronState.UNDECIDED) & (theirs.states != NeuronState.UNDECIDED)
        assert np.all(mine.states[both] == theirs.states[both])
        found += int(np.isin(mine.states, stable).sum())
        assert np.all(mine.lower <= mine.upper)
    assert found >= 10
    assert quick.layers[-1].decided_by.tolist() == ["linear"] * 4
    assert np.all((quick.witnesses >= -0.3) & (quick.witnesses <= 0.3))
