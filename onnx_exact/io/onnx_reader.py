"""ONNX → :class:`~onnx_exact.network.Network`, plus the :class:`Binding` the writer edits.

The reader follows the one data path of a ReLU MLP from the graph input to the last affine layer:

    x_raw ─[preprocessing: Sub/Div/Mul/Add/Scaler, pass-throughs]─▶ x_net
    x_net ─[pass-throughs, per-unit affine ops]─▶ Gemm | MatMul(+Add) ─[bias, BN, Mul/Add]─▶ y_1 ─Relu─▶ h_1
    ...                                                                                  y_L (─Relu─▶ h_L)

Every node on that path gets a role (see :class:`PathStep`); what comes after the last affine layer (and
its ReLU, if any) is the *tail* and is left alone. Whatever the exporter wrote, each layer becomes
``y = W h + b`` in float64 with ``W`` stored ``(out, in)``:

* ``Gemm(A, B, C)``: ``Y = alpha * A' B' + beta * C`` with ``B' = B`` or ``Bᵀ`` (transB), so
  ``W = alpha * B'ᵀ`` and ``b = beta * C`` broadcast to ``(out,)``.
* ``MatMul(x, B)`` (weight on the right, ``B`` is ``(in, out)``): ``W = Bᵀ``;
  ``MatMul(A, x)`` (weight on the left, 1-D ``x``): ``W = A``.
* Per-unit affine ops ``z ↦ s ∘ z + t`` (Add/Sub/Mul/Div by a constant, inference BatchNormalization)
  after the affine node fold as ``W ← diag(s) W``, ``b ← s ∘ b + t``; such ops between a ReLU and the
  next affine node fold into that node as ``W ← W diag(s)``, ``b ← b + W t``; before the first affine
  node they form the :class:`~onnx_exact.network.InputMap` (the domain is given on the raw input).

The *sample shape* of the activation (its shape without the batch dimension) is tracked through every
node; pass-through nodes (Identity, Dropout, same-type Cast, Flatten, Reshape) may change it only in
ways that keep the batch dimension first and the C-order feature sequence unchanged, so the network
always acts on the flattened features. float32/float16 constants are converted to float64 exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import TensorProto, helper, numpy_helper

from onnx_exact.core.errors import MalformedModelError, UnsupportedModelError, UsageError
from onnx_exact.core.network import DenseLayer, InputMap, Network

#: Ops that only move or relabel values; the reader checks each keeps the batch dim and features.
PASS_THROUGH_OPS = frozenset({"Identity", "Dropout", "Cast", "Flatten", "Reshape"})
#: Binary ops with a constant operand that act elementwise and affinely on the activation.
ELEMENTWISE_AFFINE_OPS = frozenset({"Add", "Sub", "Mul", "Div"})
#: Non-ReLU activations: named in the error so the user knows why the model is refused.
OTHER_ACTIVATIONS = frozenset(
    {
        "Tanh", "Sigmoid", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Clip",
        "HardSigmoid", "HardSwish", "PRelu", "Gelu", "Mish", "ThresholdedRelu", "Erf", "Max",
        "Min", "Abs", "Exp", "Log", "Sqrt", "Pow", "Sin", "Cos",
    }
)  # fmt: skip
FLOAT_TYPES = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.DOUBLE: np.dtype(np.float64),
    TensorProto.FLOAT16: np.dtype(np.float16),
}
ML_DOMAIN = "ai.onnx.ml"
ONNX_DOMAIN = "ai.onnx"
#: Newest opset per domain this onnx installation defines (onnxruntime runs models up to these).
MAX_OPSETS = {
    domain: max(v for (d, v) in helper.OP_SET_ID_VERSION_MAP if d == domain)
    for domain in (ONNX_DOMAIN, ML_DOMAIN)
}
#: Oldest default-domain opset onnxruntime supports.
MIN_ONNX_OPSET = 7


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


@dataclass
class ReadResult:
    """A loaded model and the network extracted from it.

    ``uses_external_data`` records whether the file stored its tensors in external data (torch's
    dynamo exporter always does) and ``external_tensors`` which ones (the loaded ``model`` holds
    them all inline): :meth:`onnx_exact.onnx_writer.TensorPlacement.like_input` keeps each tensor
    of the output where the input kept it.
    """

    model: onnx.ModelProto
    network: Network
    binding: Binding
    path: Path | None
    input_shape: tuple
    has_batch_dim: bool
    input_dtype: np.dtype
    uses_external_data: bool = False
    external_tensors: frozenset[str] = frozenset()


def read_model(source: str | os.PathLike | onnx.ModelProto) -> ReadResult:
    """Load an ONNX model and extract its ReLU MLP.

    Parameters
    ----------
    source : a path to an ``.onnx`` file (external data is loaded from its folder) or a ModelProto
        (not modified).

    Raises
    ------
    UsageError
        The file does not exist.
    MalformedModelError
        The file is not a valid ONNX model (see :func:`load_graph`) or its external data is
        missing.
    UnsupportedModelError
        The graph is not a ReLU MLP the tool can prove things about; the message names the node
        and the reason.
    """
    if isinstance(source, onnx.ModelProto):
        model, path, label, external = source, None, "<model>", frozenset()
    else:
        path = Path(os.fspath(source))
        label = str(path)
        model, external = _load(path)
    _check_opsets(model, label)
    _check_integrity(model, label)
    result = _GraphWalker(model, label).read(path, external)
    _check_inference(model, label)
    return result


def _check_inference(model: onnx.ModelProto, label: str) -> None:
    """Refuse a model onnxruntime would refuse to load because a node's types or shapes clash.

    onnxruntime runs onnx's type and shape inference when it loads a model and fails on any node
    whose inputs do not fit (an ``Add`` of a 5-vector onto 4 features, a ``Softmax`` axis out of
    range, a graph output declared with another element type). The walk above does not look at
    the nodes after the last layer, so such a model was analysed and then failed as "the written
    model does not load" (exit 1, blaming the output). Run after the walk, so its own messages
    come first. Declared output and ``value_info`` *shapes* are set aside during the inference
    (their element types are kept): onnxruntime only warns about a declared shape that differs.
    Models over protobuf's 2 GiB limit are skipped, as for ``onnx.checker``.
    """
    try:
        if model.ByteSize() >= 2**31 - 1:
            return
    except EncodeError:
        return
    graph = model.graph
    saved_outputs = [onnx.ValueInfoProto() for _ in graph.output]
    for saved, output in zip(saved_outputs, graph.output, strict=True):
        saved.CopyFrom(output)
        if output.type.HasField("tensor_type"):
            output.type.tensor_type.ClearField("shape")
    saved_value_info = list(graph.value_info)
    del graph.value_info[:]
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        reason = " ".join(str(exc).split())
        raise MalformedModelError(
            f"{label}: onnxruntime cannot load it (onnx shape inference: {reason}); fix the model "
            "or re-export it"
        ) from None
    finally:
        for saved, output in zip(saved_outputs, graph.output, strict=True):
            output.CopyFrom(saved)
        graph.value_info.extend(saved_value_info)


def _check_opsets(model: onnx.ModelProto, label: str) -> None:
    """Refuse opsets that onnx or onnxruntime cannot run, before any analysis time is spent.

    The compressed model keeps the input's opsets and is verified with onnxruntime, so a model
    stamped with an opset newer than this onnx knows (``onnx.defs.onnx_opset_version()``) or older
    than onnxruntime supports (7) would only fail after the whole analysis.
    """
    versions = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    if "ai.onnx" not in versions:
        raise UnsupportedModelError(
            f"{label}: imports no opset for the default ONNX domain; re-export the model with an "
            "opset (e.g. opset_version=17)"
        )
    for domain, version in versions.items():
        if domain not in (ONNX_DOMAIN, ML_DOMAIN):
            continue
        newest = MAX_OPSETS[domain]
        oldest = MIN_ONNX_OPSET if domain == ONNX_DOMAIN else 1
        if not oldest <= version <= newest:
            raise UnsupportedModelError(
                f"{label}: opset {version} of domain '{domain}' is not supported (onnx "
                f"{onnx.__version__} and onnxruntime run {oldest} to {newest}); convert it with "
                f"onnx.version_converter.convert_version(model, {min(max(version, oldest), newest)})"
            )


def load_graph(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """A model's graph, its external data not loaded, checked like :func:`read_model` checks it.

    For models that need not be ReLU networks (``check`` samples any model onnxruntime runs): a
    missing file is a :class:`UsageError`, a file that is not a valid ONNX model (undecodable,
    tensor data that does not match its dims, a broken graph) a :class:`MalformedModelError`.
    """
    if isinstance(source, onnx.ModelProto):
        model, label = source, "<model>"
    else:
        model, label = _decode(Path(os.fspath(source))), os.fspath(source)
    _check_integrity(model, label, None if isinstance(source, onnx.ModelProto) else Path(label))
    return model


def _decode(path: Path) -> onnx.ModelProto:
    """The model file's protobuf without external data; file and decode errors are clear."""
    if not path.exists():
        raise UsageError(f"{path}: no such file; give the path of an ONNX model")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory; give the path of an ONNX model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise MalformedModelError(
            f"{path}: not a readable ONNX model (protobuf decode failed: {exc}); "
            "check the file is complete"
        ) from None
    if model.ir_version == 0 or not model.HasField("graph"):
        raise MalformedModelError(
            f"{path}: not an ONNX model (no IR version or graph); check the file is an .onnx model"
        )
    return model


