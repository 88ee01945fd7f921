"""Removed channels followed as per-channel constants (``io/channel_constants.py``).

The MobileNet block ``Conv → ReLU6 → depthwise 3×3 (padding 1, bias) → [BN] → ReLU6 → Conv 1×1``:
a dead expansion channel leaves its depthwise group at the bias, a constant at every position
(the zero padding reads the same zeros), which BN and the second ReLU6 map on and the unpadded
1×1 Conv takes into its bias. The whole chain goes: the expansion filter, the depthwise group,
the BN entries, the pointwise input channel. A constant that reaches a padded Conv or a residual
Add keeps the channel, with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run_cli
from exporter_fixtures import GraphBuilder
from onnx import numpy_helper
from test_channel_pruning import assert_same_outputs

from onnx_exact import AnalysisOptions, DomainSpec, compress
from onnx_exact.io.channel_constants import Flow, Keep, reshaped_value
from onnx_exact.io.channel_pruning import prune_channels
from onnx_exact.io.model_stats import model_stats

SHAPE = (3, 6, 6)
LOWER, UPPER = np.zeros(108), np.ones(108)
EPS = 1e-3
BN = [np.array(v, np.float32) for v in ([1.2, 0.8, 1.1, 0.9], [0.1, -0.2, 0.05, 0.3],
                                        [0.05, 0.4, -0.1, 0.2], [1.5, 0.6, 0.9, 1.1])]  # fmt: skip
"""scale, B, mean, var of the BatchNormalization after the depthwise Conv."""


def mobile_block(
    bn: bool = False, consumer: str = "pointwise", head: str = "gemm", dw_bias: float = 0.7
) -> onnx.ModelProto:
    """``Conv(3→4, 3×3, pad 1) → clip_expand → depthwise(4, 3×3, pad 1, bias) → [BN] → clip_dw →
    consumer → GlobalAveragePool → Flatten → head`` on ``[n, 3, 6, 6]`` over [0, 1].

    clip_expand's channel 1 is dead (bias −100 against weights below 0.3); depthwise channel 1
    is then ``dw_bias`` everywhere. ``consumer``: ``pointwise`` (Conv 1×1, 4→5, bias),
    ``padded`` (Conv 3×3 pad 1), ``residual`` (an Add with a 1×1 Conv of the input, then the
    pointwise Conv). ``head``: ``gemm`` or ``matmul`` (MatMul then Add of a bias)."""
    rng = np.random.default_rng(4)
    g = GraphBuilder()
    pads = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    low, high = g.const(np.float32(0.0)), g.const(np.float32(6.0))
    w1 = (rng.random((4, 3, 3, 3)) * 0.3).astype(np.float32)
    h = g.node("Conv", ["input", g.const(w1), g.const([0.1, -100.0, 0.2, 0.3])], **pads)
    h = g.node("Clip", [h, low, high], name="clip_expand")
    wd = rng.uniform(-0.5, 0.5, (4, 1, 3, 3)).astype(np.float32)
    h = g.node("Conv", [h, g.const(wd), g.const([0.2, dw_bias, -0.1, 0.3])], group=4, **pads)
    if bn:
        h = g.node("BatchNormalization", [h, *map(g.const, BN)], epsilon=EPS)
    h = g.node("Clip", [h, low, high], name="clip_dw")
    if consumer == "residual":
        skip = rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32)
        h = g.node("Add", [h, g.node("Conv", ["input", g.const(skip)], kernel_shape=[1, 1])])
    kernel = 3 if consumer == "padded" else 1
    wp = rng.normal(0, 0.5, (5, 4, kernel, kernel)).astype(np.float32)
    attrs = pads if consumer == "padded" else {"kernel_shape": [1, 1]}
    h = g.node("Conv", [h, g.const(wp), g.const(rng.normal(0, 0.1, 5))], name="pointwise", **attrs)
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h])], axis=1)
    wh = rng.normal(size=(5, 3)).astype(np.float32)
    if head == "gemm":
        g.node("Gemm", [h, g.const(wh), g.const(np.zeros(3))], output="output")
    else:
        h = g.node("MatMul", [h, g.const(wh)])
        g.node("Add", [h, g.const(rng.normal(0, 0.1, 3))], output="output")
    return g.model([g.tensor("input", ["n", *SHAPE])], [g.tensor("output", ["n", 3])])


def initializer_of(model: onnx.ModelProto, node: onnx.NodeProto, slot: int) -> np.ndarray:
    return numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == node.input[slot])
    )


def depthwise_constant(bn: bool, dw_bias: float = 0.7) -> float:
    """What clip_dw outputs on channel 1 at every position."""
    value = dw_bias
    if bn:
        scale, shift, mean, var = (float(v[1]) for v in BN)
        value = (value - mean) / np.sqrt(var + EPS) * scale + shift
    return float(np.clip(value, 0.0, 6.0))


@pytest.mark.parametrize("bn", [False, True])
def test_a_dead_channel_feeding_a_depthwise_conv_with_a_bias_goes_everywhere(bn):
    """Found by the analysis and removed by ``compress``: the expansion filter, the depthwise
    group (``group`` 4 → 3), the BN entries and the pointwise input channel go; the pointwise
    bias takes ``v · Σ W[:, 1]`` (``v`` the constant); both ReLU6 layers count channel 1 as
    removed; outputs, params and MACs follow."""
    model = mobile_block(bn)
    result = compress(model, None, DomainSpec(lower=LOWER, upper=UPPER), AnalysisOptions(jobs=1))
    report, pruned = result.report, result.model
    assert report.passed
    layers = {layer.name: layer.channels for layer in report.layers}
    assert 1 in layers["clip_expand"].dead
    assert 1 in layers["clip_expand"].removed and 1 in layers["clip_dw"].removed
    assert not [note for note in report.notes if "proved-dead channels kept" in note]
    assert "clip_dw: channels [1] removed though not proved dead" in "\n".join(report.notes)
    convs = [n for n in pruned.graph.node if n.op_type == "Conv"]
    shapes = [initializer_of(pruned, c, 1).shape for c in convs]
    assert shapes[0][0] == 3 and shapes[1] == (3, 1, 3, 3) and shapes[2][1] == 3
    assert next(a.i for a in convs[1].attribute if a.name == "group") == 3
    if bn:
        norm = next(n for n in pruned.graph.node if n.op_type == "BatchNormalization")
        for slot, full in zip(range(1, 5), BN, strict=True):
            assert initializer_of(pruned, norm, slot).tolist() == np.delete(full, 1).tolist()
    pointwise = next(n for n in model.graph.node if n.name == "pointwise")
    weight, bias = initializer_of(model, pointwise, 1), initializer_of(model, pointwise, 2)
    expected = bias + depthwise_constant(bn) * weight[:, 1].reshape(5, -1).sum(axis=1)
    np.testing.assert_allclose(initializer_of(pruned, convs[2], 2), expected, rtol=1e-6)
    before, after = model_stats(model), model_stats(pruned)
    assert after.params < before.params and after.macs < before.macs
    assert_same_outputs(model, pruned, LOWER, UPPER, SHAPE)


def test_the_cli_compresses_the_block_and_check_proves_it(tmp_path):
    source, target = tmp_path / "mobile.onnx", tmp_path / "mobile.small.onnx"
    onnx.save(mobile_block(bn=True), source)
    box = ["--input-range", "input:[0,1]"]
    code, out, err = run_cli([source, target, *box, "--time-limit", "20"])
    assert code == 0, err
    assert "proved-dead channels kept" not in out
    pruned = onnx.load(target)
    assert model_stats(pruned).params < model_stats(onnx.load(source)).params
    code, out, err = run_cli(["check", source, target, *box, "--json", "-"])
    assert code == 0, err + out
    assert '"proved"' in out


@pytest.mark.parametrize("head", ["gemm", "matmul"])
def test_a_constant_after_global_pooling_folds_into_the_head(head):
    """Without the pointwise Conv between, the constant channel reaches the head behind
    GlobalAveragePool and Flatten: the Gemm's bias (or the Add after a MatMul) takes it."""
    model = mobile_block(head=head)
    pointwise = next(i for i, n in enumerate(model.graph.node) if n.name == "pointwise")
    pool = model.graph.node[pointwise + 1]
    pool.input[0] = model.graph.node[pointwise].input[0]
    del model.graph.node[pointwise]
    head_node = next(n for n in model.graph.node if n.op_type in ("Gemm", "MatMul"))
    weight = next(t for t in model.graph.initializer if t.name == head_node.input[1])
    weight.CopyFrom(numpy_helper.from_array(np.ones((4, 3), np.float32), weight.name))  # 4 in
    result = prune_channels(model, {"clip_expand": [1]})
    assert result.removed == {"clip_expand": [1], "clip_dw": [1]} and not result.kept
    assert_same_outputs(model, result.model, LOWER, UPPER, SHAPE)


