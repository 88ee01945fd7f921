"""Reshape targets computed from the activation's own shape, folded into constants.

torch's legacy exporter writes ``x.view(x.size(0), -1)`` with a dynamic batch as::

    x ─▶ Shape ─▶ Gather(0) ─▶ Unsqueeze ─┐
                         Constant [-1] ──┴─▶ Concat ─▶ Reshape(x, ·)

The target is ``[batch, -1]`` for every batch size. The readers accept constant targets only
(they must know the sample shape), and a ``Shape`` reader of the activation looks like a fork,
so such a graph would be refused. :func:`fold_batch_reshapes` evaluates the target from the
tensor's inferred shape, with the batch dimension kept symbolic, and when every entry but the
first is a constant and the first is that batch dimension (or a constant), replaces it by the
constant ``[0, ...]``: with ``allowzero = 0`` a 0 copies the input's dimension, so the Reshape computes the
same tensor for every batch size. The shape nodes left without a reader are dropped. Anything
else (a target that uses another dimension symbolically, arithmetic on shapes, ``allowzero =
1``) is left as it is, for the readers to refuse in one line.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_exact.io.graph import ConstantResolver, node_attr, read_counts

#: Shape-computation ops evaluated here (and dropped once nothing reads them).
SHAPE_OPS = frozenset(
    {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Identity", "Slice", "Constant"}
)

_BATCH = np.int64(-(2**62))  # the symbolic batch dimension while a target is evaluated


def fold_batch_reshapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every foldable computed Reshape target made constant (see the module); the
    model itself when there is none (it is never changed in place)."""
    graph = model.graph
    candidates = [
        i
        for i, node in enumerate(graph.node)
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx") and len(node.input) > 1
    ]
    constants = ConstantResolver(graph)
    candidates = [i for i in candidates if constants.value(graph.node[i].input[1]) is None]
    if not candidates:
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 (a model shape inference rejects is judged by the readers)
        return model
    evaluator = _ShapeEvaluator(inferred.graph, constants)
    targets = {}
    for index in candidates:
        node = graph.node[index]
        if node_attr(node, "allowzero", 0):
            continue
        value = evaluator.value(node.input[1])
        if value is None or value.ndim != 1 or not value.size:
            continue
        if np.any(value[1:] == _BATCH) or np.any(value[1:] < -1):
            continue
        targets[index] = np.where(value == _BATCH, 0, value).astype(np.int64)
    if not targets:
        return model
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    taken = {t.name for t in folded.graph.initializer} | {
        o for n in folded.graph.node for o in n.output
    }
    for index, target in targets.items():
        node = folded.graph.node[index]
        name, counter = f"{node.input[1]}_folded", 0
        while name in taken:
            counter += 1
            name = f"{node.input[1]}_folded_{counter}"
        taken.add(name)
        folded.graph.initializer.append(numpy_helper.from_array(target, name))
        node.input[1] = name
    _drop_unread_shape_nodes(folded.graph)
    return folded


class _ShapeEvaluator:
    """Values of int64 shape tensors, the batch dimension as ``_BATCH``; None when unknown."""

    def __init__(self, graph: onnx.GraphProto, constants: ConstantResolver) -> None:
        self.constants = constants
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.shapes: dict[str, list] = {}
        for info in [*graph.input, *graph.value_info, *graph.output]:
            dims = info.type.tensor_type.shape.dim
            self.shapes[info.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in dims
            ]

    def value(self, name: str) -> np.ndarray | None:
        constant = self.constants.value(name)
        if constant is not None:
            return np.asarray(constant).astype(np.int64)
        node = self.producer.get(name)
        if node is None or node.op_type not in SHAPE_OPS or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Shape":
            return self._shape(node)
        inputs = [self.value(x) if x else None for x in node.input]
        if inputs and inputs[0] is None:
            return None
        op = node.op_type
        if op in ("Identity", "Cast"):
            return inputs[0]
        if op == "Gather":
            if node_attr(node, "axis", 0) != 0 or inputs[1] is None or inputs[0].ndim != 1:
                return None
            return inputs[0][inputs[1]]
        if op == "Unsqueeze":
            axes = node_attr(node, "axes", None)
            axes = axes if axes is not None else (inputs[1] if len(inputs) > 1 else None)
            if axes is None or list(np.asarray(axes).reshape(-1)) != [0] or inputs[0].ndim != 0:
                return None
            return inputs[0].reshape(1)
        if op == "Squeeze":
            return inputs[0].reshape(-1) if inputs[0].size == 1 else None
        if op == "Concat":
            if node_attr(node, "axis", 0) != 0 or any(x is None or x.ndim != 1 for x in inputs):
                return None
            return np.concatenate(inputs)
        if op == "Slice":
            return self._slice(inputs)
        return None

    def _shape(self, node: onnx.NodeProto) -> np.ndarray | None:
        dims = self.shapes.get(node.input[0])
        if not dims:
            return None
        values = [_BATCH if (d is None and i == 0) else d for i, d in enumerate(dims)]
        if any(v is None for v in values):
            return None
        start, end = node_attr(node, "start", 0), node_attr(node, "end", None)
        return np.array(values, dtype=np.int64)[start:end]

    @staticmethod
    def _slice(inputs: list) -> np.ndarray | None:
        data, starts, ends = inputs[:3]
        rest = inputs[3:]
        if data.ndim != 1 or starts is None or ends is None or any(x is None for x in rest):
            return None
        if rest and list(rest[0].reshape(-1)) != [0]:
            return None  # only axis 0 of a 1-D shape
        step = int(rest[1].reshape(-1)[0]) if len(rest) > 1 else 1
        return data[int(starts.reshape(-1)[0]) : int(ends.reshape(-1)[0]) : step]


def _drop_unread_shape_nodes(graph: onnx.GraphProto) -> None:
    """Remove shape-computation nodes nothing reads (no node, also in a subgraph, and no graph
    output), until none is left."""
    outputs = {o.name for o in graph.output}
    while True:
        read = outputs | set(read_counts(graph))  # subgraph (If/Loop body) reads included
        unread = [
            n
            for n in graph.node
            if n.op_type in SHAPE_OPS and n.op_type != "Identity" and not set(n.output) & read
        ]
        if not unread:
            return
        for node in unread:
            graph.node.remove(node)
