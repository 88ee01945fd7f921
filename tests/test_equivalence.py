"""Equivalence checking that proves: identical, compressed, perturbed and thin-region models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from onnx_exact.core.box import Box
from onnx_exact.core.network import DenseLayer, InputMap, Network
from onnx_exact.equivalence.check import check_equivalence
from onnx_exact.equivalence.prover import prove_equivalence
from onnx_exact.equivalence.render import render_check
from onnx_exact.equivalence.results import CheckReport
from onnx_exact.io.onnx_reader import read_model
from onnx_exact.io.runtime import run_model
from onnx_exact.pipeline import AnalysisOptions, DomainSpec, compress
from onnx_exact.verify import compare_models


def gemm_mlp(
    weights: list[tuple[np.ndarray, np.ndarray]],
    *,
    scale: float | None = None,
    shift: float | None = None,
) -> onnx.ModelProto:
    """``x -> [Sub shift, Mul scale] -> (Gemm -> Relu)* -> Gemm`` with float32 weights."""
    nodes, inits = [], []
    current = "x"
    if shift is not None:
        inits.append(numpy_helper.from_array(np.array(shift, np.float32), "shift"))
        nodes.append(helper.make_node("Sub", [current, "shift"], ["centred"]))
        current = "centred"
    if scale is not None:
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), "scale"))
        nodes.append(helper.make_node("Mul", [current, "scale"], ["scaled"]))
        current = "scaled"
    for k, (weight, bias) in enumerate(weights):
        inits += [
            numpy_helper.from_array(np.asarray(weight, np.float32), f"W{k}"),
            numpy_helper.from_array(np.asarray(bias, np.float32), f"b{k}"),
        ]
        last = k == len(weights) - 1
        out = "y" if last else f"g{k}"
        nodes.append(helper.make_node("Gemm", [current, f"W{k}", f"b{k}"], [out], transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"h{k}"]))
            current = f"h{k}"
    n_in, n_out = weights[0][0].shape[1], weights[-1][0].shape[0]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def random_weights(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.normal(0, 1 / np.sqrt(a), (b, a)).astype(np.float32),
            rng.normal(0, 0.3, b).astype(np.float32),
        )
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    ]


def unit_box(n: int, lo: float = 0.0, hi: float = 1.0) -> Box:
    return Box(np.full(n, lo), np.full(n, hi), "x", "test")


# ---------------------------------------------------------------------------------- thin region

CENTRE = np.array([0.375, 0.625])  # float32-exact, away from the box centre and its corners
HALF_WIDTH = 1e-6
PEAK_WEIGHT = 1e6


def thin_region_weights(with_bump: bool):
    """Layer 1: ``relu(±(x_i - c_i))`` and two ordinary units; layer 2: the bump
    ``g = relu(eps - sum |x_i - c_i|)`` (active only on a diamond of half-diagonal 1e-6 around
    ``c``) and one ordinary unit; output ``1e6 g + p``. Without the bump, ``g`` is deleted."""
    w1 = np.array([[1, 0], [-1, 0], [0, 1], [0, -1], [0.7, 0.4], [-0.3, 0.9]], np.float64)
    b1 = np.array([-CENTRE[0], CENTRE[0], -CENTRE[1], CENTRE[1], -0.2, 0.1])
    bump = np.array([[-1, -1, -1, -1, 0, 0]], np.float64)
    ordinary = np.array([[0.5, 0.2, -0.4, 0.3, 1.1, -0.8]])
    w2 = np.concatenate([bump, ordinary]) if with_bump else ordinary
    b2 = np.array([HALF_WIDTH, 0.05]) if with_bump else np.array([0.05])
    w3 = np.array([[PEAK_WEIGHT, 1.0]]) if with_bump else np.array([[1.0]])
    b3 = np.zeros(1)
    return [(w1, b1), (w2, b2), (w3, b3)]


@pytest.fixture(scope="module")
def thin_models():
    return gemm_mlp(thin_region_weights(True)), gemm_mlp(thin_region_weights(False))


def test_sampling_misses_the_thin_region(thin_models):
    with_bump, without = thin_models
    report = compare_models(with_bump, without, unit_box(2), samples=100_000, seed=0)
    assert report.passed and report.samples >= 100_000


def test_proof_finds_the_thin_region_and_it_replays(thin_models, tmp_path):
    with_bump, without = thin_models
    target = tmp_path / "cex.npy"
    report = check_equivalence(
        with_bump, without, unit_box(2), samples=2000, counterexample_path=target
    )
    proof = report.proof
    assert proof.status == "counterexample" and not report.passed
    example = proof.counterexample
    assert np.all(np.abs(example.input - CENTRE) <= 2 * HALF_WIDTH)
    assert example.exact_difference > 0.1 and example.replayed_difference > 0.1
    saved = np.load(target)
    assert saved.shape == (2,) and saved.dtype == np.float32
    replay_a, replay_b = run_model(with_bump, saved)["y"], run_model(without, saved)["y"]
    assert abs(float(replay_a[0, 0] - replay_b[0, 0])) > 0.1
    text = json.dumps(report.to_json())
    assert '"counterexample"' in text and '"status": "counterexample"' in text


# ---------------------------------------------------------------------------------- identical


def test_identical_models_are_proved_by_the_symbolic_tier():
    model = gemm_mlp(random_weights((4, 12, 12, 3), seed=1))
    report = check_equivalence(model, model, unit_box(4, -1, 1), samples=500)
    assert report.passed and report.sampled.max_abs_diff == 0.0
    proof = report.proof
    assert proof.status == "proved" and proof.tiers == ["matched"]
    assert proof.bound <= 1e-12 and proof.binaries == 0
    assert proof.shared_neurons == proof.free_neurons > 0


def test_compressed_output_is_proved_to_round_off():
    model = gemm_mlp(random_weights((5, 24, 24, 24, 3), seed=2))
    box = Box(np.full(5, 0.2), np.full(5, 0.5), "x", "test")
    compressed = compress(model, None, DomainSpec(input_ranges=["[0.2,0.5]"]))
    assert compressed.reduction.network.param_count < read_model(model).network.param_count
    report = check_equivalence(
        model, compressed.model, box, samples=500, stability_a=compressed.analysis.stability
    )
    assert report.passed
    assert report.proof.status == "proved"
    assert report.proof.bound <= 1e-5 * 1e-1  # float32 re-rounding of folded weights at most


def test_perturbed_weight_is_found_by_sampling_and_proof():
    weights = random_weights((4, 10, 10, 2), seed=3)
    perturbed = [(w.copy(), b.copy()) for w, b in weights]
    perturbed[1][0][3, 2] += 1e-2
    a, b = gemm_mlp(weights), gemm_mlp(perturbed)
    report = check_equivalence(a, b, unit_box(4, -1, 1), samples=2000)
    assert not report.sampled.passed and not report.passed
    assert report.sampled.max_abs_diff > 1e-4
    assert report.proof.status == "counterexample"
    assert report.proof.counterexample.replayed_difference > 1e-5


# ---------------------------------------------------------------------------------- time limit


def test_time_limit_gives_not_proved_never_equivalent():
    """B differs from A by 1e-5 in one first-layer weight: too much to share the neuron, so the
    whole product MILP (~240 binaries) is needed; the true difference is far below tol, so the only
    honest answers are "proved" or "not proved", and 1 s is not enough to prove."""
    weights = random_weights((8, 48, 48, 48, 4), seed=4)
    nudged = [(w.copy(), b.copy()) for w, b in weights]
    nudged[0][0][5, 1] += np.float32(1e-5)
    box = unit_box(8, -1, 1)
    a, b = read_model(gemm_mlp(weights)).network, read_model(gemm_mlp(nudged)).network
    proof = prove_equivalence(a, b, box, 1e-2, time_limit=1.0)
    assert proof.status == "not proved" and proof.time_limit_hit
    assert proof.bound > 1e-2 and proof.counterexample is None
    assert any(d.status == "open" for d in proof.directions)
    assert "time limit" in " ".join(proof.notes)


# ---------------------------------------------------------------------------------- preprocessing


def test_different_preprocessing_is_proved():
    weights = random_weights((3, 10, 10, 2), seed=5)
    # A: x_net = 4 (x - 0.5); B: the same map folded into its first layer (float32-exact here).
    w0, b0 = weights[0]
    folded = [(w0 * np.float32(4.0), (b0 - 2.0 * w0.sum(axis=1)).astype(np.float32))]
    folded += weights[1:]
    a = gemm_mlp(weights, scale=4.0, shift=0.5)
    b = gemm_mlp(folded)
    assert not read_model(a).network.input_map.is_identity
    report = check_equivalence(a, b, unit_box(3), samples=500, atol=1e-4)
    assert report.sampled.passed
    assert report.proof.status == "proved" and report.proof.bound <= 1e-4


def test_network_level_api_and_identity_shift():
    """prove_equivalence on Networks: an explicit InputMap against the folded first layer."""
    rng = np.random.default_rng(6)
    w1, b1, w2, b2 = rng.normal(size=(6, 2)), rng.normal(size=6), rng.normal(size=(1, 6)), [0.0]
    net_a = Network(
        [DenseLayer(w1, b1, True, "l1"), DenseLayer(w2, b2, False, "out")],
        InputMap(np.array([2.0, 2.0]), np.array([-1.0, -1.0])),
    )
    net_b = Network(
        [DenseLayer(w1 * 2.0, b1 - w1.sum(axis=1), True, "l1"), DenseLayer(w2, b2, False, "o")],
        InputMap.identity(2),
    )
    proof = prove_equivalence(net_a, net_b, unit_box(2), 1e-9)
    assert proof.status == "proved" and proof.bound <= 1e-9


# ---------------------------------------------------------------------------------- rendering


def test_render_and_json(thin_models):
    model = thin_models[1]
    report = check_equivalence(model, model, unit_box(2), samples=100)
    assert isinstance(report, CheckReport)
    console = Console(record=True, width=160)
    render_check(report, console)
    text = console.export_text()
    assert "PASSED | Output: 'y'" in text and "proved equivalent on the box up to" in text
    data = json.loads(json.dumps(report.to_json()))
    assert data["proof"]["status"] == "proved" and data["sampled"]["outputs"][0]["name"] == "y"


# ---------------------------------------------------------------------------------- shared models


SHARED_CASES = [
    # (model, box, atol). ACAS Xu's outputs reach ~1e3 on its boxes, and the compressor's float32
    # re-rounding of folded weights (relative ~6e-8), amplified through six layers, leaves a proved
    # bound of ~1e-4 on prop_3 (measured 6e-5 .. 1e-4): the proof is asked for 1e-3 there.
    ("mnistfc/mnist-net_256x2.onnx", "mnistfc/mnist-net_256x2.prop_0_0.03.npz", 1e-5),
    (
        "acasxu/ACASXU_run2a_1_1_batch_2000.onnx",
        "acasxu/ACASXU_run2a_1_1_batch_2000.prop_3.npz",
        1e-3,
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("model_file", "box_file", "atol"), SHARED_CASES)
def test_shared_model_versus_its_compressed_output(model_file, box_file, atol, shared_models):
    path = shared_models / model_file
    compressed = compress(
        path,
        None,
        DomainSpec(range_file=str(shared_models / box_file)),
        AnalysisOptions(time_limit=5.0),
        samples=200,
    )
    report = check_equivalence(
        path,
        compressed.model,
        compressed.analysis.box,
        samples=500,
        atol=atol,
        stability_a=compressed.analysis.stability,
        time_limit=20.0,
    )
    assert report.passed and report.proof.status == "proved"
    assert report.proof.tiers == ["stable-units"] and report.proof.binaries == 0


def test_split_neurons_are_shared_without_binaries():
    """B replaces ``c relu(y)`` by ``c/3 relu(y) + c/3 relu(2y)``: equal by positive homogeneity."""
    weights = random_weights((3, 6, 2), seed=7)
    (w1, b1), (w2, b2) = weights
    split_w1 = np.concatenate([w1, 2 * w1[:1]])
    split_b1 = np.concatenate([b1, 2 * b1[:1]])
    split_w2 = np.concatenate([w2, w2[:, :1] / 3], axis=1)
    split_w2[:, 0] /= 3
    a = read_model(gemm_mlp(weights)).network
    b = read_model(gemm_mlp([(split_w1, split_b1), (split_w2, b2)])).network
    proof = prove_equivalence(a, b, unit_box(3, -1, 1), 1e-6)
    assert proof.status == "proved" and proof.tiers == ["matched"] and proof.binaries == 0


def test_a_model_the_reader_rejects_is_sampled_but_not_proved():
    nodes = [
        helper.make_node("Gemm", ["x", "W", "b"], ["g"], transB=1),
        helper.make_node("Tanh", ["g"], ["t"]),
        helper.make_node("Gemm", ["t", "W", "b"], ["y"], transB=1),
    ]
    constants = [
        numpy_helper.from_array(np.eye(2, dtype=np.float32), "W"),
        numpy_helper.from_array(np.zeros(2, np.float32), "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "tanh",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    report = check_equivalence(model, model, unit_box(2), samples=100)
    assert report.passed and report.proof.status == "not applicable"
    assert "Tanh" in report.proof.notes[0]
    json.dumps(report.to_json(), allow_nan=False)


def test_models_with_a_tail_prove_the_tensor_feeding_it():
    model = gemm_mlp(random_weights((3, 8, 4), seed=8))
    model.graph.node.append(helper.make_node("Softmax", ["y"], ["probabilities"], axis=1))
    del model.graph.output[:]
    model.graph.output.append(
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4])
    )
    report = check_equivalence(model, model, unit_box(3), samples=200)
    assert report.passed and report.proof.status == "proved"
    assert report.proof.output_tensor == "y"
    assert any("tails" in note for note in report.proof.notes)


def test_the_proof_over_two_networks_loads_no_onnx():
    """``prove_equivalence`` works on Networks: importing it loads neither onnx nor onnxruntime
    (only ``check``, which reads and replays models, does)."""
    import subprocess
    import sys

    code = (
        "import sys, onnx_exact.equivalence.prover; "
        "print(sorted(m for m in ('onnx', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
