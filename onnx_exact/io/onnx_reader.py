"""ONNX → :class:`~onnx_exact.core.network.Network`, plus the :class:`Binding` the writer edits.

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
  node they form the :class:`~onnx_exact.core.network.InputMap` (the domain is given on the raw input).

The *sample shape* of the activation (its shape without the batch dimension) is tracked through every
node; pass-through nodes (Identity, Dropout, same-type Cast, Flatten, Reshape) may change it only in
ways that keep the batch dimension first and the C-order feature sequence unchanged, so the network
always acts on the flattened features. float32/float16 constants are converted to float64 exactly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx

from onnx_exact.core.errors import UnsupportedModelError
from onnx_exact.core.network import DenseLayer, InputMap, Network
from onnx_exact.io.cnn_clip import holds_clip_activation
from onnx_exact.io.cnn_reader import holds_conv, read_cnn
from onnx_exact.io.graph import (
    Binding,
    LayerBinding,
    PathStep,
    node_label,
)
from onnx_exact.io.load import (
    check_inference,
    check_integrity,
    check_opsets,
    load_with_external_data,
)
from onnx_exact.io.node_semantics import GraphWalk
from onnx_exact.io.read_result import ReadResult
from onnx_exact.io.shape_folding import fold_batch_reshapes

#: Non-ReLU activations: named in the error so the user knows why the model is refused.
OTHER_ACTIVATIONS = frozenset(
    {
        "Tanh", "Sigmoid", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Clip",
        "HardSigmoid", "HardSwish", "PRelu", "Gelu", "Mish", "ThresholdedRelu", "Erf", "Max",
        "Min", "Abs", "Exp", "Log", "Sqrt", "Pow", "Sin", "Cos",
    }
)  # fmt: skip


ModelSource = str | os.PathLike | onnx.ModelProto | ReadResult
"""A model as the commands take it: a path, a loaded proto, or the result of :func:`read_model`."""


def read_model(source: str | os.PathLike | onnx.ModelProto) -> ReadResult:
    """Load an ONNX model and extract its ReLU network (a sequential CNN when it holds a Conv,
    and a network with ``Clip(0, c)``/ReLU6 activations, MLPs too:
    :func:`onnx_exact.io.cnn_reader.read_cnn`).

    Parameters
    ----------
    source : a path to an ``.onnx`` file (external data is loaded from its folder) or a ModelProto
        (not modified).

    Raises
    ------
    UsageError
        The file does not exist.
    MalformedModelError
        The file is not a valid ONNX model (see :func:`onnx_exact.io.load.load_graph`) or its
        external data is missing.
    UnsupportedModelError
        The graph is not a ReLU MLP the tool can prove things about; the message names the node
        and the reason.
    """
    if isinstance(source, onnx.ModelProto):
        model, path, label, external = source, None, "<model>", frozenset()
    else:
        path = Path(os.fspath(source))
        label = str(path)
        model, external = load_with_external_data(path)
    check_opsets(model, label)
    check_integrity(model, label)
    model = fold_batch_reshapes(model)  # x.view(x.size(0), -1) with a dynamic batch
    if holds_conv(model) or holds_clip_activation(model):
        result = read_cnn(model, label, path, external)
    else:
        result = _GraphWalker(model, label).read(path, external)
    check_inference(model, label)
    return result


class _GraphWalker(GraphWalk):
    """Walks the MLP data path once, building layers, the input map and the binding."""

    scope = "the MLP"
    fan_out = "residual/fan-out connections inside the MLP cannot be analysed"

    def __init__(self, model: onnx.ModelProto, label: str) -> None:
        super().__init__(model, label, frozenset({"Gemm", "MatMul"}))
        self.reaches_affine = self.reaches_core

    # ------------------------------------------------------------------ the walk
    def read(self, path: Path | None, external: frozenset[str]) -> ReadResult:
        graph_input = self._graph_input()
        self.input_name = graph_input.name
        tensor_type = graph_input.type.tensor_type
        dims = self.input_dims(graph_input)
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
        """The single non-constant graph input; a Gemm weight fed by a graph input is named."""
        inputs = [i for i in self.graph.input if i.name not in self.initializers]
        for candidate in inputs if len(inputs) > 1 else []:
            for index in self.consumers.get(candidate.name, []):
                node = self.graph.node[index]
                if node.op_type == "Gemm" and candidate.name in node.input[1:]:
                    raise self.fail(
                        f"{node_label(index, node)}: its weight '{candidate.name}' is a graph input, "
                        "not a constant; only constant weights can be analysed (store it as an "
                        "initializer)"
                    )
        return self.graph_input()

    def _unsupported(self, index: int) -> UnsupportedModelError:
        node = self.graph.node[index]
        if node.op_type in OTHER_ACTIVATIONS:
            return self.fail(f"{node_label(index, node)}: only ReLU activations can be analysed")
        return self.fail(
            f"{node_label(index, node)}: op {node.op_type} is not supported inside the MLP (between the "
            "input and the last Gemm/MatMul)"
        )

    def _lead_in(self, current: str) -> str:
        """From an activation (or the input) to the next core: pass-throughs and affine ops."""
        layer = len(self.layers)
        while True:
            index = self.single_consumer(current)
            node = self.graph.node[index]
            op = node.op_type
            if op in ("Gemm", "MatMul") and node.domain in ("", "ai.onnx"):
                return current
            if self.is_pass_through(index, current):
                self.pass_through(index, current, layer)
            elif self.is_elementwise_affine(index, current):
                scale, shift = self.elementwise_affine(index, current)
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
                    PathStep(index, role, layer, self.data_slot(node, current), self.width)
                )
            else:
                raise self._unsupported(index)
            current = node.output[0]

    def _layer(self, current: str) -> str:
        """Read one affine layer starting at its core; return the tensor after it (and its ReLU)."""
        layer_index = len(self.layers)
        self.past_first_core = True
        core = self.single_consumer(current)
        node = self.graph.node[core]
        width_in = self.width
        if node.op_type == "Gemm":
            weight, bias, info = self.gemm(core, current)
        else:
            weight, bias, info = self.matmul(core, current)
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
                self.pass_through(index, tensor, layer_index)
            else:
                slot = self.data_slot(body, tensor)
                try:
                    scale, shift = self.elementwise_affine(index, tensor)
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
            raise self.fail(f"{node_label(core, node)}: the folded weights overflow to Inf/NaN")
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
        if self.is_elementwise_affine(index, tensor) and node.op_type != "Scaler":
            return index, "affine"
        if self.is_pass_through(index, tensor):
            probe, after = tensor, index
            while after is not None and self.is_pass_through(after, probe):
                probe = self.graph.node[after].output[0]
                after = self._body_reader(probe)
            if after is None:
                return None
            follower = self.graph.node[after]
            if follower.op_type == "Relu" or (
                self.is_elementwise_affine(after, probe) and follower.op_type != "Scaler"
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
                self.single_consumer(tensor)  # raises the fan-out / graph-output error
            return None
        return readers[0]
