"""Residual streams: the channels shared by the Relus that identity skips tie together.

In a ResNet the output of a block's Relu is added, unchanged, to the next block's branch::

    R_7 = relu(conv2(...) + proj(R_1))        R_12 = relu(conv2'(... R_7 ...) + R_7)

so channel ``c`` of ``R_7`` and of ``R_12`` live in one *stream*: the Add forces them to have
the same channels. :meth:`StreamPlanner.stream` finds the stream of a Relu: the Relus reached
through the residual joins (``Add``/``Sum`` of two computed tensors) above and below it, where
a join's operand is either a member's output (through Identity/Dropout: the identity skip) or a
per-channel chain from a Conv/Gemm/MatMul (the branch's last conv, a projection shortcut); the
ops between a join and its Relu are per-channel (BatchNormalization, Add/Sub/Mul/Div by a
constant, Identity, Dropout).

Channel ``c`` can be removed from a stream iff it is proved dead in **every** member (the caller
intersects the proofs). Then every tensor of the stream is 0 at ``c``: each member outputs 0
there (proved), and a join's output at ``c`` is only read by its member's Relu. The plan
(:meth:`StreamPlanner.plan_stream`) deletes output channel ``c`` of every producer chain feeding
a join or a member (filters, biases, BN entries), the per-channel constants between a join and
its Relu, and input channel ``c`` of every consumer of a member's output (the next Conv or
projection, the Gemm columns behind a Flatten), exactly as for one Relu; the joins themselves
have no constants and just add narrower tensors. Every kept value is computed by the same ops
and weights; only exact zeros (and values added only into deleted channels) are gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnx_exact.io.channel_plan import (
    AFFINE_OPS,
    CORE_OPS,
    POOL_OPS,
    ChannelPlanner,
    Flow,
    Keep,
    Plan,
)
from onnx_exact.io.graph import node_attr

JOIN_OPS = {"Add", "Sum"}
"""Ops that join two computed tensors in a residual block."""

SKIP_PASS_OPS = {"Identity", "Dropout"}
"""Ops allowed between a member's output and a join (the identity skip)."""


@dataclass
class Stream:
    """A residual stream: ``members`` (Relu node indices, graph order), ``joins`` (join node
    index → the per-channel nodes between it and its Relu), ``producers`` (per-channel chains
    and their cores that feed a join or a member)."""

    members: list[int]
    joins: dict[int, list[int]] = field(default_factory=dict)
    producers: list[tuple[list[int], int]] = field(default_factory=list)


