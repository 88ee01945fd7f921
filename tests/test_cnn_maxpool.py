"""MaxPool and GlobalMaxPool in CNNs: read exactly as max trees of auxiliary ReLU layers,
analysed, pruned through the pool, checked, and refused in one line where unsupported.

Fixtures: ``cnn_maxpool_fixtures`` (torch ``Relu → MaxPool``, ``MaxPool → Relu``, overlapping
3x3/stride 2 windows with pads, a GlobalMaxPool head, tf2onnx NHWC with Transposes around the
pool, a ResNet stem whose pool output forks into a basic block), each with planted dead
channels; ``cnn_fixtures.torch_legacy("maxpool")``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from cnn_fixtures import VALID_BUILDERS, run_onnxruntime
from cnn_maxpool_fixtures import FIXTURES, pool_model
from conftest import run_cli
from exporter_fixtures import GraphBuilder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_exact.core.box import Box
from onnx_exact.core.errors import UnsupportedModelError
from onnx_exact.core.verdicts import NeuronState
from onnx_exact.io.cnn_maxpool import window_table
from onnx_exact.io.onnx_reader import read_model
from onnx_exact.stability import analyze_stability


def _samples(lower: np.ndarray, upper: np.ndarray, m: int = 64, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    uniform = lower + (upper - lower) * rng.random((m, lower.size))
    corners = np.where(rng.random((m // 2, lower.size)) < 0.5, lower, upper)
    return np.vstack([uniform, corners])


def _computes_the_model(fixture) -> None:
    """The read network equals onnxruntime on samples of the box (float32 round-off)."""
    net = read_model(fixture.model).network
    x = _samples(fixture.lower, fixture.upper)
    runtime = run_onnxruntime(fixture.model, x, fixture.input_shape)
    np.testing.assert_allclose(net.forward(x), runtime, rtol=0, atol=1e-5)


def test_window_table_lists_each_windows_inputs_padding_left_out():
    table, shape = window_table((1, 3, 3), (2, 2), (1, 1, 0, 0), (2, 2), (1, 1), False)
    assert shape == (1, 2, 2)
    assert table.tolist() == [[0, -1, -1, -1], [1, 2, -1, -1], [3, 6, -1, -1], [4, 5, 7, 8]]
    _, ceil_shape = window_table((2, 5, 5), (2, 2), (0, 0, 0, 0), (2, 2), (1, 1), True)
    assert ceil_shape == (2, 3, 3)  # the last window starts inside the input


WINDOWS = [
    ("MaxPool", "relu_pool", (1, 8, 8), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("MaxPool", "pool_relu", (2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1] * 4}),
    ("MaxPool", "relu_pool", (1, 8, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    ("MaxPool", "pool_relu", (1, 7, 7), {"kernel_shape": [2, 2], "dilations": [2, 2]}),
    ("MaxPool", "relu_pool", (1, 7, 6), {"kernel_shape": [3, 2], "strides": [2, 1], "auto_pad": "SAME_UPPER"}),
    ("MaxPool", "pool_relu", (1, 6, 6), {"kernel_shape": [1, 1], "strides": [2, 2]}),
    ("GlobalMaxPool", "pool_relu", (2, 5, 5), {}),
    ("GlobalMaxPool", "relu_pool", (3, 3, 3), {}),
]  # fmt: skip


@pytest.mark.parametrize("op, order, shape, attrs", WINDOWS)
def test_pool_windows_read_into_a_network_onnxruntime_runs(op, order, shape, attrs):
    """Pads, strides, dilations, ceil_mode, auto_pad and 1x1 windows, in both orders: the
    network equals onnxruntime; a window of K > 1 entries adds ⌈log2 K⌉ auxiliary layers,
    which no report lists (``unit_layer_indices`` is the graph's Relus)."""
    fixture = pool_model(op, order, shape, **attrs)
    _computes_the_model(fixture)
    read = read_model(fixture.model)
    net = read.network
    kernel = attrs.get("kernel_shape", shape[1:])
    levels = math.ceil(math.log2(math.prod(kernel)))
    assert sum(layer.is_auxiliary for layer in net.layers) == levels
    assert [net.layers[k].name for k in net.unit_layer_indices] == read.binding.relu_nodes
    assert read.binding.relu_nodes == ["relu1"]


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_maxpool_fixtures_read_into_a_network_onnxruntime_runs(name):
    _computes_the_model(FIXTURES[name]())


def test_a_maxpool_without_any_conv_is_read_as_a_cnn():
    """``MaxPool → Flatten → Gemm → Relu → Gemm`` (no Conv): the CNN reader reads it (the MLP
    reader knows no pool), and the network equals onnxruntime on samples of ``[-1, 1]``."""
    g = GraphBuilder()
    rng = np.random.default_rng(3)
    h = g.node("Flatten", [g.node("MaxPool", ["input"], kernel_shape=[2, 2], strides=[2, 2])])
    h = g.node("Gemm", [h, g.const(rng.normal(size=(5, 16)).astype(np.float32))], transB=1)
    h = g.node("Relu", [h], name="relu")
    w = g.const(rng.normal(size=(2, 5)).astype(np.float32))
    g.node("Gemm", [h, w], output="output", transB=1)
    model = g.model([g.tensor("input", ["batch", 1, 8, 8])], [g.tensor("output", ["batch", 2])])
    read = read_model(model)
    assert read.binding.relu_nodes == ["relu"]
    x = _samples(-np.ones(64), np.ones(64))
    runtime = run_onnxruntime(model, x, (1, 8, 8))
    np.testing.assert_allclose(read.network.forward(x), runtime, rtol=0, atol=1e-5)


def test_relu_then_maxpool_carries_its_left_operands_by_active_selection_rows():
    """``Relu → MaxPool``: the first tree level ends with selection rows of the ReLU output
    (a passthrough run), the second with nonnegative sums; both are ACTIVE by construction,
    and every auxiliary neuron stays out of the report."""
    fixture = FIXTURES["torch_relu_maxpool"]()
    net = read_model(fixture.model).network
    first, second = (k for k, layer in enumerate(net.layers) if layer.is_auxiliary)
    windows = 4 * 4 * 4  # 4 channels of 4 x 4 windows of 2 x 2
    assert net.layers[first].passthrough.size == 2 * windows  # one carried a per pair
    assert net.layers[second].out_features == 2 * windows  # relu(b - a) and the carried a
    box = Box(fixture.lower, fixture.upper, "input", "test")
    result = analyze_stability(net, box, time_limit=10, jobs=1)
    for k in (first, second):
        carried = slice(net.layers[k].out_features // 2, None)
        assert np.all(result.layers[k].states[carried] == NeuronState.ACTIVE)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def compressed(request, tmp_path_factory):
    """Each fixture through ``onnx-exact IN OUT --input-range '[0,1]'`` (exit code, JSON)."""
    fixture = FIXTURES[request.param]()
    folder = tmp_path_factory.mktemp(fixture.name)
    source, out, report = folder / "in.onnx", folder / "out.onnx", folder / "r.json"
    onnx.save(fixture.model, source)
    args = [source, out, "--input-range", "[0,1]", "--jobs", "1", "--time-limit", "30"]
    code, _, err = run_cli([*args, "--json", report])
    return fixture, code, err, source, out, report


def test_maxpool_cnns_compress_lose_planted_dead_channels_and_match(compressed):
    """Exit 0; the written model keeps its pools, loses every planted dead channel (also the
    ones before a pool, through it) and matches the input model on dense samples of the box."""
    fixture, code, err, source, out, report = compressed
    assert code == 0, err
    doc = json.loads(report.read_text())
    by_name = {layer["name"]: layer for layer in doc["layers"]}
    relus = [n.name for n in fixture.model.graph.node if n.op_type == "Relu"]
    assert list(by_name) == relus  # the graph's Relus only, no level of a max tree
    for relu, dead in fixture.dead.items():
        channels = by_name[relu]["channels"]
        assert set(dead) <= set(channels["dead"]) and set(dead) <= set(channels["removed"])
    assert doc["macs_after"] < doc["macs_before"]
    written = onnx.load(out)
    pools = [n.op_type for n in written.graph.node if n.op_type.endswith("MaxPool")]
    assert pools == [n.op_type for n in fixture.model.graph.node if n.op_type.endswith("MaxPool")]
    x = _samples(fixture.lower, fixture.upper, m=2000, seed=9)
    np.testing.assert_allclose(
        run_onnxruntime(written, x, fixture.input_shape),
        run_onnxruntime(fixture.model, x, fixture.input_shape),
        rtol=0,
        atol=1e-5,
    )


def test_check_proves_a_compressed_maxpool_cnn_equal_to_its_input(compressed):
    fixture, code, err, source, out, _ = compressed
    assert code == 0, err
    code, stdout, err = run_cli(["check", source, out, "--input-range", "[0,1]", "--jobs", "1"])
    assert code == 0, err
    assert "proved equivalent" in stdout


def test_the_legacy_torch_maxpool_fixture_reads_into_its_reference():
    """``cnn_fixtures.torch_legacy("maxpool")``: the network equals the float64 reference at
    the output and at every graph Relu's input (``unit_layer_indices`` ↔ ``relu_nodes``)."""
    fixture = VALID_BUILDERS["torch_legacy_maxpool"]()
    read = read_model(fixture.model)
    x = _samples(fixture.lower, fixture.upper)
    expected, pre = fixture.reference(x)
    np.testing.assert_allclose(read.network.forward(x), expected, rtol=0, atol=1e-9)
    preactivations = read.network.preactivations(read.network.input_map.apply(x))
    for k, name in zip(read.network.unit_layer_indices, read.binding.relu_nodes, strict=True):
        np.testing.assert_allclose(preactivations[k], pre[name], rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- refusals


def test_a_maxpool_whose_indices_are_used_is_refused_in_one_line(tmp_path):
    g = GraphBuilder()
    weight = g.const(np.random.default_rng(0).normal(size=(2, 1, 3, 3)).astype(np.float32))
    h = g.node("Relu", [g.node("Conv", ["input", weight], pads=[1, 1, 1, 1])])
    h = g.node("MaxPool", [h], name="pool", n_outputs=2, kernel_shape=[2, 2], strides=[2, 2])
    indices = g.nodes[-1].output[1]
    h = g.node("Flatten", [h], axis=1)
    out = g.node("Gemm", [h, g.const(np.ones((1, 8), np.float32))], output="output", transB=1)
    assert out == "output"
    model = g.model(
        [g.tensor("input", ["batch", 1, 4, 4])],
        [
            g.tensor("output", ["batch", 1]),
            onnx.helper.make_tensor_value_info(indices, onnx.TensorProto.INT64, ["batch", 2, 2, 2]),
        ],
    )
    path = tmp_path / "indices.onnx"
    onnx.save(model, path)
    code, stdout, err = run_cli(["analyze", path, "--input-range", "[0,1]", "--jobs", "1"])
    lines = err.strip().splitlines()
    assert code == 2 and stdout == "" and len(lines) == 1
    assert "node 'pool' (MaxPool): its Indices output" in lines[0] and str(path) in lines[0]
    with pytest.raises(UnsupportedModelError, match="Indices output"):
        read_model(model)


def test_a_maxpool_inside_a_residual_block_is_refused_in_one_line():
    """``s → [Conv → Relu → MaxPool(3x3, stride 1, pads 1)] + s``: the branch's tree layers
    would have to carry ``s`` too, which the reader does not do; one line names the node."""
    g = GraphBuilder()
    rng = np.random.default_rng(1)
    weight = g.const(rng.normal(size=(2, 1, 3, 3)).astype(np.float32))
    s = g.node("Relu", [g.node("Conv", ["input", weight], pads=[1, 1, 1, 1])])
    branch = g.const(rng.normal(size=(2, 2, 3, 3)).astype(np.float32))
    h = g.node("Relu", [g.node("Conv", [s, branch], pads=[1, 1, 1, 1])])
    h = g.node("MaxPool", [h], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = g.node("Relu", [g.node("Add", [h, s])])
    h = g.node("Flatten", [h], axis=1)
    g.node("Gemm", [h, g.const(np.ones((1, 32), np.float32))], output="output", transB=1)
    model = g.model([g.tensor("input", ["batch", 1, 4, 4])], [g.tensor("output", ["batch", 1])])
    with pytest.raises(UnsupportedModelError, match="node 'pool' .* inside a residual block"):
        read_model(model)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_max_trees_over_the_dense_limit_are_read_sparse_as_the_same_matrices(name, monkeypatch):
    """With the reader's dense limit at 0 every tree level is a SparseMatrix holding the dense
    read's entries, and the network still computes the model."""
    import onnx_exact.io.cnn_reader as cnn_reader

    fixture = FIXTURES[name]()
    dense = read_model(fixture.model).network
    monkeypatch.setattr(cnn_reader, "MAX_DENSE_ENTRIES", 0)
    sparse = read_model(fixture.model).network
    levels = [k for k, layer in enumerate(sparse.layers) if layer.is_auxiliary]
    assert levels and all(sparse.layers[k].is_sparse for k in levels)
    for a, b in zip(dense.layers, sparse.layers, strict=True):
        got = b.weight.toarray() if b.is_sparse else b.weight
        np.testing.assert_allclose(got, a.weight, rtol=0, atol=1e-15)
        np.testing.assert_array_equal(b.bias, a.bias)
        assert (a.passthrough is None) == (b.passthrough is None)
    x = _samples(fixture.lower, fixture.upper)
    runtime = run_onnxruntime(fixture.model, x, fixture.input_shape)
    np.testing.assert_allclose(sparse.forward(x), runtime, rtol=0, atol=1e-5)


def test_a_max_tree_over_the_sparse_limit_is_refused_in_one_line(monkeypatch):
    import onnx_exact.io.affine_chain as affine_chain
    import onnx_exact.io.cnn_reader as cnn_reader

    monkeypatch.setattr(cnn_reader, "MAX_DENSE_ENTRIES", 0)
    monkeypatch.setattr(affine_chain, "MAX_SPARSE_ENTRIES", 100)
    model = FIXTURES["torch_relu_maxpool"]().model
    with pytest.raises(UnsupportedModelError, match="max tree would have .* over the limit of 100"):
        read_model(model)


# ----------------------------------------------------------------------------- property


@st.composite
def maxpool_nets(draw):
    """Small random Conv/MaxPool nets in either order, with random windows and boxes."""
    seed = draw(st.integers(0, 2**31 - 1))
    order = draw(st.sampled_from(["relu_pool", "pool_relu"]))
    kernel = draw(st.sampled_from([[2, 2], [3, 3], [2, 3]]))
    stride = draw(st.sampled_from([1, 2]))
    pads = draw(st.sampled_from([[0] * 4, [1] * 4]))
    fixture = pool_model("MaxPool", order, (1, 5, 5), seed, kernel_shape=kernel,
                         strides=[stride] * 2, pads=pads)  # fmt: skip
    rng = np.random.default_rng(seed)
    centre = rng.uniform(0, 1, fixture.lower.size)
    radius = rng.uniform(0, 1, fixture.lower.size) * draw(st.sampled_from([0.05, 0.3, 1.0]))
    return fixture, Box(centre - radius, centre + radius, "input", "hypothesis")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=maxpool_nets())
def test_proved_stable_neurons_of_a_maxpool_net_never_flip_on_dense_samples(case):
    """Every neuron proved ACTIVE or INACTIVE, the auxiliary ones of the max tree included,
    keeps its sign on dense samples of the box (uniform, corners, the analysis's witnesses)."""
    fixture, box = case
    net = read_model(fixture.model).network
    result = analyze_stability(net, box, time_limit=20, jobs=1, seed=0)
    rng = np.random.default_rng(1)
    uniform = rng.uniform(box.lower, box.upper, (4000, box.size))
    corners = np.where(rng.random((2000, box.size)) < 0.5, box.lower, box.upper)
    points = np.vstack([uniform, corners, *([result.witnesses] if len(result.witnesses) else [])])
    pre = net.preactivations(net.input_map.apply(points))
    for k in net.relu_layer_indices:
        states = result.layers[k].states
        assert np.all(pre[k][:, states == NeuronState.ACTIVE] >= 0.0)
        assert np.all(pre[k][:, states == NeuronState.INACTIVE] <= 0.0)
