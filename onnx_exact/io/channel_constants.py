"""The vocabulary of a channel plan and the channels it follows as per-channel constants.

:class:`~onnx_exact.io.channel_plan.ChannelPlanner` follows the removed part of a tensor
downstream as a :class:`Flow`: whole slices ``dead`` along one per-sample axis, each holding
one value at every position, ``value[j]`` for slice ``dead[j]`` (a scalar when all are equal;
0 for a dead channel). The readers here (mixed into the planner by :class:`ConstantReaders`)
map those values through the per-channel ops a MobileNet block puts between two convolutions
and fold them into the first consumer that can take them exactly:

* a grouped (depthwise) Conv whose input groups are all removed outputs, on each of the group's
  output channels ``o``, the constant ``bias[o] + Σ_i v_i · Σ_taps W[o, i]`` at every
  position: exactly ``bias[o]`` for dead inputs (the zero padding reads the same zeros as the
  input), and for non-zero constants only when the Conv pads nothing (every tap reads ``v_i``);
  the group's filter and bias go, ``group`` shrinks, and its output channels flow on;
* ``BatchNormalization`` (inference): ``v → (v − mean)/√(var + ε)·scale + B``; ``Add``/``Sum``,
  ``Sub``, ``Mul``, ``Div`` by a constant that is uniform over each channel's positions;
  ``Relu``: ``max(v, 0)``; ``Clip(lo, hi)``: ``min(max(v, lo), hi)``. Their per-channel
  entries for the removed channels are cut; a channel that passes a Relu or Clip (an analysed
  layer) is recorded in :attr:`Plan.released`, so the report counts it removed there too;
* the consumer: a Conv that pads nothing gains ``Σ_c v_c · Σ_taps W[o, c]`` on output ``o``
  (every tap reads the constant), a Gemm (``alpha = beta = 1``) ``Σ_c v_c · B[c, o]`` (or
  ``B[o, c]`` with ``transB``), a MatMul the same on the constant of the ``Add`` that alone
  reads it (its bias); the removed input channels then multiply nothing. Each shift is planned
  per removed input channel (:attr:`Plan.shifts`), so two plans that reach one channel (a dead
  channel upstream and the same channel proved saturated downstream) add it once.

Anything else a non-zero constant reaches (a padded Conv, a pool other than a global one, a Pad,
a residual join, an op not listed) keeps the channels, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnx_exact.io.graph import node_attr

NORM_EPSILON = 1e-5
"""``BatchNormalization``'s default ``epsilon`` (ONNX)."""


class Keep(Exception):
    """The Relu's dead channels cannot be removed soundly; the message says why."""


@dataclass
class Flow:
    """Removed slices of a tensor: indices ``dead`` along per-sample axis ``axis`` (the batch axis
    is not counted) of a tensor whose per-sample shape is ``shape`` (None when unknown); slice
    ``dead[j]`` holds ``value`` (a scalar) or ``value[j]`` (an array aligned with ``dead``) at
    every position."""

    tensor: str
    shape: tuple[int, ...] | None
    axis: int
    dead: np.ndarray
    value: float | np.ndarray = 0.0

    @property
    def constant(self) -> bool:
        """Whether some slice holds a non-zero value (else they are all dead: 0)."""
        return bool(np.any(np.asarray(self.value) != 0))

    def values(self) -> np.ndarray:
        """The value of each slice, aligned with ``dead`` (float64)."""
        return np.broadcast_to(np.asarray(self.value, np.float64), self.dead.shape)


@dataclass
class Plan:
    """The edits one Relu needs: ``cuts`` (node index, input slot, axis, deleted indices),
    ``targets`` (Reshape node index, the entry of its shape target that spells the axis the
    slices are removed from, the slices removed: the entry shrinks by their count), ``reshaped`` (tensors whose shape
    changes), ``released`` (Relu node index → channels deleted because nothing reads them or
    they carry a constant folded downstream), ``groups`` (grouped Conv node index → the groups it
    loses), ``shifts`` (node index, bias input slot, the consumer's input channel or column,
    what the bias gains from that removed constant channel; added before any cut); ``owner``
    (Relu node index, the channels deleted, their value) for the plan of a Relu's own channels
    (:meth:`~onnx_exact.io.channel_plan.ChannelPlanner.plan`)."""

    cuts: list[tuple[int, int, int, np.ndarray]] = field(default_factory=list)
    targets: list[tuple[int, int, np.ndarray]] = field(default_factory=list)
    reshaped: set[str] = field(default_factory=set)
    released: dict[int, set[int]] = field(default_factory=dict)
    groups: dict[int, set[int]] = field(default_factory=dict)
    shifts: list[tuple[int, int, int, np.ndarray]] = field(default_factory=list)
    owner: tuple[int, tuple[int, ...], float] | None = None


