"""Planning of exact channel deletions in an ONNX graph (see :mod:`onnx_exact.io.channel_pruning`).

For one Relu and its proved-dead channels, :meth:`ChannelPlanner.plan` walks the graph upstream
to the Conv/Gemm/MatMul that computes the channels and downstream to the linear ops that read
them, and returns a :class:`Plan`: which slices of which constants to delete, which Reshape
targets change, which tensors change shape. It raises :class:`Keep` with a one-line reason when
any step is not provably exact. Downstream, the dead part of a tensor is a :class:`Flow`: whole
slices along one per-sample axis, mapped through Transpose (axis permuted) and Flatten/Reshape
(the boolean mask reshaped, which must again be whole slices of one axis).

A *constant* channel (a ``Clip(0, c)`` channel proved saturated: ``c`` at every position) is
planned the same way with ``Flow.value = c``: its filter goes upstream, and downstream it may
only pass ops that keep it constant per channel and end in a consumer whose bias takes it
(:mod:`onnx_exact.io.channel_constants`: a Conv without padding, a Gemm, a MatMul with a bias
Add; :attr:`Plan.shifts`). A grouped Conv reading dead channels that fill whole groups turns
them into such constants (its bias), and BatchNormalization, Add/Sub/Mul/Div by constants,
Relu and Clip map a removed channel's value on; anything else keeps the channel.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from onnx_exact.io.channel_constants import ConstantReaders, Flow, Keep, Plan, reshaped_value
from onnx_exact.io.graph import (
    ConstantResolver,
    node_attr,
    node_label,
    read_counts,
    reader_slots,
    reduce_axes,
)

PASS_OPS = {"Identity", "Dropout"}
"""Elementwise downstream ops that pass a slice on unchanged."""

VALUE_OPS = {"Relu", "Clip", "BatchNormalization"}
"""Per-channel downstream ops that map a removed channel's value (0 or a constant) on
(:meth:`~onnx_exact.io.channel_constants.ConstantReaders._value_reader`)."""

ACTIVATION_OPS = {"Relu", "Clip"}
"""The activations whose channels are planned: a Relu, or a ``Clip(0, c)`` the CNN reader
accepted (its dead channels output exactly 0 as well, since 0 lies in ``[0, c]``)."""

POOL_OPS = {"AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool"}
"""Per-channel pools over the spatial axes: a zero channel pools to a zero channel."""

AFFINE_OPS = {"Add", "Sub", "Mul", "Div"}
"""Elementwise ops with one constant operand, allowed on the chain between a core and its Relu."""

CHAIN_PASS_OPS = {"Identity", "Dropout", "Transpose"}
"""Single-input ops that pass channels on unchanged (Transpose moves their axis)."""

CORE_OPS = {"Conv", "Gemm", "MatMul"}
"""The ops a channel's chain starts at: they own its filter (weights and bias)."""


