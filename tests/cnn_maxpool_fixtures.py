"""CNN fixtures with MaxPool / GlobalMaxPool, built with ``onnx.helper`` (:class:`GraphBuilder`).

Each fixture is a valid model with its box ``[0, 1]^n`` and its *planted dead* channels: per
Relu node name, the channels whose pre-activation is negative at every position for every input
of the box, by construction and by interval bounds whatever the max tree's relaxation:

- a channel of a Conv right after the input gets tiny weights (``|w| <= 0.01``) and bias ``-5``,
  so its values lie within ``[-5.1, -4.9]``; after a MaxPool (the ``MaxPool → Relu`` order) the
  window's max is below ``-4.7`` even with the tree's interval bounds;
- a channel of a Conv reading ReLU outputs (``>= 0``, also after a pool) gets non-positive
  weights and bias ``-0.5``.

The reference is onnxruntime itself (``cnn_fixtures.run_onnxruntime``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from exporter_fixtures import GraphBuilder


@dataclass
class MaxPoolFixture:
    """A valid CNN with MaxPools, its box, input sample shape and planted dead channels."""

    name: str
    model: onnx.ModelProto
    lower: np.ndarray
    upper: np.ndarray
    input_shape: tuple[int, ...]
    dead: dict[str, list[int]] = field(default_factory=dict)


class _Builder:
    """A GraphBuilder with seeded weights and the planting rules of the module docstring."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.g = GraphBuilder()

    def conv(
        self,
        h: str,
        c_in: int,
        c_out: int,
        k: int,
        first: bool = False,
        dead: tuple[int, ...] = (),
        **attrs,
    ) -> str:
        weight = self.rng.normal(0.0, 1.0 / np.sqrt(c_in * k * k), (c_out, c_in, k, k))
        bias = self.rng.normal(0.0, 0.1, c_out)
        for c in dead:
            if first:
                weight[c] = self.rng.uniform(-0.01, 0.01, weight[c].shape) / (c_in * k * k)
                bias[c] = -5.0
            else:
                weight[c] = -np.abs(weight[c])
                bias[c] = -0.5
        inputs = [h, self.g.const(weight.astype(np.float32)), self.g.const(bias.astype(np.float32))]
        return self.g.node("Conv", inputs, kernel_shape=[k, k], **attrs)

    def gemm(self, h: str, n_in: int, n_out: int, output: str) -> str:
        weight = self.rng.normal(0.0, 1.0 / np.sqrt(n_in), (n_out, n_in)).astype(np.float32)
        bias = self.rng.normal(0.0, 0.1, n_out).astype(np.float32)
        return self.g.node(
            "Gemm", [h, self.g.const(weight), self.g.const(bias)], output=output, transB=1
        )

    def fixture(self, name, shape, n_out, dead, opset=13) -> MaxPoolFixture:
        g = self.g
        model = g.model(
            [g.tensor("input", ["batch", *shape])], [g.tensor("output", ["batch", n_out])], opset
        )
        n = int(np.prod(shape))
        return MaxPoolFixture(name, model, np.zeros(n), np.ones(n), tuple(shape), dead)


def torch_relu_maxpool(seed: int = 11) -> MaxPoolFixture:
    """torch: ``Conv → Relu → MaxPool(2x2) → Conv → Relu → Flatten → Gemm`` on ``[1, 8, 8]``."""
    return _conv_pool_conv("torch_relu_maxpool", seed, pool_first=False, dead=((1,), (2,)), c2=6)


def maxpool_relu(seed: int = 12) -> MaxPoolFixture:
    """``F.relu(F.max_pool2d(conv(x)))``: ``Conv → MaxPool(2x2) → Relu → Conv → Relu →
    Flatten → Gemm`` on ``[1, 8, 8]``; the pool reads pre-activations."""
    return _conv_pool_conv("maxpool_relu", seed, pool_first=True, dead=((2,), (0,)), c2=5)


def _conv_pool_conv(name: str, seed: int, pool_first: bool, dead, c2: int) -> MaxPoolFixture:
    """``Conv(1→4) → [Relu, MaxPool(2x2)] in either order → Conv(4→c2) → Relu → Flatten → Gemm``
    on ``[1, 8, 8]``, with the planted dead channels ``dead`` of relu1 and relu2."""
    b = _Builder(seed)
    h = b.conv("input", 1, 4, 3, first=True, dead=dead[0], pads=[1, 1, 1, 1])
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    if pool_first:
        h = b.g.node("Relu", [b.g.node("MaxPool", [h], **pool)], name="relu1")
    else:
        h = b.g.node("MaxPool", [b.g.node("Relu", [h], name="relu1")], **pool)
    h = b.conv(h, 4, c2, 3, dead=dead[1], pads=[1, 1, 1, 1])
    h = b.g.node("Relu", [h], name="relu2")
    h = b.g.node("Flatten", [h], axis=1)
    b.gemm(h, c2 * 4 * 4, 3, "output")
    return b.fixture(name, (1, 8, 8), 3, {"relu1": list(dead[0]), "relu2": list(dead[1])})


