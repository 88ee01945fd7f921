"""The CNN reader: sequential CNNs read into the dense IR with per-neuron channel indices.

Every valid sequential fixture of ``cnn_fixtures`` and both MNIST CNNs must read into a network
whose forward pass is onnxruntime's (float32 tolerance) and the fixture's float64 reference (at
the output and at every ReLU's input, which pins the NCHW flat order), with ``channels`` right;
the planted channels must come out proved by the stability analysis; the ReLU6 fixtures read
with a kink neuron per unit; the bad models must give exit 2 and one line through
``onnx-exact analyze``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from cnn_fixtures import CLIP, VALID_BUILDERS, bad_fixtures, run_onnxruntime
from cnn_fixtures import SEQUENTIAL_READ as SEQUENTIAL
from conftest import run_cli
from exporter_fixtures import GraphBuilder

import onnx_exact.io.affine_chain as affine_chain
from onnx_exact.core.box import Box
from onnx_exact.core.errors import UnsupportedModelError
from onnx_exact.core.network import DenseLayer, InputMap, Network
from onnx_exact.core.operators import ConvOperator
from onnx_exact.core.verdicts import NeuronState
from onnx_exact.io.affine_chain import conv_matrix
from onnx_exact.io.cnn_reader import CnnBinding
from onnx_exact.io.graph import Binding
from onnx_exact.io.onnx_reader import read_model
from onnx_exact.stability import analyze_stability

REFUSED: dict[str, str] = {}  # MaxPool is read now (tests/test_cnn_maxpool.py)
LAYOUTS = {"tf2onnx_nhwc": "NHWC", "matlab_conv1d": "NCW"}
MODELS = Path(__file__).resolve().parents[1] / "models"


def test_dense_layer_channels_are_checked_and_copied():
    layer = DenseLayer(np.eye(4), np.zeros(4), True, "relu", channels=[0, 0, 1, 1])
    assert layer.channels.dtype == np.int64
    net = Network([layer, DenseLayer(np.ones((1, 4)), np.zeros(1), False)], InputMap.identity(4))
    copy = net.copy()
    assert copy.layers[0].channels.tolist() == [0, 0, 1, 1]
    copy.layers[0].channels[0] = 7
    assert net.layers[0].channels[0] == 0
    assert copy.layers[1].channels is None
    with pytest.raises(ValueError, match="channel indices"):
        DenseLayer(np.eye(4), np.zeros(4), True, "relu", channels=[0, 1])


@pytest.mark.parametrize(
    "kernel, spatial, pads, strides, dilations, group, c_in, c_out",
    [
        ((3, 3), (8, 8), (1, 1, 1, 1), (2, 2), (1, 1), 1, 2, 4),
        ((5,), (16,), (2, 2), (1,), (1,), 1, 2, 4),
        ((3,), (16,), (1, 1), (2,), (2,), 1, 4, 3),
        ((3, 3), (6, 6), (1, 0, 2, 1), (1, 2), (2, 1), 3, 6, 6),
        ((2, 2, 2), (4, 4, 4), (0, 1, 0, 1, 0, 1), (1, 1, 2), (1, 1, 1), 2, 4, 6),
    ],
)
def test_conv_matrix_is_the_operators_dense_matrix(
    kernel, spatial, pads, strides, dilations, group, c_in, c_out
):
    weights = np.random.default_rng(0).normal(size=(c_out, c_in // group, *kernel))
    conv = ConvOperator(weights, None, spatial, pads, strides, dilations, group)
    np.testing.assert_array_equal(conv_matrix(conv), conv.dense())


def _box_points(lower: np.ndarray, upper: np.ndarray, m: int = 24) -> np.ndarray:
    rng = np.random.default_rng(3)
    uniform = lower + (upper - lower) * rng.random((m, lower.size))
    corners = np.where(rng.random((m // 2, lower.size)) < 0.5, lower, upper)
    return np.vstack([uniform, corners])


def _nchw_channels(network: Network, layer: int, channels: int) -> np.ndarray:
    return np.repeat(np.arange(channels), network.layers[layer].out_features // channels)


@pytest.fixture(scope="module", params=SEQUENTIAL)
def fixture(request):
    return VALID_BUILDERS[request.param]()


def _computes_the_model(network, fixture):
    """Assert ``network`` equals the fixture's float64 reference and onnxruntime on points of
    its box; return the points and the reference's pre-activations by activation name."""
    x = _box_points(fixture.lower, fixture.upper)
    expected, pre = fixture.reference(x)
    got = network.forward(x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9 * max(1.0, np.abs(expected).max()))
    runtime = run_onnxruntime(fixture.model, x, fixture.input_shape)
    np.testing.assert_allclose(got, runtime, rtol=0, atol=1e-5 * max(1.0, np.abs(runtime).max()))
    return x, pre