class StreamPlanner(ChannelPlanner):
    """:class:`ChannelPlanner` that also finds and plans residual streams."""

    def relu_name(self, index: int) -> str:
        node = self.nodes[index]
        return node.name or node.output[0]

    def is_join(self, index: int) -> bool:
        node = self.nodes[index]
        computed = [n for n in node.input if n and self.constants.value(n) is None]
        return node.op_type in JOIN_OPS and node.domain in ("", "ai.onnx") and len(computed) == 2

    # ------------------------------------------------------------------ finding
    def stream(self, relu: int) -> Stream:
        """The stream of Relu ``relu`` (one member and no join for a Relu off any join)."""
        members, queue = {relu}, [relu]
        stream = Stream([])
        while queue:
            member = queue.pop()
            links, end = self._links(self.nodes[member].input[0])
            if self.is_join(end):
                if end not in stream.joins:
                    stream.joins[end] = links
                    for operand in self.nodes[end].input:
                        found = self._operand(operand, stream)
                        if found is not None and found not in members:
                            members.add(found)
                            queue.append(found)
            else:
                stream.producers.append((links, end))
            for join in self._joins_below(self.nodes[member].output[0]):
                found = self._relu_below(join)
                if found not in members:
                    members.add(found)
                    queue.append(found)
        stream.members = sorted(members)
        return stream

    def _links(self, tensor: str) -> tuple[list[int], int]:
        """The per-channel nodes computing ``tensor`` (its side first) and the core or join
        they start at (pools included: ``Conv → MaxPool → Relu``)."""
        return self.walk_chain(
            tensor,
            SKIP_PASS_OPS | {"Transpose"} | POOL_OPS,
            lambda index: self.nodes[index].op_type in CORE_OPS or self.is_join(index),
            "a Conv, Gemm, MatMul or residual Add",
        )

    def _operand(self, tensor: str, stream: Stream) -> int | None:
        """A join operand: the member Relu it passes on unchanged, or None after recording the
        producer chain that computes it."""
        source = tensor
        while True:
            index = self.producer.get(source)
            node = None if index is None else self.nodes[index]
            if node is None or node.op_type not in SKIP_PASS_OPS | {"Relu"}:
                break
            if node.op_type == "Relu":
                return index
            self.single_reader(source, "the skip tensor")
            source = node.input[0]
        chain, core = self._chain(tensor, release=False)
        stream.producers.append((chain, core))
        return None

    def _joins_below(self, tensor: str) -> list[int]:
        """The joins reading ``tensor`` directly or through Identity/Dropout."""
        joins, stack = [], [tensor]
        while stack:
            current = stack.pop()
            for index, _ in self.consumers.get(current, []):
                node = self.nodes[index]
                if self.is_join(index):
                    joins.append(index)
                elif node.op_type in SKIP_PASS_OPS and node.domain in ("", "ai.onnx"):
                    stack.append(node.output[0])
        return joins

    def _relu_below(self, join: int) -> int:
        """The Relu a join feeds through per-channel nodes (its stream's member)."""
        tensor = self.nodes[join].output[0]
        while True:
            if tensor in self.outputs or len(self.consumers.get(tensor, [])) != 1:
                raise Keep(f"the output of the residual {self.label(join)} is read by no one Relu")
            index = self.consumers[tensor][0][0]
            node = self.nodes[index]
            op = node.op_type
            if op == "Relu" and node.domain in ("", "ai.onnx"):
                return index
            constants = sum(self.constants.value(n) is not None for n in node.input[:2])
            per_channel = (
                (op in AFFINE_OPS and constants == 1)
                or (op == "BatchNormalization" and not node_attr(node, "training_mode", 0))
                or op in SKIP_PASS_OPS
            )
            if not per_channel or node.domain not in ("", "ai.onnx"):
                raise Keep(f"{self.label(index)} follows the residual {self.label(join)}")
            tensor = node.output[0]

    # ------------------------------------------------------------------ planning
    def plan_stream(self, stream: Stream, dead: list[int]) -> tuple[Plan, list[int], str]:
        """The edits that delete channels ``dead`` from every tensor of ``stream``.

        Raises ``Keep`` when they cannot be deleted soundly.
        """
        plan = Plan()
        counts = {self._core_channels(core) for _, core in stream.producers}
        if len(counts) != 1:
            raise Keep("the stream's producers disagree on the number of channels")
        channels = counts.pop()
        if dead[-1] >= channels:
            raise ValueError(f"channel {dead[-1]} out of range: the stream has {channels}")
        note = ""
        if len(dead) == channels:
            note = (
                f"all {channels} channels are dead; channel {dead[0]} stays so no tensor is empty"
            )
            dead = dead[1:]
            if not dead:
                raise Keep(note)
        for chain, core in stream.producers:
            if self._cut_chain(chain, core, dead, plan) != 1:
                raise Keep(f"the channels of {self.label(core)} do not reach the Add on axis 1")
        for join, links in stream.joins.items():
            node = self.nodes[join]
            rank = len(self.shapes.get(node.output[0]) or ())
            if rank < 2 or any(self.shapes.get(name) != self.shapes[node.output[0]]
                               for name in node.input):  # fmt: skip
                raise Keep(f"{self.label(join)} broadcasts or has unknown shapes")
            plan.reshaped.update(node.input)
            plan.reshaped.add(node.output[0])
            for index in links:
                if self._chain_cuts(index, plan, 1, rank, channels, dead) != 1:
                    raise Keep(f"{self.label(index)} moves the channel axis after a residual Add")
                plan.reshaped.add(self.nodes[index].output[0])
        self.absorbed = set(stream.joins)
        try:
            for member in stream.members:
                out = self.nodes[member].output[0]
                shape = self.sample_shape(out)
                if shape is None or shape[0] != channels:
                    raise Keep(f"'{out}' does not have its {channels} channels on axis 1")
                self._downstream(Flow(out, shape, 0, np.asarray(dead, np.int64)), plan)
        finally:
            self.absorbed = set()
        return plan, dead, note
