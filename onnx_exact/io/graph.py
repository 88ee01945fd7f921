"""Read-only navigation of an ONNX graph, shared by the reader and the writer.

What both sides need to agree on: which tensors hold data (:func:`all_tensors`, in the order
``onnx.external_data_helper`` walks them), the value of a constant tensor whatever node stores it
(:class:`ConstantResolver`), how a node is named in a message, and the :class:`Binding` the reader
records (where each layer of the network lives in the graph) and the writer edits in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT_TYPES = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.DOUBLE: np.dtype(np.float64),
    TensorProto.FLOAT16: np.dtype(np.float16),
}
ML_DOMAIN = "ai.onnx.ml"
ONNX_DOMAIN = "ai.onnx"


@dataclass
class PathStep:
    """One node on the MLP's data path, in graph order.

    Attributes
    ----------
    node : index into ``model.graph.node`` (node names may be empty or repeated, indices are not).
    role : what the node does for the network:

        ``"preprocess"``  elementwise affine op before the first affine node, folded into InputMap;
        ``"pass"``        value-preserving reshaping node (Identity, Dropout, Cast, Flatten, Reshape);
        ``"fold"``        per-unit affine op (Add/Sub/Mul/Div by a constant, BatchNormalization)
                          folded into the weights/bias of ``layer``;
        ``"core"``        the Gemm/MatMul of ``layer``;
        ``"bias"``        the Add that carries the bias of a MatMul ``layer``;
        ``"relu"``        the Relu of ``layer``.

    layer : the Network layer this step belongs to (for preprocessing and pass-throughs: the layer
        whose core comes next, or the last layer for pass-throughs inside its body).
    data_slot : which input of the node is the activation (the others are constants).
    width : number of features the node received in the original graph (used by the writer to
        rewrite Reshape targets in the hidden part when a layer shrinks).
    """

    node: int
    role: str
    layer: int
    data_slot: int = 0
    width: int = 0


@dataclass
class LayerBinding:
    """Where one Network layer lives in the ONNX graph.

    Attributes
    ----------
    index : position in ``Network.layers``.
    style : ``"gemm"`` (a Gemm node) or ``"matmul"`` (a MatMul, optionally followed by a bias Add).
    weight_layout : how the stored weight relates to ``W (out, in)``: ``"oi"`` (Gemm transB=1,
        stored ``W/alpha``), ``"io"`` (Gemm transB=0 or right-hand MatMul weight, stored ``Wᵀ``)
        or ``"left"`` (``MatMul(W, x)`` on a 1-D input, stored ``W``).
    core : node index of the Gemm/MatMul; the writer keeps its name and attributes.
    data_slot, weight_slot : input positions of the activation and the weight in ``core``.
    bias_node : node index of the bias Add (MatMul style), else None.
    bias_slot : input position of the constant in ``bias_node`` (or 2 = Gemm's C).
    bias_shape : the stored shape of the bias constant (Gemm C or the Add constant), None if absent;
        the writer keeps its rank (``(n,)``, ``(1, n)``, ``(1, 1, n)``...).
    folded : node indices of the per-unit affine ops folded into this layer.
    relu_node : node index of the Relu, None for a layer without ReLU.
    input_tensor : the activation tensor the core reads in the original graph.
    output_tensor : the pre-activation tensor (after bias and folded ops): what the ReLU reads.
    activation_tensor : the ReLU output (``output_tensor`` for a layer without ReLU).
    weight_dtype : numpy dtype of the stored weight; the writer writes back in this dtype.
    alpha, beta, trans_a, trans_b : Gemm attributes with ONNX defaults applied (1, 1, 0, 0).
    """

    index: int
    style: str
    weight_layout: str
    core: int
    data_slot: int
    weight_slot: int
    bias_node: int | None
    bias_slot: int | None
    bias_shape: tuple | None
    folded: list[int]
    relu_node: int | None
    input_tensor: str
    output_tensor: str
    activation_tensor: str
    weight_dtype: np.dtype
    alpha: float = 1.0
    beta: float = 1.0
    trans_a: int = 0
    trans_b: int = 0


@dataclass
class Binding:
    """Everything the writer needs to edit the graph in place of re-creating it.

    Attributes
    ----------
    layers : one :class:`LayerBinding` per Network layer.
    path : every node of the MLP region, in graph order, with its role.
    input_name : the (single, non-constant) graph input.
    output_tensor : the network's end tensor (last pre-activation, or its ReLU output); the tail
        reads it and the writer makes sure the edited graph still produces it.
    """

    layers: list[LayerBinding]
    path: list[PathStep]
    input_name: str
    output_tensor: str

    @property
    def preprocess_nodes(self) -> list[int]:
        """Nodes whose effect is the network's InputMap."""
        return [step.node for step in self.path if step.role == "preprocess"]


def all_graphs(graph: onnx.GraphProto):
    """The graph and every subgraph nested in node attributes (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from all_graphs(sub)


def reader_slots(graph: onnx.GraphProto) -> dict[str, list[tuple[int, int]]]:
    """Per tensor name, the ``(node index, input slot)`` of every main-graph node reading it."""
    readers: dict[str, list[tuple[int, int]]] = {}
    for index, node in enumerate(graph.node):
        for slot, name in enumerate(node.input):
            if name:
                readers.setdefault(name, []).append((index, slot))
    return readers


def read_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """Per tensor name, how many node inputs read it in ``graph`` and its subgraphs: more than
    the main graph's readers when an If/Loop body reads it too (then it must not change)."""
    counts: dict[str, int] = {}
    for sub in all_graphs(graph):
        for node in sub.node:
            for name in node.input:
                counts[name] = counts.get(name, 0) + 1
    return counts


def all_tensors(model: onnx.ModelProto, *, sparse: bool = False) -> Iterator[onnx.TensorProto]:
    """Every TensorProto that may hold data, graph by graph (subgraphs included), in graph order.

    By default the initializers and the tensor attributes (``TENSOR`` and ``TENSORS``): the kinds
    of tensor ``onnx.external_data_helper`` externalises and loads, so the reader and the writer
    agree with onnx on which tensors have a data file. With ``sparse``, also the values and
    indices of each graph's sparse initializers, right after its dense ones: a hand-written file
    may point at data files from those too, and no file a run reads may be overwritten.
    """
    for graph in all_graphs(model.graph):
        yield from graph.initializer
        if sparse:
            for entry in graph.sparse_initializer:
                yield entry.values
                yield entry.indices
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield attribute.t
                elif attribute.type == onnx.AttributeProto.TENSORS:
                    yield from attribute.tensors


def node_label(index: int, node: onnx.NodeProto) -> str:
    """A node reference for messages: its name, or its index and first output when unnamed."""
    if node.name:
        return f"node '{node.name}' ({node.op_type})"
    out = node.output[0] if node.output else ""
    return f"node #{index} ({node.op_type}, output '{out}')"


def node_attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def reduce_axes(node: onnx.NodeProto, constants: ConstantResolver, rank: int) -> tuple | None:
    """The model axes (non-negative, sorted) a ``ReduceMean``/``ReduceSum``-style node of a
    rank-``rank`` tensor reduces: the ``axes`` attribute (opset < 18) or constant second input
    (opset >= 18); every axis when none are given, or ``()`` with ``noop_with_empty_axes``.
    None when the axes are not constant or do not fit the rank."""
    axes = node_attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = constants.value(node.input[1])
        if value is None:
            return None
        axes = [int(a) for a in np.asarray(value).reshape(-1)]
    if not axes:
        return () if node_attr(node, "noop_with_empty_axes", 0) else tuple(range(rank))
    if any(not -rank <= int(a) < rank for a in axes):
        return None
    return tuple(sorted({int(a) % rank for a in axes}))


class ConstantResolver:
    """Values of constant tensors: initializers (also those listed as graph inputs, which IR < 4
    requires and tf2onnx sometimes does), ``Constant`` nodes, and ``Identity`` chains of either.

    A ``Cast`` of a float constant to float16/32/64 is folded too (fp16 weights stored behind a
    ``Cast`` to float32 by mixed-precision exporters): numpy's ``astype`` rounds to nearest even
    like onnxruntime's Cast, and widening (float16 → float32) is exact.
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer = {
            name: i for i, node in enumerate(graph.node) for name in node.output if name
        }
        self.cache: dict[str, np.ndarray | None] = {}

    def value(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is constant, else None."""
        if name in self.cache:
            return self.cache[name]
        value = None
        if name in self.initializers:
            value = numpy_helper.to_array(self.initializers[name])
        elif name in self.producer:
            node = self.graph.node[self.producer[name]]
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_node_value(node)
            elif node.op_type == "Identity":
                value = self.value(node.input[0])
            elif node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
                source = self.value(node.input[0])
                target = FLOAT_TYPES.get(node_attr(node, "to", 0))
                is_float = source is not None and (
                    source.dtype.kind == "f" or source.dtype.name == "bfloat16"
                )
                if is_float and target is not None:
                    value = source.astype(target)
        self.cache[name] = value
        return value


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    attribute = node.attribute[0]
    kind = attribute.name
    if kind == "value":
        return numpy_helper.to_array(attribute.t)
    if kind in ("value_float", "value_int"):
        return np.array(helper.get_attribute_value(attribute))
    if kind in ("value_floats", "value_ints"):
        return np.array(list(helper.get_attribute_value(attribute)))
    return None


def output_names(model: onnx.ModelProto) -> list[str]:
    """The names of the graph outputs, in order."""
    return [output.name for output in model.graph.output]
