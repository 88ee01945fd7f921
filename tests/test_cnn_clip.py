"""``Clip(0, c)`` / ReLU6 in CNNs (issue 24): read exactly, analysed, pruned and verified.

The reader writes ``clip(y, 0, 6) = relu(y) - relu(y - 6)``: units ``relu(y)`` and auxiliary
kink neurons ``relu(y - 6)``. A unit is then stably 0 (dead: its channel goes as a Relu's),
stably linear (unit ACTIVE, kink INACTIVE: a Clip linear everywhere is removed), stably 6
(saturated: removed where every consumer takes the constant 6 into its bias exactly) or
unstable. Each fixture is compressed through ``onnx_exact.compress`` (verified on the written
file), then compared with the input model in onnxruntime on box samples.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from cnn_fixtures import CLIP, VALID_BUILDERS, run_onnxruntime
from conftest import run_cli
from exporter_fixtures import GraphBuilder

from onnx_exact import AnalysisOptions, DomainSpec, compress
from onnx_exact.core.box import Box
from onnx_exact.core.network import DenseLayer
from onnx_exact.core.verdicts import NeuronState
from onnx_exact.io.channel_pruning import prune_channels
from onnx_exact.io.onnx_reader import read_model
from onnx_exact.stability.state import Analysis

#: Per fixture and Clip: the channels removed, the saturated ones proved and those of them
#: folded, the linear channels proved, and whether the Clip goes as the identity. clip_legacy:
#: conv2 pads nothing, so clip1's saturated channel folds. clip_tf2onnx: the second Conv pads,
#: so Relu6's saturated channel stays. mobilenet_block: ``clip_expand`` channel 0 is dead but the
#: depthwise Conv's bias makes its group's output a non-zero constant, so it stays; depthwise
#: channels 2, 4, 5 are dead and 3 saturated (folded into the 1×1 project Conv's bias), which
#: releases the same expand channels; the saturated expand channel feeds the (padded) depthwise.
EXPECTED = {
    "clip_legacy": {
        "clip1": ([0, 1], [1], [1], [2], False),
        "clip2": ([], [], [], [0, 1, 2, 3], True),
    },
    "clip_tf2onnx": {
        "Relu6": ([1], [3], [], [0], False),
        "Relu6_1": ([2, 5], [], [], None, False),
    },
    "mobilenet_block": {
        # clip_expand's dead channel 0 leaves depthwise channel 0 at its bias: a constant the
        # project Conv takes, so channel 0 goes from both Clips
        "clip_expand": ([0, 2, 3, 4, 5], [1], [], [2], False),
        "clip_dw": ([0, 2, 3, 4, 5], [3], [3], None, False),
    },
}


def _samples(fixture, count: int = 64) -> np.ndarray:
    rng = np.random.default_rng(5)
    x = fixture.lower + (fixture.upper - fixture.lower) * rng.random((count, fixture.lower.size))
    corners = np.where(rng.random((count // 2, x.shape[1])) < 0.5, fixture.lower, fixture.upper)
    return np.vstack([x, corners])


@pytest.mark.parametrize("name", CLIP)
def test_relu6_cnns_lose_dead_channels_and_linear_clips_and_verify(name):
    fixture = VALID_BUILDERS[name]()
    result = compress(
        fixture.model,
        None,
        DomainSpec(lower=fixture.lower, upper=fixture.upper),
        AnalysisOptions(time_limit=10, jobs=1),
    )
    report = result.report
    assert report.passed and report.params_after < report.params_before
    by_name = {layer.name: layer for layer in report.layers}
    for clip, (removed, saturated, folded, linear, gone) in EXPECTED[name].items():
        layer = by_name[clip]
        channels = layer.channels
        assert layer.clip == channels.clip == 6.0
        assert channels.removed == removed, (clip, channels)
        assert channels.saturated == saturated and channels.folded == folded, (clip, channels)
        if linear is not None:
            assert channels.active == linear, (clip, channels)
        assert channels.relu_removed == gone
        positions = channels.positions
        assert len(layer.stably_saturated) >= positions * len(saturated)
        assert len(layer.stably_linear) >= positions * len(channels.active)
        assert set(layer.stably_saturated) <= set(layer.stably_active)  # y >= 6 >= 0
        planted = fixture.planted.get(clip, {})
        assert {c for c, kind in planted.items() if kind == "saturated"} == set(saturated)
        doc = layer.to_json()
        assert doc["clip"] == 6.0 and doc["channels"]["saturated"] == saturated
    clips = {n.name for n in result.model.graph.node if n.op_type == "Clip"}
    assert clips == {clip for clip, spec in EXPECTED[name].items() if not spec[4]}
    unfolded = [n for n in report.notes if "saturated channels (constant 6) kept" in n]
    assert len(unfolded) == sum(len(spec[1]) > len(spec[2]) for spec in EXPECTED[name].values()), (
        report.notes
    )
    onnx.checker.check_model(result.model, full_check=True)
    x = _samples(fixture)
    np.testing.assert_allclose(
        run_onnxruntime(result.model, x, fixture.input_shape),
        run_onnxruntime(fixture.model, x, fixture.input_shape),
        rtol=0,
        atol=1e-5,
    )


def test_a_removed_clip_takes_its_unshared_bound_constants_along():
    """The tf2onnx fixture's two Clips share their ``min``/``max`` initializers: removing one
    keeps them, removing both drops them (the pruner trusts the caller's ``linear``)."""
    model = VALID_BUILDERS["clip_tf2onnx"]().model
    bounds = set(model.graph.node[[n.name for n in model.graph.node].index("Relu6")].input[1:])
    one = prune_channels(model, {}, ["Relu6"]).model
    assert bounds <= {t.name for t in one.graph.initializer}
    both = prune_channels(model, {}, ["Relu6", "Relu6_1"])
    assert both.removed_relus == ["Relu6", "Relu6_1"]
    assert not bounds & {t.name for t in both.model.graph.initializer}
    assert "Clip" not in {n.op_type for n in both.model.graph.node}
    onnx.checker.check_model(both.model, full_check=True)


def _zero_passing_model(low: float) -> onnx.ModelProto:
    """``Conv → Relu → Clip(low, 6) → Conv → Flatten → Gemm``: the Relu's dead channel passes
    the Clip as zeros only when ``low <= 0`` (else it is the constant ``low``, which the
    bias-free Conv cannot take)."""
    rng = np.random.default_rng(3)
    g = GraphBuilder()
    bias = np.array([-50.0, 0.1, 0.2], np.float32)
    h = g.node("Conv", ["input", g.const(rng.normal(size=(3, 2, 1, 1)).astype(np.float32)),
                        g.const(bias)], kernel_shape=[1, 1])  # fmt: skip
    h = g.node("Relu", [h], name="relu")
    h = g.node("Clip", [h, g.const(np.float32(low)), g.const(np.float32(6.0))], name="clip")
    h = g.node("Conv", [h, g.const(rng.normal(size=(2, 3, 1, 1)).astype(np.float32))],
               kernel_shape=[1, 1])  # fmt: skip
    h = g.node("Flatten", [h], axis=1)
    g.node("Gemm", [h, g.const(rng.normal(size=(2, 8)).astype(np.float32))], output="out",
           transB=1)  # fmt: skip
    return g.model([g.tensor("input", ["n", 2, 2, 2])], [g.tensor("out", ["n", 2])], opset=13)


@pytest.mark.parametrize("low, passes", [(0.0, True), (-1.0, True), (0.5, False)])
def test_a_dead_channel_passes_a_downstream_clip_whose_range_holds_zero(low, passes):
    model = _zero_passing_model(low)
    result = prune_channels(model, {"relu": [0]})
    if passes:
        assert result.removed == {"relu": [0], "clip": [0]} and result.kept == {}
        x = np.random.default_rng(0).random((16, 8))
        np.testing.assert_allclose(
            run_onnxruntime(result.model, x, (2, 2, 2)),
            run_onnxruntime(model, x, (2, 2, 2)),
            atol=1e-5,
        )
    else:
        assert result.removed == {} and "no per-output constant bias" in result.kept["relu"]


def _saturated_model(head: str, pads: int = 0) -> onnx.ModelProto:
    """``Conv → Clip(0, 6) → [Conv 3×3 (pads) →] Flatten → head`` on ``[n, 2, 3, 3]`` with
    channel 1 saturated (bias +50): ``gemm`` (with bias), ``matmul`` (no bias)."""
    rng = np.random.default_rng(8)
    g = GraphBuilder()
    bias = np.array([0.2, 50.0, 0.1], np.float32)
    h = g.node("Conv", ["input", g.const(rng.normal(size=(3, 2, 1, 1)).astype(np.float32)),
                        g.const(bias)], kernel_shape=[1, 1])  # fmt: skip
    h = g.node("Clip", [h, g.const(np.float32(0.0)), g.const(np.float32(6.0))], name="clip")
    size = 27
    if pads >= 0 and head == "conv":
        kernel = rng.normal(size=(2, 3, 3, 3)).astype(np.float32)
        h = g.node("Conv", [h, g.const(kernel), g.const(np.ones(2, np.float32))],
                   kernel_shape=[3, 3], pads=[pads] * 4)  # fmt: skip
        size = 2 * (1 + 2 * pads) ** 2
    h = g.node("Flatten", [h], axis=1)
    weight = rng.normal(size=(size, 2)).astype(np.float32)
    if head == "matmul":
        g.node("MatMul", [h, g.const(weight)], output="out")
    else:
        g.node("Gemm", [h, g.const(weight), g.const(np.zeros(2, np.float32))], output="out")
    return g.model([g.tensor("input", ["n", 2, 3, 3])], [g.tensor("out", ["n", 2])], opset=13)


@pytest.mark.parametrize(
    "head, pads, reason",
    [("gemm", 0, ""), ("conv", 0, ""), ("conv", 1, "pads its input"),
     ("matmul", 0, "no per-output constant bias")],
)  # fmt: skip
def test_a_saturated_channel_folds_into_a_bias_only_where_it_is_exact(head, pads, reason):
    """The pruner trusts the request (channel 1 is 6 everywhere here: ``50 + w·x`` with
    ``|w·x| < 50`` on [0, 1]); it folds ``6·Σ W`` into a Gemm's or an unpadded Conv's bias and
    refuses a padded Conv (0 at the border) and a MatMul (no bias to take it)."""
    model = _saturated_model(head, pads)
    result = prune_channels(model, {}, (), {"clip": (6.0, [1])})
    if reason:
        assert result.folded == {} and reason in result.unfolded["clip"]
        return
    assert result.folded == {"clip": [1]} and result.removed == {"clip": [1]}
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(0).random((32, 18))
    np.testing.assert_allclose(
        run_onnxruntime(result.model, x, (2, 3, 3)), run_onnxruntime(model, x, (2, 3, 3)),
        atol=1e-4,
    )  # fmt: skip


def _clip_model(inputs: int, **attrs) -> onnx.ModelProto:
    """``Conv → Clip(...) → Flatten → Gemm``; ``inputs`` bound inputs (min, max) or attributes."""
    g = GraphBuilder()
    h = g.node("Conv", ["input", g.const(np.ones((2, 1, 1, 1), np.float32))], kernel_shape=[1, 1])
    bounds = [g.const(np.float32(v)) for v in (attrs.pop("low", 0.0), attrs.pop("high", 6.0))]
    h = g.node("Clip", [h, *bounds[:inputs]], name="bad_clip", **attrs)
    h = g.node("Flatten", [h], axis=1)
    weight, bias = g.const(np.ones((1, 8), np.float32)), g.const(np.zeros(1, np.float32))
    g.node("Gemm", [h, weight, bias], output="out", transB=1)
    opset = 13 if inputs or not attrs else 10
    return g.model([g.tensor("input", ["n", 1, 2, 2])], [g.tensor("out", ["n", 1])], opset=opset)


@pytest.mark.parametrize(
    "model, message",
    [
        (lambda: _clip_model(2, low=-1.0), "Clip(min -1, max 6) is not supported"),
        (lambda: _clip_model(1), "Clip(min 0, max none) is not supported"),
        (lambda: _clip_model(2, high=-2.0), "Clip(min 0, max -2) is not supported"),
        (lambda: _clip_model(0, min=0.5, max=6.0), "Clip(min 0.5, max 6) is not supported"),
    ],
    ids=["negative_min", "no_max", "negative_max", "attribute_min"],
)
def test_other_clips_exit_2_with_one_line_naming_the_node(model, message, tmp_path):
    path = tmp_path / "clip.onnx"
    onnx.save(model(), path)
    code, out, err = run_cli(["analyze", path, "--input-range", "[0,1]", "--jobs", "1"])
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("onnx-exact: error: ") and "node 'bad_clip' (Clip)" in lines[0]
    assert message in lines[0] and str(path) in lines[0]


def test_a_clip_layer_orders_units_kinks_then_passthrough_rows():
    """Units, kinks (auxiliary, not selection rows), then passthrough selection rows: only the
    latter are :attr:`DenseLayer.passthrough`; a copy keeps ``clip``."""
    weight = np.array([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]])
    layer = DenseLayer(weight, [0.5, -5.5, 0.0], True, "clip", auxiliary=[0, 1, 1], clip=6.0)
    assert layer.kinks.tolist() == [1] and layer.passthrough.tolist() == [1]
    h = np.array([[1.0, 3.0]])
    assert layer.apply(h).tolist() == [[7.5, 1.5, 3.0]]
    with pytest.raises(ValueError, match="kink"):
        DenseLayer(weight, [0.5, -5.5, 0.0], True, "clip", auxiliary=[0, 0, 1], clip=6.0)


