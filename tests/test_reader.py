"""The reader: every exporter pattern gives a Network equal to onnxruntime, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SHARED_MODELS
from exporter_fixtures import (
    ALL_BUILDERS,
    EXTERNAL_DATA_BUILDERS,
    GraphBuilder,
    box_samples,
    mlp_parameters,
    run_onnx,
    save_external,
)
from onnx import TensorProto, helper

from onnx_exact.core.errors import UnsupportedModelError, UsageError
from onnx_exact.io.onnx_reader import read_model


def assert_matches_onnxruntime(read, model, lower, upper, samples: int = 64) -> None:
    """``Network.forward`` equals onnxruntime on ``network.output_name`` within 1e-5 relative."""
    x = box_samples(lower, upper, samples)
    (got,) = run_onnx(model, x, [read.network.output_name])
    want = read.network.forward(x)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_reader_matches_onnxruntime(name: str, tmp_path: Path) -> None:
    model, lower, upper = ALL_BUILDERS[name]()
    before = model.SerializeToString()
    if name in EXTERNAL_DATA_BUILDERS:
        path = tmp_path / "model.onnx"
        save_external(model, path)
        read = read_model(path)
        assert read.uses_external_data and read.path == path
    else:
        read = read_model(model)
        assert not read.uses_external_data and read.path is None
    assert model.SerializeToString() == before, "the reader must not modify the model"
    net = read.network
    assert net.in_features == lower.size
    assert net.input_name == read.binding.input_name
    assert net.output_name == read.binding.output_tensor
    assert len(read.binding.layers) == len(net.layers)
    assert_matches_onnxruntime(read, read.model, lower, upper)


def test_torch_legacy_binding() -> None:
    read = read_model(ALL_BUILDERS["torch_legacy_gemm"]()[0])
    assert read.input_shape == (1, 6) and read.has_batch_dim
    assert read.input_dtype == np.float32
    assert [b.style for b in read.binding.layers] == ["gemm"] * 3
    assert [b.weight_layout for b in read.binding.layers] == ["oi"] * 3
    assert [layer.relu for layer in read.network.layers] == [True, True, False]
    assert read.network.layers[0].name == "/relu1/Relu"
    nodes = read.model.graph.node
    assert nodes[read.binding.layers[1].core].name == "/fc2/Gemm"
    assert read.binding.layers[2].relu_node is None
    np.testing.assert_array_equal(read.network.layers[0].weight, mlp_parameters(seed=1)[0][0])


def test_rank1_and_left_weight_bindings() -> None:
    rank1 = read_model(ALL_BUILDERS["torch_legacy_rank1"]()[0])
    assert rank1.input_shape == (6,) and not rank1.has_batch_dim
    assert [b.weight_layout for b in rank1.binding.layers] == ["io"] * 3
    assert [b.bias_slot for b in rank1.binding.layers] == [1, 0, 1]  # bias in either Add slot
    left = read_model(ALL_BUILDERS["vnncomp_left_weight"]()[0])
    assert [b.weight_layout for b in left.binding.layers] == ["left"] * 3
    assert [b.data_slot for b in left.binding.layers] == [1, 1, 1]
    double = read_model(ALL_BUILDERS["vnncomp_left_weight_double"]()[0])
    assert double.input_dtype == np.float64
    assert double.binding.layers[0].weight_dtype == np.float64


def test_folded_affine_ops_are_recorded() -> None:
    batchnorm = read_model(ALL_BUILDERS["torch_legacy_gemm_batchnorm"]()[0])
    nodes = batchnorm.model.graph.node
    folded = [[nodes[i].op_type for i in b.folded] for b in batchnorm.binding.layers]
    assert folded == [["BatchNormalization"], ["BatchNormalization"], []]
    keras = read_model(ALL_BUILDERS["keras_batchnorm_after_relu"]()[0])
    nodes = keras.model.graph.node
    # Mul/Add after a Relu fold into the *next* layer
    assert [[nodes[i].op_type for i in b.folded] for b in keras.binding.layers] == [
        [],
        ["Mul", "Add"],
        ["Mul", "Add"],
    ]
    assert all(b.bias_node is not None for b in keras.binding.layers)


def test_preprocessing_becomes_the_input_map() -> None:
    read = read_model(ALL_BUILDERS["keras_normalization"]()[0])
    mean, inv_std = np.linspace(-0.5, 0.5, 6), np.linspace(0.5, 2.0, 6)
    np.testing.assert_allclose(read.network.input_map.scale, inv_std.astype(np.float32))
    np.testing.assert_allclose(
        read.network.input_map.shift,
        -(mean.astype(np.float32).astype(np.float64) * inv_std.astype(np.float32)),
        rtol=1e-12,
    )
    scaler = read_model(ALL_BUILDERS["skl2onnx_scaler"]()[0])
    assert not scaler.network.input_map.is_identity
    assert [scaler.model.graph.node[i].op_type for i in scaler.binding.preprocess_nodes] == [
        "Scaler"
    ]
    eran = read_model(ALL_BUILDERS["eran_normalized"]()[0])
    assert [eran.model.graph.node[i].op_type for i in eran.binding.preprocess_nodes] == [
        "Sub",
        "Div",
    ]


def test_tail_and_output_layer_relu() -> None:
    softmax = read_model(ALL_BUILDERS["torch_softmax_tail"]()[0])
    assert softmax.network.output_name == "logits"
    classifier = read_model(ALL_BUILDERS["skl2onnx_classifier"]()[0])
    assert classifier.network.out_features == 3
    regressor = read_model(ALL_BUILDERS["skl2onnx_regressor"]()[0])
    assert regressor.network.out_features == 1  # the Reshape([-1, 1]) stays in the tail
    eran = read_model(ALL_BUILDERS["eran_normalized"]()[0])
    assert eran.network.layers[-1].relu and eran.network.output_name == "output"
    stacked = read_model(ALL_BUILDERS["two_affine_back_to_back"]()[0])
    assert [layer.relu for layer in stacked.network.layers] == [False, True, True, False]


# ----------------------------------------------------------------------------- refusals
def _gemm_model(
    activation: str | None = "Relu",
    input_type=TensorProto.FLOAT,
    weight=None,
    extra_output: bool = False,
    check: bool = True,
) -> onnx.ModelProto:
    """A 6-8-3 Gemm MLP with a configurable hidden activation, for the error cases."""
    g = GraphBuilder()
    (w1, b1), (w2, b2) = mlp_parameters((6, 8, 3), seed=30)
    x = g.node(
        "Gemm", ["x", g.const(w1 if weight is None else weight), g.const(b1)], name="fc1", transB=1
    )
    if activation:
        x = g.node(activation, [x], name="act1", output="hidden")
    g.node("Gemm", [x, g.const(w2), g.const(b2)], name="fc2", output="y", transB=1)
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", 8]))
    inputs = [helper.make_tensor_value_info("x", input_type, ["N", 6])]
    graph = helper.make_graph(g.nodes, "g", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    return model


def _refused(model_or_path, *fragments: str, error=UnsupportedModelError) -> str:
    with pytest.raises(error) as info:
        read_model(model_or_path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_other_activation_is_refused_with_node_name() -> None:
    _refused(_gemm_model("Tanh"), "node 'act1' (Tanh)", "only ReLU activations")
    _refused(_gemm_model("Sigmoid"), "'act1'", "only ReLU")


def test_residual_fan_out_is_refused() -> None:
    g = GraphBuilder()
    (w1, b1), (w2, b2), (w3, b3) = mlp_parameters((6, 8, 8, 3), seed=31)
    h = g.node(
        "Relu", [g.node("Gemm", ["x", g.const(w1), g.const(b1)], name="fc1", transB=1)], name="r1"
    )
    h2 = g.node(
        "Relu", [g.node("Gemm", [h, g.const(w2), g.const(b2)], name="fc2", transB=1)], name="r2"
    )
    s = g.node("Add", [h, h2], name="residual")
    g.node("Gemm", [s, g.const(w3), g.const(b3)], name="fc3", output="y", transB=1)
    model = g.model([g.tensor("x", ["N", 6])], [g.tensor("y", ["N", 3])])
    _refused(model, "feeds 2 nodes", "'fc2'", "'residual'", "fan-out")


def test_hidden_activation_as_graph_output_is_refused() -> None:
    _refused(_gemm_model(extra_output=True), "'hidden'", "graph output")


def test_non_constant_weights_are_refused() -> None:
    model = _gemm_model()
    weight_name = model.graph.node[0].input[1]
    weight = next(t for t in model.graph.initializer if t.name == weight_name)
    model.graph.initializer.remove(weight)
    model.graph.input.append(helper.make_tensor_value_info(weight_name, TensorProto.FLOAT, [8, 6]))
    _refused(model, "'fc1' (Gemm)", f"'{weight_name}' is a graph input", "constant")

    computed = _gemm_model()
    doubled = helper.make_node("Add", [weight_name, weight_name], ["w_doubled"], name="double_w")
    computed.graph.node.insert(0, doubled)
    computed.graph.node[1].input[1] = "w_doubled"
    _refused(computed, "'fc1' (Gemm)", "'w_doubled' is not a constant")


def test_nan_weights_are_refused() -> None:
    weight = mlp_parameters((6, 8, 3), seed=30)[0][0].copy()
    weight[2, 3] = np.nan
    _refused(_gemm_model(weight=weight), "'fc1' (Gemm)", "NaN or Inf")


def test_double_input_with_float_weights_is_refused() -> None:
    model = _gemm_model(input_type=TensorProto.DOUBLE, check=False)
    _refused(model, "'fc1' (Gemm)", "float32", "float64", "invalid")


def test_two_inputs_and_no_affine_layer_are_refused() -> None:
    model = _gemm_model()
    model.graph.input.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, ["N", 2]))
    _refused(model, "2 non-constant graph inputs", "'x'", "'other'")

    g = GraphBuilder()
    g.node("Relu", ["x"], name="only_relu", output="y")
    plain = g.model([g.tensor("x", ["N", 6])], [g.tensor("y", ["N", 6])])
    _refused(plain, "no Gemm or MatMul")


def test_rank3_with_several_positions_is_refused() -> None:
    g = GraphBuilder()
    (w1, b1), (w2, b2) = mlp_parameters((6, 8, 3), seed=32)
    x = g.node("MatMul", ["x", g.const(w1.T.copy())], name="mm1")
    x = g.node("Relu", [g.node("Add", [x, g.const(b1)], name="add1")], name="r1")
    g.node("MatMul", [x, g.const(w2.T.copy())], name="mm2", output="y")
    model = g.model([g.tensor("x", ["N", 4, 6])], [g.tensor("y", ["N", 4, 3])])
    _refused(model, "'mm1' (MatMul)", "T == 1", "T = 4")


def test_cast_to_another_float_type_is_refused() -> None:
    g = GraphBuilder()
    (w1, b1), (w2, b2) = mlp_parameters((6, 8, 3), seed=33)
    x = g.node("Cast", ["x"], name="to_double", to=TensorProto.DOUBLE)
    x = g.node("Cast", [x], name="back", to=TensorProto.FLOAT)
    x = g.node("Relu", [g.node("Gemm", [x, g.const(w1), g.const(b1)], name="fc1", transB=1)])
    g.node("Gemm", [x, g.const(w2), g.const(b2)], name="fc2", output="y", transB=1)
    model = g.model([g.tensor("x", ["N", 6])], [g.tensor("y", ["N", 3])])
    _refused(model, "'to_double' (Cast)", "same-type Casts")


def test_float16_weights_behind_a_cast_are_folded_constants() -> None:
    """Mixed-precision exporters store fp16 weights and Cast them to float32: exact, foldable."""
    g = GraphBuilder()
    (w1, b1), (w2, b2) = mlp_parameters((6, 8, 3), seed=34)
    half = g.const(w1, dtype=np.float16)
    w1_float = g.node("Cast", [half], name="cast_w1", to=TensorProto.FLOAT)
    x = g.node("Relu", [g.node("Gemm", ["x", w1_float, g.const(b1)], name="fc1", transB=1)])
    g.node("Gemm", [x, g.const(w2), g.const(b2)], name="fc2", output="y", transB=1)
    model = g.model([g.tensor("x", ["N", 6])], [g.tensor("y", ["N", 3])])
    read = read_model(model)
    expected = w1.astype(np.float16).astype(np.float64)
    np.testing.assert_array_equal(read.network.layers[0].weight, expected)
    assert_matches_onnxruntime(read, model, np.zeros(6), np.ones(6))


def test_malformed_models_are_refused_before_the_analysis() -> None:
    """Data that does not match dims/type, repeated names, dangling inputs: one clear line each."""
    short = _gemm_model()
    short.graph.initializer[0].raw_data = short.graph.initializer[0].raw_data[:-4]
    _refused(short, f"initializer '{short.graph.initializer[0].name}'", "bytes of raw_data")
    named_twice = _gemm_model()
    named_twice.graph.node[-1].name = named_twice.graph.node[0].name
    _refused(named_twice, f"2 nodes are named '{named_twice.graph.node[0].name}'")
    dangling = _gemm_model()
    dangling.graph.node[-1].input[0] = "nowhere"
    _refused(dangling, "'nowhere'", "no graph input, initializer or earlier node")
    newer = _gemm_model()
    newer.ir_version = onnx.IR_VERSION + 1
    _refused(newer, f"IR version {onnx.IR_VERSION + 1}")


def test_unreadable_files(tmp_path: Path) -> None:
    _refused(tmp_path / "absent.onnx", "no such file", error=UsageError)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xfe this is not a protobuf \x00\x01\x02" * 7)
    _refused(garbage, "garbage.onnx", "ONNX")
    truncated = tmp_path / "truncated.onnx"
    data = _gemm_model().SerializeToString()
    truncated.write_bytes(data[: len(data) // 2])
    _refused(truncated, "truncated.onnx")


def test_missing_external_data(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    save_external(ALL_BUILDERS["torch_dynamo"]()[0], path)
    (tmp_path / "model.onnx.data").unlink()
    _refused(path, "model.onnx", "external data")


# ----------------------------------------------------------------------------- real models
def _manifest() -> list[dict]:
    manifest = SHARED_MODELS / "manifest.json"
    if not manifest.exists():
        return []
    return json.loads(manifest.read_text())


@pytest.mark.parametrize("entry", _manifest(), ids=lambda e: e["model"])
def test_third_party_models(entry: dict) -> None:
    path = SHARED_MODELS / entry["model"]
    if not path.exists():
        pytest.skip(f"{path} is absent")
    read = read_model(path)
    n = read.network.in_features
    lower, upper = np.zeros(n), np.ones(n)
    if entry["domains"]:
        box = np.load(path.parent / entry["domains"][0]["box_npz"])
        lower, upper = box["lower"], box["upper"]
    assert lower.size == n
    assert_matches_onnxruntime(read, read.model, lower, upper, samples=16)


def test_third_party_manifest_is_complete(shared_models) -> None:
    names = {entry["model"].split("/")[0] for entry in _manifest()}
    assert {"acasxu", "mnistfc", "exactcompression", "rl", "marabou"} <= names