def test_a_saturated_channel_and_the_dead_one_above_it_shift_the_bias_once():
    """Depthwise channel 1 at bias 50 is clip_dw's constant 6: the plan of clip_expand's dead
    channel and the plan of clip_dw's saturated channel both fold it into the pointwise bias,
    which must take it once."""
    model = mobile_block(dw_bias=50.0)
    result = prune_channels(model, {"clip_expand": [1]}, (), {"clip_dw": (6.0, [1])})
    assert result.removed == {"clip_expand": [1], "clip_dw": [1]}
    assert result.folded == {"clip_dw": [1]} and not result.kept and not result.unfolded
    assert_same_outputs(model, result.model, LOWER, UPPER, SHAPE)


@pytest.mark.parametrize(
    "consumer, reason",
    [("padded", "pads its input"), ("residual", "joins the channels with another tensor")],
)
def test_a_constant_reaching_a_padded_conv_or_a_residual_add_keeps_the_channel(consumer, reason):
    model = mobile_block(bn=True, consumer=consumer)
    result = prune_channels(model, {"clip_expand": [1]})
    assert result.removed == {} and reason in result.kept["clip_expand"]
    assert_same_outputs(model, result.model, LOWER, UPPER, SHAPE)


def test_per_channel_values_follow_a_reshape_while_each_slice_holds_one_value():
    """Channel ``c`` of ``(3, 2, 2)`` flattened is columns ``4c … 4c + 3``: each takes the
    channel's value; a reshape that puts two removed channels with different values in one
    slice keeps them."""
    flow = Flow("t", (3, 2, 2), 0, np.array([0, 2]), np.array([1.5, -2.0]))
    columns = np.array([0, 1, 2, 3, 8, 9, 10, 11])
    assert reshaped_value(flow, (12,), 0, columns).tolist() == [1.5] * 4 + [-2.0] * 4
    flow = Flow("t", (4, 1, 1), 0, np.array([0, 1]), np.array([1.5, -2.0]))
    with pytest.raises(Keep, match="mixes the values"):
        reshaped_value(flow, (2, 2), 0, np.array([0]))