def test_sequential_fixture_reads_into_the_network_onnxruntime_runs(fixture):
    read = read_model(fixture.model)
    network, binding = read.network, read.binding
    assert isinstance(binding, CnnBinding)
    x, pre = _computes_the_model(network, fixture)

    assert binding.relu_nodes == list(pre)  # the fixture records its activations in order
    assert [network.layers[k].name for k in network.relu_layer_indices] == binding.relu_nodes
    assert binding.input_layout == LAYOUTS.get(fixture.name, "NCHW")
    assert binding.output_tensor == fixture.model.graph.output[0].name
    net_x = network.input_map.apply(x)
    preactivations = network.preactivations(net_x)
    for k, name in zip(network.relu_layer_indices, binding.relu_nodes, strict=True):
        np.testing.assert_allclose(preactivations[k], pre[name], rtol=0, atol=1e-9)
        layer = network.layers[k]
        if name == "relu_fc":
            assert layer.channels is None
        else:  # a conv layer: NCHW channels, the planted ones among them
            count = int(layer.channels.max()) + 1
            np.testing.assert_array_equal(layer.channels, _nchw_channels(network, k, count))
            assert all(c < count for c in fixture.planted.get(name, {}))
    assert network.layers[-1].channels is None and not network.layers[-1].relu


def test_planted_channels_are_proved_stable(fixture):
    read = read_model(fixture.model)
    network = read.network
    box = Box(fixture.lower, fixture.upper).to_network(network.input_map)
    # the planted channels clear their kinks on interval bounds, which the first pass always
    # finishes whatever the limit: no solver tier is needed
    result = analyze_stability(network, box, time_limit=1, jobs=1, seed=0, tiers=())
    by_name = {network.layers[layer.index].name: layer for layer in result.layers}
    assert fixture.planted
    for name, plants in fixture.planted.items():
        layer = network.layers[network.relu_layer_indices[read.binding.relu_nodes.index(name)]]
        states = by_name[name].states
        for channel, kind in plants.items():
            if layer.channels is None:  # a dense layer: the channel is the neuron
                neurons = states[[channel]]
            else:
                neurons = states[layer.channels == channel]
            want = NeuronState.INACTIVE if kind == "dead" else NeuronState.ACTIVE
            assert np.all(neurons == want), (name, channel, kind)