def test_a_kink_seen_positive_ends_the_proofs_that_the_clip_is_the_identity():
    """Under the structural focus the ``-`` directions of a Clip layer's units (toward
    ACTIVE) matter only while no kink can be positive: a Clip stays unless every unit is
    linear. Kinks are never pursued themselves."""
    fixture = VALID_BUILDERS["clip_legacy"]()
    net = read_model(fixture.model).network
    box = Box(fixture.lower, fixture.upper, net.input_name, "test").to_network(net.input_map)
    analysis = Analysis(net, box, np.inf, 0, 1, None)
    analysis.focused = True
    k = net.relu_layer_indices[1]
    kinks = net.layers[k].kinks
    _, minus = analysis.structural(k)
    assert minus[: kinks[0]].all() and not minus[kinks].any()
    analysis.obs.seen_pos[k][kinks[3]] = True
    plus, minus = analysis.structural(k)
    assert not minus.any() and not plus[kinks].any() and plus[: kinks[0]].all()
    analysis.obs.seen_pos[k][kinks[3]] = False
    analysis.states[k][kinks[0]] = NeuronState.ACTIVE
    assert not analysis.structural(k)[1].any()


def _inverted_residual(
    fork_after_clip: bool, projection: bool = False
) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """A MobileNet-v2 inverted residual block: ``stem Conv [→ Clip]`` forks into ``1×1 expand →
    Clip → depthwise 3×3 → Clip → 1×1 project`` and the identity skip (or a 1×1 projection
    Conv, listed before the branch: the fork's first reader), joined by ``Add``, then
    ``GlobalAveragePool → Flatten → Gemm``; expand channel 1 is dead (bias −50)."""
    rng = np.random.default_rng(12)
    g = GraphBuilder()
    six = g.const(np.float32(6.0))
    zero = g.const(np.float32(0.0))

    def conv(x, c_out, c_in, k, bias=None, **attrs):
        kernel = (rng.normal(size=(c_out, c_in, k, k)) / np.sqrt(c_in * k * k)).astype(np.float32)
        b = rng.normal(0, 0.3, size=c_out).astype(np.float32) if bias is None else bias
        return g.node("Conv", [x, g.const(kernel), g.const(b)], kernel_shape=[k, k], **attrs)

    h = conv("input", 3, 2, 3, pads=[1, 1, 1, 1])
    if fork_after_clip:
        h = g.node("Clip", [h, zero, six], name="clip_stem")
    skip = conv(h, 3, 3, 1) if projection else h
    expand_bias = np.array([0.5, -50.0, 1.0, 2.0, 0.1, 0.3], np.float32)
    b = conv(h, 6, 3, 1, bias=expand_bias)
    b = g.node("Clip", [b, zero, six], name="clip_expand")
    b = conv(b, 6, 1, 3, group=6, pads=[1, 1, 1, 1])
    b = g.node("Clip", [b, zero, six], name="clip_dw")
    b = conv(b, 3, 6, 1)
    h = g.node("Add", [b, skip])
    h = g.node("GlobalAveragePool", [h])
    h = g.node("Flatten", [h], axis=1)
    g.node("Gemm", [h, g.const(rng.normal(size=(2, 3)).astype(np.float32))], output="out",
           transB=1)  # fmt: skip
    shape = (2, 5, 5)
    model = g.model([g.tensor("input", ["n", *shape])], [g.tensor("out", ["n", 2])], opset=13)
    return model, shape


