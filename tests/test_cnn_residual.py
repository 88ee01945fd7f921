"""Residual CNNs (ResNet basic blocks): read exactly, analysed without counting the auxiliary
passthrough neurons, pruned by residual stream, and refused clearly when the join is not a
ResNet block.

The fixtures ``residual_block`` and ``resnet_blocks`` (``cnn_fixtures``) plant channels dead in
a residual stream (dead in every Relu tied by the identity skips) and on the fork; the shared
``resnet_4b`` is read when ``../shared`` is present.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from cnn_fixtures import RESIDUAL, VALID_BUILDERS, run_onnxruntime
from conftest import run_cli
from exporter_fixtures import GraphBuilder

from onnx_exact import AnalysisOptions, DomainSpec, compress
from onnx_exact.core.box import Box
from onnx_exact.core.errors import UnsupportedModelError
from onnx_exact.core.verdicts import NeuronState
from onnx_exact.io.model_stats import model_stats
from onnx_exact.io.onnx_reader import read_model
from onnx_exact.report import summarize_layers
from onnx_exact.stability import analyze_stability

STREAMS = {
    "residual_block": {"relu_a": [3], "relu_b": [1], "relu_out": [3]},
    "resnet_blocks": {"relu_s": [0], "relu_1a": [1], "relu_1": [4], "relu_2": [4]},
}
"""The planted dead channels each fixture must lose (streams: in every member at once)."""


def _samples(lower: np.ndarray, upper: np.ndarray, m: int = 32) -> np.ndarray:
    rng = np.random.default_rng(5)
    uniform = lower + (upper - lower) * rng.random((m, lower.size))
    corners = np.where(rng.random((m // 2, lower.size)) < 0.5, lower, upper)
    return np.vstack([uniform, corners])


@pytest.mark.parametrize("name", RESIDUAL)
def test_residual_fixtures_read_into_a_network_that_computes_the_model(name):
    """The skip's source is carried by auxiliary rows after each branch layer's own neurons:
    the network equals onnxruntime and the reference, and its real neurons' pre-activations
    are the graph's Relu inputs."""
    fixture = VALID_BUILDERS[name]()
    read = read_model(fixture.model)
    net = read.network
    x = _samples(fixture.lower, fixture.upper)
    expected, pre = fixture.reference(x)
    np.testing.assert_allclose(net.forward(x), expected, rtol=0, atol=1e-9)
    runtime = run_onnxruntime(fixture.model, x, fixture.input_shape)
    np.testing.assert_allclose(net.forward(x), runtime, rtol=0, atol=1e-5)
    preactivations = net.preactivations(net.input_map.apply(x))
    carried = 0
    for k, relu in zip(net.relu_layer_indices, read.binding.relu_nodes, strict=True):
        layer = net.layers[k]
        np.testing.assert_allclose(preactivations[k][:, layer.real], pre[relu], atol=1e-9)
        if layer.auxiliary is not None:
            carried += 1
            aux = np.flatnonzero(layer.auxiliary)
            assert aux[0] == layer.real.sum() and aux[-1] == layer.out_features - 1
            assert np.all(layer.channels[aux] == layer.channels[layer.real].max() + 1)
            assert layer.passthrough is not None  # gathered, not multiplied: same values
            h = np.abs(np.random.default_rng(k).normal(size=(5, layer.in_features)))
            dense = h @ layer.weight.T + layer.bias
            np.testing.assert_array_equal(layer.apply(h)[:, aux], dense[:, aux])
            np.testing.assert_allclose(layer.apply(h), dense, rtol=1e-12, atol=1e-12)
    assert carried == {"residual_block": 1, "resnet_blocks": 2}[name]


