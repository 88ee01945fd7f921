"""Parameters and multiply-adds of an ONNX model, counted the way onnxsim 0.8.1 counts them.

Structured pruning is judged by what an inference engine executes, so a run reports both counts
from the ONNX graph itself (before and after), not from the analysis IR: the IR composes
Transposes and poolings into dense matrices, the written model keeps them as they were.

The counts (per inference, with a dynamic batch dim set to 1):

- **params**: elements of every floating-point constant a node consumes (initializers, also
  those listed as graph inputs, and ``Constant`` node values), each counted once, at the first
  node that consumes it; integer constants (shapes, axes, pads) are not parameters;
- **MACs**: ``Conv`` = output elements × (input channels per group × kernel elements), i.e.
  ``prod(out_spatial) · K.size`` per sample (1-D, 2-D and N-D alike); ``Gemm`` / ``MatMul`` =
  output elements × the contracted dimension (``rows · cols`` of the weight for a vector input,
  onnxsim's ``rows × weight size``); every other op 0 (elementwise ops, pooling, data movement).

Shapes come from onnx's shape inference on a light copy of the graph (float tensors without
their data, so a large model is never duplicated in memory). A Gemm/MatMul whose input shape
stays unknown (after an ``ai.onnx.ml`` op without shape inference) counts one row times its
constant 2-D weight, as onnxsim does; a Conv whose output shape stays unknown counts 0 and is
named in :attr:`ModelStats.unknown`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

from onnx_exact.io.graph import node_attr

FLOAT_TYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
)
MAC_OPS = frozenset({"Conv", "Gemm", "MatMul"})


@dataclass(frozen=True)
class NodeStats:
    """One node's share: the float constants it consumes first, and its multiply-adds."""

    name: str
    op_type: str
    params: int
    macs: int


@dataclass
class ModelStats:
    """Whole-model ``params`` and ``macs`` (per inference) and one row per node, graph order.

    ``unknown`` names the MAC-counting nodes whose shapes shape inference could not fix and
    no fallback covers (they count 0 MACs, so ``macs`` is then a lower bound).
    """

    params: int
    macs: int
    nodes: list[NodeStats] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LayerCost:
    """Params and MACs of the nodes feeding one ReLU (see :func:`relu_layer_stats`)."""

    name: str
    params: int
    macs: int


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph without float tensor data and with dynamic leading dims of inputs set to 1.

    Shape inference needs the dims of float constants, never their values (only integer shape
    tensors are propagated), so copying their data would only cost memory.
    """
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    graph = model.graph
    light.graph.name = graph.name
    light.graph.node.extend(graph.node)
    light.graph.output.extend(graph.output)
    light.graph.value_info.extend(graph.value_info)
    for tensor in graph.initializer:
        if tensor.data_type in FLOAT_TYPES:
            stub = light.graph.initializer.add()
            stub.name, stub.data_type = tensor.name, tensor.data_type
            stub.dims.extend(tensor.dims)
        else:
            light.graph.initializer.add().CopyFrom(tensor)
    for value in graph.input:
        entry = light.graph.input.add()
        entry.CopyFrom(value)
        shape = entry.type.tensor_type.shape if entry.type.HasField("tensor_type") else None
        if shape is not None and len(shape.dim) >= 2 and not shape.dim[0].HasField("dim_value"):
            shape.dim[0].Clear()
            shape.dim[0].dim_value = 1
    # declared output shapes may still name the dynamic batch: let inference decide them
    for output in light.graph.output:
        if output.type.HasField("tensor_type"):
            output.type.tensor_type.ClearField("shape")
    return light


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Fully known static shapes of every tensor of the light copy (others are left out)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_light_copy(model), data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return {}
    shapes: dict[str, tuple[int, ...]] = {}
    graph = inferred.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        if not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    return shapes


def _float_constants(graph: onnx.GraphProto) -> dict[str, int]:
    """Element counts of the float constants: initializers and ``Constant`` node outputs."""
    sizes = {t.name: math.prod(t.dims) for t in graph.initializer if t.data_type in FLOAT_TYPES}
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.attribute:
            continue
        attribute = node.attribute[0]
        if attribute.name == "value" and attribute.t.data_type in FLOAT_TYPES:
            sizes[node.output[0]] = math.prod(attribute.t.dims)
        elif attribute.name == "value_float":
            sizes[node.output[0]] = 1
        elif attribute.name == "value_floats":
            sizes[node.output[0]] = len(attribute.floats)
    return sizes


def _node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Multiply-adds of a Conv/Gemm/MatMul node (None when its shapes are unknown)."""
    out = shapes.get(node.output[0])
    if node.op_type == "Conv":
        weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if out is None or weight is None:
            return None
        return math.prod(out) * math.prod(weight[1:])
    left = shapes.get(node.input[0])
    if out is None or left is None or not left:
        # onnxsim's rule for an unknown input shape: one row times the constant weight
        weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
        return math.prod(weight) if weight is not None and len(weight) == 2 else None
    if node.op_type == "Gemm":
        inner = left[0] if node_attr(node, "transA", 0) else left[-1]
    else:  # MatMul: a 1-D left operand is a vector, its length is the contracted dim
        inner = left[-1]
    return math.prod(out) * int(inner)


