"""Exact structured pruning of dead channels, edited into (a copy of) the ONNX graph.

A channel of a Relu is *dead* when the Relu outputs 0 at every position of that channel for every
input of the box (proved elsewhere; this module trusts the caller's ``dead``). Removing it is
exact when two things hold, and this module checks both from the graph alone:

* **upstream**, the channel's values are computed by a per-channel chain
  ``Conv | Gemm | MatMul → [Add/Sub/Mul/Div by a constant | BatchNormalization | Transpose |
  Identity | Dropout]* → Relu``: every op on it acts on each channel separately, so deleting the
  channel's filter (Conv weight axis 0, bias, BN scale/B/mean/var, the channel's entry of each
  broadcast constant) leaves every other channel's values bit for bit unchanged;
* **downstream**, the zeros reach only ops through which a zero channel stays a zero slice
  (Identity, Dropout, Relu, constant-0 Pad, Average/Max/Global pools, Transpose, Flatten,
  Reshape) and end in linear consumers whose matching inputs can be deleted: a Conv (weight
  axis 1), a Gemm (the columns of ``B`` per ``transB``), a MatMul (the rows of its right-hand
  constant). A deleted input slice multiplies zeros, so the consumer's output is unchanged.

The tensor between the two is followed as a per-sample boolean mask of dead elements; a Flatten or
Reshape reshapes the mask (channel ``c`` of ``C × P`` becomes columns ``c·P … (c+1)·P − 1`` in NCHW
order, every ``C``-th column in NHWC order), and the edit stays exact as long as the mask is a set
of whole slices along one axis, since deleting whole slices keeps the row-major order of what
remains. Anything else (a fan-out on the chain, a shared weight, a residual Add, Concat, a graph
output, a non-zero Pad, an op not listed) keeps the Relu's channels, and ``kept`` says why.

A grouped (e.g. depthwise) Conv computing the channels loses whole groups only: the dead
channels must fill them; the input channels that only those groups read are then unread, whatever
their values, so they are deleted upstream too (through Relu, pools and Pad) and reported as
removed from the Relu they pass; ``group`` shrinks. A grouped Conv *reading* dead channels that
fill whole input groups outputs its bias on those groups: the groups go and their outputs flow
on as per-channel constants (0 without a bias) through BatchNormalization, affine constants,
Relu and Clip, to consumers whose bias takes them (:mod:`onnx_exact.io.channel_constants`).
Plans that would together leave a tensor without channels lose the later Relu's own plan. A constant read through
Identity/Cast is cut at its source, in the source's dtype.

Residual blocks: the Relus tied by identity skips form a *stream*
(:mod:`onnx_exact.io.channel_stream`); a channel goes from a stream only when it is proved dead
in every member, and then from every producer feeding its Adds and every consumer of its
members at once. A channel dead in some members only stays in the stream, and ``kept`` says
which; from each member it is proved dead in, it still goes from that member's consumers other
than the joins, which then read the member through a ``Gather(axis=1)`` of the kept channels
(:mod:`onnx_exact.io.channel_gather`; ``gathered``).

The planning (the graph walks) lives in :mod:`onnx_exact.io.channel_plan` and
:mod:`onnx_exact.io.channel_stream`; this module applies the plans and tidies the graph.

A ``Clip(0, c)`` (ReLU6) is planned where a Relu is: its dead channels output exactly 0 (0 lies
in ``[0, c]``), a zero channel passes any Clip whose range holds 0 downstream, and a Clip proved
the identity on the box (every unit linear: above 0 and below ``c``) is removed like a Relu,
with its bound constants when nothing else reads them. A Clip's channels proved *saturated*
(``c`` at every position for every input of the box) go too where every consumer can take the
constant into its bias (:meth:`ChannelPlanner._fold_constant`: a Conv without padding, a Gemm);
otherwise they stay, and ``unfolded`` says why.

A Relu proved the identity on the box (every neuron active) is removed: its readers read its
input; the linear ops it joined are then fused into one node where that is exact and lowers the
MACs (:mod:`onnx_exact.io.cnn_fusion`: Conv∘Gemm, Conv∘Conv). Value-info entries of every
tensor whose shape changed are dropped (shape inference restores them); edited initializers keep
their name, position and dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_exact.io.channel_constants import emptying
from onnx_exact.io.channel_gather import GatherRequest, insert_gathers, plan_consumers
from onnx_exact.io.channel_plan import Keep, Plan
from onnx_exact.io.channel_stream import Stream, StreamPlanner
from onnx_exact.io.cnn_fusion import FusionResult, fuse_removed_relus
from onnx_exact.io.graph import all_graphs, node_attr


@dataclass
class PruneResult:
    """What :func:`prune_channels` did.

    ``model`` is a new ModelProto (the input is not modified); ``removed`` the channels deleted per
    Relu; ``kept`` the Relus whose proved-dead channels (some or all) stay, with the reason;
    ``removed_relus`` the Relus removed because they are the identity on the box; ``folded``
    the saturated Clip channels deleted (also in ``removed``: their constant went into the
    consumers' biases), ``unfolded`` why a Clip's saturated channels stay; ``fusion`` which
    linear chains joined by a removed Relu became one node (:mod:`onnx_exact.io.cnn_fusion`);
    ``gathered`` the proved-dead channels of a residual stream member that stay in the stream but
    went from the member's consumers through a Gather (:mod:`onnx_exact.io.channel_gather`; the
    member is in ``kept`` too, saying so).
    """

    model: onnx.ModelProto
    removed: dict[str, list[int]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    removed_relus: list[str] = field(default_factory=list)
    folded: dict[str, list[int]] = field(default_factory=dict)
    unfolded: dict[str, str] = field(default_factory=dict)
    fusion: FusionResult = field(default_factory=FusionResult)
    gathered: dict[str, list[int]] = field(default_factory=dict)


def prune_channels(
    model: onnx.ModelProto,
    dead: Mapping[str, Sequence[int]],
    linear: Iterable[str] = (),
    saturated: Mapping[str, tuple[float, Sequence[int]]] | None = None,
) -> PruneResult:
    """Delete the proved-dead channels of ``dead`` and remove the ``linear`` Relus.

    Parameters
    ----------
    model : the original model (not modified).
    dead : Relu node name (or, for an unnamed node, its output tensor name) → channels proved
        dead: the Relu outputs exactly 0 on the whole channel for every input of the box.
    linear : Relus whose every neuron is proved active (the Relu is the identity on the box).
    saturated : Clip node name → ``(c, channels)``: channels proved to output the constant ``c``
        at every position for every input of the box (never all of the Clip's channels together
        with its ``dead`` ones).

    Returns
    -------
    :class:`PruneResult`. On the box, the edited model computes the original's outputs: every
    kept value comes from the same ops and weights, and only terms that multiply exact zeros are
    gone (a runtime may still sum the remaining terms in another order, so float results can
    differ by round-off).

    Raises
    ------
    ValueError : a name that is no Relu of the main graph, a channel out of range, or a Relu
        both in ``dead`` (with channels) and in ``linear`` (programming errors of the caller).
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    pruner = _Pruner(copy)
    linear = list(linear)
    for name in linear:
        if dead.get(name):
            raise ValueError(f"Relu {name!r} cannot be both dead and linear")
    result = PruneResult(copy)
    plans: list[Plan] = []
    streams: dict[tuple[int, ...], Stream] = {}
    gathers: list[GatherRequest] = []
    for name, channels in dead.items():
        index = pruner.relu_index(name)
        channels = sorted({int(c) for c in channels})
        if not channels:
            continue
        try:
            stream = pruner.stream(index)
            if stream.joins:
                streams.setdefault(tuple(stream.members), stream)
                continue
            plan, removed, note = pruner.plan(index, channels)
        except Keep as keep:
            result.kept[name] = str(keep)
            continue
        plans.append(plan)
        result.removed[name] = removed
        if note:
            result.kept[name] = note
    for stream in streams.values():
        _prune_stream(pruner, stream, dead, plans, result, gathers)
    for name, (value, channels) in (saturated or {}).items():
        index = pruner.relu_index(name)
        try:
            if pruner.stream(index).joins:
                raise Keep("its channels are tied to a residual stream")
            plan, removed, _ = pruner.plan(index, sorted({int(c) for c in channels}), value)
        except Keep as keep:
            result.unfolded[name] = str(keep)
            continue
        plans.append(plan)
        result.folded[name] = removed
        result.removed[name] = sorted(set(result.removed.get(name, [])) | set(removed))
    while (dropped := emptying(pruner, plans)) is not None:
        plans[:] = [p for p in plans if p is not dropped[0]]
        _leave_out(pruner, *dropped, result)
    _credit_released(pruner, plans, dead, result)
    pruner.apply(plans)
    joins = {}
    for name in linear:
        index = pruner.relu_index(name)
        if pruner.remove_relu(index):
            result.removed_relus.append(name)
            joins[name] = pruner.nodes[index].input[0]
    pruner.finish()
    insert_gathers(copy, gathers, pruner.taken)
    result.fusion = fuse_removed_relus(copy, joins)
    return result