@pytest.mark.parametrize(
    "fork_after_clip, projection",
    [(True, False), (False, False), (True, True)],
    ids=["clip_fork", "conv_fork", "projection_first"],
)
def test_clips_inside_a_residual_branch_read_and_prune_exactly(fork_after_clip, projection):
    """The skip source (a Clip output, or a Conv output) is carried across the branch's Clip
    layers (after their kinks) in the pair form; the branch is the path with the Clips even when
    a projection skip is the fork's first reader; the network is onnxruntime's, and the dead
    expand channel goes from the compressed model, which verifies."""
    model, shape = _inverted_residual(fork_after_clip, projection)
    n = int(np.prod(shape))
    x = np.random.default_rng(1).uniform(-1, 1, (40, n))
    net = read_model(model).network
    np.testing.assert_allclose(net.forward(x), run_onnxruntime(model, x, shape), atol=1e-5)
    expand = next(layer for layer in net.layers if layer.name == "clip_expand")
    units = int(expand.real.sum())
    assert expand.kinks.tolist() == list(range(units, 2 * units))
    assert expand.auxiliary[2 * units :].all() and expand.out_features > 2 * units
    result = compress(
        model,
        None,
        DomainSpec(lower=-np.ones(n), upper=np.ones(n)),
        AnalysisOptions(time_limit=10, jobs=1),
    )
    assert result.report.passed
    layer = next(layer for layer in result.report.layers if layer.name == "clip_expand")
    assert 1 in layer.channels.dead and 1 in layer.channels.removed
    np.testing.assert_allclose(
        run_onnxruntime(result.model, x, shape), run_onnxruntime(model, x, shape), atol=1e-5
    )