def _load(path: Path) -> tuple[onnx.ModelProto, frozenset[str]]:
    """Load a model file and its external data; decode and file errors become clear errors.

    Returns the model (every tensor inline) and the names of the tensors the file stored in
    external data.
    """
    model = _decode(path)
    external = frozenset(
        tensor.name
        for tensor in all_tensors(model)
        if onnx.external_data_helper.uses_external_data(tensor)
    )
    if external:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise MalformedModelError(
                f"{path}: cannot load its external data ({exc}); keep the data file next to the model"
            ) from None
    return model, external


#: Element types stored several to a byte (``raw_data`` and ``int32_data`` hold them packed).
_PACKED_PER_BYTE = {
    getattr(TensorProto, name): per_byte
    for name, per_byte in (("INT4", 2), ("UINT4", 2), ("FLOAT4E2M1", 2), ("INT2", 4), ("UINT2", 4))
    if hasattr(TensorProto, name)
}


def _check_integrity(model: onnx.ModelProto, label: str, path: Path | None = None) -> None:
    """Refuse a malformed model up front, naming the tensor or node, instead of failing later.

    onnx and onnxruntime would otherwise raise deep inside the analysis or the writer (a reshape
    of too few bytes, a checker error on the output after the whole analysis). Checked here: the
    IR version this onnx reads, the stored size of every initializer and ``Constant`` tensor of the
    main graph against its ``dims`` and ``data_type``, unique initializer and node names
    (onnxruntime refuses repeated node names), every node input and graph output produced before
    it is used; then ``onnx.checker.check_model`` for anything else (models under 2 GiB). A model
    that still refers to external data is checked from its ``path``: in memory the checker would
    look for the data files in the current directory instead of beside the model.
    """
    if model.ir_version > onnx.IR_VERSION:
        raise MalformedModelError(
            f"{label}: IR version {model.ir_version} is newer than onnx {onnx.__version__} reads "
            f"(up to {onnx.IR_VERSION}); re-export the model with an older exporter or upgrade onnx"
        )
    graph = model.graph
    tensors = [("initializer", t) for t in graph.initializer] + [
        (f"{_label(i, node)} value", attribute.t)
        for i, node in enumerate(graph.node)
        if node.op_type == "Constant"
        for attribute in node.attribute
        if attribute.type == onnx.AttributeProto.TENSOR
    ]
    for kind, tensor in tensors:
        problem = _tensor_size_problem(tensor)
        if problem:
            raise MalformedModelError(
                f"{label}: {kind} '{tensor.name}' {problem}; the file is corrupt or was edited "
                "by hand: re-export the model"
            )
    for what, names in (
        ("initializer", [t.name for t in graph.initializer]),
        ("node", [node.name for node in graph.node if node.name]),
    ):
        seen: set[str] = set()
        repeated = next((name for name in names if name in seen or seen.add(name)), None)
        if repeated is not None:
            raise MalformedModelError(
                f"{label}: {names.count(repeated)} {what}s are named '{repeated}' (onnx and "
                f"onnxruntime refuse repeated names); give each {what} a unique name"
            )
    available = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    for index, node in enumerate(graph.node):
        missing = next((name for name in node.input if name and name not in available), None)
        if missing is not None:
            raise MalformedModelError(
                f"{label}: {_label(index, node)} reads tensor '{missing}', which no graph input, "
                "initializer or earlier node produces (a broken or unsorted graph); fix the model "
                "or re-export it"
            )
        available.update(name for name in node.output if name)
    for output in graph.output:
        if output.name not in available:
            raise MalformedModelError(
                f"{label}: graph output '{output.name}' is produced by no node; remove it from "
                "graph.output or re-export the model"
            )
    try:
        small = model.ByteSize() < 2**31 - 1
    except EncodeError:  # over protobuf's 2 GiB limit: onnxruntime checks it from its path
        small = False
    if small:
        external = any(onnx.external_data_helper.uses_external_data(t) for t in all_tensors(model))
        try:
            onnx.checker.check_model(str(path) if external and path is not None else model)
        except onnx.checker.ValidationError as exc:
            reason = " ".join(str(exc).split())
            raise MalformedModelError(
                f"{label}: not a valid ONNX model (onnx.checker: {reason}); fix it or re-export it"
            ) from None