def _prune_stream(
    pruner: _Pruner,
    stream: Stream,
    dead: Mapping[str, Sequence[int]],
    plans: list[Plan],
    result: PruneResult,
    gathers: list[GatherRequest],
) -> None:
    """Plan the channels dead in every member of a residual stream; record the rest as kept,
    and remove them from the consumers of each member they are proved dead in where that is
    exact (:func:`~onnx_exact.io.channel_gather.plan_consumers`)."""
    names = [pruner.relu_name(m) for m in stream.members]
    proved = {name: {int(c) for c in dead.get(name, ())} for name in names}
    common = sorted(set.intersection(*proved.values()))
    asked = [name for name in names if proved[name]]
    why: dict[str, str] = {}  # why a member's proved-dead channels stay in the stream
    for name in asked:
        partial = sorted(proved[name] - set(common))
        if partial:
            others = ", ".join(n for n in names if n != name)
            why[name] = f"not proved dead in every Relu of its residual stream (with {others})"
            result.kept[name] = f"channels {partial} are {why[name]}"
    removed: list[int] = []
    if common:
        try:
            plan, removed, note = pruner.plan_stream(stream, common)
        except Keep as keep:
            for name in asked:
                result.kept[name] = why[name] = str(keep)
        else:
            plans.append(plan)
            for name in names:
                result.removed[name] = removed
                if note:
                    result.kept[name] = why[name] = note
    for member, name in zip(stream.members, names, strict=True):
        channels = sorted(proved[name] - set(removed))
        if not channels:
            continue
        try:
            plan, request = plan_consumers(pruner, member, channels, removed)
        except Keep as keep:
            result.kept[name] += f"; not removed from its consumers either: {keep}"
            continue
        plans.append(plan)
        gathers.append(request)
        result.gathered[name] = channels
        result.kept[name] = (
            f"channels {channels} removed from its consumers ({', '.join(request.consumers)}) "
            f"through a Gather; kept in the stream's tensors: {why[name]}"
        )


