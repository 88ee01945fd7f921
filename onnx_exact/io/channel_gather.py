"""Channels dead in one member of a residual stream, removed from that member's consumers.

A channel ``c`` of a Relu ``R`` in a residual stream (:mod:`onnx_exact.io.channel_stream`)
stays in the stream's tensors unless it is proved dead in every member: a join adds ``R`` to a
value that may be non-zero at ``c``. Yet ``R[:, C]`` itself is exactly 0 for every input of the
box when the channels ``C`` are proved dead in ``R``, so every reader of ``R``'s output other
than the residual joins (the next block's first Conv, a projection Conv, a Flatten → Gemm) can
drop those input channels::

    conv(R) = conv_without_C(Gather(R, kept, axis=1))

exactly: only terms that multiply exact zeros are gone. :func:`plan_consumers` plans it with
the downstream planning of :class:`~onnx_exact.io.channel_plan.ChannelPlanner` started at
those readers (the same cuts, Reshape targets and refusals as for a channel removed whole: a
grouped Conv loses only whole input groups whose outputs have no bias, anything else keeps), and
:func:`insert_gathers` writes the ``Gather(axis=1)`` nodes: one per such reader, all reading one
int64 index initializer of the kept channels. One per reader rather than one shared, so that a
fork (a projection shortcut beside the next block's branch) stays right at the Relu's output,
where the CNN reader carries the skip's source as plain selection rows.

The joins, and the Identity/Dropout skips that lead only to joins, keep reading the full tensor.
The edit is made only when the float weights it deletes outnumber the index entries it adds
(onnxsim's parameter count leaves integer tensors out; this rule counts them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_exact.io.channel_plan import ACTIVATION_OPS, Flow, Keep, Plan
from onnx_exact.io.channel_stream import SKIP_PASS_OPS, StreamPlanner


@dataclass
class GatherRequest:
    """A Gather to write after the cuts: Relu output ``tensor`` read through ``Gather(axis=1,
    kept)`` by each reader in ``readers`` (reader's first output, input slot); ``kept`` in the
    coordinates of ``tensor`` once the stream's own cuts are applied; ``channels`` the channels
    removed from the readers (original coordinates), ``consumers`` their labels."""

    tensor: str
    readers: list[tuple[str, int]]
    kept: np.ndarray
    channels: list[int]
    consumers: list[str]


def plan_consumers(
    planner: StreamPlanner, relu: int, channels: list[int], stream_removed: list[int]
) -> tuple[Plan, GatherRequest]:
    """The edits that remove the dead ``channels`` of stream member ``relu`` from its consumers.

    ``stream_removed``: the channels the stream's own plan deletes from every tensor of the
    stream (they are already gone from the consumers; ``channels`` must not hold them). Raises
    :class:`Keep` when the consumers cannot drop the channels soundly or it would not pay.
    """
    node = planner.nodes[relu]
    out = node.output[0]
    shape = planner.sample_shape(out)
    if shape is None:
        raise Keep(f"the shape of '{out}' is unknown")
    readers = planner.consumers.get(out, [])
    if planner.read_count.get(out, 0) != len(readers):
        raise Keep(f"'{out}' is read inside a subgraph")
    consumers = [(i, s) for i, s in readers if not _joins_only(planner, i)]
    if not consumers:
        raise Keep("only residual joins read it")
    plan = Plan()
    flow = Flow(out, shape, 0, np.asarray(channels, np.int64))
    for index, slot in consumers:
        if planner.nodes[index].op_type in ACTIVATION_OPS:  # the pruner may remove it
            raise Keep(f"{planner.label(index)} reads it")
        follow = planner._reader(index, slot, flow, plan)
        if follow is not None:
            planner._downstream(follow, plan)
    if stream_removed and plan.targets:
        raise Keep("a Reshape after it would have to follow the stream's removed channels too")
    gone = set(channels) | set(stream_removed)
    remaining = [c for c in range(shape[0]) if c not in set(stream_removed)]
    kept = np.asarray([i for i, c in enumerate(remaining) if c not in gone], np.int64)
    if kept.size == 0:
        raise Keep("no channel would be left for its consumers")
    weights = sum(_cut_entries(planner, cut) for cut in plan.cuts)
    if weights <= kept.size:
        raise Keep(f"its consumers would lose {weights} weights for {kept.size} index entries")
    labels = [planner.label(i) for i, _ in consumers]
    request = GatherRequest(
        out, [(planner.nodes[i].output[0], s) for i, s in consumers], kept, channels, labels
    )
    return plan, request


def _joins_only(planner: StreamPlanner, index: int) -> bool:
    """Whether reader ``index`` is a residual join, or an Identity/Dropout skip read by joins
    only (through more of them): it needs the full tensor and is left alone."""
    if planner.is_join(index):
        return True
    node = planner.nodes[index]
    if node.op_type not in SKIP_PASS_OPS or node.domain not in ("", "ai.onnx"):
        return False
    out = node.output[0]
    readers = planner.consumers.get(out, [])
    if out in planner.outputs or not readers:
        return False
    return all(_joins_only(planner, i) for i, _ in readers)


def _cut_entries(planner: StreamPlanner, cut: tuple[int, int, int, np.ndarray]) -> int:
    """How many entries cut ``(node, slot, axis, indices)`` deletes from its constant."""
    index, slot, axis, idx = cut
    value = planner.constants.value(planner.nodes[index].input[slot])
    if value is None or value.ndim == 0:
        return 0
    return int(value.size // max(value.shape[axis], 1) * np.unique(idx).size)


def insert_gathers(model: onnx.ModelProto, requests: list[GatherRequest], taken: set[str]) -> None:
    """Write the Gathers of ``requests`` into ``model`` (after the pruner's cuts and clean-up):
    each right after the node computing its tensor, so the graph stays topologically sorted.
    ``taken``: names in use (node, tensor, initializer names); the new ones are added to it."""
    graph = model.graph
    for request in requests:
        position = next(
            i for i, node in enumerate(graph.node) if request.tensor in list(node.output)
        )
        indices = _fresh(f"{request.tensor}_kept_channels", taken)
        graph.initializer.append(numpy_helper.from_array(request.kept, indices))
        if model.ir_version < 4:  # every initializer must be declared as a graph input
            shape = [request.kept.size]
            graph.input.append(helper.make_tensor_value_info(indices, TensorProto.INT64, shape))
        by_output = {node.output[0]: node for node in graph.node if node.output}
        gathers = []
        for reader, slot in request.readers:
            output = _fresh(f"{request.tensor}_kept", taken)
            gathers.append(
                helper.make_node(
                    "Gather",
                    [request.tensor, indices],
                    [output],
                    name=_fresh(f"{output}_gather", taken),
                    axis=1,
                )
            )
            by_output[reader].input[slot] = output
        for offset, gather in enumerate(gathers, start=1):
            graph.node.insert(position + offset, gather)


def _fresh(name: str, taken: set[str]) -> str:
    fresh, counter = name, 0
    while fresh in taken:
        counter += 1
        fresh = f"{name}_{counter}"
    taken.add(fresh)
    return fresh
