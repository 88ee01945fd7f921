"""Fusing the linear ops around a removed all-active ReLU (``onnx_exact.io.cnn_fusion``).

Each fixture has a first Conv whose ReLU is planted always active on the box ``[0, 1]``: its
bias is ``Σ|W| + 1`` per channel, so the pre-activation is at least 1 for every input of the
box (interval bounds prove it). The rest of the network is random (seeded).
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from conftest import run_cli
from exporter_fixtures import GraphBuilder

from onnx_exact import AnalysisOptions, DomainSpec, check, compress
from onnx_exact.core.operators import ConvOperator
from onnx_exact.io.channel_pruning import prune_channels
from onnx_exact.io.model_stats import model_stats

SHAPE = (2, 6, 6)


def _weight(rng, *shape) -> np.ndarray:
    fan_in = int(np.prod(shape[1:]))
    return (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)


def _active_weights(rng, c_in: int, c_out: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Conv weights whose every output is ≥ 1 on inputs in [0, 1] (bias Σ|W| + 1)."""
    kernel = _weight(rng, c_out, c_in, k, k)
    bias = (np.abs(kernel.astype(np.float64)).sum(axis=(1, 2, 3)) + 1.0).astype(np.float32)
    return kernel, bias


def _active_conv(g: GraphBuilder, rng, x: str, c_in: int, c_out: int, k: int, **attrs) -> str:
    kernel, bias = _active_weights(rng, c_in, c_out, k)
    return g.node("Conv", [x, g.const(kernel), g.const(bias)], kernel_shape=[k, k], **attrs)


def _head(g: GraphBuilder, rng, h: str, n_in: int, hidden: int = 10, style: str = "gemm") -> None:
    """``Flatten → n_in → hidden → ReLU → 3`` (Gemm, or tf2onnx's MatMul [+ Add])."""
    w1, b1 = _weight(rng, hidden, n_in), rng.normal(0, 0.1, hidden).astype(np.float32)
    w2, b2 = _weight(rng, 3, hidden), rng.normal(0, 0.1, 3).astype(np.float32)
    if style == "gemm":
        h = g.node("Gemm", [g.node("Flatten", [h], axis=1), g.const(w1), g.const(b1)], transB=1)
    else:
        target = g.const(np.array([-1, n_in]), dtype=np.int64)
        h = g.node("MatMul", [g.node("Reshape", [h, target]), g.const(np.ascontiguousarray(w1.T))])
        if style == "matmul_add":
            h = g.node("Add", [h, g.const(b1)])
    h = g.node("Relu", [h], name="relu_fc")
    g.node("Gemm", [h, g.const(w2), g.const(b2)], output="y", transB=1)


def _model(g: GraphBuilder) -> onnx.ModelProto:
    return g.model([g.tensor("x", ["batch", *SHAPE])], [g.tensor("y", ["batch", 3])])


def conv_gemm(out_channels: int = 4, k: int = 3, hidden: int = 10, style="gemm", seed=0):
    """``Conv(2 → out, k×k) → Relu (always active) → Flatten → Gemm → Relu → Gemm``."""
    rng, g = np.random.default_rng(seed), GraphBuilder()
    h = _active_conv(g, rng, "x", SHAPE[0], out_channels, k)
    h = g.node("Relu", [h], name="relu1")
    side = SHAPE[1] - k + 1
    if style != "gemm":  # tf2onnx: NCHW back to NHWC before the Reshape
        h = g.node("Transpose", [h], perm=[0, 2, 3, 1])
    _head(g, rng, h, out_channels * side * side, hidden, style)
    return _model(g)