def test_a_relu6_in_the_dense_head_loses_its_dead_and_saturated_units():
    """``Conv → Relu → Flatten → Gemm → Clip(0, 6) → Gemm``: hidden unit 0 is dead (bias −50),
    unit 1 saturated (bias +50); both go, unit 1's 6 into the last Gemm's bias."""
    rng = np.random.default_rng(4)
    g = GraphBuilder()
    kernel = (rng.normal(size=(3, 2, 3, 3)) / 4).astype(np.float32)
    h = g.node("Conv", ["input", g.const(kernel), g.const(np.zeros(3, np.float32))],
               kernel_shape=[3, 3], pads=[1, 1, 1, 1])  # fmt: skip
    h = g.node("Flatten", [g.node("Relu", [h], name="relu")], axis=1)
    bias = (rng.normal(size=6) * 0.1).astype(np.float32)
    bias[:2] = [-50.0, 50.0]
    weight = (rng.normal(size=(6, 48)) / 7).astype(np.float32)
    h = g.node("Gemm", [h, g.const(weight), g.const(bias)], transB=1)
    h = g.node("Clip", [h, g.const(np.float32(0.0)), g.const(np.float32(6.0))], name="clip_fc")
    head = rng.normal(size=(2, 6)).astype(np.float32)
    g.node("Gemm", [h, g.const(head), g.const(np.zeros(2, np.float32))], output="out", transB=1)
    model = g.model([g.tensor("input", ["n", 2, 4, 4])], [g.tensor("out", ["n", 2])], opset=13)
    box = DomainSpec(lower=np.zeros(32), upper=np.ones(32))
    result = compress(model, None, box, AnalysisOptions(time_limit=10, jobs=1))
    channels = result.report.layers[1].channels
    assert result.report.passed and not channels.conv
    assert (channels.dead, channels.saturated, channels.folded) == ([0], [1], [1])
    assert channels.removed == [0, 1]
    x = np.random.default_rng(0).random((30, 32))
    np.testing.assert_allclose(
        run_onnxruntime(result.model, x, (2, 4, 4)), run_onnxruntime(model, x, (2, 4, 4)),
        atol=1e-5,
    )  # fmt: skip


