"""Sampled equivalence with onnxruntime: layouts, tolerances, label and map outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_exact.core.box import Box
from onnx_exact.core.errors import UsageError, VerificationError
from onnx_exact.io.runtime import onnxruntime_session, run_model
from onnx_exact.verify import cast_inside, compare_models, verification_inputs

N_IN, N_HIDDEN, N_OUT = 4, 6, 3


def mlp_weights(
    seed: int = 0, sizes=(N_IN, N_HIDDEN, N_OUT)
) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.standard_normal((n_out, n_in)).astype(np.float32),
            rng.standard_normal(n_out).astype(np.float32),
        )
        for n_in, n_out in zip(sizes, sizes[1:], strict=False)
    ]


def mlp_model(
    weights,
    input_dims: list,
    *,
    label_output: bool = False,
    zipmap_output: bool = False,
) -> onnx.ModelProto:
    """A ReLU MLP ``x -> [Flatten] -> (MatMul + Add -> Relu)* -> MatMul + Add``.

    ``input_dims`` is the declared input shape: ``["N", n]``, ``[1, 1, 1, n]``, ``[n]``, ...
    A rank-1 input stays rank 1 (MatMul of a vector); any other is flattened from axis 1.
    Optional tails: an ArgMax label output, or Softmax + ZipMap (ai.onnx.ml).
    """
    nodes, inits = [], []
    rank1 = len(input_dims) == 1
    current = "x"
    if not rank1:
        nodes.append(helper.make_node("Flatten", ["x"], ["flat"], axis=1))
        current = "flat"
    for k, (weight, bias) in enumerate(weights):
        inits += [
            numpy_helper.from_array(weight.T.copy(), f"W{k}"),
            numpy_helper.from_array(bias, f"b{k}"),
        ]
        nodes.append(helper.make_node("MatMul", [current, f"W{k}"], [f"mm{k}"]))
        nodes.append(helper.make_node("Add", [f"mm{k}", f"b{k}"], [f"pre{k}"]))
        current = f"pre{k}"
        if k < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"h{k}"]))
            current = f"h{k}"
    nodes.append(helper.make_node("Identity", [current], ["logits"]))
    batch = [] if rank1 else [input_dims[0]]
    n_out = weights[-1][0].shape[0]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, batch + [n_out])]
    opsets = [helper.make_opsetid("", 17)]
    if label_output:
        nodes.append(helper.make_node("ArgMax", ["logits"], ["label"], axis=-1, keepdims=0))
        outputs.append(helper.make_tensor_value_info("label", TensorProto.INT64, batch))
    if zipmap_output:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
        nodes.append(
            helper.make_node(
                "ZipMap",
                ["probabilities"],
                ["scores"],
                domain="ai.onnx.ml",
                classlabels_int64s=list(range(n_out)),
            )
        )
        outputs.append(
            helper.make_value_info(
                "scores",
                helper.make_sequence_type_proto(
                    helper.make_map_type_proto(
                        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
                    )
                ),
            )
        )
        opsets.append(helper.make_opsetid("ai.onnx.ml", 3))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_dims)],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def perturbed(weights, layer: int = 0, index=(0, 0), delta: float = 1e-2):
    out = [(w.copy(), b.copy()) for w, b in weights]
    out[layer][0][index] += np.float32(delta)
    return out


BOX = Box(np.full(N_IN, -1.0), np.full(N_IN, 1.0), "x", "test")


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    "dims",
    [["N", N_IN], [None, N_IN], [1, 1, 1, N_IN], [1, N_IN, 1], [N_IN], [2, N_IN]],
    ids=["named-batch", "unnamed-batch", "acas-like", "mnistfc-like", "rank1", "fixed-batch-2"],
)
def test_identical_models_pass_with_zero_difference(dims):
    model = mlp_model(mlp_weights(), dims)
    report = compare_models(model, model, BOX, samples=200, seed=1)
    assert report.passed
    assert report.samples == 203
    assert report.max_abs_diff == 0.0 and report.max_rel_diff == 0.0
    assert report.outputs[0].required_atol == 0.0 and report.outputs[0].mismatched_elements == 0


@pytest.mark.parametrize(
    "dims", [["N", N_IN], [1, 1, 1, N_IN], [N_IN]], ids=["dynamic", "fixed-1", "rank1"]
)
def test_perturbed_weight_is_found(dims):
    weights = mlp_weights()
    reference, candidate = mlp_model(weights, dims), mlp_model(perturbed(weights), dims)
    report = compare_models(reference, candidate, BOX, samples=300, seed=2)
    assert not report.passed
    (logits,) = report.outputs
    assert not logits.passed and logits.mismatched_elements > 0
    assert 0.0 < logits.required_atol <= logits.max_abs_diff
    assert logits.required_rtol > 1e-5
    assert 0 <= logits.where_abs < report.samples
    # the reported worst input reproduces the reported difference
    worst = report.worst_input
    assert worst.shape == (N_IN,) and np.all((worst >= BOX.lower) & (worst <= BOX.upper))
    diff = np.abs(run_model(reference, worst)["logits"] - run_model(candidate, worst)["logits"])
    assert float(diff.max()) == pytest.approx(logits.max_abs_diff, rel=1e-6)
    # the reported minimum tolerances pass, and just below them the check fails
    assert compare_models(
        reference, candidate, BOX, samples=300, seed=2, atol=logits.required_atol
    ).passed
    assert not compare_models(
        reference, candidate, BOX, samples=300, seed=2, atol=logits.required_atol * 0.999
    ).passed
    assert compare_models(
        reference, candidate, BOX, samples=300, seed=2, rtol=logits.required_rtol * 1.000001
    ).passed


def test_per_output_tolerances_from_a_dict():
    weights = mlp_weights()
    reference = mlp_model(weights, ["N", N_IN], label_output=True)
    candidate = mlp_model(perturbed(weights, delta=1e-4), ["N", N_IN], label_output=True)
    strict = compare_models(reference, candidate, BOX, samples=100, atol={"": 1e-9}, rtol=0.0)
    loose = compare_models(reference, candidate, BOX, samples=100, atol={"logits": 1.0}, rtol=0.0)
    assert not strict.outputs[0].passed
    assert loose.outputs[0].passed
    assert loose.atol == {"logits": 1.0}


def test_argmax_label_output_is_compared_exactly():
    weights = mlp_weights(5)
    reference = mlp_model(weights, ["N", N_IN], label_output=True)
    same = compare_models(reference, reference, BOX, samples=200)
    assert same.passed and [o.name for o in same.outputs] == ["logits", "label"]

    flipped = [(w.copy(), b.copy()) for w, b in weights]
    flipped[-1][1][0] += np.float32(3.0)  # favour class 0: many labels change
    report = compare_models(
        reference, mlp_model(flipped, ["N", N_IN], label_output=True), BOX, samples=200, atol=10.0
    )
    logits, label = report.outputs
    assert logits.passed  # within atol=10
    assert not label.passed and label.mismatched_elements > 0
    assert label.required_atol == np.inf
    assert not report.passed
    labels_ref = run_model(reference, report.worst_input)["label"]
    labels_new = run_model(mlp_model(flipped, ["N", N_IN], label_output=True), report.worst_input)
    assert labels_ref[0] != labels_new["label"][0]


def test_zipmap_output_is_compared_by_keys_and_values():
    weights = mlp_weights(7)
    reference = mlp_model(weights, ["N", N_IN], zipmap_output=True)
    assert compare_models(reference, reference, BOX, samples=100).passed
    candidate = mlp_model(perturbed(weights, layer=1, delta=0.5), ["N", N_IN], zipmap_output=True)
    report = compare_models(reference, candidate, BOX, samples=100)
    scores = next(o for o in report.outputs if o.name == "scores")
    assert not scores.passed and scores.max_abs_diff > 1e-4
    assert run_model(reference, np.zeros(N_IN))["scores"].shape == (1, N_OUT)


# ----------------------------------------------------------------------------- inputs


def test_inputs_are_deterministic_inside_the_box_and_include_extras():
    box = Box(np.array([0.0, -2.0, 0.5]), np.array([1.0, 2.0, 0.5]), "x")
    extra = np.array([[5.0, -5.0, 0.0], [np.nan, 0.0, 0.0], [0.5, 0.5, 0.5]])
    first = np.concatenate(list(verification_inputs(box, extra, 1000, seed=4, chunk=128)))
    second = np.concatenate(list(verification_inputs(box, extra, 1000, seed=4, chunk=512)))
    other_seed = np.concatenate(list(verification_inputs(box, extra, 1000, seed=5)))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other_seed)
    assert first.shape == (3 + 2 + 1000, 3)
    assert np.all((first >= box.lower) & (first <= box.upper))
    np.testing.assert_array_equal(first[:3], [box.center, box.lower, box.upper])
    np.testing.assert_array_equal(first[3], [1.0, -2.0, 0.5])  # clipped
    corners = first[5:305]
    assert np.all((corners == box.lower) | (corners == box.upper))


def test_extra_inputs_of_the_wrong_width_are_refused():
    model = mlp_model(mlp_weights(), ["N", N_IN])
    with pytest.raises(UsageError, match="extra_inputs"):
        compare_models(model, model, BOX, extra_inputs=np.zeros((2, N_IN + 1)), samples=10)


def test_float32_cast_rounds_toward_the_inside():
    box = Box(np.array([0.1, 0.3, 0.7]), np.array([0.1 + 1e-8, 0.7, 0.7]), "x")
    x = np.array([[0.1, 0.7, 0.7], [0.1 + 1e-8, 0.3, 0.7]])
    cast = cast_inside(x, box, np.dtype(np.float32))
    assert cast.dtype == np.float32
    widened = cast.astype(np.float64)
    # features 0 and 1 contain float32 numbers: the cast stays in the box
    assert np.all((widened[:, :2] >= box.lower[:2]) & (widened[:, :2] <= box.upper[:2]))
    # feature 2 is degenerate at a value float32 cannot hold: nearest value
    assert np.all(widened[:, 2] == np.float32(0.7))


# ----------------------------------------------------------------------------- structure errors


def test_different_output_names_fail_verification():
    weights = mlp_weights()
    reference = mlp_model(weights, ["N", N_IN], label_output=True)
    with pytest.raises(VerificationError, match="outputs differ"):
        compare_models(reference, mlp_model(weights, ["N", N_IN]), BOX, samples=10)


def test_two_input_model_is_refused():
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "z"], ["y"])],
        "two",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", N_IN]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", N_IN]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", N_IN])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UsageError, match="'z'"):
        compare_models(model, model, BOX, samples=10)


def test_session_and_run_model_accept_a_path(tmp_path):
    path = tmp_path / "m.onnx"
    model = mlp_model(mlp_weights(), [1, N_IN, 1])
    onnx.save(model, path)
    session = onnxruntime_session(str(path))
    x = np.random.default_rng(0).uniform(-1, 1, (5, N_IN))
    from_session = run_model(session, x)["logits"]
    from_proto = run_model(model, x)["logits"]
    np.testing.assert_array_equal(from_session, from_proto)
    assert from_session.shape == (5, N_OUT)
    weights = mlp_weights()
    h = np.maximum(x.astype(np.float32) @ weights[0][0].T + weights[0][1], 0)
    np.testing.assert_allclose(from_session, h @ weights[1][0].T + weights[1][1], rtol=1e-5)


# ----------------------------------------------------------------------------- size


def test_mnist_sized_model_compares_every_sample():
    """2,000 samples, the centre and the two extreme corners of a 784-256-256-10 model, streamed
    in chunks (its speed is measured by the benchmarks, not asserted here)."""
    sizes = (784, 256, 256, 10)
    model = mlp_model(mlp_weights(0, sizes), ["N", 784])
    box = Box(np.zeros(784), np.ones(784), "x")
    report = compare_models(model, model, box, samples=2000)
    assert report.passed and report.samples == 2003


@pytest.mark.parametrize(
    ("model_file", "box_file"),
    [
        (
            "acasxu/ACASXU_run2a_1_1_batch_2000.onnx",
            "acasxu/ACASXU_run2a_1_1_batch_2000.prop_1.npz",
        ),
        ("mnistfc/mnist-net_256x2.onnx", "mnistfc/mnist-net_256x2.prop_0_0.03.npz"),
        ("rl/dubinsrejoin.onnx", "rl/dubinsrejoin.case_safe_0.npz"),
    ],
)
def test_shared_models_agree_with_themselves(model_file, box_file, shared_models):
    if not (shared_models / model_file).exists():
        pytest.skip(f"{shared_models / model_file} is absent")
    bounds = np.load(shared_models / box_file)
    box = Box(bounds["lower"], bounds["upper"], "input")
    path = str(shared_models / model_file)
    report = compare_models(path, onnx.load(path), box, samples=300)
    assert report.passed and report.max_abs_diff == 0.0
    assert report.worst_input.shape == (box.size,)


def test_one_tolerance_policy_parses_the_cli_forms_and_looks_up_each_output():
    """``--atol 1e-4``, ``--atol out:1e-3`` (split at the last colon) and their mix give the
    tolerance every stage looks up the same way: the output's own entry, else the default."""
    from onnx_exact.core.tolerance import (
        DEFAULT_ATOL,
        is_tolerance,
        parse_tolerance,
        tolerance_for,
    )

    assert parse_tolerance(None, "--atol", None) is None
    assert parse_tolerance([], "--rtol", DEFAULT_ATOL) == DEFAULT_ATOL
    assert parse_tolerance(["1e-4"], "--atol", None) == 1e-4
    mixed = parse_tolerance(["1e-4", "a:b:2e-3"], "--atol", None)
    assert mixed == {"a:b": 2e-3, "": 1e-4}
    assert parse_tolerance(["y:1e-3"], "--atol", None) == {"y": 1e-3, "": DEFAULT_ATOL}
    assert tolerance_for(mixed, "a:b") == 2e-3 and tolerance_for(mixed, "other") == 1e-4
    assert tolerance_for({"y": 1e-3}, "z", 7.0) == 7.0 and tolerance_for(3e-3, "any") == 3e-3
    assert tolerance_for({"*": 5e-4}, "z") == 5e-4
    for bad, message in (("x:abc", "expected a number"), ("nan", "finite number >= 0")):
        with pytest.raises(UsageError, match=message):
            parse_tolerance([bad], "--atol", None)
    assert is_tolerance("1e-5") and is_tolerance("logits:1e-4")
    assert not is_tolerance("model.onnx") and not is_tolerance("-1")
