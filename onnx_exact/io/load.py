"""Loading an ONNX file and refusing a malformed or unrunnable model before any analysis.

Every check names the file and the tensor or node at fault and says what to do: a missing or
undecodable file, external data that is not beside the model, opsets onnx and onnxruntime cannot
run, tensors whose stored data does not match their dims, repeated names, broken edges, anything
else ``onnx.checker`` refuses, and (after the reader's walk) node types or shapes that onnx's
shape inference rejects, as onnxruntime would when it loads the model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import TensorProto, helper

from onnx_exact.core.errors import MalformedModelError, UnsupportedModelError, UsageError
from onnx_exact.io.graph import ML_DOMAIN, ONNX_DOMAIN, all_tensors, node_label

#: Newest opset per domain this onnx installation defines (onnxruntime runs models up to these).
MAX_OPSETS = {
    domain: max(v for (d, v) in helper.OP_SET_ID_VERSION_MAP if d == domain)
    for domain in (ONNX_DOMAIN, ML_DOMAIN)
}
#: Oldest default-domain opset onnxruntime supports.
MIN_ONNX_OPSET = 7


def check_inference(model: onnx.ModelProto, label: str) -> None:
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


def check_opsets(model: onnx.ModelProto, label: str) -> None:
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
        model, label = decode_model(Path(os.fspath(source))), os.fspath(source)
    check_integrity(model, label, None if isinstance(source, onnx.ModelProto) else Path(label))
    return model


def decode_model(path: Path) -> onnx.ModelProto:
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


def load_with_external_data(path: Path) -> tuple[onnx.ModelProto, frozenset[str]]:
    """Load a model file and its external data; decode and file errors become clear errors.

    Returns the model (every tensor inline) and the names of the tensors the file stored in
    external data.
    """
    model = decode_model(path)
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
PACKED_PER_BYTE = {
    getattr(TensorProto, name): per_byte
    for name, per_byte in (("INT4", 2), ("UINT4", 2), ("FLOAT4E2M1", 2), ("INT2", 4), ("UINT2", 4))
    if hasattr(TensorProto, name)
}


def check_integrity(model: onnx.ModelProto, label: str, path: Path | None = None) -> None:
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
        (f"{node_label(i, node)} value", attribute.t)
        for i, node in enumerate(graph.node)
        if node.op_type == "Constant"
        for attribute in node.attribute
        if attribute.type == onnx.AttributeProto.TENSOR
    ]
    for kind, tensor in tensors:
        problem = tensor_size_problem(tensor)
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
                f"{label}: {node_label(index, node)} reads tensor '{missing}', which no graph input, "
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


def tensor_size_problem(tensor: onnx.TensorProto) -> str | None:
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
    per_byte = PACKED_PER_BYTE.get(tensor.data_type)
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
