"""Small CNNs written in the op patterns real exporters emit (see ``../shared/docs/exporters.md``).

Every valid builder returns a :class:`CnnFixture`: the ``onnx.ModelProto``, a float64 box over
the model's flattened input sample (in the model's own layout, NHWC for tf2onnx), a numpy
reference of the whole network built from :mod:`onnx_exact.core.operators`, the interval bounds of
every activation's input on the box, and the channels *planted* stable: their biases are set from
those interval bounds so that the channel is provably dead (below 0 at every position), always
active (above 0), or for ``Clip(0, 6)`` saturated (above 6), whatever the random weights. Weights
are seeded, stored in float32; the reference and the bounds use those float32 values exactly.

:func:`bad_fixtures` gives models the reader must refuse with a clear message: a grouped Conv
whose group count does not divide the channels, dynamic spatial dims, a Conv weight computed at
run time. ``VALID_BUILDERS`` maps a short name to each valid builder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from exporter_fixtures import GraphBuilder

from onnx_exact.core.operators import (
    AveragePoolOperator,
    ConvOperator,
    DenseOperator,
    LinearOperator,
    PadOperator,
    ReshapeOperator,
    TransposeOperator,
    resolve_auto_pad,
)

MARGIN = 1.0
"""How far a planted channel's interval bound clears its kink (far above float32 round-off)."""

Bounds = tuple[np.ndarray, np.ndarray]


@dataclass
class CnnFixture:
    """A valid CNN model with its box, numpy reference and planted stable channels.

    ``reference(x)`` maps raw inputs ``(m, n_in)`` (float64, the model's input layout) to
    ``(outputs (m, n_out), pre)`` where ``pre[name]`` are the inputs of the activation node
    ``name`` (flattened NCHW). ``bounds[name]`` are interval bounds of those inputs on the box;
    ``planted[name]`` maps a channel to ``"dead"``, ``"active"`` or ``"saturated"``.
    """

    name: str
    model: onnx.ModelProto
    lower: np.ndarray
    upper: np.ndarray
    input_shape: tuple[int, ...]
    reference: Callable[[np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]]
    bounds: dict[str, Bounds] = field(default_factory=dict)
    planted: dict[str, dict[int, str]] = field(default_factory=dict)


@dataclass
class BadFixture:
    """A model the reader must refuse; ``fails_in`` says where else it fails: ``"onnxruntime"``
    (the session refuses to run it) or ``None`` (a valid ONNX model onnx-exact cannot analyse)."""

    name: str
    model: onnx.ModelProto
    lower: np.ndarray
    upper: np.ndarray
    fails_in: str | None
    reason: str


def interval(op: LinearOperator, lower: np.ndarray, upper: np.ndarray) -> Bounds:
    """Interval bounds of ``op`` on a box: centre through ``op``, radius through ``|op|``."""
    centre = op.forward(((lower + upper) / 2)[None])[0]
    radius = op.abs().linear(((upper - lower) / 2)[None])[0]
    return centre - radius, centre + radius