def conv_conv(pad2: int = 0, k2: int = 1, stride1: int = 1, stride2: int = 1, seed=0):
    """``Conv(2 → 8, 3×3, pad 1, stride1) → Relu (always active) → Conv(8 → 2, k2, pad2,
    stride2) → Relu → Flatten → Gemm → Relu → Gemm``."""
    rng, g, h = np.random.default_rng(seed), GraphBuilder(), "x"
    kernel1, bias1 = _active_weights(rng, SHAPE[0], 8, 3)
    attrs = {"pads": [1] * 4, "strides": [stride1] * 2}
    h = g.node("Conv", [h, g.const(kernel1), g.const(bias1)], kernel_shape=[3, 3], **attrs)
    h = g.node("Relu", [h], name="relu1")
    kernel = _weight(rng, 2, 8, k2, k2)
    conv1 = ConvOperator(kernel1, bias1, SHAPE[1:], attrs["pads"], attrs["strides"])
    centre = conv1.forward(np.full((1, conv1.n_in), 0.5)).reshape(8, -1).mean(axis=1)
    bias = (-kernel.astype(np.float64).sum(axis=(2, 3)) @ centre).astype(np.float32)  # mixed
    h = g.node(
        "Conv",
        [h, g.const(kernel), g.const(bias)],
        kernel_shape=[k2, k2],
        pads=[pad2] * 4,
        strides=[stride2] * 2,
    )
    h = g.node("Relu", [h], name="relu2")
    side = (SHAPE[1] - 1) // stride1 + 1
    side = (side + 2 * pad2 - k2) // stride2 + 1
    _head(g, rng, h, 2 * side * side)
    return _model(g)


def _outputs(model: onnx.ModelProto, x: np.ndarray, shape=SHAPE) -> np.ndarray:
    """onnxruntime's output for flat samples ``x`` fed as ``[m, *shape]`` float32."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32).reshape(-1, *shape)})[0]


def _samples(n: int = 256) -> np.ndarray:
    return np.random.default_rng(7).random((n, int(np.prod(SHAPE))))


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _assert_same_function(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    onnx.checker.check_model(after, full_check=True)
    x = _samples()
    np.testing.assert_allclose(_outputs(after, x), _outputs(before, x), rtol=0, atol=1e-5)


def _fused(model: onnx.ModelProto):
    pruned = prune_channels(model, {}, ["relu1"])
    assert pruned.removed_relus == ["relu1"]
    return pruned


# ----------------------------------------------------------------------------- the graph step


def test_conv_then_gemm_fuses_into_one_gemm_on_the_conv_input():
    """Conv 2→4 3×3 on 6×6 (16·4·18 = 1152 MACs) + Gemm 64→10 (640) become one Gemm 72→10
    (720): no Conv left, the Flatten reads the input, same outputs on the box."""
    model = conv_gemm()
    pruned = _fused(model)
    fusion = pruned.fusion.fused["relu1"]
    assert (fusion.kind, fusion.macs_before, fusion.macs_after) == ("Conv∘Gemm", 1152 + 640, 720)
    assert "Conv" not in _ops(pruned.model) and "Relu" in _ops(pruned.model)
    assert model_stats(pruned.model).macs == model_stats(model).macs - 1792 + 720
    flatten = next(n for n in pruned.model.graph.node if n.op_type == "Flatten")
    assert flatten.input[0] == "x"
    _assert_same_function(model, pruned.model)


def test_tf2onnx_transpose_reshape_matmul_chains_fuse_with_and_without_an_add():
    """NHWC Transpose → Reshape([-1, n]) → MatMul (+ Add): the MatMul takes the composed weight
    and the Add the composed bias; without an Add, one is inserted for the Conv's bias."""
    for style in ("matmul_add", "matmul"):
        model = conv_gemm(style=style)
        pruned = _fused(model)
        assert pruned.fusion.fused["relu1"].kind == "Conv∘MatMul", style
        ops = _ops(pruned.model)
        assert "Conv" not in ops and "Transpose" not in ops and ops.count("Add") == 1, style
        _assert_same_function(model, pruned.model)


def test_a_fusion_that_would_grow_the_macs_is_not_made():
    """A cheap 1×1 Conv 2→1 (36·2 = 72 MACs) before a wide Gemm 36→40 (1440): one Gemm
    72→40 would take 2880, so the Conv stays (the ReLU still goes)."""
    model = conv_gemm(out_channels=1, k=1, hidden=40)
    pruned = _fused(model)
    assert "relu1" not in pruned.fusion.fused
    assert "would not lower the MACs (1512 -> 2880)" in pruned.fusion.unfused["relu1"]
    assert "Conv" in _ops(pruned.model)
    _assert_same_function(model, pruned.model)


