"""Write a :class:`~onnx_exact.reduce.Reduction` back into (a copy of) the original ONNX graph.

The model is edited, not regenerated, so everything the reader did not touch stays byte for byte
the same: preprocessing, pass-through nodes, the tail (Softmax, ArgMax, ZipMap, ...), opsets, IR
version, names, doc strings, metadata and dynamic batch dimensions. For each reduced layer ``j``
the nodes of original layer ``hosts[j]`` carry the new weights in their own style:

* Gemm stays Gemm with the same ``transB`` layout and ``alpha``/``beta``: the stored values are
  ``W / alpha`` (and ``b / beta``), so rows the reduction kept are bit-identical (for float32 weights
  ``alpha * W`` is exact in float64, and dividing it by ``alpha`` gives ``W`` back exactly);
* MatMul (+Add) stays MatMul (+Add), a left-hand weight stays on the left; a bias-free MatMul that
  now needs a bias gets an Add;
* per-unit ops that the reader folded (BatchNormalization, Mul/Add/Sub/Div) are removed: their effect
  is in the reduced weights.

Layers not in ``hosts`` lose their affine nodes and ReLU; pass-through nodes stay (they only move
values) and Reshape targets that spell out a hidden width get the new width. Dead nodes, unused
initializers and stale ``value_info`` are then removed and the result must pass ``onnx.checker``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_exact.core.errors import UnsupportedModelError
from onnx_exact.io.graph import Binding, ConstantResolver, LayerBinding, all_graphs
from onnx_exact.io.onnx_reader import ReadResult
from onnx_exact.io.staging import is_large
from onnx_exact.reduce import Reduction


def build_model(
    read: ReadResult, reduction: Reduction, metadata: dict[str, str]
) -> onnx.ModelProto:
    """Edit a deep copy of ``read.model`` so that it computes ``reduction.network``.

    Parameters
    ----------
    read : the reader's result for the original model (its ``binding`` locates every layer).
    reduction : the reduced network; ``reduction.hosts[j]`` is the original layer whose nodes carry
        reduced layer ``j``.
    metadata : ``metadata_props`` to set (existing keys are kept, equal keys overwritten).

    Returns
    -------
    The edited model; it passes ``onnx.checker.check_model`` (checked here up to
    ``EXTERNAL_DATA_THRESHOLD_BYTES`` of tensors, a larger model from its path by
    :func:`onnx_exact.io.staging.stage_model`).
    """
    _check_reduction(read, reduction)
    model = onnx.ModelProto()
    model.CopyFrom(read.model)
    _GraphEditor(model, read.binding, reduction).apply()
    merge_metadata(model, metadata)
    if not is_large(model):
        onnx.checker.check_model(model)  # a larger model is checked from its path when staged
    return model


def _check_reduction(read: ReadResult, reduction: Reduction) -> None:
    """The invariants of :class:`Reduction` that the editing relies on (programming errors)."""
    original = read.network.layers
    reduced = reduction.network.layers
    hosts = list(reduction.hosts)
    if len(hosts) != len(reduced) or not hosts:
        raise ValueError(f"reduction has {len(reduced)} layers but {len(hosts)} hosts")
    if any(a >= b for a, b in zip(hosts, hosts[1:], strict=False)) or hosts[0] < 0:
        raise ValueError(f"reduction hosts {hosts} are not strictly increasing")
    if hosts[-1] != len(original) - 1:
        raise ValueError(
            f"the last reduced layer must be hosted by the output layer, not {hosts[-1]}"
        )
    for j, host in enumerate(hosts):
        if reduced[j].relu != original[host].relu:
            raise ValueError(f"reduced layer {j} and its host {host} disagree on the ReLU")
    if reduced[0].in_features != original[0].in_features:
        raise ValueError("the reduction changed the number of input features")
    if reduced[-1].out_features != original[-1].out_features:
        raise ValueError("the reduction changed the number of outputs")
    kept_map, read_map = reduction.network.input_map, read.network.input_map
    if not (
        np.array_equal(kept_map.scale, read_map.scale)
        and np.array_equal(kept_map.shift, read_map.shift)
    ):
        raise ValueError("the reduction changed the input map; the preprocessing nodes are kept")


def merge_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Set ``metadata_props`` entries on ``model``: existing keys kept, equal keys overwritten."""
    existing = {entry.key: entry for entry in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = str(value)
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, str(value)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Outer-scope tensors a node's subgraphs may read (every name they mention)."""
    names: set[str] = set()
    for attribute in node.attribute:
        subs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []
        if attribute.type == onnx.AttributeProto.GRAPHS:
            subs = list(attribute.graphs)
        for sub in subs:
            for inner in all_graphs(sub):
                for inner_node in inner.node:
                    names.update(inner_node.input)
                names.update(o.name for o in inner.output)
    return names


class _GraphEditor:
    """Rewrites the MLP path of ``model`` (a private copy) for one reduction."""

    def __init__(self, model: onnx.ModelProto, binding: Binding, reduction: Reduction) -> None:
        self.model = model
        self.graph = model.graph
        self.binding = binding
        self.reduction = reduction
        self.host_of = {host: j for j, host in enumerate(reduction.hosts)}
        self.original_initializers = {t.name: t for t in self.graph.initializer}
        self.constants = ConstantResolver(self.graph)
        self.initializer_position = {t.name: i for i, t in enumerate(self.graph.initializer)}
        self.read_count: dict[str, int] = {}
        for graph in all_graphs(self.graph):
            for node in graph.node:
                for name in node.input:
                    self.read_count[name] = self.read_count.get(name, 0) + 1
        self.graph_outputs = {o.name for o in self.graph.output}
        self.taken = self._names_in_use()
        self.new_initializers: list[onnx.TensorProto] = []
        self.replaced_initializers: dict[str, onnx.TensorProto] = {}
        self.pending_bias: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ names and constants
    def _names_in_use(self) -> set[str]:
        names = {i.name for i in self.graph.input} | self.graph_outputs
        names |= {t.name for t in self.graph.initializer} | {v.name for v in self.graph.value_info}
        for graph in all_graphs(self.graph):
            for node in graph.node:
                names.update(node.input)
                names.update(node.output)
                names.add(node.name)
        return names

    def fresh(self, stem: str) -> str:
        """A tensor/node name not used anywhere in the model, derived from ``stem``."""
        name, counter = stem, 0
        while name in self.taken:
            counter += 1
            name = f"{stem}_{counter}"
        self.taken.add(name)
        return name

    def put_constant(self, source: str, value: np.ndarray, dtype: np.dtype) -> str:
        """Store ``value`` for the node input that read ``source``; return the name to read.

        An unchanged initializer is kept as is; one read by this one node only is replaced in place
        (same name, same position); anything shared, or a Constant/Identity-produced value, gets a
        fresh initializer so no other reader sees the new values.
        """
        array = np.ascontiguousarray(value.astype(dtype))
        if source in self.original_initializers:
            stored = numpy_helper.to_array(self.original_initializers[source])
            if stored.dtype == array.dtype and np.array_equal(stored, array):
                return source  # unchanged (e.g. the next layer's bias): keep it, even if shared
        exclusive = (
            source in self.original_initializers
            and self.read_count.get(source, 0) == 1
            and source not in self.graph_outputs
            and source not in self.replaced_initializers
        )
        if exclusive:
            tensor = numpy_helper.from_array(array, source)
            self.replaced_initializers[source] = tensor
            return source
        name = self.fresh(f"{source}_reduced" if source else "onnx_exact_bias")
        self.new_initializers.append(numpy_helper.from_array(array, name))
        return name

    # ------------------------------------------------------------------ the path rewrite
    def apply(self) -> None:
        """Re-emit the MLP path node by node, threading the current activation tensor through.

        Preprocessing and pass-through nodes are always kept (they only move values; cores keep
        the rank, so their shapes stay valid); folded ops are dropped; the core, bias and Relu of
        a hosted layer are rewritten, those of a removed layer dropped. Then dead nodes, unused
        initializers and stale ``value_info`` go.
        """
        emitted: dict[int, list[onnx.NodeProto]] = {}
        current = self.binding.input_name
        width = self.reduction.network.in_features
        first_core_seen = False
        last_producer: onnx.NodeProto | None = None
        for step in self.binding.path:
            node = onnx.NodeProto()
            node.CopyFrom(self.graph.node[step.node])
            layer = self.binding.layers[step.layer]
            hosted = step.layer in self.host_of
            if step.role in ("preprocess", "pass"):
                node.input[step.data_slot] = current
                if node.op_type == "Reshape" and width != step.width:
                    self._retarget_reshape(node, step.width, width)
                emitted[step.node] = [node]
            elif step.role == "fold" or not hosted:
                emitted[step.node] = []
                continue
            elif step.role == "core":
                nodes = self._core(node, layer, current, column_input=not first_core_seen)
                first_core_seen = True
                emitted[step.node] = nodes
                node = nodes[-1]
                width = self.reduction.network.layers[self.host_of[step.layer]].out_features
            elif step.role == "bias":
                node.input[step.data_slot] = current
                bias = self.pending_bias.pop(step.layer)
                node.input[layer.bias_slot] = self.put_constant(
                    node.input[layer.bias_slot],
                    bias.reshape(_bias_shape(layer.bias_shape, bias.size)),
                    layer.weight_dtype,
                )
                emitted[step.node] = [node]
            else:  # relu
                node.input[0] = current
                emitted[step.node] = [node]
            current = node.output[0]
            last_producer = node
        if current != self.binding.output_tensor:
            # the ops that produced the network output were folded away: the last kept node now
            # produces it under its original name, so the tail and graph outputs are unchanged
            last_producer.output[0] = self.binding.output_tensor

        path_outputs = {o for i in emitted for o in self.graph.node[i].output}
        new_nodes = []
        for index, node in enumerate(self.graph.node):
            new_nodes.extend(emitted.get(index, [node]))
        del self.graph.node[:]
        self.graph.node.extend(new_nodes)
        self._store_initializers()
        self._remove_dead_nodes()
        self._remove_unused_initializers()
        self._sync_initializer_inputs()
        live = {o for node in self.graph.node for o in node.output}
        stale = [v for v in self.graph.value_info if v.name in path_outputs or v.name not in live]
        for entry in stale:
            self.graph.value_info.remove(entry)

    def _core(
        self, node: onnx.NodeProto, layer: LayerBinding, current: str, column_input: bool
    ) -> list[onnx.NodeProto]:
        """The hosted layer's affine node(s) with the reduced weights, reading ``current``."""
        reduced = self.reduction.network.layers[self.host_of[layer.index]]
        weight, bias = reduced.weight, reduced.bias
        node.input[layer.data_slot] = current
        weight_source = node.input[layer.weight_slot]
        if layer.style == "gemm":
            return [self._gemm(node, layer, weight, bias, weight_source, column_input)]
        if column_input and self.binding.layers[0].trans_a:
            raise UnsupportedModelError(
                f"{node.name or node.output[0]}: the first layer (Gemm transA=1) was folded into a "
                "MatMul layer, which cannot read a column input"
            )
        stored = weight if layer.weight_layout == "left" else weight.T
        node.input[layer.weight_slot] = self.put_constant(weight_source, stored, layer.weight_dtype)
        if layer.bias_node is not None:
            self.pending_bias[layer.index] = bias
            return [node]
        if not np.any(bias):
            return [node]
        # the new Add takes over the MatMul's output name, so whatever read it reads the sum
        bias_name = self.put_constant("", bias, layer.weight_dtype)
        product = self.fresh(f"{node.output[0]}_product")
        add = helper.make_node(
            "Add",
            [product, bias_name],
            [node.output[0]],
            name=self.fresh(f"{node.name or node.output[0]}_bias"),
        )
        node.output[0] = product
        return [node, add]

    def _gemm(
        self,
        node: onnx.NodeProto,
        layer: LayerBinding,
        weight: np.ndarray,
        bias: np.ndarray,
        weight_source: str,
        column_input: bool,
    ) -> onnx.NodeProto:
        """Gemm keeps alpha/beta/transB: store ``W / alpha`` (laid out per transB) and ``b / beta``."""
        alpha = layer.alpha if layer.alpha != 0 else 1.0
        if alpha != layer.alpha:
            _set_float_attribute(node, "alpha", alpha)
        if column_input and self.binding.layers[0].trans_a and not layer.trans_a:
            _set_int_attribute(node, "transA", 1)  # the column [n, 1] input of a folded first layer
        scaled = weight / alpha
        stored = scaled if layer.weight_layout == "oi" else scaled.T
        node.input[1] = self.put_constant(weight_source, stored, layer.weight_dtype)
        has_c = layer.bias_shape is not None
        if not has_c and not np.any(bias):
            return node
        beta = layer.beta if has_c and layer.beta != 0 else 1.0
        if beta != layer.beta:
            _set_float_attribute(node, "beta", beta)
        shape = (1, bias.size) if has_c and len(layer.bias_shape) == 2 else (bias.size,)
        source = node.input[2] if has_c else ""
        c_name = self.put_constant(source, (bias / beta).reshape(shape), layer.weight_dtype)
        if has_c:
            node.input[2] = c_name
        else:
            node.input.append(c_name)
        return node

    def _retarget_reshape(self, node: onnx.NodeProto, old_width: int, new_width: int) -> None:
        """A Reshape that spells out the hidden width in its last target entry gets the new one."""
        target = self.constants.value(node.input[1])
        if target is None or target.size == 0 or int(target.reshape(-1)[-1]) != old_width:
            return
        new_target = target.reshape(-1).copy()
        new_target[-1] = new_width
        node.input[1] = self.put_constant(node.input[1], new_target, new_target.dtype)

    # ------------------------------------------------------------------ clean-up
    def _store_initializers(self) -> None:
        for name, tensor in self.replaced_initializers.items():
            self.graph.initializer[self.initializer_position[name]].CopyFrom(tensor)
        self.graph.initializer.extend(self.new_initializers)

    def _remove_dead_nodes(self) -> None:
        """Drop nodes none of whose outputs reach a graph output (scanning backwards)."""
        needed = set(self.graph_outputs)
        keep = []
        for node in reversed(self.graph.node):
            if any(o in needed for o in node.output if o):
                keep.append(node)
                needed.update(node.input)
                needed.update(_subgraph_reads(node))
        keep.reverse()
        del self.graph.node[:]
        self.graph.node.extend(keep)

    def _remove_unused_initializers(self) -> None:
        used = set(self.graph_outputs)
        for node in self.graph.node:
            used.update(node.input)
            used.update(_subgraph_reads(node))
        unused = [t for t in self.graph.initializer if t.name not in used]
        for tensor in unused:
            self.graph.initializer.remove(tensor)

    def _sync_initializer_inputs(self) -> None:
        """Keep initializers that are listed as graph inputs (IR < 4 needs all) consistent.

        Real inputs keep their position and declaration; listed initializers get a declaration
        matching their (possibly new) shape, removed ones disappear, and with IR < 4 new ones are
        appended.
        """
        original_inputs = list(self.graph.input)
        listed = [i for i in original_inputs if i.name in self.original_initializers]
        if not listed and self.model.ir_version >= 4:
            return
        current = {t.name: t for t in self.graph.initializer}
        new_inputs = []
        for entry in original_inputs:
            if entry.name not in self.original_initializers:
                new_inputs.append(entry)
            elif entry.name in current:
                new_inputs.append(_tensor_value_info(current[entry.name]))
        if self.model.ir_version < 4:
            declared = {i.name for i in new_inputs}
            new_inputs += [
                _tensor_value_info(t) for t in self.graph.initializer if t.name not in declared
            ]
        del self.graph.input[:]
        self.graph.input.extend(new_inputs)


def _tensor_value_info(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


def _bias_shape(original: tuple | None, size: int) -> tuple[int, ...]:
    """The original bias rank, with the unit count as the last dimension (leading ones)."""
    rank = len(original) if original else 1
    return (1,) * (max(rank, 1) - 1) + (size,)


def _set_float_attribute(node: onnx.NodeProto, name: str, value: float) -> None:
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.f = value
            return
    node.attribute.append(helper.make_attribute(name, float(value)))


def _set_int_attribute(node: onnx.NodeProto, name: str, value: int) -> None:
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.i = value
            return
    node.attribute.append(helper.make_attribute(name, int(value)))