@pytest.mark.parametrize("name", CLIP)
def test_relu6_fixtures_read_with_a_kink_neuron_per_unit(name):
    """``Clip(0, 6)`` in each exporter's form (Constant inputs, opset-10 attributes, tf2onnx's
    initializer inputs) closes a layer: units ``relu(y)`` (the Clip's input, NCHW channels),
    then one auxiliary kink ``relu(y - 6)`` per unit; the network is the fixture's reference
    and onnxruntime's."""
    fixture = VALID_BUILDERS[name]()
    read = read_model(fixture.model)
    network = read.network
    x, pre = _computes_the_model(network, fixture)
    preactivations = network.preactivations(network.input_map.apply(x))
    clips = [k for k in network.relu_layer_indices if network.layers[k].clip is not None]
    assert [network.layers[k].name for k in clips] == [n for n in pre if n != "relu_fc"]
    for k in clips:
        layer = network.layers[k]
        units = pre[layer.name].shape[1]
        assert layer.clip == 6.0 and layer.kinks.tolist() == list(range(units, 2 * units))
        assert layer.auxiliary.tolist() == [False] * units + [True] * units
        np.testing.assert_allclose(preactivations[k][:, :units], pre[layer.name], atol=1e-9)
        np.testing.assert_allclose(preactivations[k][:, units:], pre[layer.name] - 6.0, atol=1e-9)
        count = int(layer.channels[:units].max()) + 1
        np.testing.assert_array_equal(
            layer.channels[:units], np.repeat(range(count), units // count)
        )


def test_matlab_mean_subtraction_becomes_the_input_map():
    fixture = VALID_BUILDERS["matlab_conv1d"]()
    read = read_model(fixture.model)
    assert not read.network.input_map.is_identity
    roles = [step.role for step in read.binding.path]
    assert roles[0] == "preprocess" and roles.count("relu") == 2 and roles.count("core") == 3


@pytest.mark.parametrize("name", ["mnist_cnn_l1_0", "mnist_cnn_l1_2e-3"])
def test_mnist_cnn_reads_into_the_network_onnxruntime_runs(name):
    path = MODELS / f"{name}.onnx"
    read = read_model(path)
    network = read.network
    assert [layer.weight.shape for layer in network.layers] == [
        (16 * 14 * 14, 784), (32 * 7 * 7, 16 * 14 * 14), (100, 1568), (10, 100),
    ]  # fmt: skip
    x = _box_points(np.zeros(784), np.ones(784))
    runtime = run_onnxruntime(onnx.load(path), x, (1, 28, 28))
    np.testing.assert_allclose(network.forward(x), runtime, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(network.layers[0].channels, np.repeat(np.arange(16), 196))
    np.testing.assert_array_equal(network.layers[1].channels, np.repeat(np.arange(32), 49))
    assert network.layers[2].channels is None


def _assorted_cnn() -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """Ops the fixtures do not cover: a bias-free Conv with ``SAME_LOWER``, per-channel Mul and
    Add constants after it, a depthwise Conv, a Relu *after* an NHWC Transpose (channels last at
    the ReLU), GlobalAveragePool behind a Transpose back, and a MatMul head."""
    rng = np.random.default_rng(11)
    g = GraphBuilder()
    h = g.node(
        "Conv",
        ["input", g.const(rng.normal(size=(4, 3, 3, 3)) / 3)],
        kernel_shape=[3, 3],
        auto_pad="SAME_LOWER",
        strides=[2, 2],
    )
    h = g.node("Mul", [h, g.const(rng.uniform(0.5, 2, size=(1, 4, 1, 1)))])
    h = g.node("Add", [g.const(rng.normal(size=(4, 1, 1))), h])
    h = g.node("Relu", [h], name="relu_a")
    h = g.node(
        "Conv",
        [h, g.const(rng.normal(size=(4, 1, 3, 3)) / 3), g.const(rng.normal(size=4))],
        kernel_shape=[3, 3],
        pads=[1, 1, 1, 1],
        group=4,
    )
    h = g.node("Transpose", [h], perm=[0, 2, 3, 1])
    h = g.node("Relu", [h], name="relu_b")
    h = g.node("Transpose", [h], perm=[0, 3, 1, 2])
    h = g.node("GlobalAveragePool", [h])
    h = g.node("Reshape", [h, g.const(np.array([0, -1]), dtype=np.int64)])
    h = g.node("MatMul", [h, g.const(rng.normal(size=(4, 2)))])
    g.node("Add", [h, g.const(rng.normal(size=2))], output="out")
    model = g.model([g.tensor("input", ["N", 3, 7, 5])], [g.tensor("out", ["N", 2])])
    return model, (3, 7, 5)


def test_per_channel_ops_depthwise_and_channels_last_relu_read_exactly():
    model, shape = _assorted_cnn()
    network = read_model(model).network
    x = _box_points(-np.ones(math.prod(shape)), np.ones(math.prod(shape)))
    runtime = run_onnxruntime(model, x, shape)
    np.testing.assert_allclose(network.forward(x), runtime, rtol=0, atol=1e-5)
    first, second, last = network.layers
    positions = first.out_features // 4  # 4 x 4 x 3 outputs per channel (SAME, stride 2)
    assert positions == 12
    np.testing.assert_array_equal(first.channels, np.repeat(np.arange(4), positions))
    np.testing.assert_array_equal(second.channels, np.tile(np.arange(4), positions))  # NHWC
    assert last.channels is None and last.out_features == 2


def _refusal(model: onnx.ModelProto) -> str:
    with pytest.raises(UnsupportedModelError) as refused:
        read_model(model)
    return str(refused.value)


def test_reader_refusals_name_the_node(monkeypatch):
    model, _ = _assorted_cnn()
    # over the dense limit a layer is kept sparse; over the sparse limit it is refused
    monkeypatch.setattr(affine_chain, "MAX_DENSE_ENTRIES", 0)
    monkeypatch.setattr(affine_chain, "MAX_SPARSE_ENTRIES", 10)
    message = _refusal(model)
    assert "(Conv): its layer would be a 48 x 105 matrix with " in message
    assert "nonzero entries, over the limit of 10; CNNs this large" in message
    monkeypatch.undo()

    g = GraphBuilder()
    pads = g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1]), dtype=np.int64)
    h = g.node("Pad", ["input", pads], mode="reflect")
    h = g.node("Conv", [h, g.const(np.ones((2, 1, 3, 3)))], kernel_shape=[3, 3], name="conv")
    h = g.node("Relu", [h])
    h = g.node("Flatten", [h])
    g.node("Gemm", [h, g.const(np.ones((1, 32)))], output="out", transB=1)
    padded = g.model([g.tensor("input", ["N", 1, 4, 4])], [g.tensor("out", ["N", 1])])
    assert "Pad mode 'reflect' is not supported" in _refusal(padded)

    g = GraphBuilder()
    h = g.node("Conv", ["input", g.const(np.ones((2, 1, 3, 3)))], kernel_shape=[3, 3])
    h = g.node("Relu", [h], name="relu")
    h = g.node("Transpose", [h], name="swap_batch", perm=[1, 0, 2, 3])
    h = g.node("Reshape", [h, g.const(np.array([-1, 4]), dtype=np.int64)])
    g.node("Gemm", [h, g.const(np.ones((1, 4)))], output="out", transB=1)
    swapped = g.model([g.tensor("input", [2, 1, 4, 4])], [g.tensor("out", [4, 1])])
    assert "node 'swap_batch' (Transpose): perm [1, 0, 2, 3] moves the batch axis" in _refusal(
        swapped
    )