def overlapping_pool(seed: int = 13) -> MaxPoolFixture:
    """``Conv → Relu → MaxPool(3x3, stride 2, pads 1) → Conv → Relu → Flatten → Gemm`` on
    ``[2, 7, 7]`` (overlapping windows, some holding padding: 4 x 4 outputs)."""
    b = _Builder(seed)
    h = b.conv("input", 2, 3, 3, first=True, dead=(0,), pads=[1, 1, 1, 1])
    h = b.g.node("Relu", [h], name="relu1")
    h = b.g.node("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    h = b.conv(h, 3, 4, 2, dead=(3,))
    h = b.g.node("Relu", [h], name="relu2")
    h = b.g.node("Flatten", [h], axis=1)
    b.gemm(h, 4 * 3 * 3, 2, "output")
    return b.fixture("overlapping_pool", (2, 7, 7), 2, {"relu1": [0], "relu2": [3]})


def global_max_head(seed: int = 14) -> MaxPoolFixture:
    """``Conv → Relu → Conv → Relu → GlobalMaxPool → Flatten → Gemm`` on ``[1, 6, 6]``."""
    b = _Builder(seed)
    h = b.conv("input", 1, 3, 3, first=True, dead=(2,), pads=[1, 1, 1, 1])
    h = b.g.node("Relu", [h], name="relu1")
    h = b.conv(h, 3, 4, 3, dead=(1,), strides=[2, 2], pads=[1, 1, 1, 1])
    h = b.g.node("Relu", [h], name="relu2")
    h = b.g.node("GlobalMaxPool", [h])
    h = b.g.node("Flatten", [h], axis=1)
    b.gemm(h, 4, 3, "output")
    return b.fixture("global_max_head", (1, 6, 6), 3, {"relu1": [2], "relu2": [1]})


def tf2onnx_maxpool(seed: int = 15) -> MaxPoolFixture:
    """tf2onnx / Keras, unoptimised: NHWC input ``[batch, 8, 8, 1]`` → Transpose → Conv →
    Relu, then ``MaxPool`` between Transposes to NHWC and back (as tf2onnx wraps an NHWC pool)
    → Conv → Relu → Transpose(0,2,3,1) → Reshape → MatMul → Add."""
    b = _Builder(seed)
    g = b.g
    h = g.node("Transpose", ["input"], perm=[0, 3, 1, 2])
    h = b.conv(h, 1, 4, 3, first=True, dead=(0,), pads=[1, 1, 1, 1])
    h = g.node("Relu", [h], name="Relu")
    h = g.node("Transpose", [h], perm=[0, 2, 3, 1])
    h = g.node("Transpose", [h], perm=[0, 3, 1, 2])
    h = g.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2], auto_pad="VALID")
    h = g.node("Transpose", [h], perm=[0, 2, 3, 1])
    h = g.node("Transpose", [h], perm=[0, 3, 1, 2])
    h = b.conv(h, 4, 5, 3, dead=(3,), auto_pad="SAME_UPPER")
    h = g.node("Relu", [h], name="Relu_1")
    h = g.node("Transpose", [h], perm=[0, 2, 3, 1])
    h = g.node("Reshape", [h, g.const(np.array([-1, 80]), dtype=np.int64)])
    weight = b.rng.normal(0.0, 0.1, (80, 3)).astype(np.float32)
    h = g.node("MatMul", [h, g.const(weight)])
    g.node("Add", [h, g.const(np.full(3, 0.1, np.float32))], output="output")
    return b.fixture("tf2onnx_maxpool", (8, 8, 1), 3, {"Relu": [0], "Relu_1": [3]})


def resnet_stem(seed: int = 16) -> MaxPoolFixture:
    """A ResNet stem and basic block: ``Conv → Relu → MaxPool(3x3, stride 2, pads 1)``, whose
    output forks into ``Conv → Relu → Conv`` and the identity skip, ``Add → Relu →
    GlobalAveragePool → Flatten → Gemm`` on ``[1, 8, 8]``."""
    b = _Builder(seed)
    g = b.g
    h = g.node("Relu", [b.conv("input", 1, 4, 3, pads=[1, 1, 1, 1])], name="stem")
    s = g.node("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    h = g.node("Relu", [b.conv(s, 4, 4, 3, dead=(2,), pads=[1, 1, 1, 1])], name="branch")
    h = g.node("Add", [b.conv(h, 4, 4, 3, pads=[1, 1, 1, 1]), s])
    h = g.node("Relu", [h], name="out")
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h])], axis=1)
    b.gemm(h, 4, 3, "output")
    return b.fixture("resnet_stem", (1, 8, 8), 3, {"branch": [2]})


FIXTURES = {
    "torch_relu_maxpool": torch_relu_maxpool,
    "maxpool_relu": maxpool_relu,
    "overlapping_pool": overlapping_pool,
    "global_max_head": global_max_head,
    "tf2onnx_maxpool": tf2onnx_maxpool,
    "resnet_stem": resnet_stem,
}


def pool_model(
    op: str, order: str, shape: tuple[int, ...], seed: int = 0, **attrs
) -> MaxPoolFixture:
    """``Conv(3x3, pads 1) → [Relu → pool | pool → Relu] → Flatten → Gemm`` on ``shape``
    (``(C, H, W)``), the pool ``op`` with ``attrs``: for the window cases of the reader test."""
    b = _Builder(seed)
    h = b.conv("input", shape[0], 3, 3, pads=[1, 1, 1, 1])
    if order == "relu_pool":
        h = b.g.node(op, [b.g.node("Relu", [h], name="relu1")], **attrs)
    else:
        h = b.g.node("Relu", [b.g.node(op, [h], **attrs)], name="relu1")
    h = b.g.node("Flatten", [h], axis=1)
    probe = b.g.model([b.g.tensor("input", ["batch", *shape])], [b.g.tensor(h, ["batch", "n"])])
    width = _flat_width(probe, shape)
    b.gemm(h, width, 2, "output")
    return b.fixture(f"{op}_{order}", shape, 2, {})


def _flat_width(model: onnx.ModelProto, shape: tuple[int, ...]) -> int:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.zeros((1, *shape), np.float32)})[0]
    return int(out.shape[1])