def test_conv_then_1x1_conv_fuses_into_one_conv():
    """Conv 2→8 3×3 pad 1 (36·8·18 = 5184 MACs) + 1×1 Conv 8→2 (576) become one 3×3 Conv
    2→2 pad 1 (36·2·18 = 1296)."""
    model = conv_conv()
    pruned = _fused(model)
    fusion = pruned.fusion.fused["relu1"]
    assert (fusion.kind, fusion.macs_before, fusion.macs_after) == ("Conv∘Conv", 5760, 1296)
    convs = [n for n in pruned.model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1 and convs[0].input[0] == "x"
    attrs = {a.name: list(a.ints) for a in convs[0].attribute}
    assert attrs == {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}
    _assert_same_function(model, pruned.model)


def test_strided_convs_fuse_into_a_larger_strided_kernel():
    """Conv 3×3 stride 2 pad 1 (6×6 → 3×3) then 2×2 stride 1: kernel 2·1 + 3 = 5, stride 2,
    begin pads 1 and end pads what the last output reads (2·1 + 5 − 1 − 6 = 0)."""
    model = conv_conv(k2=2, stride1=2)
    pruned = _fused(model)
    conv = next(n for n in pruned.model.graph.node if n.op_type == "Conv")
    attrs = {a.name: list(a.ints) for a in conv.attribute}
    assert attrs == {"kernel_shape": [5, 5], "strides": [2, 2], "pads": [1, 1, 0, 0]}
    _assert_same_function(model, pruned.model)


def test_a_padded_second_conv_is_not_fused_and_the_model_stays_exact():
    """Conv2 with pads: its zero border is not Conv1 on a zero-padded input (Conv1's bias
    would leak into the border), so both Convs stay, although fusing would lower the MACs."""
    model = conv_conv(pad2=1, k2=3)
    pruned = _fused(model)
    assert "relu1" not in pruned.fusion.fused
    assert "pads its input" in pruned.fusion.unfused["relu1"]
    assert _ops(pruned.model).count("Conv") == 2
    _assert_same_function(model, pruned.model)


def test_a_fan_out_or_graph_output_on_the_chain_blocks_the_fusion():
    """The Conv's output also read elsewhere (here: a second graph output) stays unfused."""
    model = conv_gemm()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    model.graph.output.append(onnx.helper.make_tensor_value_info(conv.output[0], 1, None))
    pruned = prune_channels(model, {}, ["relu1"])
    assert "relu1" not in pruned.fusion.fused and "graph output" in pruned.fusion.unfused["relu1"]
    assert "Conv" in _ops(pruned.model)


# ----------------------------------------------------------------------------- end to end


def test_compress_fuses_a_proved_active_relu_lowers_the_macs_and_check_proves_it(tmp_path):
    """``onnx-exact IN OUT`` (exit 0, verified): the ReLU proved active is removed and its Conv
    fused into the Gemm; the report's MACs (from the written model) drop; ``check IN OUT``
    proves the pair equal (the input's proved-active layer composed away in the output)."""
    model = conv_gemm()
    source, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, source)
    code, _, stderr = run_cli(
        [source, out, "-r", "[0,1]", "--time-limit", "5", "--jobs", "1", "--json", report]
    )
    assert code == 0, stderr
    doc = json.loads(report.read_text())
    written = onnx.load(out)
    assert "Conv" not in _ops(written)
    note = next(n for n in doc["notes"] if n.startswith("relu1: Conv 'Conv_4' fused into Gemm"))
    before, after = map(int, re.search(r"MACs (\d+) -> (\d+)", note).groups())
    assert after < before
    assert doc["macs_after"] == model_stats(written).macs < doc["macs_before"]
    _assert_same_function(model, written)
    code, stdout, stderr = run_cli(["check", source, out, "-r", "[0,1]", "--json", "-"])
    assert code == 0, stderr
    assert json.loads(stdout)["proof"]["status"] == "proved"