def _tensor_size_problem(tensor: onnx.TensorProto) -> str | None:
    """What is wrong with the amount of data ``tensor`` stores for its dims and type, if anything.

    ``raw_data`` must hold ``prod(dims)`` elements of ``data_type`` (sub-byte types packed), a
    typed field (``float_data``, ``int32_data``, ...) one entry per element (two for complex
    types, packed for sub-byte types). Tensors still in external data are not checked.
    """
    if tensor.data_location == TensorProto.EXTERNAL:
        return None
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        return f"has a negative dimension in its dims {dims}"
    count = math.prod(dims)
    try:
        type_name = TensorProto.DataType.Name(tensor.data_type)
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        field = helper.tensor_dtype_to_field(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        return f"has the unknown data_type {tensor.data_type}"
    per_byte = _PACKED_PER_BYTE.get(tensor.data_type)
    if tensor.HasField("raw_data"):
        if tensor.data_type == TensorProto.STRING:
            return "is a STRING tensor stored in raw_data"
        need = -(-count // per_byte) if per_byte else count * itemsize
        have, unit = len(tensor.raw_data), "bytes of raw_data"
    else:
        need = -(-count // per_byte) if per_byte else count
        if tensor.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
            need = 2 * count
        have, unit = len(getattr(tensor, field)), f"entries of {field}"
    if have == need:
        return None
    return f"({type_name}, dims {dims}) stores {have} {unit} but its dims and data_type need {need}"


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


def _label(index: int, node: onnx.NodeProto) -> str:
    """A node reference for messages: its name, or its index and first output when unnamed."""
    if node.name:
        return f"node '{node.name}' ({node.op_type})"
    out = node.output[0] if node.output else ""
    return f"node #{index} ({node.op_type}, output '{out}')"


def _attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


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
                target = FLOAT_TYPES.get(_attr(node, "to", 0))
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


class _GraphWalker:
    """Walks the MLP data path once, building layers, the input map and the binding."""

    def __init__(self, model: onnx.ModelProto, label: str) -> None:
        self.model = model
        self.graph = model.graph
        self.label = label
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.constant = ConstantResolver(self.graph).value
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.graph.node):
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(index)
        self.graph_outputs = {o.name for o in self.graph.output}
        self.reaches_affine = self._tensors_reaching_affine()
        self.past_first_core = False

    # ------------------------------------------------------------------ helpers
    def fail(self, message: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{self.label}: {message}")

    def _tensors_reaching_affine(self) -> set[str]:
        """Tensors from which some Gemm/MatMul is reachable (graph nodes are topologically sorted)."""
        reaching: set[str] = set()
        for node in reversed(self.graph.node):
            if node.op_type in ("Gemm", "MatMul") or any(o in reaching for o in node.output):
                reaching.update(name for name in node.input if name)
        return reaching

    def float_constant(self, index: int, name: str, what: str) -> np.ndarray:
        """A finite float constant input of node ``index`` as float64, or a clear error."""
        node = self.graph.node[index]
        value = self.constant(name)
        if value is None:
            raise self.fail(
                f"{_label(index, node)}: {what} '{name}' is not a constant (it is a graph input "
                "or computed at run time); only constant weights can be analysed"
            )
        if value.dtype.kind != "f":
            raise self.fail(
                f"{_label(index, node)}: {what} '{name}' has non-float type {value.dtype}"
            )
        if value.dtype != self.dtype:
            raise self.fail(
                f"{_label(index, node)}: {what} '{name}' is {value.dtype} but the activation is "
                f"{self.dtype}: the model is invalid (mixed float types); re-export it with one type"
            )
        value = value.astype(np.float64)
        if not np.all(np.isfinite(value)):
            raise self.fail(
                f"{_label(index, node)}: {what} '{name}' contains NaN or Inf; fix the weights"
            )
        return value

    def full_shapes(self) -> list[tuple[int, ...]]:
        """The activation's full shape for each probe batch size (one shape without a batch dim)."""
        if not self.has_batch:
            return [self.sample_shape]
        return [(b, *self.sample_shape) for b in self.batch_probe]

    def set_output_shapes(self, index: int, outputs: list[tuple[int, ...]]) -> None:
        """Accept a node's output shapes (one per probe) if batch-first and feature-preserving."""
        node = self.graph.node[index]
        if self.has_batch:
            samples = {tuple(shape[1:]) for shape in outputs}
            batch_kept = all(
                len(shape) >= 1 and shape[0] == b
                for shape, b in zip(outputs, self.batch_probe, strict=True)
            )
            if not batch_kept or len(samples) != 1:
                raise self.fail(
                    f"{_label(index, node)}: reshapes across the batch dimension "
                    f"(output shape {list(outputs[0])}); only per-sample flattening is supported"
                )
            new_sample = samples.pop()
        else:
            new_sample = tuple(outputs[0])
        if math.prod(new_sample) != self.width:
            raise self.fail(
                f"{_label(index, node)}: changes the number of features per sample "
                f"({self.width} → {math.prod(new_sample)})"
            )
        self.sample_shape = new_sample

    def elementwise(self, scale_or_shift: np.ndarray, index: int) -> np.ndarray:
        """Broadcast a constant against the activation, without growing it, and flatten it."""
        node = self.graph.node[index]
        full = (1, *self.sample_shape) if self.has_batch else self.sample_shape
        try:
            grown = np.broadcast_shapes(full, scale_or_shift.shape)
        except ValueError:
            grown = None
        if grown != full:
            raise self.fail(
                f"{_label(index, node)}: constant of shape {list(scale_or_shift.shape)} does not "
                f"broadcast per feature onto the activation {list(full)}"
            )
        return np.broadcast_to(scale_or_shift, full).reshape(-1).astype(np.float64)

    # ------------------------------------------------------------------ the walk
    def read(self, path: Path | None, external: frozenset[str]) -> ReadResult:
        graph_input = self._graph_input()
        self.input_name = graph_input.name
        tensor_type = graph_input.type.tensor_type
        if tensor_type.elem_type not in FLOAT_TYPES:
            raise self.fail(
                f"input '{graph_input.name}' has element type "
                f"{TensorProto.DataType.Name(tensor_type.elem_type)}; only float16/32/64 inputs "
                "can be analysed"
            )
        self.dtype = FLOAT_TYPES[tensor_type.elem_type]
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim
        )
        if not tensor_type.HasField("shape") or not dims:
            raise self.fail(
                f"input '{graph_input.name}' has no declared shape; the number of features must be "
                "known (re-export with a static feature shape)"
            )
        self.has_batch = len(dims) >= 2
        sample_dims = dims[1:] if self.has_batch else dims
        if not all(isinstance(d, int) and d > 0 for d in sample_dims):
            raise self.fail(
                f"input '{graph_input.name}' has shape {list(dims)}: all dimensions but the batch "
                "dimension must be static"
            )
        features = math.prod(int(d) for d in sample_dims)
        largest = max((math.prod(t.dims) for t in self.graph.initializer), default=0)
        largest = max([largest] + [v.size for v in map(self.constant, self._constant_nodes())])
        if features > largest and graph_input.name in self.reaches_affine:
            raise self.fail(
                f"input '{graph_input.name}' declares {features} features per sample (shape "
                f"{list(dims)}) but the largest weight has {largest} entries, so no layer can read "
                "them; fix the input's declared shape"
            )
        batch = dims[0] if self.has_batch else None
        self.batch_probe = [batch] if isinstance(batch, int) and batch > 0 else [2, 3]
        self.sample_shape = tuple(int(d) for d in sample_dims)
        self.width = math.prod(self.sample_shape)
        n_raw = self.width

        self.path: list[PathStep] = []
        self.layers: list[DenseLayer] = []
        self.bindings: list[LayerBinding] = []
        self.input_scale = np.ones(n_raw)
        self.input_shift = np.zeros(n_raw)
        self.pre_scale: np.ndarray | None = None  # folded into the next core (after a ReLU)
        self.pre_shift: np.ndarray | None = None
        self.pre_nodes: list[int] = []
        current = graph_input.name
        if current not in self.reaches_affine:
            raise self.fail(
                f"no Gemm or MatMul node is reachable from input '{current}': nothing to compress"
            )
        while current in self.reaches_affine:
            current = self._lead_in(current)
            current = self._layer(current)

        last = self.bindings[-1]
        network = Network(
            layers=self.layers,
            input_map=InputMap(self.input_scale, self.input_shift),
            input_name=graph_input.name,
            output_name=last.activation_tensor,
        )
        binding = Binding(self.bindings, self.path, graph_input.name, last.activation_tensor)
        return ReadResult(
            model=self.model,
            network=network,
            binding=binding,
            path=path,
            input_shape=dims,
            has_batch_dim=self.has_batch,
            input_dtype=self.dtype,
            uses_external_data=bool(external),
            external_tensors=external,
        )

    def _constant_nodes(self) -> list[str]:
        """Outputs of the graph's ``Constant`` nodes (weights may be stored in them)."""
        return [n.output[0] for n in self.graph.node if n.op_type == "Constant" and n.output]

    def _graph_input(self) -> onnx.ValueInfoProto:
        """The single non-constant graph input (initializers listed as inputs are constants)."""
        inputs = [i for i in self.graph.input if i.name not in self.initializers]
        for candidate in inputs if len(inputs) > 1 else []:
            for index in self.consumers.get(candidate.name, []):
                node = self.graph.node[index]
                if node.op_type == "Gemm" and candidate.name in node.input[1:]:
                    raise self.fail(
                        f"{_label(index, node)}: its weight '{candidate.name}' is a graph input, "
                        "not a constant; only constant weights can be analysed (store it as an "
                        "initializer)"
                    )
        if len(inputs) != 1:
            names = ", ".join(f"'{i.name}'" for i in inputs) or "none"
            raise self.fail(
                f"{len(inputs)} non-constant graph inputs ({names}); onnx-exact needs exactly one"
            )
        if not inputs[0].type.HasField("tensor_type"):
            raise self.fail(f"input '{inputs[0].name}' is not a tensor")
        return inputs[0]

    def _single_consumer(self, tensor: str) -> int:
        """The one node that reads ``tensor`` inside the MLP, or a clear error."""
        readers = self.consumers.get(tensor, [])
        if tensor in self.graph_outputs:
            raise self.fail(
                f"tensor '{tensor}' inside the MLP is also a graph output; hidden activations that "
                "leave the graph cannot be compressed"
            )
        if len(readers) != 1:
            names = ", ".join(_label(i, self.graph.node[i]) for i in readers)
            raise self.fail(
                f"tensor '{tensor}' feeds {len(readers)} nodes ({names}): residual/fan-out "
                "connections inside the MLP cannot be analysed"
            )
        return readers[0]

    def _unsupported(self, index: int) -> UnsupportedModelError:
        node = self.graph.node[index]
        if node.op_type in OTHER_ACTIVATIONS:
            return self.fail(f"{_label(index, node)}: only ReLU activations can be analysed")
        return self.fail(
            f"{_label(index, node)}: op {node.op_type} is not supported inside the MLP (between the "
            "input and the last Gemm/MatMul)"
        )

    def _lead_in(self, current: str) -> str:
        """From an activation (or the input) to the next core: pass-throughs and affine ops."""
        layer = len(self.layers)
        while True:
            index = self._single_consumer(current)
            node = self.graph.node[index]
            op = node.op_type
            if op in ("Gemm", "MatMul") and node.domain in ("", "ai.onnx"):
                return current
            if self._is_pass_through(index, current):
                self._pass_through(index, current, layer)
            elif self._is_elementwise_affine(index, current):
                scale, shift = self._elementwise_affine(index, current)
                if layer == 0:
                    self.input_scale = scale * self.input_scale
                    self.input_shift = scale * self.input_shift + shift
                    role = "preprocess"
                else:
                    prev_scale = np.ones(self.width) if self.pre_scale is None else self.pre_scale
                    prev_shift = np.zeros(self.width) if self.pre_shift is None else self.pre_shift
                    self.pre_scale = scale * prev_scale
                    self.pre_shift = scale * prev_shift + shift
                    self.pre_nodes.append(index)
                    role = "fold"
                self.path.append(
                    PathStep(index, role, layer, self._data_slot(node, current), self.width)
                )
            else:
                raise self._unsupported(index)
            current = node.output[0]

    def _data_slot(self, node: onnx.NodeProto, current: str) -> int:
        return list(node.input).index(current)

    def _is_pass_through(self, index: int, current: str) -> bool:
        node = self.graph.node[index]
        return (
            node.op_type in PASS_THROUGH_OPS
            and node.domain in ("", "ai.onnx")
            and node.input[0] == current
        )

    def _pass_through(self, index: int, current: str, layer: int) -> None:
        """Check a pass-through node keeps values and feature order; update the sample shape."""
        node = self.graph.node[index]
        op = node.op_type
        for extra in node.output[1:]:
            if extra and self.consumers.get(extra):
                raise self.fail(f"{_label(index, node)}: its extra output '{extra}' is used")
        if op == "Cast":
            target = _attr(node, "to", 0)
            if FLOAT_TYPES.get(target) != self.dtype:
                raise self.fail(
                    f"{_label(index, node)}: casts {self.dtype} to "
                    f"{TensorProto.DataType.Name(target)}; only same-type Casts can be passed through"
                )
        elif op == "Dropout":
            if len(node.input) > 2 and node.input[2]:
                training = self.constant(node.input[2])
                if training is None or bool(np.any(training)):
                    raise self.fail(
                        f"{_label(index, node)}: training_mode is not a constant False; export the "
                        "model in inference mode"
                    )
        elif op == "Flatten":
            axis = _attr(node, "axis", 1)
            outputs = []
            for shape in self.full_shapes():
                cut = axis + len(shape) if axis < 0 else axis
                outputs.append((math.prod(shape[:cut]), math.prod(shape[cut:])))
            self.set_output_shapes(index, outputs)
        elif op == "Reshape":
            target = self.constant(node.input[1]) if len(node.input) > 1 else None
            if target is None:
                raise self.fail(
                    f"{_label(index, node)}: its target shape is not a constant; only constant "
                    "reshapes can be passed through"
                )
            allow_zero = _attr(node, "allowzero", 0)
            outputs = [
                _reshape(shape, [int(v) for v in target.reshape(-1)], allow_zero)
                for shape in self.full_shapes()
            ]
            if any(o is None for o in outputs):
                raise self.fail(
                    f"{_label(index, node)}: target shape {target.tolist()} does not fit the "
                    f"activation {list(self.full_shapes()[0])}"
                )
            self.set_output_shapes(index, outputs)
            if self.past_first_core and self.sample_shape[-1:] != (self.width,):
                raise self.fail(
                    f"{_label(index, node)}: between layers the features must stay in the last "
                    f"dimension (got sample shape {list(self.sample_shape)})"
                )
        self.path.append(PathStep(index, "pass", layer, 0, self.width))

    def _is_elementwise_affine(self, index: int, current: str) -> bool:
        node = self.graph.node[index]
        if node.op_type in ELEMENTWISE_AFFINE_OPS and node.domain in ("", "ai.onnx"):
            other = [name for name in node.input if name != current]
            if len(other) != 1 or list(node.input).count(current) != 1:
                return False
            return self.constant(other[0]) is not None
        if node.op_type == "Scaler" and node.domain == ML_DOMAIN:
            return True
        return node.op_type == "BatchNormalization" and node.input[0] == current

    def _elementwise_affine(self, index: int, current: str) -> tuple[np.ndarray, np.ndarray]:
        """``(s, t)`` over the flattened features such that the node computes ``s ∘ z + t``."""
        node = self.graph.node[index]
        op = node.op_type
        ones = np.ones(self.width)
        if op == "Scaler":
            scale = np.asarray(_attr(node, "scale", [1.0]), dtype=np.float32).astype(np.float64)
            offset = np.asarray(_attr(node, "offset", [0.0]), dtype=np.float32).astype(np.float64)
            scale_vec = self.elementwise(scale, index)
            offset_vec = self.elementwise(offset, index)
            if self.dtype != np.float32:
                raise self.fail(
                    f"{_label(index, node)}: Scaler outputs float32 but the input is {self.dtype}"
                )
            return scale_vec, -offset_vec * scale_vec
        if op == "BatchNormalization":
            return self._batch_norm(index)
        slot = self._data_slot(node, current)
        other = node.input[1 - slot]
        value = self.elementwise(self.float_constant(index, other, "constant"), index)
        if op == "Add":
            return ones, value
        if op == "Sub":
            return (ones, -value) if slot == 0 else (-ones, value)
        if op == "Mul":
            return value, np.zeros(self.width)
        if slot != 0:
            raise self.fail(f"{_label(index, node)}: divides a constant by the activation")
        if np.any(value == 0):
            raise self.fail(f"{_label(index, node)}: divides by zero")
        return 1.0 / value, np.zeros(self.width)

    def _batch_norm(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Inference BatchNormalization ``γ (z − μ) / √(σ² + ε) + β`` per channel (axis 1)."""
        node = self.graph.node[index]
        if _attr(node, "training_mode", 0):
            raise self.fail(f"{_label(index, node)}: training_mode=1; export in inference mode")
        for extra in node.output[1:]:
            if extra and self.consumers.get(extra):
                raise self.fail(f"{_label(index, node)}: its running-statistics outputs are used")
        gamma, beta, mean, var = (
            self.float_constant(index, name, what)
            for name, what in zip(
                node.input[1:5], ("scale", "bias", "mean", "variance"), strict=True
            )
        )
        epsilon = float(np.float32(_attr(node, "epsilon", 1e-5)))
        channels = self.sample_shape[0] if self.has_batch else None
        if channels is None or gamma.shape != (channels,):
            raise self.fail(
                f"{_label(index, node)}: needs a batch dimension and one statistic per channel "
                f"(activation sample shape {list(self.sample_shape)})"
            )
        scale = gamma / np.sqrt(var + epsilon)
        shift = beta - mean * scale
        per_channel = (channels,) + (1,) * (len(self.sample_shape) - 1)
        return (
            self.elementwise(scale.reshape(per_channel), index),
            self.elementwise(shift.reshape(per_channel), index),
        )

    def _layer(self, current: str) -> str:
        """Read one affine layer starting at its core; return the tensor after it (and its ReLU)."""
        layer_index = len(self.layers)
        self.past_first_core = True
        core = self._single_consumer(current)
        node = self.graph.node[core]
        width_in = self.width
        if node.op_type == "Gemm":
            weight, bias, info = self._gemm(core, current)
        else:
            weight, bias, info = self._matmul(core, current)
        if self.pre_scale is not None:
            bias = bias + weight @ self.pre_shift
            weight = weight * self.pre_scale[None, :]
        folded = list(self.pre_nodes)
        self.pre_scale = self.pre_shift = None
        self.pre_nodes = []
        self.path.append(PathStep(core, "core", layer_index, info["data_slot"], width_in))
        self.width = weight.shape[0]

        tensor = node.output[0]
        bias_node = bias_slot = None
        relu_node = None
        post_folded = False  # a folded op or the bias came after the core: a later Add is no bias
        bias_shape = info.pop("bias_shape")
        gemm_bias_slot = info.pop("bias_slot")
        while True:
            step = self._body_step(tensor)
            if step is None:
                break
            index, kind = step
            body = self.graph.node[index]
            if kind == "relu":
                relu_node = index
                self.path.append(PathStep(index, "relu", layer_index, 0, self.width))
                break
            if kind == "pass":
                self._pass_through(index, tensor, layer_index)
            else:
                slot = self._data_slot(body, tensor)
                try:
                    scale, shift = self._elementwise_affine(index, tensor)
                except UnsupportedModelError:
                    if tensor in self.reaches_affine:
                        raise
                    break  # not per unit, after the output layer: it belongs to the tail
                is_bias = info["style"] == "matmul" and not post_folded and body.op_type == "Add"
                if is_bias:
                    bias_node, bias_slot, post_folded = index, 1 - slot, True
                    bias_shape = tuple(self.constant(body.input[1 - slot]).shape)
                    self.path.append(PathStep(index, "bias", layer_index, slot, self.width))
                else:
                    post_folded = True
                    folded.append(index)
                    self.path.append(PathStep(index, "fold", layer_index, slot, self.width))
                weight = weight * scale[:, None]
                bias = bias * scale + shift
            tensor = body.output[0]

        output_tensor = tensor
        activation = self.graph.node[relu_node].output[0] if relu_node is not None else tensor
        name = self.graph.node[relu_node].name if relu_node is not None else node.name
        if not np.all(np.isfinite(weight)) or not np.all(np.isfinite(bias)):
            raise self.fail(f"{_label(core, node)}: the folded weights overflow to Inf/NaN")
        self.layers.append(
            DenseLayer(weight, bias, relu_node is not None, name or f"layer{layer_index}")
        )
        self.bindings.append(
            LayerBinding(
                index=layer_index,
                bias_node=bias_node if info["style"] == "matmul" else None,
                bias_slot=bias_slot if info["style"] == "matmul" else gemm_bias_slot,
                bias_shape=bias_shape,
                folded=folded,
                relu_node=relu_node,
                input_tensor=current,
                output_tensor=output_tensor,
                activation_tensor=activation,
                **info,
            )
        )
        return activation

    def _body_step(self, tensor: str) -> tuple[int, str] | None:
        """The next node of a layer body (bias, folded op, pass-through, Relu), or None at its end.

        A pass-through is taken only when a ReLU or a foldable op follows it; otherwise it belongs
        to the next layer's lead-in (or to the tail), which keeps ``output_tensor`` the tensor right
        after the affine ops.
        """
        index = self._body_reader(tensor)
        if index is None:
            return None
        node = self.graph.node[index]
        if node.op_type == "Relu" and node.domain in ("", "ai.onnx"):
            return index, "relu"
        if self._is_elementwise_affine(index, tensor) and node.op_type != "Scaler":
            return index, "affine"
        if self._is_pass_through(index, tensor):
            probe, after = tensor, index
            while after is not None and self._is_pass_through(after, probe):
                probe = self.graph.node[after].output[0]
                after = self._body_reader(probe)
            if after is None:
                return None
            follower = self.graph.node[after]
            if follower.op_type == "Relu" or (
                self._is_elementwise_affine(after, probe) and follower.op_type != "Scaler"
            ):
                return index, "pass"
            return None
        if node.op_type not in ("Gemm", "MatMul") and tensor in self.reaches_affine:
            raise self._unsupported(index)
        return None

    def _body_reader(self, tensor: str) -> int | None:
        """The single reader of ``tensor``, or None where the MLP may end (output, fan-out)."""
        readers = self.consumers.get(tensor, [])
        if tensor in self.graph_outputs or len(readers) != 1:
            if tensor in self.reaches_affine:
                self._single_consumer(tensor)  # raises the fan-out / graph-output error
            return None
        return readers[0]

    def _gemm(self, index: int, current: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """``Y = alpha * A' B' + beta * C`` → ``W = alpha * B'ᵀ`` (out, in), ``b = beta * C``."""
        node = self.graph.node[index]
        if node.input[0] != current:
            raise self.fail(
                f"{_label(index, node)}: the activation is the Gemm's B input; only Gemm(x, W) "
                "is supported"
            )
        alpha = float(np.float32(_attr(node, "alpha", 1.0)))
        beta = float(np.float32(_attr(node, "beta", 1.0)))
        trans_a = int(_attr(node, "transA", 0))
        trans_b = int(_attr(node, "transB", 0))
        stored = self.float_constant(index, node.input[1], "weight")
        if stored.ndim != 2:
            raise self.fail(f"{_label(index, node)}: weight must be 2-D, got {list(stored.shape)}")
        w_io = stored.T if trans_b else stored
        n_in, n_out = w_io.shape
        if trans_a:
            if self.has_batch or self.sample_shape != (n_in, 1) or self.layers:
                raise self.fail(
                    f"{_label(index, node)}: transA=1 is supported only on the first layer of a "
                    f"model without batch dimension reading a column [{n_in}, 1]"
                )
            self.sample_shape = (1, n_out)
        elif self.has_batch and len(self.sample_shape) == 1 and self.sample_shape[0] == n_in:
            self.sample_shape = (n_out,)
        elif not self.has_batch and self.sample_shape == (1, n_in):
            self.sample_shape = (1, n_out)
        else:
            raise self.fail(
                f"{_label(index, node)}: expects {n_in} features in a [batch, {n_in}] tensor, gets "
                f"sample shape {list(self.sample_shape)}"
            )
        weight = alpha * w_io.T
        bias_shape = None
        bias = np.zeros(n_out)
        if len(node.input) > 2 and node.input[2]:
            c = self.float_constant(index, node.input[2], "bias C")
            bias_shape = tuple(c.shape)
            if c.ndim > 2 or c.size not in (1, n_out) or (c.ndim == 2 and c.shape[0] != 1):
                raise self.fail(
                    f"{_label(index, node)}: bias C of shape {list(c.shape)} is not per unit "
                    f"(expected scalar, [{n_out}] or [1, {n_out}])"
                )
            bias = beta * np.broadcast_to(c.reshape(-1), (n_out,))
        info = {
            "style": "gemm",
            "weight_layout": "oi" if trans_b else "io",
            "core": index,
            "data_slot": 0,
            "weight_slot": 1,
            "bias_slot": 2,
            "bias_shape": bias_shape,
            "weight_dtype": self.dtype,
            "alpha": alpha,
            "beta": beta,
            "trans_a": trans_a,
            "trans_b": trans_b,
        }
        return weight, bias, info

    def _matmul(self, index: int, current: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """``MatMul(x, B)`` → ``W = Bᵀ``; ``MatMul(A, x)`` on a 1-D ``x`` → ``W = A``."""
        node = self.graph.node[index]
        if list(node.input).count(current) != 1:
            raise self.fail(f"{_label(index, node)}: multiplies the activation by itself")
        data_slot = self._data_slot(node, current)
        weight_slot = 1 - data_slot
        stored = self.float_constant(index, node.input[weight_slot], "weight")
        if stored.ndim != 2:
            raise self.fail(
                f"{_label(index, node)}: weight must be 2-D, got {list(stored.shape)} "
                "(batched weights are not an MLP layer)"
            )
        if data_slot == 0:
            n_in, n_out = stored.shape
            weight = stored.T
            leading = self.sample_shape[:-1]
            if self.sample_shape[-1] != n_in or math.prod(leading) != 1:
                detail = (
                    f"; rank-3 inputs [batch, T, features] are supported only with T == 1 (got "
                    f"T = {math.prod(leading)}): the layer would act on each position separately"
                    if math.prod(leading) != 1
                    else ""
                )
                raise self.fail(
                    f"{_label(index, node)}: expects {n_in} features in the last dimension, gets "
                    f"sample shape {list(self.sample_shape)}{detail}"
                )
            self.sample_shape = (*leading, n_out)
            layout = "io"
        else:
            n_out, n_in = stored.shape
            weight = stored
            if self.has_batch or self.sample_shape != (n_in,):
                raise self.fail(
                    f"{_label(index, node)}: a weight on the left (MatMul(W, x)) needs a 1-D input "
                    f"of {n_in} features, gets sample shape {list(self.sample_shape)}"
                )
            self.sample_shape = (n_out,)
            layout = "left"
        info = {
            "style": "matmul",
            "weight_layout": layout,
            "core": index,
            "data_slot": data_slot,
            "weight_slot": weight_slot,
            "bias_slot": None,
            "bias_shape": None,
            "weight_dtype": self.dtype,
        }
        return weight, np.zeros(n_out), info


def _reshape(shape: tuple[int, ...], target: list[int], allow_zero: int) -> tuple | None:
    """ONNX Reshape's output shape (0 copies the input dim unless allowzero; -1 is inferred)."""
    out = []
    for position, value in enumerate(target):
        if value == 0 and not allow_zero:
            if position >= len(shape):
                return None
            out.append(shape[position])
        else:
            out.append(value)
    if out.count(-1) > 1:
        return None
    total = math.prod(shape)
    if -1 in out:
        known = math.prod(v for v in out if v != -1)
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    if math.prod(out) != total or any(v < 0 for v in out):
        return None
    return tuple(out)