def max_pool(x: np.ndarray, shape: tuple[int, ...], kernel: int) -> np.ndarray:
    """``MaxPool(kernel, stride = kernel)`` of flattened ``(m, C, H, W)`` samples (H, W divisible)."""
    c, h, w = shape
    blocks = x.reshape(x.shape[0], c, h // kernel, kernel, w // kernel, kernel)
    return blocks.max(axis=(3, 5)).reshape(x.shape[0], -1)


class Trace:
    """Builds a fixture's reference and interval bounds step by step, planting biases.

    The current value is a flattened sample; ``push``/``add`` keep a skip connection's value on
    a stack and add it back. Each step is appended to ``steps`` as a function of
    ``(value, stack, pre)``.
    """

    def __init__(self, lower: np.ndarray, upper: np.ndarray, seed: int) -> None:
        self.lo, self.hi = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
        self.rng = np.random.default_rng(seed)
        self.steps: list[Callable] = []
        self.stack: list[Bounds] = []
        self.bounds: dict[str, Bounds] = {}
        self.planted: dict[str, dict[int, str]] = {}
        self.pending: dict[int, str] = {}

    def weight(self, *shape: int) -> np.ndarray:
        """Seeded float32 weights of scale ``1/sqrt(fan_in)``."""
        fan_in = int(np.prod(shape[1:]))
        return (self.rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)

    def plant(self, linear: LinearOperator, plant: dict[int, str], offset=None) -> np.ndarray:
        """A float32 bias: random, except for the planted channels, set from the interval bounds
        of ``linear`` (plus the ``offset`` bounds added after it) so each clears its kink."""
        lo, hi = interval(linear, self.lo, self.hi)
        if offset is not None:
            lo, hi = lo + offset[0], hi + offset[1]
        channels = linear.output_shape[0]
        lo, hi = lo.reshape(channels, -1), hi.reshape(channels, -1)
        bias = self.rng.normal(0.0, 0.1, size=channels)
        for channel, kind in plant.items():
            if kind == "dead":
                bias[channel] = -hi[channel].max() - MARGIN
            else:
                kink = 6.0 if kind == "saturated" else 0.0
                bias[channel] = kink - lo[channel].min() + MARGIN
        self.pending = dict(plant)
        return bias.astype(np.float32)

    def linear(self, op: LinearOperator) -> None:
        self.lo, self.hi = interval(op, self.lo, self.hi)
        self.steps.append(lambda v, stack, pre: op.forward(v))

    def activation(self, name: str, low: float = 0.0, high: float = np.inf) -> None:
        """``Relu`` (``high = ∞``) or ``Clip(low, high)``; records the input bounds."""
        self.bounds[name] = (self.lo, self.hi)
        if self.pending:
            self.planted[name], self.pending = self.pending, {}

        def step(v, stack, pre):
            pre[name] = v
            return np.clip(v, low, high)

        self.steps.append(step)
        self.lo, self.hi = np.clip(self.lo, low, high), np.clip(self.hi, low, high)

    def monotone(self, function: Callable[[np.ndarray], np.ndarray]) -> None:
        """A non-decreasing map (MaxPool): bounds are its values at the bounds."""
        self.lo, self.hi = function(self.lo[None])[0], function(self.hi[None])[0]
        self.steps.append(lambda v, stack, pre: function(v))

    def push(self) -> None:
        self.stack.append((self.lo, self.hi))

        def step(v, stack, pre):
            stack.append(v)
            return v

        self.steps.append(step)

    def add(self) -> None:
        lo, hi = self.stack.pop()
        self.lo, self.hi = self.lo + lo, self.hi + hi
        self.steps.append(lambda v, stack, pre: v + stack.pop())

    def reference(self) -> Callable[[np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]]:
        steps = list(self.steps)

        def run(x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            value, stack, pre = np.asarray(x, np.float64), [], {}
            for step in steps:
                value = step(value, stack, pre)
            return value, pre

        return run

    def fixture(self, name, model, lower, upper, input_shape) -> CnnFixture:
        onnx.checker.check_model(model, full_check=True)
        return CnnFixture(
            name,
            model,
            np.asarray(lower, np.float64),
            np.asarray(upper, np.float64),
            tuple(input_shape),
            self.reference(),
            self.bounds,
            self.planted,
        )


def f64(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


def conv_layer(
    trace: Trace,
    g: GraphBuilder,
    x: str,
    spatial,
    c_in,
    c_out,
    k,
    plant=None,
    bias=True,
    name=None,
    scale=1.0,
    **attrs,
) -> tuple[str, ConvOperator]:
    """A planted ``Conv`` node and its operator; ``attrs`` are ONNX's (pads, strides, …);
    ``scale`` multiplies the seeded weights (small weights keep a channel's range narrow)."""
    d = len(spatial)
    group = attrs.get("group", 1)
    kernel = (trace.weight(c_out, c_in // group, *(k,) * d) * np.float32(scale)).astype(np.float32)
    strides = attrs.get("strides", [1] * d)
    dilations = attrs.get("dilations", [1] * d)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    pads = resolve_auto_pad(auto_pad, spatial, (k,) * d, strides, dilations, attrs.get("pads"))
    linear = ConvOperator(f64(kernel), None, spatial, pads, strides, dilations, group)
    b = trace.plant(linear, plant or {}) if bias else None
    op = ConvOperator(
        f64(kernel), None if b is None else f64(b), spatial, pads, strides, dilations, group
    )
    inputs = [x, g.const(kernel)] + ([g.const(b)] if b is not None else [])
    out = g.node("Conv", inputs, name=name, kernel_shape=[k] * d, **attrs)
    trace.linear(op)
    return out, op


def dense_layer(trace: Trace, n_in: int, n_out: int, plant=None) -> tuple[np.ndarray, np.ndarray]:
    """Planted ``(W (out, in), b)`` in float32; the trace steps through ``W h + b``."""
    weight = trace.weight(n_out, n_in)
    bias = trace.plant(DenseOperator(f64(weight)), plant or {})
    trace.linear(DenseOperator(f64(weight), f64(bias)))
    return weight, bias


def head(trace: Trace, g: GraphBuilder, h: str, n_in: int, style: str, output: str) -> None:
    """``n_in → 10 → ReLU → 3`` into the graph output ``output``: Gemm(transB=1) (torch legacy)
    or MatMul(W[i,o]) + Add; hidden unit 0 planted dead."""
    w1, b1 = dense_layer(trace, n_in, 10, {0: "dead"})
    trace.activation("relu_fc")
    w2, b2 = dense_layer(trace, 10, 3)
    if style == "gemm":
        h = g.node("Gemm", [h, g.const(w1), g.const(b1)], transB=1)
        h = g.node("Relu", [h], name="relu_fc")
        g.node("Gemm", [h, g.const(w2), g.const(b2)], output=output, transB=1)
    else:
        h = g.node("MatMul", [h, g.const(np.ascontiguousarray(w1.T))])
        h = g.node("Relu", [g.node("Add", [h, g.const(b1)])], name="relu_fc")
        h = g.node("MatMul", [h, g.const(np.ascontiguousarray(w2.T))])
        g.node("Add", [h, g.const(b2)], output=output)


def torch_legacy(variant: str = "plain", seed: int = 0) -> CnnFixture:
    """torch legacy exporter: ``Conv → [BatchNormalization] → Relu → [MaxPool | AveragePool] →
    Conv → Relu → Flatten → Gemm → Relu → Gemm`` on ``[batch, 2, 8, 8]`` over [0, 1].

    Variants ``plain``, ``bn`` (BN after the first Conv, unfolded: the reference folds it),
    ``maxpool``, ``avgpool`` (2×2, stride 2). Planted: first conv channel 0 dead and 1 always
    active, second conv channel 2 dead, hidden Gemm unit 0 dead.
    """
    shape = (2, 8, 8)
    lower, upper = np.zeros(128), np.ones(128)
    trace, g = Trace(lower, upper, seed), GraphBuilder()
    plant1 = {0: "dead", 1: "active"}
    if variant == "bn":
        kernel = trace.weight(4, 2, 3, 3)
        scale = (0.5 + trace.rng.random(4)).astype(np.float32)
        beta = trace.rng.normal(0, 0.1, 4).astype(np.float32)
        mean = trace.rng.normal(0, 0.1, 4).astype(np.float32)
        var = (0.5 + trace.rng.random(4)).astype(np.float32)
        eps = 1e-5
        factor = f64(scale) / np.sqrt(f64(var) + np.float64(np.float32(eps)))
        folded = f64(kernel) * factor[:, None, None, None]
        fused_bias = trace.plant(ConvOperator(folded, None, shape[1:], (1, 1, 1, 1)), plant1)
        conv_bias = ((f64(fused_bias) - f64(beta)) / factor + f64(mean)).astype(np.float32)
        stored = (f64(conv_bias) - f64(mean)) * factor + f64(beta)
        trace.linear(ConvOperator(folded, stored, shape[1:], (1, 1, 1, 1)))
        h = g.node(
            "Conv",
            ["input", g.const(kernel), g.const(conv_bias)],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        )
        h = g.node(
            "BatchNormalization",
            [h, g.const(scale), g.const(beta), g.const(mean), g.const(var)],
            epsilon=eps,
        )
    else:
        h, _ = conv_layer(trace, g, "input", shape[1:], 2, 4, 3, plant1, pads=[1, 1, 1, 1])
    trace.activation("relu1")
    h = g.node("Relu", [h], name="relu1")
    side = 8
    if variant == "maxpool":
        trace.monotone(lambda v: max_pool(v, (4, 8, 8), 2))
        h = g.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
        side = 4
    elif variant == "avgpool":
        trace.linear(AveragePoolOperator((4, 8, 8), (2, 2), strides=(2, 2)))
        h = g.node("AveragePool", [h], kernel_shape=[2, 2], strides=[2, 2])
        side = 4
    h, conv2 = conv_layer(
        trace, g, h, (side, side), 4, 6, 3, {2: "dead"}, pads=[1, 1, 1, 1], strides=[2, 2]
    )
    trace.activation("relu2")
    h = g.node("Relu", [h], name="relu2")
    h = g.node("Flatten", [h], axis=1)
    trace.linear(ReshapeOperator(conv2.output_shape, (conv2.n_out,)))
    head(trace, g, h, conv2.n_out, "gemm", "output")
    model = g.model([g.tensor("input", ["batch", *shape])], [g.tensor("output", ["batch", 3])])
    return trace.fixture(f"torch_legacy_{variant}", model, lower, upper, shape)


def torch_dynamo(seed: int = 1) -> CnnFixture:
    """torch dynamo style: ``Conv → Relu → Conv → Relu → Reshape(Constant [-1, n]) → MatMul →
    Add → Relu → MatMul → Add``, opset 18, input ``[s0, 1, 8, 8]`` over [-1, 1]."""
    shape = (1, 8, 8)
    lower, upper = -np.ones(64), np.ones(64)
    trace, g = Trace(lower, upper, seed), GraphBuilder()
    h, _ = conv_layer(
        trace, g, "x", shape[1:], 1, 3, 3, {1: "dead"}, name="conv2d", pads=[0, 0, 0, 0]
    )
    trace.activation("relu")
    h = g.node("Relu", [h], name="relu")
    h, conv2 = conv_layer(
        trace, g, h, (6, 6), 3, 5, 2, {0: "dead", 4: "active"}, name="conv2d_1", strides=[2, 2]
    )
    trace.activation("relu_1")
    h = g.node("Relu", [h], name="relu_1")
    shape_const = g.constant_node(np.array([-1, conv2.n_out]), dtype=np.int64)
    h = g.node("Reshape", [h, shape_const], allowzero=1)
    trace.linear(ReshapeOperator(conv2.output_shape, (conv2.n_out,)))
    head(trace, g, h, conv2.n_out, "matmul", "linear_1")
    model = g.model([g.tensor("x", ["s0", *shape])], [g.tensor("linear_1", ["s0", 3])], opset=18)
    return trace.fixture("torch_dynamo", model, lower, upper, shape)


def tf2onnx_nhwc(seed: int = 2) -> CnnFixture:
    """tf2onnx / Keras: NHWC input ``[unk__6, 8, 8, 2]`` → Transpose(0,3,1,2) → Conv (SAME) →
    Relu → Conv (stride 2, SAME_UPPER pads 0/1) → Relu → Transpose(0,2,3,1) → Reshape → MatMul →
    Add → Relu → MatMul → Add, box [0, 1] in NHWC order."""
    shape = (8, 8, 2)
    lower, upper = np.zeros(128), np.ones(128)
    trace, g = Trace(lower, upper, seed), GraphBuilder()
    h = g.node("Transpose", ["input_1"], perm=[0, 3, 1, 2])
    trace.linear(TransposeOperator(shape, (2, 0, 1)))
    h, _ = conv_layer(trace, g, h, (8, 8), 2, 4, 3, {3: "dead"}, pads=[1, 1, 1, 1])
    trace.activation("Relu")
    h = g.node("Relu", [h], name="Relu")
    h, conv2 = conv_layer(
        trace, g, h, (8, 8), 4, 6, 3, {1: "dead", 5: "dead"}, pads=[0, 0, 1, 1], strides=[2, 2]
    )
    trace.activation("Relu_1")
    h = g.node("Relu", [h], name="Relu_1")
    return tf2onnx_head(trace, g, h, conv2.output_shape, "tf2onnx_nhwc", lower, upper, shape)


def tf2onnx_head(
    trace: Trace, g: GraphBuilder, h: str, conv_shape, name: str, lower, upper, shape
) -> CnnFixture:
    """tf2onnx's tail after the last conv activation (NCHW ``conv_shape``): Transpose back to
    NHWC, Reshape to ``[-1, n]``, the MatMul head to 3 outputs, then the fixture ``name`` on
    its NHWC input ``[unk__6, *shape]`` (opset 13)."""
    h = g.node("Transpose", [h], perm=[0, 2, 3, 1])
    back = TransposeOperator(conv_shape, (1, 2, 0))
    trace.linear(back)
    h = g.node("Reshape", [h, g.const(np.array([-1, back.n_out]), dtype=np.int64)])
    trace.linear(ReshapeOperator(back.output_shape, (back.n_out,)))
    head(trace, g, h, back.n_out, "matmul", "dense_1")
    model = g.model(
        [g.tensor("input_1", ["unk__6", *shape])], [g.tensor("dense_1", ["unk__6", 3])], opset=13
    )
    return trace.fixture(name, model, lower, upper, shape)


def matlab_conv1d(seed: int = 3) -> CnnFixture:
    """MATLAB style 1-D CNN: ``Sub(mean) → Conv1d → Relu → Conv1d (stride 2, dilation 2) → Relu →
    Flatten → MatMul → Add``; IR 3, opset 9, initializers also listed as graph inputs; input
    ``[N, 2, 16]`` over [0, 4]."""
    shape = (2, 16)
    lower, upper = np.zeros(32), np.full(32, 4.0)
    trace, g = Trace(lower, upper, seed), GraphBuilder()
    mean = trace.rng.uniform(1.0, 3.0, size=shape).astype(np.float32)
    h = g.node("Sub", ["input", g.const(mean)])
    trace.linear(DenseOperator(np.eye(32), -f64(mean).reshape(-1)))
    h, _ = conv_layer(trace, g, h, (16,), 2, 4, 5, {2: "dead"}, pads=[2, 2])
    trace.activation("relu_1")
    h = g.node("Relu", [h], name="relu_1")
    h, conv2 = conv_layer(
        trace,
        g,
        h,
        (16,),
        4,
        3,
        3,
        {0: "dead", 1: "active"},
        pads=[1, 1],
        strides=[2],
        dilations=[2],
    )
    trace.activation("relu_2")
    h = g.node("Relu", [h], name="relu_2")
    h = g.node("Flatten", [h], axis=1)
    trace.linear(ReshapeOperator(conv2.output_shape, (conv2.n_out,)))
    weight, bias = dense_layer(trace, conv2.n_out, 2)
    h = g.node("MatMul", [h, g.const(np.ascontiguousarray(weight.T))])
    g.node("Add", [h, g.const(bias)], output="fc_out")
    model = g.model(
        [g.tensor("input", ["N", *shape])],
        [g.tensor("fc_out", ["N", 2])],
        opset=9,
        ir_version=3,
        initializers_as_inputs=True,
    )
    return trace.fixture("matlab_conv1d", model, lower, upper, shape)


def pooled_head(
    trace: Trace, g: GraphBuilder, h: str, pooled: tuple[int, ...], name: str, lower, upper, shape
) -> CnnFixture:
    """``GlobalAveragePool → Flatten → Gemm`` to 3 outputs after a ``pooled`` (C, H, W)
    activation, then the fixture ``name`` on the input ``[batch, *shape]``."""
    trace.linear(AveragePoolOperator.global_pool(pooled))
    h = g.node("GlobalAveragePool", [h])
    h = g.node("Flatten", [h], axis=1)
    weight, bias = dense_layer(trace, pooled[0], 3)
    g.node("Gemm", [h, g.const(weight), g.const(bias)], output="output", transB=1)
    model = g.model([g.tensor("input", ["batch", *shape])], [g.tensor("output", ["batch", 3])])
    return trace.fixture(name, model, lower, upper, shape)


def residual_block(seed: int = 4) -> CnnFixture:
    """A ResNet basic block: ``Conv → Relu (h) → Conv → Relu → Conv → Add(h) → Relu →
    GlobalAveragePool → Flatten → Gemm`` on ``[batch, 3, 6, 6]`` over [-1, 1].

    Planted: channel 3 of ``h`` dead, and the third Conv's channel 3 so deep below 0 that the
    sum with the dead skip channel is dead too (a channel removable on the skip path); the inner
    Conv's channel 1 dead.
    """
    shape = (3, 6, 6)
    lower, upper = -np.ones(108), np.ones(108)
    trace, g = Trace(lower, upper, seed), GraphBuilder()
    pad = {"pads": [1, 1, 1, 1]}
    h, _ = conv_layer(trace, g, "input", (6, 6), 3, 4, 3, {3: "dead"}, **pad)
    trace.activation("relu_a")
    skip = g.node("Relu", [h], name="relu_a")
    trace.push()
    h, _ = conv_layer(trace, g, skip, (6, 6), 4, 4, 3, {1: "dead"}, **pad)
    trace.activation("relu_b")
    h = g.node("Relu", [h], name="relu_b")
    h, _ = conv_layer(trace, g, h, (6, 6), 4, 4, 3, {3: "dead"}, **pad)
    trace.add()
    h = g.node("Add", [h, skip])
    trace.activation("relu_out")
    h = g.node("Relu", [h], name="relu_out")
    return pooled_head(trace, g, h, (4, 6, 6), "residual_block", lower, upper, shape)


def resnet_blocks(seed: int = 7) -> CnnFixture:
    """Two ResNet basic blocks as torch exports them, on ``[batch, 2, 6, 6]`` over [-1, 1]:
    ``Conv → relu_s`` (fork), a block with a 1×1 stride-2 projection shortcut
    (``Conv s2 → relu_1a → Conv``, ``Conv 1×1 s2`` on the skip, ``Add → relu_1``), a block with
    an identity skip (``Conv → relu_2a → Conv``, ``Add(relu_1) → relu_2``), then ``Flatten →
    Gemm`` (6 × 3 × 3 → 3).

    Planted dead: relu_s channel 0 (its readers are the first block's Conv and projection);
    relu_1a channel 1; channel 4 of the residual stream {relu_1, relu_2}: the first block's
    last Conv and its projection both deep below 0 there, and the second block's last Conv
    too, so the sums stay below 0 whatever the (zero) skip adds.
    """
    shape = (2, 6, 6)
    lower, upper = -np.ones(72), np.ones(72)
    trace, g = Trace(lower, upper, seed), GraphBuilder()
    pad = {"pads": [1, 1, 1, 1]}
    h, _ = conv_layer(trace, g, "input", (6, 6), 2, 4, 3, {0: "dead"}, **pad)
    trace.activation("relu_s")
    skip = g.node("Relu", [h], name="relu_s")
    trace.push()
    skip_bounds = trace.stack[-1]
    h, _ = conv_layer(trace, g, skip, (6, 6), 4, 6, 3, {1: "dead"}, strides=[2, 2], **pad)
    trace.activation("relu_1a")
    h = g.node("Relu", [h], name="relu_1a")
    h, _ = conv_layer(trace, g, h, (3, 3), 6, 6, 3, {4: "dead"}, **pad)
    # the projection shortcut: a planted 1x1 stride-2 Conv applied to the pushed value
    kernel = trace.weight(6, 4, 1, 1)
    linear = ConvOperator(f64(kernel), None, (6, 6), (0, 0, 0, 0), (2, 2))
    lo, hi = interval(linear, *skip_bounds)
    bias = trace.rng.normal(0.0, 0.1, size=6)
    bias[4] = -hi.reshape(6, -1)[4].max() - MARGIN
    bias = bias.astype(np.float32)
    projection = ConvOperator(f64(kernel), f64(bias), (6, 6), (0, 0, 0, 0), (2, 2))
    trace.stack[-1] = interval(projection, *skip_bounds)
    trace.steps.append(lambda v, stack, pre: stack.append(projection.forward(stack.pop())) or v)
    shortcut = g.node(
        "Conv", [skip, g.const(kernel), g.const(bias)], kernel_shape=[1, 1], strides=[2, 2]
    )
    trace.add()
    h = g.node("Add", [h, shortcut])
    trace.activation("relu_1")
    skip = g.node("Relu", [h], name="relu_1")
    trace.push()
    h, _ = conv_layer(trace, g, skip, (3, 3), 6, 6, 3, **pad)
    trace.activation("relu_2a")
    h = g.node("Relu", [h], name="relu_2a")
    h, _ = conv_layer(trace, g, h, (3, 3), 6, 6, 3, {4: "dead"}, **pad)
    trace.add()
    h = g.node("Add", [h, skip])
    trace.activation("relu_2")
    h = g.node("Relu", [h], name="relu_2")
    h = g.node("Flatten", [h], axis=1)
    trace.linear(ReshapeOperator((6, 3, 3), (54,)))
    weight, bias = dense_layer(trace, 54, 3)
    g.node("Gemm", [h, g.const(weight), g.const(bias)], output="output", transB=1)
    model = g.model([g.tensor("input", ["batch", *shape])], [g.tensor("output", ["batch", 3])])
    return trace.fixture("resnet_blocks", model, lower, upper, shape)


def pad_pool(seed: int = 6) -> CnnFixture:
    """Explicit padding and pooling ops: ``Pad`` (constant 0.25, spatial) → Conv (VALID) → Relu
    → ``Dropout`` (inference: identity) → Conv (``auto_pad = SAME_UPPER``, stride 2) → Relu →
    ``AveragePool`` (3×3, stride 2, begin pads 1, ``ceil_mode``, pads excluded) → ``Identity`` → Flatten → Gemm,
    on ``[N, 2, 9, 9]`` over [-1, 1]. Planted: first conv channel 2 dead, second 0 dead, 3 active.
    """
    shape = (2, 9, 9)
    lower, upper = -np.ones(162), np.ones(162)
    trace, g = Trace(lower, upper, seed), GraphBuilder()
    pad = PadOperator(shape, (0, 1, 2, 0, 1, 0), 0.25)
    trace.linear(pad)
    pads = g.const(np.array([0, 0, 1, 2, 0, 0, 1, 0]), dtype=np.int64)
    h = g.node("Pad", ["input", pads, g.const(np.float32(0.25))], mode="constant")
    h, conv1 = conv_layer(trace, g, h, pad.output_shape[1:], 2, 4, 3, {2: "dead"}, auto_pad="VALID")
    trace.activation("relu_1")
    h = g.node("Relu", [h], name="relu_1")
    h = g.node("Dropout", [h])
    h, conv2 = conv_layer(
        trace, g, h, conv1.output_shape[1:], 4, 5, 3, {0: "dead", 3: "active"},
        auto_pad="SAME_UPPER", strides=[2, 2],
    )  # fmt: skip
    trace.activation("relu_2")
    h = g.node("Relu", [h], name="relu_2")
    # 5×5 begin-padded to 6×6: floor mode gives 2×2 windows, ceil mode 3×3 (the last one reaches
    # one element past the input, which no divisor counts).
    pool = AveragePoolOperator(conv2.output_shape, (3, 3), (1, 1, 0, 0), (2, 2), ceil_mode=True)
    assert pool.output_shape == (5, 3, 3)
    trace.linear(pool)
    h = g.node(
        "AveragePool", [h], kernel_shape=[3, 3], pads=[1, 1, 0, 0], strides=[2, 2], ceil_mode=1
    )
    h = g.node("Flatten", [g.node("Identity", [h])], axis=1)
    trace.linear(ReshapeOperator(pool.output_shape, (pool.n_out,)))
    weight, bias = dense_layer(trace, pool.n_out, 3)
    g.node("Gemm", [h, g.const(weight), g.const(bias)], output="output", transB=1)
    model = g.model([g.tensor("input", ["N", *shape])], [g.tensor("output", ["N", 3])], opset=13)
    return trace.fixture("pad_pool", model, lower, upper, shape)


def _clip_fixture(name: str) -> CnnFixture:
    """A ReLU6 fixture of ``cnn_clip_fixtures`` (which builds on this module's helpers)."""
    import cnn_clip_fixtures

    return getattr(cnn_clip_fixtures, name)()


VALID_BUILDERS: dict[str, Callable[[], CnnFixture]] = {
    "torch_legacy_plain": lambda: torch_legacy("plain"),
    "torch_legacy_bn": lambda: torch_legacy("bn"),
    "torch_legacy_maxpool": lambda: torch_legacy("maxpool"),
    "torch_legacy_avgpool": lambda: torch_legacy("avgpool"),
    "torch_dynamo": torch_dynamo,
    "tf2onnx_nhwc": tf2onnx_nhwc,
    "matlab_conv1d": matlab_conv1d,
    "residual_block": residual_block,
    "resnet_blocks": resnet_blocks,
    "mobilenet_block": lambda: _clip_fixture("mobilenet_block"),
    "clip_legacy": lambda: _clip_fixture("clip_legacy"),
    "clip_tf2onnx": lambda: _clip_fixture("clip_tf2onnx"),
    "pad_pool": pad_pool,
}

RESIDUAL = ["residual_block", "resnet_blocks"]
"""The valid fixtures with residual joins (ResNet basic blocks)."""

CLIP = ["mobilenet_block", "clip_legacy", "clip_tf2onnx"]
"""The valid fixtures with ``Clip(0, 6)`` (ReLU6) activations (tested in ``test_cnn_clip``)."""

SEQUENTIAL = [name for name in VALID_BUILDERS if name not in (*RESIDUAL, *CLIP)]
"""The valid fixtures with one data path of supported ops (no residual join, no Clip);
:data:`SEQUENTIAL_READ` leaves the MaxPool one out too (its max tree adds auxiliary layers and
looser bounds: tested in ``test_cnn_maxpool``)."""

SEQUENTIAL_READ = [name for name in SEQUENTIAL if name != "torch_legacy_maxpool"]


def _small_conv_model(group: int, c_in: int, dims, runtime_weight: bool = False) -> BadFixture:
    """``Conv → Relu → GlobalAveragePool → Flatten → Gemm`` with the defect the caller asks for;
    ``runtime_weight`` makes the Conv weight ``Mul(initializer, ReduceMean(input))``."""
    rng = np.random.default_rng(9)
    g = GraphBuilder()
    kernel = (rng.normal(size=(6, c_in // group, 3, 3)) / 3).astype(np.float32)
    weight = g.const(kernel)
    if runtime_weight:
        scale = g.node("ReduceMean", ["input"], keepdims=0)
        weight = g.node("Mul", [weight, scale], name="weight_at_run_time")
    h = g.node("Conv", ["input", weight], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=group)
    h = g.node("Relu", [h], name="relu")
    h = g.node("GlobalAveragePool", [h])
    h = g.node("Flatten", [h], axis=1)
    head_weight = g.const(rng.normal(size=(2, 6)).astype(np.float32))
    g.node("Gemm", [h, head_weight], output="output", transB=1)
    model = g.model([g.tensor("input", ["batch", c_in, *dims])], [g.tensor("output", ["batch", 2])])
    n = c_in * 36
    return BadFixture("", model, np.zeros(n), np.ones(n), None, "")


def bad_fixtures() -> dict[str, BadFixture]:
    """Models onnx-exact must refuse with exit 2 and a line naming the node (box: ``6×6`` images).

    - ``bad_group``: ``group=4`` on 6 input channels (kernel ``(6, 1, 3, 3)``): onnxruntime
      fails when it runs the node;
    - ``dynamic_spatial``: input ``[batch, 3, H, W]``: valid and runnable at any size, but the box
      cannot fix the shape the analysis needs;
    - ``runtime_weight``: the Conv weight is ``Mul(initializer, ReduceMean(input))``: computed
      from the input at run time, so it is no constant.
    """
    fixtures = {
        "bad_group": _small_conv_model(4, 6, (6, 6)),
        "dynamic_spatial": _small_conv_model(1, 3, ("H", "W")),
        "runtime_weight": _small_conv_model(1, 3, (6, 6), runtime_weight=True),
    }
    fixtures["bad_group"].fails_in = "onnxruntime"
    reasons = {
        "bad_group": "group 4 does not divide the 6 input channels",
        "dynamic_spatial": "spatial dims H, W are dynamic",
        "runtime_weight": "the Conv weight is computed from the input",
    }
    for name, fixture in fixtures.items():
        fixture.name, fixture.reason = name, reasons[name]
    return fixtures


def run_onnxruntime(model: onnx.ModelProto, x: np.ndarray, input_shape) -> np.ndarray:
    """onnxruntime's float32 output for flat float64 samples ``x`` (``(m, n_in)``), flattened."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = x.astype(np.float32).reshape(x.shape[0], *input_shape)
    return session.run(None, {name: feed})[0].reshape(x.shape[0], -1).astype(np.float64)


def assert_compressed_exactly(fixture: CnnFixture, result) -> None:
    """``result`` (of ``onnx_exact.compress`` on ``fixture``) verified, lost every planted dead
    channel and some MACs, and its model equals the input model on box samples (atol 1e-5)."""
    report = result.report
    assert report.passed
    by_name = {layer.name: layer for layer in report.layers}
    for relu, planted in fixture.planted.items():
        dead = {c for c, kind in planted.items() if kind == "dead"}
        channels = by_name[relu].channels
        assert dead <= set(channels.dead), (relu, channels)
        assert dead <= set(channels.removed), (relu, channels)
    assert report.macs_after < report.macs_before
    rng = np.random.default_rng(1)
    x = fixture.lower + (fixture.upper - fixture.lower) * rng.random((64, fixture.lower.size))
    np.testing.assert_allclose(
        run_onnxruntime(result.model, x, fixture.input_shape),
        run_onnxruntime(fixture.model, x, fixture.input_shape),
        rtol=0,
        atol=1e-5,
    )