def test_a_relu6_mlp_is_read_as_a_clip_network_and_compressed():
    """An MLP with ReLU6 (``Gemm → Clip → Gemm → Clip → Gemm``, no Conv) goes to the reader that
    knows Clip: hidden unit 0 dead, unit 1 saturated (folded into the next Gemm's bias), and the
    second Clip linear everywhere (small weights, bias 3), so it is removed."""
    rng = np.random.default_rng(6)
    g = GraphBuilder()
    low, high = g.const(np.float32(0.0)), g.const(np.float32(6.0))
    bias = (rng.normal(size=8) * 0.1).astype(np.float32)
    bias[:2] = [-50.0, 50.0]
    h = g.node("Gemm", ["x", g.const(rng.normal(size=(8, 6)).astype(np.float32)),
                        g.const(bias)], transB=1)  # fmt: skip
    h = g.node("Clip", [h, low, high], name="relu6_1")
    weight = (rng.normal(size=(4, 8)) * 0.02).astype(np.float32)
    h = g.node("Gemm", [h, g.const(weight), g.const(np.full(4, 3.0, np.float32))], transB=1)
    h = g.node("Clip", [h, low, high], name="relu6_2")
    head = rng.normal(size=(2, 4)).astype(np.float32)
    g.node("Gemm", [h, g.const(head), g.const(np.zeros(2, np.float32))], output="y", transB=1)
    model = g.model([g.tensor("x", ["n", 6])], [g.tensor("y", ["n", 2])], opset=13)
    box = DomainSpec(lower=np.zeros(6), upper=np.ones(6))
    result = compress(model, None, box, AnalysisOptions(time_limit=10, jobs=1))
    first, second = (layer.channels for layer in result.report.layers)
    assert result.report.passed
    assert (first.dead, first.saturated, first.removed) == ([0], [1], [0, 1])
    assert second.relu_removed and second.active == [0, 1, 2, 3]
    assert [n.name for n in result.model.graph.node if n.op_type == "Clip"] == ["relu6_1"]
    x = np.random.default_rng(2).random((40, 6))
    np.testing.assert_allclose(
        run_onnxruntime(result.model, x, (6,)), run_onnxruntime(model, x, (6,)), atol=1e-5
    )


def test_the_command_line_shows_the_clip_layers_saturated_and_folded(tmp_path):
    """``onnx-exact IN OUT``: the Channels table names each Clip layer's kind and its saturated
    channels; the JSON has the Clip keys per layer."""
    fixture = VALID_BUILDERS["clip_legacy"]()
    model, out, report = tmp_path / "clip.onnx", tmp_path / "small.onnx", tmp_path / "r.json"
    onnx.save(fixture.model, model)
    code, stdout, stderr = run_cli(
        [model, out, "-r", "[0,1]", "--time-limit", "10", "--jobs", "1", "--json", report]
    )
    assert code == 0, stderr
    assert "Clip(0, 6)" in stdout and "saturated" in stdout and "verification PASSED" in stdout
    layers = {layer["name"]: layer for layer in json.loads(report.read_text())["layers"]}
    assert layers["clip1"]["clip"] == 6.0 and layers["clip1"]["channels"]["folded"] == [1]
    assert len(layers["clip1"]["stably_saturated"]) == 36
    assert layers["clip2"]["channels"]["relu_removed"]