def test_compress_with_prove_on_a_fused_conv_pair():
    """The Python API, ``prove=True``: the fused conv∘conv output is verified and proved."""
    model = conv_conv()
    box = DomainSpec(lower=np.zeros(72), upper=np.ones(72))
    result = compress(model, None, box, AnalysisOptions(time_limit=5, jobs=1), prove=True)
    assert _ops(result.model).count("Conv") == 1
    assert result.report.macs_after < result.report.macs_before
    assert result.report.passed and result.report.proof.status == "proved"
    assert check(model, result.model, box).proof.status == "proved"


def test_batchnorm_and_average_pool_on_the_chain_are_composed_into_the_gemm():
    """Conv → BatchNormalization → Relu (active) → AveragePool 2×2 → Flatten → Gemm: BN and
    pool are folded into the one Gemm (the reader's composition), the Conv and both go."""
    rng, g = np.random.default_rng(3), GraphBuilder()
    h = _active_conv(g, rng, "x", 2, 4, 3, pads=[1] * 4)
    scale = (0.5 + rng.random(4)).astype(np.float32)
    shift = (np.abs(rng.normal(0, 0.1, 4)) + 2 * scale * 10).astype(np.float32)
    stats = [g.const(scale), g.const(shift), g.const(np.zeros(4)), g.const(np.ones(4))]
    h = g.node("BatchNormalization", [h, *stats], epsilon=0.0)
    h = g.node("Relu", [h], name="relu1")
    h = g.node("AveragePool", [h], kernel_shape=[2, 2], strides=[2, 2])
    _head(g, rng, h, 4 * 3 * 3, hidden=30)
    model = _model(g)
    pruned = _fused(model)
    assert pruned.fusion.fused["relu1"].macs_after == 72 * 30
    assert _ops(pruned.model) == ["Flatten", "Gemm", "Relu", "Gemm"]
    _assert_same_function(model, pruned.model)


def test_two_removed_relus_in_a_row_fuse_conv_conv_then_conv_gemm():
    """relu1 and relu2 both active: Conv∘Conv first (3×3 then 1×1), then the fused Conv∘Gemm;
    only Flatten and the Gemm head are left."""
    rng, g = np.random.default_rng(4), GraphBuilder()
    h = _active_conv(g, rng, "x", 2, 8, 3, pads=[1] * 4)
    h = g.node("Relu", [h], name="relu1")
    h = _active_conv(g, rng, h, 8, 2, 1)
    h = g.node("Relu", [h], name="relu2")
    _head(g, rng, h, 2 * 36, hidden=4)
    model = _model(g)
    pruned = prune_channels(model, {}, ["relu1", "relu2"])
    assert pruned.fusion.fused["relu1"].kind == "Conv∘Conv"
    assert pruned.fusion.fused["relu2"].kind == "Conv∘Gemm"
    assert _ops(pruned.model) == ["Flatten", "Gemm", "Relu", "Gemm"]
    _assert_same_function(model, pruned.model)


def test_a_per_position_constant_between_two_convs_is_no_convolution_and_stays():
    """An Add of a per-position constant after Conv1 makes Conv1∘Conv2 a dense map that no
    convolution computes: it is read back, found different, and left unfused."""
    rng, g = np.random.default_rng(5), GraphBuilder()
    h = _active_conv(g, rng, "x", 2, 8, 3, pads=[1] * 4)
    h = g.node("Add", [h, g.const(rng.random((8, 6, 6)))])
    h = g.node("Relu", [h], name="relu1")
    h = g.node("Conv", [h, g.const(_weight(rng, 2, 8, 1, 1))], kernel_shape=[1, 1])
    h = g.node("Relu", [h], name="relu2")
    _head(g, rng, h, 72)
    model = _model(g)
    pruned = _fused(model)
    assert "bias varies over positions" in pruned.fusion.unfused["relu1"]
    assert _ops(pruned.model).count("Conv") == 2
    _assert_same_function(model, pruned.model)