def _leave_out(pruner: _Pruner, plan: Plan, why: str, result: PruneResult) -> None:
    """Take back the record of a Relu's own plan left out by
    :func:`~onnx_exact.io.channel_constants.emptying`: its channels stay, and ``why``."""
    relu, channels, value = plan.owner
    name = pruner.relu_name(relu)
    for record in (result.removed, result.folded) if value else (result.removed,):
        rest = sorted(set(record.get(name, [])) - set(channels))
        if rest:
            record[name] = rest
        else:
            record.pop(name, None)
    (result.unfolded if value else result.kept)[name] = why


def _credit_released(
    pruner: _Pruner, plans: list[Plan], dead: Mapping[str, Sequence[int]], result: PruneResult
) -> None:
    """Channels released upstream of a grouped Conv count as removed from their Relu; a Relu
    kept only because of that Conv is no longer kept once all its dead channels went."""
    released: dict[str, set[int]] = {}
    for plan in plans:
        for index, channels in plan.released.items():
            node = pruner.nodes[index]
            released.setdefault(node.name or node.output[0], set()).update(channels)
    for name, channels in released.items():
        result.removed[name] = sorted(channels | set(result.removed.get(name, [])))
        if name in result.kept and set(dead.get(name, [])) <= channels:
            del result.kept[name]


