"""Sequential CNNs → :class:`~onnx_exact.core.network.Network` with per-neuron channels.

The reader follows the one data path from the graph input to the last affine node (a ``Conv``,
``Gemm`` or ``MatMul``), as the MLP reader does, and cuts it at every ``Relu``:

    x_raw ─[elementwise affine on the input]─▶ x_net            (the InputMap)
    x_net ─[linear ops]─▶ y_1 ─Relu─▶ h_1 ─[linear ops]─▶ y_2 ─Relu─▶ ...  ─▶ y_L (─Relu─▶ h_L)

Every op between two ReLUs is an affine map of the flattened sample, built from
:mod:`onnx_exact.core.operators`: ``Conv`` (1-D/2-D/N-D; pads or ``auto_pad``, strides,
dilations, groups incl. depthwise), ``Gemm``/``MatMul`` (the head), ``BatchNormalization`` and
``Add``/``Sub``/``Mul``/``Div`` by a constant (per channel or per element), constant ``Pad``,
``AveragePool``/``GlobalAveragePool``, ``Transpose`` (tf2onnx's NHWC ↔ NCHW), ``Flatten``/
``Reshape`` (C-order identity on the flat index), ``Identity``/``Dropout``/same-type ``Cast``,
``Gather`` of channels (axis 1, constant indices: the pruner's selection before a consumer).
Their composition ``y_k = A_k h_{k-1} + c_k`` becomes the layer's dense float64 matrix
(:class:`~onnx_exact.io.affine_chain.AffineChain`), so a BN or a per-channel Mul after a Conv,
a Transpose and Reshape before a Gemm, or a Pad before a Conv are all folded into the layer
that contains them. A layer whose dense matrix would have more than
:data:`~onnx_exact.io.affine_chain.MAX_DENSE_ENTRIES` entries (a wide conv on a large image) is
kept sparse (:class:`~onnx_exact.core.sparse.SparseMatrix`, the kernel taps only), up to
:data:`~onnx_exact.io.affine_chain.MAX_SPARSE_ENTRIES` stored entries.

Each ReLU layer records ``channels`` (:attr:`DenseLayer.channels`): the channel of every neuron,
tracked through the ops (a Conv or a pool sets ``channel = flat index // positions`` of its NCHW
output; Transpose, Pad and Reshape move the labels with the values; a Gemm/MatMul ends them).

Residual blocks (a tensor forked into a ReLU branch and a linear skip that meet at an ``Add``)
are read by :mod:`onnx_exact.io.cnn_residual`: the skip's source is carried across the branch
by auxiliary passthrough neurons (:attr:`DenseLayer.auxiliary`), exactly. A ``Clip(0, c)``
(ReLU6) closes a layer like a Relu, with one auxiliary kink neuron per unit
(:mod:`onnx_exact.io.cnn_clip`: ``clip(y, 0, c) = relu(y) - relu(y - c)``). A ``MaxPool`` or
``GlobalMaxPool`` closes one layer of auxiliary neurons per level of its windows' max trees
(:mod:`onnx_exact.io.cnn_maxpool`: ``max(a, b) = a + relu(b - a)``).

Refused with one line naming the node (this round): other forks and joins (three-way forks,
nested skips, both paths with ReLUs, ``Concat``), a MaxPool in a residual block or with
its Indices output used, other Clips and other
activations, a Conv weight computed at run time, a group count that does not divide the
channels, dynamic spatial dims, and a layer over the sparse limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnx_exact.core.errors import MalformedModelError, UnsupportedModelError
from onnx_exact.core.network import DenseLayer, InputMap, Network
from onnx_exact.core.operators import (
    AveragePoolOperator,
    ConvOperator,
    DenseOperator,
    IndexOperator,
    LinearOperator,
    MeanOperator,
    PadOperator,
    TransposeOperator,
    resolve_auto_pad,
)
from onnx_exact.core.sparse import SparseMatrix
from onnx_exact.io.affine_chain import MAX_DENSE_ENTRIES, AffineChain, LayerTooLarge
from onnx_exact.io.cnn_clip import ClipChain, clip_maximum, with_kinks
from onnx_exact.io.cnn_maxpool import MAX_POOL_OPS, MaxPoolWalk
from onnx_exact.io.cnn_residual import ResidualWalk
from onnx_exact.io.graph import PathStep, node_attr, node_label, reduce_axes
from onnx_exact.io.node_semantics import GraphWalk
from onnx_exact.io.read_result import ReadResult

#: Ops that compute the core of a layer (where an MLP or CNN's path ends).
CORE_OPS = frozenset({"Conv", "Gemm", "MatMul"})
#: Activations other than ReLU, refused by name.
OTHER_ACTIVATIONS = frozenset(
    {
        "Tanh", "Sigmoid", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus", "Softsign",
        "HardSigmoid", "HardSwish", "PRelu", "Gelu", "Mish", "ThresholdedRelu",
    }
)  # fmt: skip
SPATIAL_LETTERS = {1: "W", 2: "HW", 3: "DHW"}


@dataclass
class CnnBinding:
    """Where a CNN's network lives in the graph (the channel pruner works on the graph itself).

    Attributes
    ----------
    relu_nodes : the Relu (or ``Clip(0, c)``) node names, one per ReLU layer, in
        ``network.unit_layer_indices`` order (a nameless node is named by its output tensor);
        ``DenseLayer.name`` is the same.
    input_layout : the input's layout, ``"NCHW"``, ``"NCW"``, ``"NCDHW"``, channels-last
        (``"NHWC"``, ``"NWC"``...) when the path starts with a Transpose moving the last axis to
        position 1, or ``"NC"`` for a flat input.
    output_tensor : the network's end tensor (last pre-activation, or its ReLU output); the
        tail reads it.
    input_name : the graph input.
    relu_tensors : each ReLU's output tensor, in ``relu_nodes`` order.
    path : every node on the data path, in graph order, with its role: ``"preprocess"``
        (InputMap), ``"pass"`` (Identity/Dropout/Cast/Flatten/Reshape), ``"fold"``
        (BatchNormalization, Add/Sub/Mul/Div by a constant), ``"core"`` (Conv/Gemm/MatMul),
        ``"linear"`` (Pad, AveragePool, GlobalAveragePool, Transpose), ``"maxpool"`` (MaxPool,
        GlobalMaxPool: the layers of its max tree) or ``"relu"``.
    weight_dtype : the float type of the stored weights (= the activations').
    """

    relu_nodes: list[str]
    input_layout: str
    output_tensor: str
    input_name: str
    relu_tensors: list[str]
    path: list[PathStep]
    weight_dtype: np.dtype


def holds_conv(model: onnx.ModelProto) -> bool:
    """Whether the main graph has a ``Conv`` or a max pool node (then :func:`read_cnn` reads
    it; the MLP reader knows neither)."""
    ops = MAX_POOL_OPS | {"Conv"}
    return any(n.op_type in ops and n.domain in ("", "ai.onnx") for n in model.graph.node)


def read_cnn(
    model: onnx.ModelProto,
    label: str = "<model>",
    path: Path | None = None,
    external: frozenset[str] = frozenset(),
) -> ReadResult:
    """Read a sequential CNN into a dense :class:`Network` (see the module docstring).

    :func:`onnx_exact.io.onnx_reader.read_model` loads and checks the file and calls this when
    the graph holds a Conv; ``label`` names the file in messages, ``path`` and ``external`` are
    recorded in the result.

    Raises
    ------
    UnsupportedModelError
        An op, connection or shape this reader cannot model exactly; the one-line message names
        the node and what to do.
    MalformedModelError
        The model is invalid (a group count that does not divide the channels).
    """
    return _CnnWalker(model, label).read(path, external)


class _CnnWalker(MaxPoolWalk, ResidualWalk, GraphWalk):
    """Walks the CNN data path once, composing the linear ops of each layer into one matrix.

    The state between two ReLUs is an :class:`~onnx_exact.io.affine_chain.AffineChain` from the
    last activation (or the network input) to the current tensor, of ``width`` features and
    ``sample_shape`` (batch excluded); ``channel`` labels each of its features with a channel
    (None after a Gemm/MatMul).
    """

    fan_out = (
        "a fork inside a layer (not of a ReLU output into a ResNet-style block) cannot be analysed"
    )

    def __init__(self, model: onnx.ModelProto, label: str) -> None:
        super().__init__(model, label, CORE_OPS)
        self.layers: list[DenseLayer] = []
        self.path: list[PathStep] = []
        self.relu_nodes: list[str] = []
        self.relu_tensors: list[str] = []

    # ------------------------------------------------------------------ the walk
    def read(self, path: Path | None, external: frozenset[str]) -> ReadResult:
        graph_input = self.graph_input()
        dims = self._cnn_input_dims(graph_input)
        self.input_name = graph_input.name
        self.has_batch = True
        batch = dims[0]
        self.batch_probe = [batch] if isinstance(batch, int) and batch > 0 else [2, 3]
        self.sample_shape = tuple(int(d) for d in dims[1:])
        self.width = math.prod(self.sample_shape)
        self.input_scale, self.input_shift = np.ones(self.width), np.zeros(self.width)
        self.input_layout = "NC" + SPATIAL_LETTERS.get(len(self.sample_shape) - 1, "")
        self._check_weights_are_constant()
        self._start_layer()
        self.at_input = True  # elementwise ops here form the InputMap
        self.channel: np.ndarray | None = None
        self.last_core = ""

        current = graph_input.name
        if current not in self.reaches_core:
            raise self.fail(
                f"no Conv, Gemm or MatMul node is reachable from input '{current}': nothing to "
                "compress"
            )
        while current in self.reaches_core:
            if len(self.consumers.get(current, [])) > 1:
                current = self.residual(current)
            else:
                current = self._step(current, self.single_consumer(current))
        current = self._end(current)

        network = Network(
            layers=self.layers,
            input_map=InputMap(self.input_scale, self.input_shift),
            input_name=graph_input.name,
            output_name=current,
        )
        binding = CnnBinding(
            relu_nodes=self.relu_nodes,
            input_layout=self.input_layout,
            output_tensor=current,
            input_name=graph_input.name,
            relu_tensors=self.relu_tensors,
            path=self.path,
            weight_dtype=self.dtype,
        )
        return ReadResult(
            model=self.model,
            network=network,
            binding=binding,
            path=path,
            input_shape=dims,
            has_batch_dim=True,
            input_dtype=self.dtype,
            uses_external_data=bool(external),
            external_tensors=external,
        )

    def _cnn_input_dims(self, graph_input: onnx.ValueInfoProto) -> tuple:
        """The input's dims (batch first; all others static), its float type in ``dtype``."""
        tensor_type = graph_input.type.tensor_type
        name = graph_input.name
        dims = self.input_dims(graph_input)
        if not tensor_type.HasField("shape") or len(dims) < 2:
            raise self.fail(
                f"input '{name}' has shape {list(dims) if dims else 'undeclared'}; a CNN input "
                "needs a batch dimension and static sample dims ([batch, C, H, W] or similar)"
            )
        dynamic = [str(d) for d in dims[1:] if not (isinstance(d, int) and d > 0)]
        if dynamic:
            raise self.fail(
                f"input '{name}' has shape {list(dims)}: dims {', '.join(dynamic)} are dynamic, "
                "and the analysis needs every dim but the batch fixed; re-export with a static "
                "input shape (e.g. onnx.tools.update_model_dims.update_inputs_outputs_dims)"
            )
        return dims

    def _check_weights_are_constant(self) -> None:
        """Refuse a Conv/Gemm weight computed at run time before the walk meets the branch
        that computes it (which would read as a fan-out of the input)."""
        for index, node in enumerate(self.graph.node):
            if node.op_type not in ("Conv", "Gemm") or node.domain not in ("", "ai.onnx"):
                continue
            if len(node.input) > 1 and self.constant(node.input[1]) is None:
                raise self.fail(
                    f"{node_label(index, node)}: its weight '{node.input[1]}' is computed at run "
                    "time, not a constant; only constant weights can be analysed (store it as "
                    "an initializer)"
                )

    # ------------------------------------------------------------------ one node
    def _step(self, current: str, index: int) -> str:
        """Apply node ``index`` (reading ``current``) to the state; return its output."""
        try:
            return self._apply_node(current, index)
        except LayerTooLarge as error:
            raise self.fail(f"{node_label(index, self.graph.node[index])}: {error}") from None

    def _apply_node(self, current: str, index: int) -> str:
        node = self.graph.node[index]
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise self._unsupported(index)
        if op in ("Relu", "Clip"):
            clip = clip_maximum(self, index) if op == "Clip" else None
            self._close_layer(index, node.output[0], clip)
            self.path.append(PathStep(index, "relu", len(self.layers) - 1, 0, self.width))
        elif self.is_elementwise_affine(index, current):
            self._elementwise(index, current)
        elif self.is_pass_through(index, current):
            self.pass_through(index, current, len(self.layers))  # keeps the flat order
        elif op == "Conv":
            self._conv(index, current)
        elif op in ("Gemm", "MatMul"):
            self._dense(index, current)
        elif op == "Transpose":
            self._transpose(index)
        elif op == "Pad":
            self._pad(index, current)
        elif op in ("AveragePool", "GlobalAveragePool"):
            self._average_pool(index)
        elif op in MAX_POOL_OPS:
            self.max_pool(index, MAX_DENSE_ENTRIES)
        elif op == "ReduceMean":
            self._reduce_mean(index)
        elif op == "Gather":
            self._gather(index, current)
        else:
            raise self._unsupported(index)
        return node.output[0]

    def _end(self, current: str) -> str:
        """After the last core: fold per-unit affine ops and a Relu, then close the network."""
        while True:
            readers = self.consumers.get(current, [])
            if current in self.graph_outputs or len(readers) != 1:
                break
            index = readers[0]
            node = self.graph.node[index]
            if node.op_type == "Relu" and node.domain in ("", "ai.onnx"):
                self._step(current, index)
                return node.output[0]
            if not self.is_elementwise_affine(index, current) or node.op_type == "Scaler":
                break
            try:
                self._elementwise(index, current)
            except UnsupportedModelError:
                break  # not per unit: it belongs to the tail
            current = node.output[0]
        self._close_layer(None, current)
        return current

    def _is_relu(self, index: int) -> bool:
        """Whether node ``index`` is an activation that closes a layer (a Relu or a Clip): a
        residual block's branch is the path holding one."""
        node = self.graph.node[index]
        return node.op_type in ("Relu", "Clip") and node.domain in ("", "ai.onnx")

    def _unsupported(self, index: int) -> UnsupportedModelError:
        node = self.graph.node[index]
        label = node_label(index, node)
        op = node.op_type
        if op in OTHER_ACTIVATIONS:
            return self.fail(f"{label}: only ReLU activations can be analysed")
        if op in ("Add", "Sub", "Mul", "Concat", "Sum"):
            return self.fail(
                f"{label}: {op} of two computed tensors (a residual or branch join) is not "
                "supported yet; only sequential CNNs can be analysed"
            )
        return self.fail(
            f"{label}: op {op} is not supported in a CNN (between the input and the last "
            "Conv/Gemm/MatMul)"
        )

    # ------------------------------------------------------------------ the composed map
    def _start_layer(self) -> None:
        last = self.layers[-1] if self.layers else None
        if last is not None and last.clip is not None:  # reads relu(y) - relu(y - c)
            self.chain = ClipChain(last.out_features, int(last.real.sum()))
        elif self.in_branch and self.carry is not None:
            self.chain = self.branch_chain()
        else:
            self.chain = AffineChain(self.width)

    def _apply(self, index: int, op: LinearOperator, role: str) -> None:
        """``state ← op ∘ state`` (after a size check) and the path step."""
        self.chain.apply(op)  # LayerTooLarge past the sparse limit (named by _step)
        self.path.append(PathStep(index, role, len(self.layers), 0, self.width))
        self.width = op.n_out
        self.at_input = False

    def _close_layer(self, relu: int | None, tensor: str, clip: float | None = None) -> None:
        """The composed map becomes a layer (with a ReLU if ``relu`` is a node index; a
        ``Clip(0, clip)`` node adds the kink rows after its units)."""
        if relu is not None:
            node = self.graph.node[relu]
            name = node.name or tensor
        else:
            name = self.last_core or f"layer{len(self.layers)}"
        bias = self.chain.offset
        try:
            weight = self.chain.matrix()
        except LayerTooLarge as error:
            raise self.fail(f"layer '{name}': {error}") from None
        entries = weight.data if isinstance(weight, SparseMatrix) else weight
        if not np.all(np.isfinite(entries)) or not np.all(np.isfinite(bias)):
            raise self.fail(f"layer '{name}': the folded weights overflow to Inf/NaN")
        channels = self.channel if relu is not None else None
        auxiliary = None
        units = weight.shape[0]
        if self.in_branch:
            weight, bias, channels, auxiliary = self.carry_rows(weight, bias, channels)
        if clip is not None:
            weight, bias, channels, auxiliary = with_kinks(
                weight, bias, channels, auxiliary, units, clip
            )
            if self.in_branch:
                self.carry = self.carry + units  # the carried rows moved behind the kinks
        layer = DenseLayer(weight, bias, relu is not None, name, channels, auxiliary, clip)
        if auxiliary is None:
            layer.structured = self.chain.structured_map(layer.weight, layer.bias)
        elif clip is None and layer.passthrough is not None:
            head = layer.out_features - layer.passthrough.size
            if head == units:  # the carried rows are all selections: map the branch's rows
                layer.structured = self.chain.structured_map(layer.weight[:head], layer.bias[:head])
        self.layers.append(layer)
        if relu is not None:
            self.relu_nodes.append(name)
            self.relu_tensors.append(tensor)
        self._start_layer()
        self.at_input = False

    def _elementwise(self, index: int, current: str) -> None:
        """``t ← s ∘ t + u`` (BatchNormalization, Add/Sub/Mul/Div by a constant)."""
        scale, shift = self.elementwise_affine(index, current)
        node = self.graph.node[index]
        slot = self.data_slot(node, current) if node.op_type != "BatchNormalization" else 0
        if self.at_input:
            self.input_scale = scale * self.input_scale
            self.input_shift = scale * self.input_shift + shift
            self.path.append(PathStep(index, "preprocess", 0, slot, self.width))
            return
        self.path.append(PathStep(index, "fold", len(self.layers), slot, self.width))
        self.chain.scale(scale, shift)

    # ------------------------------------------------------------------ the ops
    def _spatial_input(self, index: int) -> tuple[int, tuple[int, ...]]:
        """``(C, spatial)`` of the current sample, which must be ``(C, *S)``."""
        if len(self.sample_shape) < 2:
            node = self.graph.node[index]
            raise self.fail(
                f"{node_label(index, node)}: needs a [batch, C, spatial...] input, gets sample "
                f"shape {list(self.sample_shape)}"
            )
        return self.sample_shape[0], self.sample_shape[1:]

    def _window(self, index: int, kernel: tuple[int, ...], spatial) -> tuple:
        """``(pads, strides, dilations)`` of a Conv/pool node, ``auto_pad`` resolved."""
        node = self.graph.node[index]
        d = len(spatial)
        strides = tuple(node_attr(node, "strides", [1] * d))
        dilations = tuple(node_attr(node, "dilations", [1] * d))
        pads = node_attr(node, "pads", None)
        auto_pad = node_attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if len(strides) != d or len(dilations) != d or (pads is not None and len(pads) != 2 * d):
            raise self.fail(
                f"{node_label(index, node)}: strides/dilations/pads do not match its {d} "
                "spatial axes"
            )
        try:
            pads = resolve_auto_pad(auto_pad, spatial, kernel, strides, dilations, pads)
        except ValueError as exc:
            raise self.fail(f"{node_label(index, node)}: {exc}") from None
        return pads, strides, dilations

    def _pool_window(self, index: int, spatial) -> tuple:
        """``(kernel, pads, strides, dilations, ceil_mode)`` of an AveragePool/MaxPool node."""
        node = self.graph.node[index]
        kernel = tuple(int(k) for k in node_attr(node, "kernel_shape", []))
        if len(kernel) != len(spatial):
            raise self.fail(
                f"{node_label(index, node)}: kernel_shape {list(kernel)} does not fit the "
                f"sample shape {list(self.sample_shape)}"
            )
        pads, strides, dilations = self._window(index, kernel, spatial)
        return kernel, pads, strides, dilations, bool(node_attr(node, "ceil_mode", 0))

    def _conv(self, index: int, current: str) -> None:
        node = self.graph.node[index]
        label = node_label(index, node)
        if node.input[0] != current:
            raise self.fail(f"{label}: the activation is not the Conv's data input X")
        kernel = self.float_constant(index, node.input[1], "weight")
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = self.float_constant(index, node.input[2], "bias")
        c_in, spatial = self._spatial_input(index)
        group = int(node_attr(node, "group", 1))
        if kernel.ndim != len(spatial) + 2:
            raise self.fail(
                f"{label}: weight of shape {list(kernel.shape)} does not fit the input sample "
                f"shape {list(self.sample_shape)}"
            )
        c_out = kernel.shape[0]
        if group < 1 or c_in % group or c_out % group or kernel.shape[1] * group != c_in:
            raise MalformedModelError(
                f"{self.label}: {label}: group {group} does not divide the {c_in} input channels "
                f"and {c_out} output channels with a weight of shape {list(kernel.shape)}; the "
                "model is invalid (onnxruntime cannot run it): fix the group count or the weight"
            )
        kernel_shape = tuple(int(k) for k in kernel.shape[2:])
        declared = node_attr(node, "kernel_shape", None)
        if declared is not None and tuple(declared) != kernel_shape:
            raise MalformedModelError(
                f"{self.label}: {label}: kernel_shape {list(declared)} differs from the weight's "
                f"{list(kernel_shape)}; fix the model"
            )
        if bias is not None and bias.shape != (c_out,):
            raise self.fail(f"{label}: bias of shape {list(bias.shape)}, expected [{c_out}]")
        pads, strides, dilations = self._window(index, kernel_shape, spatial)
        try:
            conv = ConvOperator(kernel, bias, spatial, pads, strides, dilations, group)
        except ValueError as exc:
            raise self.fail(f"{label}: {exc}") from None
        self._apply(index, conv, "core")
        self._set_shape(conv.output_shape, by_channel=True)
        self.last_core = node.name or f"layer{len(self.layers)}"

    def _dense(self, index: int, current: str) -> None:
        node = self.graph.node[index]
        if node.op_type == "Gemm":
            weight, bias, _ = self.gemm(index, current)
        else:
            weight, bias, _ = self.matmul(index, current)
        self._apply(index, DenseOperator(weight, bias), "core")  # gemm/matmul set sample_shape
        self.channel = None
        self.last_core = node.name or f"layer{len(self.layers)}"

    def _transpose(self, index: int) -> None:
        node = self.graph.node[index]
        rank = len(self.sample_shape) + 1
        perm = [int(p) for p in node_attr(node, "perm", list(range(rank))[::-1])]
        if sorted(perm) != list(range(rank)) or perm[0] != 0:
            raise self.fail(
                f"{node_label(index, node)}: perm {perm} moves the batch axis (or does not fit "
                f"the rank-{rank} activation); only per-sample transposes are supported"
            )
        sample_perm = [p - 1 for p in perm[1:]]
        if self.at_input and rank >= 3 and sample_perm == [rank - 2, *range(rank - 2)]:
            spatial = SPATIAL_LETTERS.get(rank - 2, "")
            self.input_layout = "N" + spatial + "C"
        op = TransposeOperator(self.sample_shape, sample_perm)
        self._apply(index, op, "linear")
        self._move_channels(op.source, op.output_shape)

    def _reduce_mean(self, index: int) -> None:
        """``ReduceMean`` over spatial axes (torch dynamo's adaptive average pool to 1, a
        ``mean(dim=(2, 3))``, Keras' GlobalAveragePooling2D in NHWC): a linear op. Refused when
        it reduces the batch or mixes channels (labels vary along a reduced axis)."""
        node = self.graph.node[index]
        label = node_label(index, node)
        rank = len(self.sample_shape) + 1
        axes = reduce_axes(node, self.constants, rank)
        if axes is None or 0 in axes:
            raise self.fail(
                f"{label}: its axes are computed at run time or include the batch axis; only "
                "a mean over constant per-sample axes can be analysed"
            )
        if not axes:  # noop_with_empty_axes: the identity
            flat = np.arange(math.prod(self.sample_shape))
            self._apply(index, IndexOperator(self.sample_shape, self.sample_shape, flat), "linear")
            return
        op = MeanOperator(
            self.sample_shape, [a - 1 for a in axes], bool(node_attr(node, "keepdims", 1))
        )
        if self.channel is not None:
            labels = self.channel.reshape(self.sample_shape)
            first = labels[
                tuple(slice(0, 1) if i + 1 in axes else slice(None) for i in range(rank - 1))
            ]
            if not np.all(labels == first):
                raise self.fail(
                    f"{label}: it averages over the channel axis; only means over spatial axes "
                    "can be analysed"
                )
        self._apply(index, op, "linear")
        self._move_channels(op.first_sources(), op.output_shape)

    def _gather(self, index: int, current: str) -> None:
        """``Gather(axis=1)`` with constant 1-D distinct indices (the channel selection the
        pruner writes before a residual member's consumers): a linear selection of the
        sample's entries, channel labels following their values."""
        node = self.graph.node[index]
        label = node_label(index, node)
        indices = self.constant(node.input[1]) if node.input[0] == current else None
        axis = node_attr(node, "axis", 0)
        rank = len(self.sample_shape) + 1
        if indices is None or indices.ndim != 1 or axis % rank != 1 or indices.dtype.kind != "i":
            raise self.fail(
                f"{label}: only a Gather of the activation on axis 1 with constant 1-D integer "
                "indices can be analysed"
            )
        channels = self.sample_shape[0]
        picked = np.where(indices < 0, indices + channels, indices).astype(np.int64)
        if np.any(picked < 0) or np.any(picked >= channels) or np.unique(picked).size < picked.size:
            raise self.fail(f"{label}: its indices are out of range or repeated")
        flat = np.arange(math.prod(self.sample_shape)).reshape(self.sample_shape)[picked]
        op = IndexOperator(self.sample_shape, flat.shape, flat.reshape(-1))
        self._apply(index, op, "linear")
        self._move_channels(op.source, op.output_shape)

    def _pad(self, index: int, current: str) -> None:
        node = self.graph.node[index]
        label = node_label(index, node)
        mode = node_attr(node, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode != "constant":
            raise self.fail(f"{label}: Pad mode '{mode}' is not supported (only 'constant')")
        rank = len(self.sample_shape) + 1
        if len(node.input) > 1 and node.input[1]:
            pads = self.constant(node.input[1])
            if pads is None:
                raise self.fail(f"{label}: its pads are not a constant")
            pads = [int(p) for p in pads.reshape(-1)]
            value = 0.0
            if len(node.input) > 2 and node.input[2]:
                value = float(
                    self.float_constant(index, node.input[2], "constant_value").ravel()[0]
                )
            if len(node.input) > 3 and node.input[3]:
                axes = self.constant(node.input[3])
                if axes is None:
                    raise self.fail(f"{label}: its axes are not a constant")
                axes = [int(a) % rank for a in axes.reshape(-1)]
                full = [0] * (2 * rank)
                for i, axis in enumerate(axes):
                    full[axis], full[rank + axis] = pads[i], pads[len(axes) + i]
                pads = full
        else:
            pads = [int(p) for p in node_attr(node, "pads", [])]
            value = float(np.asarray(node_attr(node, "value", 0.0), self.dtype))
        if len(pads) != 2 * rank:
            raise self.fail(f"{label}: {len(pads)} pads for a rank-{rank} activation")
        if pads[0] or pads[rank]:
            raise self.fail(f"{label}: pads the batch axis; only per-sample padding is supported")
        try:
            op = PadOperator(self.sample_shape, pads[1:rank] + pads[rank + 1 :], value)
        except ValueError as exc:
            raise self.fail(f"{label}: {exc}") from None
        self._apply(index, op, "linear")
        self._pad_channels(pads[1:rank] + pads[rank + 1 :], op.output_shape)

    def _average_pool(self, index: int) -> None:
        node = self.graph.node[index]
        label = node_label(index, node)
        channels, spatial = self._spatial_input(index)
        if node.op_type == "GlobalAveragePool":
            op = AveragePoolOperator.global_pool(self.sample_shape)
        else:
            kernel, pads, strides, dilations, ceil = self._pool_window(index, spatial)
            include = bool(node_attr(node, "count_include_pad", 0))
            try:
                op = AveragePoolOperator(
                    self.sample_shape, kernel, pads, strides, dilations, include, ceil
                )
            except ValueError as exc:
                raise self.fail(f"{label}: {exc}") from None
        self._apply(index, op, "linear")
        self._set_shape(op.output_shape, by_channel=True)

    # ------------------------------------------------------------------ shapes and channels
    def _set_shape(self, shape: tuple[int, ...], by_channel: bool) -> None:
        self.sample_shape = tuple(int(s) for s in shape)
        if by_channel:
            positions = math.prod(self.sample_shape[1:])
            self.channel = np.repeat(np.arange(self.sample_shape[0], dtype=np.int64), positions)

    def _move_channels(self, source: np.ndarray, shape: tuple[int, ...]) -> None:
        """Channel labels follow the values of a Transpose (a permutation of the flat index)."""
        self.sample_shape = tuple(int(s) for s in shape)
        if self.channel is not None:
            self.channel = self.channel[source]

    def _pad_channels(self, pads: list[int], shape: tuple[int, ...]) -> None:
        """Channel labels through a Pad: cropped entries go, a padded entry takes the label of
        the nearest kept entry along the padded axes (``np.pad`` edge mode), so padding the
        spatial axes of ``(C, *S)`` labels each new entry with its own channel."""
        in_shape = self.sample_shape
        self.sample_shape = tuple(int(s) for s in shape)
        if self.channel is None:
            return
        r = len(in_shape)
        labels = self.channel.reshape(in_shape)
        labels = labels[
            tuple(slice(max(-pads[i], 0), in_shape[i] - max(-pads[r + i], 0)) for i in range(r))
        ]
        if labels.size == 0:
            self.channel = None
            return
        width = [(max(pads[i], 0), max(pads[r + i], 0)) for i in range(r)]
        self.channel = np.pad(labels, width, mode="edge").reshape(-1)