def compact(values: np.ndarray) -> float | np.ndarray:
    """A flow's ``value`` for per-slice ``values``: a scalar when they are all equal."""
    values = np.asarray(values, np.float64)
    if values.size and np.all(values == values.reshape(-1)[0]):
        return float(values.reshape(-1)[0])
    return values


def reshaped_value(flow: Flow, shape: tuple[int, ...], axis: int, dead: np.ndarray):
    """``flow.value`` for the slices ``dead`` on ``axis`` of ``flow`` reshaped to ``shape``
    (row-major); Keep when a new slice mixes two values."""
    if np.ndim(flow.value) == 0:
        return flow.value
    full = np.zeros(flow.shape)
    index = (slice(None),) * flow.axis
    full[(*index, flow.dead)] = flow.values().reshape(
        (-1,) + (1,) * (len(flow.shape) - 1 - flow.axis)
    )
    slices = np.moveaxis(full.reshape(shape), axis, 0)[dead].reshape(dead.size, -1)
    if np.any(slices != slices[:, :1]):
        raise Keep("a reshape mixes the values of the constant channels")
    return compact(slices[:, 0])


def pads_input(node) -> bool:
    """Whether Conv ``node`` pads its input (``pads`` or an ``auto_pad`` other than VALID)."""
    auto_pad = node_attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    return bool(any(node_attr(node, "pads", []))) or auto_pad not in ("NOTSET", "VALID")