def test_a_graph_without_conv_still_reads_as_an_mlp():
    from exporter_fixtures import torch_legacy_gemm

    model, _, _ = torch_legacy_gemm()
    assert isinstance(read_model(model).binding, Binding)


CASES = {name: (lambda name=name: VALID_BUILDERS[name]()) for name in REFUSED} | {
    name: (lambda name=name: bad_fixtures()[name]) for name in bad_fixtures()
}
MESSAGES = REFUSED | {
    "bad_group": "group 4 does not divide the 6 input channels",
    "dynamic_spatial": "dims H, W are dynamic",
    "runtime_weight": "node 'Conv_6' (Conv): its weight 'Mul_out_4' is computed at run time",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_cnns_exit_2_with_one_line(name, tmp_path):
    model = CASES[name]().model
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    code, out, err = run_cli(["analyze", path, "--input-range", "[0,1]", "--jobs", "1"])
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("onnx-exact: error: "), err
    assert MESSAGES[name] in lines[0] and str(path) in lines[0]


def test_analyze_oval21_base_with_its_vnnlib(shared_models):
    folder = shared_models / "cnn"
    model, prop = folder / "oval21_base.onnx", folder / "oval21_base.vnnlib"
    if not model.exists():
        pytest.skip("../shared/models/cnn/oval21_base.onnx is absent")
    code, out, err = run_cli(
        ["analyze", model, "--vnnlib", prop, "--time-limit", "1", "--jobs", "1", "-q"]
    )
    assert code == 0, err
    read = read_model(model)
    assert read.binding.relu_nodes == ["Relu_1", "Relu_3", "Relu_6"]
    assert [layer.weight.shape for layer in read.network.layers] == [
        (2048, 3072), (1024, 2048), (100, 1024), (10, 100),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "name, layout",
    [("oval21_base", "NCHW"), ("oval21_wide", "NCHW"), ("marabou_cifar10_medium", "NHWC")],
)
def test_shared_cnns_read_into_the_network_onnxruntime_runs(shared_models, name, layout):
    path = shared_models / "cnn" / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"../shared/models/cnn/{name}.onnx is absent")
    read = read_model(path)
    assert read.binding.input_layout == layout
    box = np.load(shared_models / "cnn" / f"{name}.box.npz")
    lower, upper = (np.asarray(box[key], np.float64).reshape(-1) for key in ("lower", "upper"))
    x = _box_points(lower, upper, m=4)
    model = onnx.load(path)
    sample = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
    runtime = np.vstack([run_onnxruntime(model, row[None], sample) for row in x])
    np.testing.assert_allclose(read.network.forward(x), runtime, rtol=0, atol=1e-4)
    first = read.network.layers[0]
    assert first.channels is not None and np.all(np.diff(first.channels) >= 0)