def test_an_ir3_model_keeps_its_initializers_declared_as_inputs():
    """IR 3 needs every initializer among the graph inputs: the fused weights are declared,
    the replaced ones no longer."""
    rng, g = np.random.default_rng(6), GraphBuilder()
    h = g.node("Relu", [_active_conv(g, rng, "x", 2, 4, 3)], name="relu1")
    _head(g, rng, h, 64)
    model = g.model(
        [g.tensor("x", ["batch", *SHAPE])],
        [g.tensor("y", ["batch", 3])],
        opset=8,
        ir_version=3,
        initializers_as_inputs=True,
    )
    pruned = _fused(model)
    graph = pruned.model.graph
    assert {t.name for t in graph.initializer} == {i.name for i in graph.input} - {"x"}
    _assert_same_function(model, pruned.model)


def test_a_linear_relu6_is_removed_and_fused_like_a_relu():
    """``Clip(0, c)`` with every unit between 0 and c (c above the Conv's largest output on the
    box) is the identity: removed with its bound constants, its Conv fused into the Gemm."""
    rng, g = np.random.default_rng(8), GraphBuilder()
    h = _active_conv(g, rng, "x", 2, 4, 3)
    bounds = [g.const(np.float32(0.0)), g.const(np.float32(1000.0))]
    h = g.node("Clip", [h, *bounds], name="clip1")
    _head(g, rng, h, 64)
    model = _model(g)
    pruned = prune_channels(model, {}, ["clip1"])
    assert pruned.removed_relus == ["clip1"] and pruned.fusion.fused["clip1"].kind == "Conv∘Gemm"
    assert _ops(pruned.model) == ["Flatten", "Gemm", "Relu", "Gemm"]
    assert len(pruned.model.graph.initializer) == 4  # fused W, b and the head's: no bounds left
    _assert_same_function(model, pruned.model)


@pytest.mark.parametrize(
    ("spatial", "conv1", "conv2"),
    [
        ((7, 7), {"k": 3, "pads": [1, 0, 2, 1], "strides": [2, 1]}, {"k": 2, "strides": [1, 2]}),
        (
            (8, 8),
            {"k": 3, "auto_pad": "SAME_UPPER", "strides": [2, 2]},
            {"k": 2, "strides": [2, 2]},
        ),
        ((6, 6), {"k": 2, "group": 2, "pads": [1, 1, 1, 1]}, {"k": 1, "auto_pad": "VALID"}),
        ((9,), {"k": 3, "pads": [2, 1], "strides": [2]}, {"k": 3, "strides": [1]}),
    ],
)
def test_conv_conv_geometries_fuse_into_the_same_function(spatial, conv1, conv2):
    """Strides, asymmetric and ``auto_pad`` pads, a grouped Conv1, 1-D: the fused Conv (group 1,
    kernel ``s1·(k2−1)+k1``, stride ``s1·s2``) computes what the two did, on the box."""
    rng, g = np.random.default_rng(9), GraphBuilder()
    d, c_in, c_mid = len(spatial), 2, 8
    k1, k2 = conv1.pop("k"), conv2.pop("k")
    kernel = _weight(rng, c_mid, c_in // conv1.get("group", 1), *(k1,) * d)
    bias = (np.abs(kernel.astype(np.float64)).sum(axis=tuple(range(1, d + 2))) + 1.0).astype(
        np.float32
    )
    h = g.node("Conv", ["x", g.const(kernel), g.const(bias)], kernel_shape=[k1] * d, **conv1)
    h = g.node("Relu", [h], name="relu1")
    w2 = _weight(rng, 3, c_mid, *(k2,) * d)
    h = g.node("Conv", [h, g.const(w2)], kernel_shape=[k2] * d, output="y", **conv2)
    model = g.model(
        [g.tensor("x", ["batch", c_in, *spatial])],
        [g.tensor("y", ["batch", 3, *(f"s{i}" for i in range(d))])],
    )
    model = onnx.shape_inference.infer_shapes(model)
    pruned = prune_channels(model, {}, ["relu1"])
    assert _ops(pruned.model) == ["Conv"], pruned.fusion.unfused
    x = np.random.default_rng(1).random((64, c_in * int(np.prod(spatial))))
    runs = [_outputs(m, x, (c_in, *spatial)) for m in (model, pruned.model)]
    assert runs[0].shape == runs[1].shape
    np.testing.assert_allclose(runs[1], runs[0], rtol=0, atol=1e-5)