class ChannelPlanner(ConstantReaders):
    """An index of ``model``'s main graph (producers, readers, constants, inferred shapes) and
    the planning of one Relu's edits on it; nothing is changed here."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.nodes = self.graph.node
        self.constants = ConstantResolver(self.graph)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.consumers = reader_slots(self.graph)
        self.read_count = read_counts(self.graph)
        self.outputs = {o.name for o in self.graph.output}
        self.shapes = inferred_shapes(model)
        self.absorbed: set[int] = set()  # residual joins a stream plan cuts as a whole
        self.taken = (
            set(self.producer)
            | set(self.initializers)
            | {i.name for i in self.graph.input}
            | {n.name for n in self.nodes}
        )

    # ------------------------------------------------------------------ lookups
    def relu_index(self, name: str) -> int:
        for i, node in enumerate(self.nodes):
            if node.op_type in ACTIVATION_OPS and (
                node.name == name or (not node.name and node.output[0] == name)
            ):
                return i
        raise ValueError(f"no Relu or Clip node named {name!r} in the main graph")

    def label(self, index: int) -> str:
        return node_label(index, self.nodes[index])

    def sample_shape(self, tensor: str) -> tuple[int, ...] | None:
        """The per-sample (batch axis dropped) static shape of ``tensor``, if inference knows it."""
        shape = self.shapes.get(tensor)
        if shape is None or len(shape) < 1 or any(d is None or d < 0 for d in shape[1:]):
            return None
        return tuple(shape[1:])

    def single_reader(self, tensor: str, what: str) -> None:
        """``tensor`` (inside a chain) must be read by one node and be no graph output."""
        if tensor in self.outputs:
            raise Keep(f"{what} '{tensor}' is a graph output")
        if self.read_count.get(tensor, 0) != 1:
            readers = [self.label(i) for i, _ in self.consumers.get(tensor, [])]
            raise Keep(f"{what} '{tensor}' fans out to {', '.join(readers) or 'a subgraph'}")

    def constant(self, index: int, slot: int) -> np.ndarray:
        """The constant at input ``slot`` of node ``index`` (Keep when it is computed)."""
        node = self.nodes[index]
        name = node.input[slot] if slot < len(node.input) else ""
        value = self.constants.value(name) if name else None
        if value is None:
            raise Keep(f"input {slot} of {self.label(index)} is not a constant")
        return value

    def cut(self, plan: Plan, index: int, slot: int, axis: int, dead: np.ndarray) -> None:
        """Plan deleting indices ``dead`` on ``axis`` of the constant at input ``slot`` of node
        ``index``. A value read through Identity/Cast nodes is cut at its source (slicing commutes
        with both; the stored dtype stays the source's). Every tensor on the way must be read by
        that one node only, so no other node sees the change."""
        while True:
            name = self.nodes[index].input[slot]
            if self.read_count.get(name, 0) != 1 or name in self.outputs:
                raise Keep(f"constant '{name}' of {self.label(index)} is shared with other nodes")
            producer = self.producer.get(name)
            if producer is None or self.nodes[producer].op_type not in ("Identity", "Cast"):
                break
            plan.reshaped.add(name)
            index, slot = producer, 0
        if self.constants.value(name) is None:
            raise Keep(f"input {slot} of {self.label(index)} is not a constant")
        plan.cuts.append((index, slot, axis, np.asarray(dead, np.int64)))

    # ------------------------------------------------------------------ planning
    def plan(self, relu: int, dead: list[int], value: float = 0.0) -> tuple[Plan, list[int], str]:
        """The edits that delete channels ``dead`` of Relu ``relu``, the channels deleted, a note.

        ``value``: what those channels output at every position (0: dead; a saturated Clip's
        ``c``: folded into the consumers' biases). Raises ``Keep`` when they cannot be deleted
        soundly.
        """
        plan = Plan()
        chain, core = self._chain(self.nodes[relu].input[0], release=False)
        channels = self._core_channels(core)
        if dead[-1] >= channels:
            raise ValueError(f"channel {dead[-1]} out of range: the Relu has {channels} channels")
        note = ""
        if len(dead) == channels:
            what = f"constant {value:g}" if value else "dead"
            note = (
                f"all {channels} channels are {what}; channel {dead[0]} stays so no tensor is empty"
            )
            dead = dead[1:]
            if not dead:
                raise Keep(note)
        axis = self._cut_chain(chain, core, dead, plan)
        if axis < 1:
            raise Keep("the channel axis ends up as the batch axis")
        plan.owner = (relu, tuple(dead), value)
        out = self.nodes[relu].output[0]
        shape = self.sample_shape(out)
        flow = Flow(out, shape, axis - 1, np.asarray(dead, np.int64), value)
        if shape is not None and shape[axis - 1] != channels:
            raise Keep(f"'{out}' has {shape[axis - 1]} entries on the channel axis, not {channels}")
        self._downstream(flow, plan)
        return plan, dead, note

    def _release(self, tensor: str, channels: list[int], plan: Plan) -> None:
        """Delete channels of ``tensor`` that its one reader (a grouped Conv losing whole groups)
        no longer reads: whatever their values, nothing else sees them, so their filters go too.
        A Relu passed on the way records the channels in ``plan.released``."""
        chain, core = self._chain(tensor, release=True)
        if self._cut_chain(chain, core, channels, plan) != 1:
            raise Keep(f"the channels of '{tensor}' are not on axis 1")
        for index in chain:
            if self.nodes[index].op_type in ACTIVATION_OPS:
                plan.released.setdefault(index, set()).update(channels)

    def _chain(self, tensor: str, release: bool) -> tuple[list[int], int]:
        """The per-channel nodes that compute ``tensor`` from a core (``tensor``'s side first)
        and the core. Pools may be on it (``Conv → MaxPool → Relu``: pools never mix channels,
        so a channel the activation zeroes goes from each). With ``release`` (the channels are
        dropped, not proved 0), Relu, Clip and Pad may be on the chain too."""
        allowed = CHAIN_PASS_OPS | POOL_OPS | (ACTIVATION_OPS | {"Pad"} if release else set())
        return self.walk_chain(
            tensor,
            allowed,
            lambda index: self.nodes[index].op_type in CORE_OPS,
            "a Conv, Gemm or MatMul",
        )

    def walk_chain(
        self, tensor: str, allowed: set[str], starts: Callable[[int], bool], start_kind: str
    ) -> tuple[list[int], int]:
        """The per-channel nodes computing ``tensor`` (its side first) up to the first node for
        which ``starts`` holds, and that node. On the way: Add/Sub/Mul/Div by a constant,
        inference BatchNormalization and the ``allowed`` single-input ops; anything else (a
        second output in use, a foreign domain, a tensor with two readers) is a :class:`Keep`
        naming the node. ``start_kind`` names what ``starts`` accepts, for the message."""
        chain: list[int] = []
        while True:
            self.single_reader(tensor, "the tensor")
            index = self.producer.get(tensor)
            if index is None:
                raise Keep(f"'{tensor}' is not computed by {start_kind}")
            node = self.nodes[index]
            op = node.op_type
            if node.domain not in ("", "ai.onnx"):
                raise Keep(f"{self.label(index)} of domain '{node.domain}' is on the chain")
            if starts(index):
                return chain, index
            if self.extra_outputs_used(index):
                raise Keep(f"{self.label(index)} has a second output in use")
            if op in AFFINE_OPS:
                slots = [s for s in (0, 1) if self.constants.value(node.input[s]) is None]
                if len(slots) != 1:
                    raise Keep(f"{self.label(index)} joins two computed tensors (a residual {op}?)")
                tensor = node.input[slots[0]]
            elif op == "BatchNormalization" and not node_attr(node, "training_mode", 0):
                tensor = node.input[0]
            elif op in allowed:
                tensor = node.input[0]
            else:
                raise Keep(f"{self.label(index)} between the Relu and its core is not supported")
            chain.append(index)

    def _core_channels(self, core: int) -> int:
        node = self.nodes[core]
        weight = self.constant(core, 1)
        if node.op_type == "Conv":
            return weight.shape[0]
        if weight.ndim != 2:
            raise Keep(f"the weight of {self.label(core)} is not a matrix")
        transposed = node.op_type == "Gemm" and node_attr(node, "transB", 0)
        return weight.shape[0] if transposed else weight.shape[1]

    def _cut_chain(self, chain: list[int], core: int, dead: list[int], plan: Plan) -> int:
        """Cut channels ``dead`` from the core and the chain; the full channel axis at its end."""
        channels = self._core_channels(core)
        axis, rank = self._core_cuts(core, plan, dead)
        plan.reshaped.add(self.nodes[core].output[0])
        for index in reversed(chain):
            axis = self._chain_cuts(index, plan, axis, rank, channels, dead)
            plan.reshaped.add(self.nodes[index].output[0])
        return axis

    def _core_cuts(self, core: int, plan: Plan, dead: list[int]) -> tuple[int, int]:
        """Cut the core's output channels; return (full channel axis, rank) of its output.

        A grouped Conv loses whole groups only (their input channels are released upstream);
        ``group`` shrinks with them when the cuts are applied."""
        node = self.nodes[core]
        idx = np.asarray(dead, np.int64)
        weight = self.constant(core, 1)
        if node.op_type == "Conv":
            group = node_attr(node, "group", 1)
            if group != 1:
                per_group, inputs = weight.shape[0] // group, weight.shape[1]
                groups = sorted({o // per_group for o in dead})
                whole = {o for j in groups for o in range(j * per_group, (j + 1) * per_group)}
                if whole != set(dead):
                    raise Keep(f"the dead channels do not fill whole groups of {self.label(core)}")
                released = [j * inputs + i for j in groups for i in range(inputs)]
                self._release(node.input[0], released, plan)
                plan.groups.setdefault(core, set()).update(groups)
            self.cut(plan, core, 1, 0, idx)
            if len(node.input) > 2 and node.input[2]:
                self.cut(plan, core, 2, 0, idx)
            return 1, weight.ndim
        if weight.ndim != 2:
            raise Keep(f"the weight of {self.label(core)} is not a matrix")
        if node.op_type == "Gemm":
            trans = node_attr(node, "transB", 0)
            channels = weight.shape[0] if trans else weight.shape[1]
            self.cut(plan, core, 1, 0 if trans else 1, idx)
            if len(node.input) > 2 and node.input[2]:
                bias = self.constant(core, 2)
                if bias.ndim >= 1 and bias.shape[-1] == channels and channels > 1:
                    self.cut(plan, core, 2, bias.ndim - 1, idx)
            return 1, 2
        shape = self.shapes.get(node.output[0])
        if shape is None:
            raise Keep(f"the rank of the output of {self.label(core)} is unknown")
        self.cut(plan, core, 1, 1, idx)
        return len(shape) - 1, len(shape)

    def _chain_cuts(
        self, index: int, plan: Plan, axis: int, rank: int, channels: int, dead: list[int]
    ) -> int:
        """Cut the per-channel constants of chain node ``index``; return the channel axis after it."""
        node = self.nodes[index]
        op = node.op_type
        idx = np.asarray(dead, np.int64)
        if op == "Transpose":
            perm = list(node_attr(node, "perm", range(rank)[::-1]))
            return perm.index(axis)
        if op in POOL_OPS or op == "Pad":
            if axis != 1:
                raise Keep(f"{self.label(index)} works on axis 1, the channels are on {axis}")
            if op == "Pad":
                self._check_pad(index, check_value=False)
            return axis
        if op == "BatchNormalization":
            if axis != 1:
                raise Keep(f"{self.label(index)} normalises axis 1, not the channel axis {axis}")
            for slot in range(1, 5):
                self.cut(plan, index, slot, 0, idx)
            return axis
        if op in AFFINE_OPS:
            slot = 1 if self.constants.value(node.input[1]) is not None else 0
            value = self.constant(index, slot)
            const_axis = axis - (rank - value.ndim)
            if value.ndim > rank:
                raise Keep(f"the constant of {self.label(index)} raises the tensor's rank")
            if const_axis >= 0 and value.shape[const_axis] != 1:
                if value.shape[const_axis] != channels:
                    raise Keep(f"the constant of {self.label(index)} does not match the channels")
                self.cut(plan, index, slot, const_axis, idx)
        return axis

    def _mean(self, index: int, flow: Flow) -> Flow:
        """A ``ReduceMean`` over axes other than the channels' keeps each channel's slice apart
        (a dead slice stays 0, a constant one constant); its output's channel axis moves left
        by the reduced axes before it when they are dropped."""
        node, label = self.nodes[index], self.label(index)
        if flow.shape is None:
            raise Keep(f"the shape read by {label} is unknown")
        axes = reduce_axes(node, self.constants, len(flow.shape) + 1)
        if axes is None or 0 in axes or flow.axis + 1 in axes:
            raise Keep(f"{label} averages over the batch or the channels, or its axes are computed")
        axis = flow.axis
        if not node_attr(node, "keepdims", 1):
            axis -= sum(1 for a in axes if a - 1 < flow.axis)
        return Flow(node.output[0], self.sample_shape(node.output[0]), axis, flow.dead, flow.value)

    def _downstream(self, start: Flow, plan: Plan) -> None:
        """Follow every reader of the dead slices to linear consumers, planning their cuts."""
        stack = [start]
        while stack:
            flow = stack.pop()
            plan.reshaped.add(flow.tensor)
            if flow.tensor in self.outputs:
                raise Keep(f"the channels reach the graph output '{flow.tensor}'")
            readers = self.consumers.get(flow.tensor, [])
            if self.read_count.get(flow.tensor, 0) != len(readers):
                raise Keep(f"'{flow.tensor}' is read inside a subgraph")
            for index, slot in readers:
                follow = self._reader(index, slot, flow, plan)
                if follow is not None:
                    stack.append(follow)

    def _reader(self, index: int, slot: int, flow: Flow, plan: Plan) -> Flow | None:
        """Plan one reader of ``flow``: the flow on its output, or None if it absorbs the cut."""
        node = self.nodes[index]
        op, label = node.op_type, self.label(index)
        if node.domain not in ("", "ai.onnx"):
            raise Keep(f"{label} of domain '{node.domain}' reads the channels")
        if self.extra_outputs_used(index):
            raise Keep(f"{label} has a second output in use")
        out = node.output[0]
        if index in self.absorbed:
            if flow.axis != 0:
                raise Keep(f"{label} adds channels on axis 1, the dead ones are on {flow.axis + 1}")
            return None  # a join of the residual stream being planned: its output is cut whole
        if op in AFFINE_OPS or op in ("Sum", "Concat"):
            return self._affine_reader(index, slot, flow, plan)
        if slot != 0:
            raise Keep(f"{label} reads the channels as input {slot}")
        if op in VALUE_OPS:
            return self._value_reader(index, flow, plan)
        if op in PASS_OPS:
            return Flow(out, flow.shape, flow.axis, flow.dead, flow.value)
        if op in POOL_OPS or op == "Pad":
            if flow.axis != 0:
                raise Keep(f"{label} works on axis 1 but the channels are on axis {flow.axis + 1}")
            if flow.constant and op not in ("GlobalAveragePool", "GlobalMaxPool"):
                raise Keep(f"{label} may not keep the constant channels constant at the border")
            if op == "Pad":
                self._check_pad(index)
            return Flow(out, self.sample_shape(out), 0, flow.dead, flow.value)
        if op == "ReduceMean":
            return self._mean(index, flow)
        if op == "Transpose":
            rank = len(flow.shape) + 1 if flow.shape is not None else None
            perm = list(node_attr(node, "perm", range(rank or 0)[::-1]))
            if not perm or perm[0] != 0:
                raise Keep(f"{label} moves the batch axis")
            shape = None if flow.shape is None else tuple(flow.shape[p - 1] for p in perm[1:])
            return Flow(out, shape, perm.index(flow.axis + 1) - 1, flow.dead, flow.value)
        if op in ("Flatten", "Reshape"):
            axis, rank = node_attr(node, "axis", 1), len(flow.shape or ()) + 1
            if op == "Flatten" and flow.shape is not None and axis % rank != 1:
                raise Keep(f"{label} (axis {axis}) mixes the batch axis with the sample")
            return self._reshape(index, flow, plan)
        if op == "Conv":
            if flow.axis != 0:
                raise Keep(
                    f"{label} reads channels on axis 1, the dead ones are on {flow.axis + 1}"
                )
            if node_attr(node, "group", 1) != 1:
                return self._grouped_reader(index, flow, plan)
            if flow.constant:
                self._fold_constant(index, flow, plan)
            self.cut(plan, index, 1, 1, flow.dead)
            return None
        if op in ("Gemm", "MatMul"):
            weight = self.constant(index, 1)
            if weight.ndim != 2 or flow.shape is None and op == "MatMul":
                raise Keep(f"{label} is not a matrix product with a known input rank")
            if op == "Gemm" and node_attr(node, "transA", 0):
                raise Keep(f"{label} has transA=1")
            last = 0 if op == "Gemm" else len(flow.shape) - 1  # Gemm's input is 2-D
            if flow.axis != last or (flow.shape is not None and len(flow.shape) != last + 1):
                raise Keep(f"{label} contracts an axis other than the channel axis")
            trans = op == "Gemm" and node_attr(node, "transB", 0)
            if flow.constant:
                self._fold_constant(index, flow, plan)
            self.cut(plan, index, 1, 1 if trans else 0, flow.dead)
            return None
        raise Keep(f"{label} reads the channels and is not supported")

    def extra_outputs_used(self, index: int) -> bool:
        """Whether an output after the first (BN statistics, MaxPool indices, Dropout mask) is
        read or is a graph output."""
        return any(
            o and (o in self.read_count or o in self.outputs) for o in self.nodes[index].output[1:]
        )

    def _check_pad(self, index: int, check_value: bool = True) -> None:
        """A Pad keeps a zero channel zero only in constant mode with value 0 (checked with
        ``check_value``) and no pads on the channel axis."""
        node = self.nodes[index]
        label = self.label(index)
        mode = node_attr(node, "mode", b"constant")
        if check_value and (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            raise Keep(f"{label} pads in mode {mode!r}, not with zeros")
        if len(node.input) > 1:
            pads = self.constant(index, 1).reshape(-1)
            value = self.constant(index, 2) if len(node.input) > 2 and node.input[2] else 0
        else:
            pads = np.asarray(node_attr(node, "pads", []))
            value = node_attr(node, "value", 0.0)
        if check_value and np.any(np.asarray(value) != 0):
            raise Keep(
                f"{label} pads with {float(np.asarray(value).reshape(-1)[0])}, not 0: "
                "a dead channel would be non-zero at the border"
            )
        if len(node.input) > 3 and node.input[3]:
            raise Keep(f"{label} pads selected axes only")
        rank = pads.size // 2
        if rank < 2 or pads[1] != 0 or pads[rank + 1] != 0:
            raise Keep(f"{label} pads the channel axis")

    def _reshape(self, index: int, flow: Flow, plan: Plan) -> Flow:
        """Map the dead slices through a Flatten/Reshape; plan the Reshape's new target."""
        node = self.nodes[index]
        label, out = self.label(index), node.output[0]
        out_shape = self.sample_shape(out)
        in_full, out_full = self.shapes.get(node.input[0]), self.shapes.get(out)
        if flow.shape is None or out_shape is None or in_full is None or out_full is None:
            raise Keep(f"the shapes around {label} are unknown")
        if in_full[0] != out_full[0] or np.prod(out_shape) != np.prod(flow.shape):
            raise Keep(f"{label} mixes the batch axis with the sample")
        mask = np.zeros(flow.shape, bool)
        mask[(slice(None),) * flow.axis + (flow.dead,)] = True
        axis, dead = _slices(mask.reshape(out_shape))
        if axis is None:
            raise Keep(f"after {label} the dead channels are no longer whole slices of one axis")
        if node.op_type == "Reshape":
            target = self.constant(index, 1).reshape(-1)
            allowzero = node_attr(node, "allowzero", 0)
            batch = in_full[0] if isinstance(in_full[0], int) else 7
            new_in = list(flow.shape)
            new_in[flow.axis] -= flow.dead.size
            new_out = list(out_shape)
            new_out[axis] -= dead.size
            new_target = target.copy()
            if new_target.size == len(out_shape) + 1 and new_target[axis + 1] > 0:
                new_target[axis + 1] = new_out[axis]
            if _reshaped(target, [batch, *flow.shape], allowzero) != [batch, *out_shape] or (
                _reshaped(new_target, [batch, *new_in], allowzero) != [batch, *new_out]
            ):
                raise Keep(f"the shape target of {label} cannot follow the removed channels")
            if not np.array_equal(new_target, target):
                plan.targets.append((index, axis + 1, dead))
        return Flow(out, out_shape, axis, dead, reshaped_value(flow, out_shape, axis, dead))


def inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Tensor name → shape (ints, None for symbolic dims) from onnx's shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 (inference is a best effort; unknown shapes keep channels)
        inferred = model
    shapes: dict[str, tuple] = {}
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
            )
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def _slices(mask: np.ndarray) -> tuple[int | None, np.ndarray]:
    """An axis along which ``mask`` is a union of whole slices (a proper, non-empty subset of
    them), and those slices' indices; (None, empty) when there is none."""
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        full = mask.all(axis=others) if others else mask
        if full.any() and not full.all():
            shape = [1] * mask.ndim
            shape[axis] = mask.shape[axis]
            if np.array_equal(mask, np.broadcast_to(full.reshape(shape), mask.shape)):
                return axis, np.flatnonzero(full)
    return None, np.zeros(0, np.int64)


def _reshaped(target: np.ndarray, shape: list[int], allowzero: int) -> list[int] | None:
    """ONNX Reshape's output shape for input ``shape`` and ``target`` (0 copies unless
    ``allowzero``; one -1 is inferred); None when the target does not fit."""
    out = [int(t) for t in target]
    for i, t in enumerate(out):
        if t == 0 and not allowzero:
            if i >= len(shape):
                return None
            out[i] = shape[i]
    total = int(np.prod(shape))
    if out.count(-1) > 1:
        return None
    if -1 in out:
        known = int(np.prod([t for t in out if t != -1]))
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return out if int(np.prod(out)) == total else None