def test_auxiliary_neurons_are_active_by_construction_and_never_counted():
    fixture = VALID_BUILDERS["resnet_blocks"]()
    net = read_model(fixture.model).network
    box = Box(fixture.lower, fixture.upper).to_network(net.input_map)
    result = analyze_stability(net, box, time_limit=5, jobs=1, seed=0, tiers=())
    summaries = {s.name: s for s in summarize_layers(net, result)}
    for k in net.relu_layer_indices:
        layer, states = net.layers[k], result.layers[k]
        if layer.auxiliary is not None:
            assert np.all(states.states[layer.auxiliary] == NeuronState.ACTIVE)
            assert set(states.decided_by[layer.auxiliary]) == {"linear"}
        assert summaries[layer.name].size == int(layer.real.sum())
    assert sum(result.counts().values()) == sum(
        int(net.layers[k].real.sum()) for k in net.relu_layer_indices
    )
    dead = summaries["relu_1"].stably_inactive
    assert set(np.flatnonzero(net.layers[net.relu_layer_indices[2]].channels == 4)) <= set(dead)


def test_crown_substitutes_selection_rows_as_their_product_would():
    """CROWN adds a selection row's coefficients into the column it copies instead of
    multiplying by the row: the bounds equal those of the same layers without the shortcut."""
    from onnx_exact.bounds.crown import interval_bounds, symbolic_bounds

    fixture = VALID_BUILDERS["resnet_blocks"]()
    net = read_model(fixture.model).network
    box = Box(fixture.lower, fixture.upper).to_network(net.input_map)
    plain = net.copy()
    for layer in plain.layers:
        layer.passthrough = None  # every row multiplied
    assert any(layer.passthrough is not None for layer in net.layers)
    bounds = interval_bounds(net, box)
    for k in net.relu_layer_indices[1:]:
        fast, corners = symbolic_bounds(net, box, bounds, k)
        slow, slow_corners = symbolic_bounds(plain, box, bounds, k)
        np.testing.assert_allclose(fast.upper, slow.upper, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(fast.lower, slow.lower, rtol=1e-12, atol=1e-12)
        bounds[k] = fast


@pytest.mark.parametrize("name", RESIDUAL)
def test_residual_cnns_lose_their_stream_channels_and_verify(name):
    """Through ``compress``: verified on the written file, the planted channels removed from
    every Relu of their stream (and the fork's from both of its readers), fewer MACs, outputs
    equal to the input model's on box samples."""
    fixture = VALID_BUILDERS[name]()
    result = compress(
        fixture.model,
        None,
        DomainSpec(lower=fixture.lower, upper=fixture.upper),
        AnalysisOptions(time_limit=5, jobs=1),
    )
    report = result.report
    assert report.passed
    by_name = {layer.name: layer for layer in report.layers}
    for relu, channels in STREAMS[name].items():
        assert set(channels) <= set(by_name[relu].channels.removed), (relu, by_name[relu])
    after = model_stats(result.model)
    assert (after.params, after.macs) == (report.params_after, report.macs_after)
    assert report.macs_after < report.macs_before
    x = _samples(fixture.lower, fixture.upper, 64)
    np.testing.assert_allclose(
        run_onnxruntime(result.model, x, fixture.input_shape),
        run_onnxruntime(fixture.model, x, fixture.input_shape),
        rtol=0,
        atol=1e-5,
    )
    if name == "resnet_blocks":  # the projection lost output channel 4, both adds carry 5
        shapes = {t.name: t.dims for t in result.model.graph.initializer}
        convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
        projection = next(n for n in convs if shapes[n.input[1]][2:] == [1, 1])
        assert shapes[projection.input[1]][:2] == [5, 3]  # relu_s lost channel 0 too


def test_check_compares_a_residual_pair(tmp_path):
    """``check IN OUT`` on a pruned residual CNN: proved (the auxiliary neurons are the same
    in both networks and match; the removed ones are proved dead)."""
    fixture = VALID_BUILDERS["resnet_blocks"]()
    source, box, out = tmp_path / "in.onnx", tmp_path / "box.npz", tmp_path / "out.onnx"
    onnx.save(fixture.model, source)
    np.savez(box, lower=fixture.lower, upper=fixture.upper)
    code, _, stderr = run_cli([source, out, "--input-range-file", box, "--time-limit", "5"])
    assert code == 0, stderr
    code, stdout, stderr = run_cli(
        ["check", source, out, "--input-range-file", box, "--time-limit", "30", "--json", "-"]
    )
    assert code == 0, stderr
    assert json.loads(stdout)["proof"]["status"] == "proved"


def _block(kind: str) -> onnx.ModelProto:
    """``Conv → Relu (r) → ...`` with a join of the asked ``kind``."""
    rng = np.random.default_rng(0)
    g = GraphBuilder()

    def conv(x: str, name: str | None = None) -> str:
        weight = g.const((rng.normal(size=(2, 2, 3, 3)) / 3).astype(np.float32))
        return g.node("Conv", [x, weight], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name=name)

    h = conv("input") if kind != "input_fork" else "input"
    if kind == "conv_fork":  # the fork is a Conv output, not a Relu's: s may be negative
        r = h
    elif kind == "input_fork":  # a block on the network input (Mul: preprocessing first)
        r = g.node("Mul", ["input", g.const(np.float32(2.0))])
    else:
        r = g.node("Relu", [h], name="r")
    if kind == "both_relu":
        a = g.node("Relu", [conv(r)], name="left")
        b = g.node("Relu", [conv(r)], name="right")
        h = g.node("Add", [a, b], name="join")
    elif kind == "three_way":
        a = g.node("Relu", [conv(r)], name="left")
        b = conv(r)
        h = g.node("Add", [g.node("Add", [a, b], name="join"), r], name="join2")
    else:
        h = g.node("Add", [conv(g.node("Relu", [conv(r)], name="inner")), r], name="join")
    h = g.node("Relu", [h], name="out")
    h = g.node("Flatten", [h], axis=1)
    head = g.const(rng.normal(size=(2, 8)).astype(np.float32))
    g.node("Gemm", [h, head], output="output", transB=1)
    return g.model([g.tensor("input", ["batch", 2, 2, 2])], [g.tensor("output", ["batch", 2])])


@pytest.mark.parametrize(
    "kind, message",
    [
        ("both_relu", "node 'join' (Add): both paths from tensor"),
        ("three_way", "feeds 3 nodes"),
    ],
)
def test_joins_that_are_no_resnet_block_are_refused_naming_the_node(kind, message):
    with pytest.raises(UnsupportedModelError, match=re.escape(message)):
        read_model(_block(kind))


@pytest.mark.parametrize("kind", ["conv_fork", "input_fork", "relu_fork"])
def test_skips_from_tensors_that_may_be_negative_carry_the_pair_and_verify(kind):
    """A fork of a Conv output or of the input carries ``relu(s), relu(-s)`` (s = their
    difference): the network is the model's, the pair's first rows are no passthrough (not
    ACTIVE by construction) and are never counted; a ReLU output's fork carries ``s`` itself."""
    model = _block(kind)
    read = read_model(model)
    net = read.network
    lower, upper = -np.ones(8), np.ones(8)
    x = _samples(lower, upper)
    runtime = run_onnxruntime(model, x, (2, 2, 2))
    np.testing.assert_allclose(net.forward(x), runtime, rtol=0, atol=1e-5)
    k = next(i for i, layer in enumerate(net.layers) if layer.auxiliary is not None)
    first = net.layers[k]
    assert first.auxiliary.sum() == (8 if kind == "relu_fork" else 16)
    box = Box(lower, upper).to_network(net.input_map)
    result = analyze_stability(net, box, time_limit=5, jobs=1, seed=0)
    linear = result.layers[k].decided_by[first.auxiliary] == "linear"
    assert linear.all() if kind == "relu_fork" else not linear.any()
    sizes = [s.size for s in summarize_layers(net, result)]
    assert sizes == [8, 8, 8][-len(sizes) :] and sum(sizes) == sum(
        int(net.layers[i].real.sum()) for i in net.relu_layer_indices
    )
    out = compress(
        model, None, DomainSpec(lower=lower, upper=upper), AnalysisOptions(time_limit=5, jobs=1)
    )
    assert out.report.passed


def test_the_shared_resnet_reads_into_the_network_onnxruntime_runs(shared_models):
    path = shared_models / "cnn" / "resnet_4b.onnx"
    if not path.exists():
        pytest.skip("../shared/models/cnn/resnet_4b.onnx is absent")
    read = read_model(path)
    assert read.binding.relu_nodes[:3] == ["Relu_1", "Relu_3", "Relu_7"]
    carried = [
        int(layer.auxiliary.sum()) for layer in read.network.layers if layer.auxiliary is not None
    ]
    assert carried == [4096, 2048, 2048, 512]
    box = np.load(shared_models / "cnn" / "resnet_4b.box.npz")
    lower, upper = (np.asarray(box[key], np.float64).reshape(-1) for key in ("lower", "upper"))
    x = _samples(lower, upper, 2)
    model = onnx.load(path)
    runtime = np.vstack([run_onnxruntime(model, row[None], (3, 32, 32)) for row in x])
    np.testing.assert_allclose(read.network.forward(x), runtime, rtol=0, atol=1e-4)


def _stream_with_bn(seed: int = 3) -> onnx.ModelProto:
    """``Conv → r1 → [Conv → Relu → Conv] + Identity(r1) (Sum) → BN → r2 → GAP → Flatten →
    Gemm`` on ``[batch, 3, 4, 4]`` over [0, 1]: channel 2 is dead in r1 (bias −100) and in the
    branch's last Conv (bias −100), so also in r2 whatever the BN does to it."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder()

    def conv(x: str, c_in: int, bias: np.ndarray) -> str:
        weight = (rng.random((4, c_in, 3, 3)) * 0.3).astype(np.float32)
        inputs = [x, g.const(weight), g.const(bias.astype(np.float32))]
        return g.node("Conv", inputs, kernel_shape=[3, 3], pads=[1, 1, 1, 1])

    dead = np.array([0.1, 0.2, -100.0, 0.1])
    r1 = g.node("Relu", [conv("input", 3, dead)], name="r1")
    h = g.node("Relu", [conv(r1, 4, np.full(4, 0.1))], name="inner")
    h = g.node("Sum", [conv(h, 4, dead), g.node("Identity", [r1])], name="join")
    stats = [np.float32([1.5, 0.5, 2.0, 1.0]), np.float32([0.1, -0.2, 0.3, 0.0]),
             np.float32([0.2, 0.1, 0.0, 0.3]), np.float32([1.0, 2.0, 0.5, 1.0])]  # fmt: skip
    h = g.node("BatchNormalization", [h, *(g.const(s) for s in stats)], epsilon=1e-5)
    h = g.node("Relu", [h], name="r2")
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h])], axis=1)
    head = g.const(rng.normal(size=(2, 4)).astype(np.float32))
    g.node("Gemm", [h, head], output="output", transB=1)
    return g.model([g.tensor("input", ["batch", 3, 4, 4])], [g.tensor("output", ["batch", 2])])


def test_a_stream_through_a_sum_join_an_identity_skip_and_a_bn_loses_its_dead_channel():
    """The skip passes an Identity, the join is a Sum, a BatchNormalization sits between the
    join and its Relu: channel 2, dead in r1 and r2, goes from both Convs feeding them, the
    BN's statistics and the Convs and Gemm reading them; outputs unchanged on the box."""
    model = _stream_with_bn()
    lower, upper = np.zeros(48), np.ones(48)
    result = compress(
        model, None, DomainSpec(lower=lower, upper=upper), AnalysisOptions(time_limit=5, jobs=1)
    )
    assert result.report.passed
    by_name = {layer.name: layer.channels for layer in result.report.layers}
    assert by_name["r1"].removed == [2] and by_name["r2"].removed == [2]
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    bn = next(n for n in result.model.graph.node if n.op_type == "BatchNormalization")
    assert all(shapes[name] == [3] for name in bn.input[1:])
    x = _samples(lower, upper, 64)
    np.testing.assert_allclose(
        run_onnxruntime(result.model, x, (3, 4, 4)),
        run_onnxruntime(model, x, (3, 4, 4)),
        rtol=0,
        atol=1e-5,
    )