class ConstantReaders:
    """The readers of :class:`~onnx_exact.io.channel_plan.ChannelPlanner` that change or fold
    the values of the removed channels (mixed in: they use its graph index and ``cut``)."""

    def _value_reader(self, index: int, flow: Flow, plan: Plan) -> Flow:
        """Relu, Clip or inference BatchNormalization reading the channels: the same slices,
        their values mapped; a Relu/Clip records them in ``plan.released``."""
        node, label = self.nodes[index], self.label(index)
        values = flow.values()
        if node.op_type == "BatchNormalization":
            if node_attr(node, "training_mode", 0):
                raise Keep(f"{label} runs in training mode")
            if flow.axis != 0:
                raise Keep(f"{label} normalises axis 1, the channels are on {flow.axis + 1}")
            scale, bias, mean, var = (
                self.constant(index, s).astype(np.float64).reshape(-1)[flow.dead]
                for s in range(1, 5)
            )
            eps = float(node_attr(node, "epsilon", NORM_EPSILON))
            values = (values - mean) / np.sqrt(var + eps) * scale + bias
            for slot in range(1, 5):
                self.cut(plan, index, slot, 0, flow.dead)
        else:
            if node.op_type == "Clip":
                low, high = self.clip_bounds(index)
                values = np.minimum(np.maximum(values, low), high)
            else:
                values = np.maximum(values, 0.0)
            if flow.axis == 0:  # the activation's channels: removed from this layer as well
                plan.released.setdefault(index, set()).update(flow.dead.tolist())
        if not np.all(np.isfinite(values)):
            raise Keep(f"{label} maps the removed channels to a non-finite value")
        out = node.output[0]
        return Flow(out, flow.shape, flow.axis, flow.dead, compact(values))

    def clip_bounds(self, index: int) -> tuple[float, float]:
        """``(min, max)`` of Clip node ``index``: constant inputs, or attributes before opset 11;
        an absent bound is no bound. Keep when a bound is computed."""
        node = self.nodes[index]
        bounds = []
        for slot, what, default in ((1, "min", -np.inf), (2, "max", np.inf)):
            if len(node.input) > slot and node.input[slot]:
                bound = self.constants.value(node.input[slot])
                if bound is None or bound.size != 1:
                    raise Keep(f"{self.label(index)} has a computed {what}")
                bounds.append(float(bound.reshape(-1)[0]))
            else:
                bounds.append(float(node_attr(node, what, default)))
        return bounds[0], bounds[1]

    def _affine_reader(self, index: int, slot: int, flow: Flow, plan: Plan) -> Flow:
        """Add/Sum, Sub, Mul, Div with one constant operand. ``Mul`` by a constant, or ``Div`` by
        one, keeps a dead channel 0 whatever the constant; otherwise each removed channel's
        entries of the constant must be one number over its positions. The constant's entries
        for the channels go too."""
        node = self.nodes[index]
        op, label = node.op_type, self.label(index)
        other = 1 - slot if len(node.input) == 2 and slot in (0, 1) and op != "Concat" else None
        value = None if other is None else self.constants.value(node.input[other])
        if value is None:
            raise Keep(f"{label} joins the channels with another tensor (a residual {op}?)")
        if op == "Div" and slot != 0:
            raise Keep(f"{label} divides by the channels")
        if flow.shape is None:
            raise Keep(f"the rank of the input of {label} is unknown")
        rank = len(flow.shape) + 1
        if value.ndim > rank:
            raise Keep(f"the constant of {label} raises the tensor's rank")
        if self.sample_shape(node.output[0]) != flow.shape:
            raise Keep(f"the constant of {label} broadcasts the tensor to another shape")
        const_axis = flow.axis + 1 - (rank - value.ndim)
        entries = value.astype(np.float64).reshape((1, -1))  # one row shared by every channel
        if const_axis >= 0 and value.shape[const_axis] != 1:
            if value.shape[const_axis] != flow.shape[flow.axis]:
                raise Keep(f"the constant of {label} does not match the channels")
            self.cut(plan, index, other, const_axis, flow.dead)
            entries = np.moveaxis(value.astype(np.float64), const_axis, 0)[flow.dead]
            entries = entries.reshape(flow.dead.size, -1)
        out = node.output[0]
        if op in ("Mul", "Div") and not flow.constant:
            return Flow(out, flow.shape, flow.axis, flow.dead)
        if np.any(entries != entries[:, :1]):
            raise Keep(f"the constant of {label} varies over the positions of the channels")
        c, values = entries[:, 0], flow.values()
        if op == "Sub":
            values = values - c if slot == 0 else c - values
        else:
            values = {"Mul": values * c, "Div": values / c}.get(op, values + c)
        if not np.all(np.isfinite(values)):
            raise Keep(f"{label} maps the removed channels to a non-finite value")
        return Flow(out, flow.shape, flow.axis, flow.dead, compact(values))

    def _grouped_reader(self, index: int, flow: Flow, plan: Plan) -> Flow:
        """A grouped Conv reading removed channels that fill whole input groups: each of those
        groups outputs a constant per output channel (see the module docstring), so the group's
        filter and bias go and its output channels flow on with those values."""
        node, label = self.nodes[index], self.label(index)
        weight = self.constant(index, 1)
        group = node_attr(node, "group", 1)
        per_group, inputs = weight.shape[0] // group, weight.shape[1]
        groups = sorted({int(c) // inputs for c in flow.dead})
        whole = {c for j in groups for c in range(j * inputs, (j + 1) * inputs)}
        if whole != set(flow.dead.tolist()):
            raise Keep(f"the dead channels do not fill whole input groups of {label}")
        outputs = np.asarray(
            [o for j in groups for o in range(j * per_group, (j + 1) * per_group)], np.int64
        )
        has_bias = len(node.input) > 2 and node.input[2]
        values = np.zeros(outputs.size)
        if has_bias:
            values += self.constant(index, 2).astype(np.float64).reshape(-1)[outputs]
        if flow.constant:
            if pads_input(node):
                raise Keep(f"{label} pads its input: the constant channels are 0 at the border")
            taps = weight[outputs].astype(np.float64).reshape(outputs.size, inputs, -1).sum(-1)
            by_channel = np.zeros(weight.shape[1] * group)
            by_channel[flow.dead] = flow.values()
            values += (taps * by_channel[whole_inputs(outputs, per_group, inputs)]).sum(axis=1)
        self.cut(plan, index, 1, 0, outputs)
        if has_bias:
            self.cut(plan, index, 2, 0, outputs)
        plan.groups.setdefault(index, set()).update(groups)
        out = node.output[0]
        return Flow(out, self.sample_shape(out), 0, outputs, compact(values))

    def _fold_constant(self, index: int, flow: Flow, plan: Plan) -> None:
        """Plan adding what the constant channels ``flow.dead`` contribute to consumer ``index``
        (a Conv without padding, a Gemm with alpha = beta = 1, a MatMul whose one reader is an
        Add of a constant bias) to its bias, one shift per channel: the same at every output
        position, so deleting the channels is then exact."""
        node, label = self.nodes[index], self.label(index)
        weight = self.constant(index, 1).astype(np.float64)
        bias_node, slot = index, 2
        if node.op_type == "Conv":
            if pads_input(node):
                raise Keep(f"{label} pads its input: the constant channels are 0 at the border")
            taps = weight[:, flow.dead].reshape(weight.shape[0], flow.dead.size, -1).sum(axis=2)
        elif node.op_type == "MatMul":
            taps = weight[flow.dead, :].T
            bias_node, slot = self._bias_add(index)
        elif node_attr(node, "alpha", 1.0) != 1.0 or node_attr(node, "beta", 1.0) != 1.0:
            raise Keep(f"{label} scales its product or bias (alpha, beta)")
        elif node_attr(node, "transB", 0):
            taps = weight[:, flow.dead]
        else:
            taps = weight[flow.dead, :].T
        bias_label = self.label(bias_node)
        inputs = self.nodes[bias_node].input
        name = inputs[slot] if len(inputs) > slot else ""
        bias = self.constants.value(name) if name else None
        outputs = taps.shape[0]
        if bias is None or bias.size != outputs or bias.shape[-1:] != (outputs,):
            raise Keep(
                f"{bias_label} has no per-output constant bias to take the constant channels"
            )
        if self.read_count.get(name, 0) != 1 or name in self.outputs:
            raise Keep(f"the bias '{name}' of {bias_label} is shared with other nodes")
        for j, (channel, value) in enumerate(zip(flow.dead.tolist(), flow.values(), strict=True)):
            if value:
                plan.shifts.append((bias_node, slot, int(channel), value * taps[:, j]))

    def _bias_add(self, index: int) -> tuple[int, int]:
        """``(node, slot)`` of the constant bias of MatMul ``index``: the Add alone reading it."""
        out, label = self.nodes[index].output[0], self.label(index)
        readers = self.consumers.get(out, [])
        if out in self.outputs or self.read_count.get(out, 0) != 1 or len(readers) != 1:
            raise Keep(f"{label} has no per-output constant bias (an Add alone reading it)")
        add, slot = readers[0]
        node = self.nodes[add]
        if node.op_type != "Add" or len(node.input) != 2 or node.domain not in ("", "ai.onnx"):
            raise Keep(f"{label} has no per-output constant bias (an Add alone reading it)")
        return add, 1 - slot


def whole_inputs(outputs: np.ndarray, per_group: int, inputs: int) -> np.ndarray:
    """``(outputs, inputs)``: the input channels each output channel of a grouped Conv reads."""
    first = outputs // per_group * inputs
    return first[:, None] + np.arange(inputs)[None, :]


def emptying(planner, plans: list[Plan]) -> tuple[Plan, str] | None:
    """A Relu's own plan to leave out, and why, when the ``plans`` together (applied in order)
    would delete every entry on some axis of a constant: each plan keeps a channel of its own
    Relu, but two may delete the rest between them (a Relu's dead channels, and the others
    removed from it by an upstream channel that reaches it as a constant). The plan that
    completes the axis is blamed, or the last Relu's plan before it that cuts there."""
    merged: dict[tuple[int, int, int], set[int]] = {}
    cutting: dict[tuple[int, int, int], list[Plan]] = {}
    for plan in plans:
        for index, slot, axis, idx in plan.cuts:
            key = (index, slot, axis)
            merged.setdefault(key, set()).update(idx.tolist())
            cutting.setdefault(key, []).append(plan)
            size = planner.constants.value(planner.nodes[index].input[slot]).shape[axis]
            owned = [p for p in cutting[key] if p.owner is not None]
            if len(merged[key]) >= size and owned:
                name = planner.nodes[index].input[slot]
                return owned[-1], f"with the other removed channels, no entry of '{name}' is left"
    return None