class _Pruner(StreamPlanner):
    """Plans (see :class:`StreamPlanner`) and applies the edits on ``model`` (a private copy)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model)
        self.removed_nodes: set[int] = set()
        self.reshaped: set[str] = set()
        self.replaced: set[str] = set()
        self.detached: set[str] = set()

    # ------------------------------------------------------------------ applying
    def apply(self, plans: list[Plan]) -> None:
        """Delete the planned slices (in original coordinates, all at once per tensor)."""
        cuts: dict[tuple[int, int], dict[int, set[int]]] = {}
        shifts: dict[tuple[int, int], dict[int, np.ndarray]] = {}
        for plan in plans:
            for index, slot, axis, idx in plan.cuts:
                cuts.setdefault((index, slot), {}).setdefault(axis, set()).update(idx.tolist())
            # in original coordinates, before the cuts; one per removed input channel, so two
            # plans folding the same channel's constant (it is the same value) add it once
            for index, slot, channel, delta in plan.shifts:
                shifts.setdefault((index, slot), {})[channel] = delta
                cuts.setdefault((index, slot), {})
            self.reshaped |= plan.reshaped
        for (index, slot), axes in cuts.items():
            value = self.constants.value(self.nodes[index].input[slot])
            if (index, slot) in shifts:
                delta = sum(shifts[index, slot].values())
                shifted = value.astype(np.float64) + delta.reshape(value.shape)
                value = shifted.astype(value.dtype)
            for axis, idx in axes.items():
                value = np.delete(value, sorted(idx), axis=axis)
            self._store(index, slot, value)
        groups: dict[int, set[int]] = {}
        for plan in plans:
            for core, removed in plan.groups.items():
                groups.setdefault(core, set()).update(removed)
        for core, removed in groups.items():
            node = self.nodes[core]
            _set_group(node, node_attr(node, "group", 1) - len(removed))
        targets: dict[int, dict[int, set[int]]] = {}  # two plans may shrink one Reshape target
        for plan in plans:
            for index, entry, removed in plan.targets:
                targets.setdefault(index, {}).setdefault(entry, set()).update(removed.tolist())
        for index, entries in targets.items():
            target = self.constants.value(self.nodes[index].input[1]).reshape(-1).copy()
            for entry, removed in entries.items():
                target[entry] -= len(removed)
            self._store(index, 1, target)

    def _store(self, index: int, slot: int, value: np.ndarray) -> None:
        """Give input ``slot`` of node ``index`` the value ``value`` (its dtype kept): in place for
        an initializer only this node reads, else under a fresh initializer name."""
        node = self.nodes[index]
        name = node.input[slot]
        tensor = self.initializers.get(name)
        if tensor is not None and self.read_count.get(name, 0) == 1 and name not in self.outputs:
            doc = tensor.doc_string
            tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
            tensor.doc_string = doc
            self.replaced.add(name)
            return
        fresh, counter = f"{name}_pruned", 0
        while fresh in self.taken:
            counter += 1
            fresh = f"{name}_pruned_{counter}"
        self.taken.add(fresh)
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), fresh))
        node.input[slot] = fresh
        self.detached.add(name)

    def remove_relu(self, index: int) -> bool:
        """Remove Relu ``index`` (the identity on the box): readers read its input instead; a
        graph output it produced is produced by its input's producer. False if it must stay."""
        node = self.nodes[index]
        source, out = node.input[0], node.output[0]
        in_subgraph = self.read_count.get(out, 0) != len(self.consumers.get(out, []))
        if in_subgraph:
            return False
        if out in self.outputs:
            producer = self.producer.get(source)
            if producer is None or source in self.outputs or self.read_count.get(source, 0) != 1:
                return False
            outputs = self.nodes[producer].output
            outputs[list(outputs).index(source)] = out
            self.reshaped.add(source)
        else:
            for reader, slot in self.consumers.get(out, []):
                self.nodes[reader].input[slot] = source
        self.removed_nodes.add(index)
        self.reshaped.add(out)
        self.detached.update(name for name in node.input[1:] if name)  # a Clip's bounds
        return True

    def finish(self) -> None:
        """Drop the removed nodes, the constants only the edited nodes read, stale value-info;
        keep the initializer declarations of graph inputs (IR < 4) in step with the initializers."""
        keep = [n for i, n in enumerate(self.nodes) if i not in self.removed_nodes]
        removed = {id(self.nodes[i]) for i in self.removed_nodes}
        read = self.outputs | {
            x
            for sub in all_graphs(self.graph)
            for n in sub.node
            if id(n) not in removed
            for x in n.input
        }
        orphans = self.detached - read
        keep = [n for n in keep if not (n.op_type == "Constant" and set(n.output) <= orphans)]
        del self.graph.node[:]
        self.graph.node.extend(keep)
        for tensor in [t for t in self.graph.initializer if t.name in orphans]:
            self.graph.initializer.remove(tensor)
        # value_info of a reshaped tensor or of an initializer pruned in place (the dynamo
        # exporter declares every initializer's shape there) would contradict the new shapes
        stale = self.reshaped | self.replaced
        for entry in [v for v in self.graph.value_info if v.name in stale]:
            self.graph.value_info.remove(entry)
        current = {t.name: t for t in self.graph.initializer}
        inputs = []
        for entry in self.graph.input:
            if entry.name in self.replaced:
                tensor = current[entry.name]
                entry = helper.make_tensor_value_info(entry.name, tensor.data_type, tensor.dims)
            if entry.name not in orphans:
                inputs.append(entry)
        if self.model.ir_version < 4:  # every initializer must be declared as a graph input
            names = {i.name for i in inputs}
            inputs += [
                helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                for t in self.graph.initializer
                if t.name not in names
            ]
        del self.graph.input[:]
        self.graph.input.extend(inputs)


def _set_group(node: onnx.NodeProto, group: int) -> None:
    for attribute in node.attribute:
        if attribute.name == "group":
            attribute.i = group