def model_stats(model: onnx.ModelProto) -> ModelStats:
    """Params and MACs of ``model`` as onnxsim counts them (module docstring), per node."""
    graph = model.graph
    constants = _float_constants(graph)
    needs_shapes = any(node.op_type in MAC_OPS for node in graph.node)
    shapes = _shapes(model) if needs_shapes else {}
    seen: set[str] = set()
    rows, unknown = [], []
    for index, node in enumerate(graph.node):
        params = 0
        for name in node.input:
            if name in constants and name not in seen:
                seen.add(name)
                params += constants[name]
        macs = 0
        if node.op_type in MAC_OPS and node.domain in ("", "ai.onnx"):
            counted = _node_macs(node, shapes)
            label = node.name or f"#{index} {node.op_type}"
            if counted is None:
                unknown.append(label)
            macs = counted or 0
        rows.append(NodeStats(node.name, node.op_type, params, macs))
    return ModelStats(
        params=sum(r.params for r in rows),
        macs=sum(r.macs for r in rows),
        nodes=rows,
        unknown=unknown,
    )


def _relu_key(node: onnx.NodeProto, names: set[str]) -> str | None:
    """The name under which ``node`` is one of the asked ReLU layers (its node name or output):
    a ``Relu``, or a ``Clip`` (a ReLU6 layer is named by its Clip)."""
    if node.op_type not in ("Relu", "Clip"):
        return None
    for key in (node.name, node.output[0] if node.output else ""):
        if key and key in names:
            return key
    return None


def relu_layer_stats(
    model: onnx.ModelProto, relu_names: Sequence[str], stats: ModelStats | None = None
) -> tuple[list[LayerCost], LayerCost]:
    """Params and MACs per ReLU layer: the nodes whose first asked ReLU downstream is that one.

    A node belongs to the layer of the earliest (graph order) ReLU of ``relu_names`` its output
    reaches; for a sequential network that is the Conv/Gemm (and BN, Pad, pooling ...) between
    the previous ReLU and this one. Nodes reaching none form the tail (the output layer), given
    as the second value under the name ``"output"``. A name absent from ``model`` (a ReLU that
    pruning removed) gets no row: its nodes join the next ReLU's layer. ReLUs are matched by
    node name, or by output tensor name for unnamed nodes.
    """
    stats = stats or model_stats(model)
    graph = model.graph
    asked = set(relu_names)
    order = {}
    for index, node in enumerate(graph.node):
        key = _relu_key(node, asked)
        if key is not None:
            order[key] = index
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    owner: list[str | None] = [None] * len(graph.node)
    for index in range(len(graph.node) - 1, -1, -1):  # graph order is topological
        node = graph.node[index]
        key = _relu_key(node, asked)
        if key is not None:
            owner[index] = key
            continue
        reached = [owner[c] for name in node.output for c in consumers.get(name, ()) if owner[c]]
        owner[index] = min(reached, key=order.__getitem__) if reached else None
    params: dict[str | None, int] = {}
    macs: dict[str | None, int] = {}
    for key, row in zip(owner, stats.nodes, strict=True):
        params[key] = params.get(key, 0) + row.params
        macs[key] = macs.get(key, 0) + row.macs
    layers = [
        LayerCost(name, params.get(name, 0), macs.get(name, 0))
        for name in relu_names
        if name in order
    ]
    return layers, LayerCost("output", params.get(None, 0), macs.get(None, 0))
