"""The ReLU6 fixtures of :mod:`cnn_fixtures` (listed in its ``VALID_BUILDERS`` and ``CLIP``).

``Clip(0, 6)`` as torch exports it at opset >= 11 (bounds from ``Constant`` nodes, in a
MobileNet-v2 block), as the torch legacy exporter writes it at opset 10 (``min``/``max``
attributes) and as tf2onnx writes Keras' ``Relu6`` (initializer inputs, NHWC). Planted
channels are dead, saturated (above 6 at every position) or active; an active channel of these
fixtures also stays below 6 (linear), checked by ``test_cnn_clip``.
"""

from __future__ import annotations

import numpy as np
from cnn_fixtures import CnnFixture, Trace, conv_layer, dense_layer, pooled_head, tf2onnx_head
from exporter_fixtures import GraphBuilder

from onnx_exact.core.operators import ReshapeOperator, TransposeOperator


def mobilenet_block(seed: int = 5) -> CnnFixture:
    """A MobileNet-v2 style block with ReLU6 as torch exports it (``Clip`` with min/max from
    ``Constant`` nodes): 1×1 expand → Clip(0, 6) → depthwise 3×3 → Clip(0, 6) → 1×1 project →
    GlobalAveragePool → Flatten → Gemm, on ``[batch, 3, 6, 6]`` over [0, 1].

    Planted: expand channel 0 dead, 1 saturated (always 6), 2 active; depthwise channel 4 dead
    and 3 saturated (the 1×1 project Conv pads nothing, so its constant folds into the bias).
    """
    shape = (3, 6, 6)
    lower, upper = np.zeros(108), np.ones(108)
    trace, g = Trace(lower, upper, seed), GraphBuilder()
    clip_min, clip_max = g.constant_node(0.0), g.constant_node(6.0)
    h, _ = conv_layer(
        trace, g, "input", (6, 6), 3, 6, 1, {0: "dead", 1: "saturated", 2: "active"}, name="expand"
    )
    trace.activation("clip_expand", 0.0, 6.0)
    h = g.node("Clip", [h, clip_min, clip_max], name="clip_expand")
    h, _ = conv_layer(
        trace,
        g,
        h,
        (6, 6),
        6,
        6,
        3,
        {4: "dead", 3: "saturated"},
        name="depthwise",
        group=6,
        pads=[1, 1, 1, 1],
    )
    trace.activation("clip_dw", 0.0, 6.0)
    h = g.node("Clip", [h, clip_min, clip_max], name="clip_dw")
    h, _ = conv_layer(trace, g, h, (6, 6), 6, 4, 1, name="project")
    return pooled_head(trace, g, h, (4, 6, 6), "mobilenet_block", lower, upper, shape)


def clip_legacy(seed: int = 8) -> CnnFixture:
    """ReLU6 as the torch legacy exporter writes it at opset 10 (``Clip`` with ``min``/``max``
    *attributes*): ``Conv → Clip(0, 6) → Conv (no padding) → Clip(0, 6) → Flatten → Gemm`` on
    ``[batch, 2, 6, 6]`` over [0, 1].

    Planted: ``clip1`` channel 0 dead, 1 saturated (always 6), 2 active and below 6 (linear);
    ``clip2`` every channel active and below 6 (its weights are small): the whole Clip is the
    identity on the box.
    """
    shape = (2, 6, 6)
    lower, upper = np.zeros(72), np.ones(72)
    trace, g = Trace(lower, upper, seed), GraphBuilder()
    pad = {"pads": [1, 1, 1, 1]}
    plant = {0: "dead", 1: "saturated", 2: "active"}
    h, _ = conv_layer(trace, g, "input", (6, 6), 2, 4, 3, plant, name="conv1", **pad)
    trace.activation("clip1", 0.0, 6.0)
    h = g.node("Clip", [h], name="clip1", min=0.0, max=6.0)
    plant = dict.fromkeys(range(4), "active")
    h, conv2 = conv_layer(trace, g, h, (6, 6), 4, 4, 3, plant, name="conv2", scale=0.05)
    trace.activation("clip2", 0.0, 6.0)
    h = g.node("Clip", [h], name="clip2", min=0.0, max=6.0)
    h = g.node("Flatten", [h], axis=1)
    trace.linear(ReshapeOperator(conv2.output_shape, (conv2.n_out,)))
    weight, bias = dense_layer(trace, conv2.n_out, 3)
    g.node("Gemm", [h, g.const(weight), g.const(bias)], output="output", transB=1)
    model = g.model(
        [g.tensor("input", ["batch", *shape])], [g.tensor("output", ["batch", 3])], opset=10
    )
    return trace.fixture("clip_legacy", model, lower, upper, shape)


def clip_tf2onnx(seed: int = 9) -> CnnFixture:
    """tf2onnx's ``Relu6`` (opset 13: ``Clip`` with initializer ``min``/``max`` *inputs*) in an
    NHWC model: ``Transpose → Conv (SAME) → Clip(0, 6) → Conv (stride 2) → Clip(0, 6) →
    Transpose → Reshape → MatMul → Add → Relu → MatMul → Add`` on ``[unk, 6, 6, 2]`` over [0, 1].

    Planted: ``Relu6`` channel 1 dead, 3 saturated, 0 active; ``Relu6_1`` channels 2 and 5 dead;
    the hidden dense unit 0 dead.
    """
    shape = (6, 6, 2)
    lower, upper = np.zeros(72), np.ones(72)
    trace, g = Trace(lower, upper, seed), GraphBuilder()
    low, high = g.const(np.float32(0.0)), g.const(np.float32(6.0))
    h = g.node("Transpose", ["input_1"], perm=[0, 3, 1, 2])
    trace.linear(TransposeOperator(shape, (2, 0, 1)))
    plant = {1: "dead", 3: "saturated", 0: "active"}
    h, _ = conv_layer(trace, g, h, (6, 6), 2, 4, 3, plant, pads=[1, 1, 1, 1])
    trace.activation("Relu6", 0.0, 6.0)
    h = g.node("Clip", [h, low, high], name="Relu6")
    plant = {2: "dead", 5: "dead"}
    h, conv2 = conv_layer(trace, g, h, (6, 6), 4, 6, 3, plant, pads=[0, 0, 1, 1], strides=[2, 2])
    trace.activation("Relu6_1", 0.0, 6.0)
    h = g.node("Clip", [h, low, high], name="Relu6_1")
    return tf2onnx_head(trace, g, h, conv2.output_shape, "clip_tf2onnx", lower, upper, shape)
