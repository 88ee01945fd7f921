"""Fusing the linear ops that a removed identity ReLU leaves joined, where that lowers the MACs.

A Relu proved the identity on the box (every neuron active) is removed by
:mod:`onnx_exact.io.channel_pruning`; the ops on both sides of it then form one affine map. This
module composes two such chains into one node when the composition is exact and executes fewer
multiply-adds (counted as onnxsim counts them, :mod:`onnx_exact.io.model_stats`), and leaves them
alone otherwise:

* **Conv∘Gemm**: ``Conv → [BatchNormalization | Add/Sub/Mul/Div by a constant | Identity]* →
  (removed Relu) → [Identity | Dropout | Pad | AveragePool | GlobalAveragePool | Transpose]* →
  Flatten | Reshape → [Identity | Dropout]* → Gemm | MatMul [→ Add of a constant]`` becomes
  ``Flatten | Reshape → Gemm | MatMul [→ Add]`` on the Conv's input ``x``: one dense map
  ``W x + b`` with ``W`` of ``out × n_in`` (``n_in`` the features of ``x``). Fused when
  ``n_in · out`` is below the chain's Conv and Gemm MACs.
* **Conv∘Conv**: ``Conv1 → [per-channel affine ops]* → (removed Relu) → [Identity | Dropout]* →
  Conv2`` with Conv2 unpadded, ungrouped and undilated and Conv1 undilated becomes one Conv on
  Conv1's input: kernel ``s1·(k2 − 1) + k1``, stride ``s1·s2``, Conv1's begin pads (the end pads
  what the last output reads, never more than Conv1's), group 1. Fused when its MACs are below
  the two Convs' together.

Conv2's padding (an explicit ``Pad`` between the two included) breaks the exactness: a padded
tap of Conv2 reads a 0, where the fused Conv would read Conv1's value at a position outside
Conv1's output grid, which is Conv1's bias (the BN shift) plus the real input pixels near the
border that tap reaches — the bias leaks into the border outputs. Such chains are kept unfused
(``unfused`` names the reason, nothing is reported to the user: nothing was lost).

The composed map is computed exactly in float64 by the CNN reader itself
(:func:`onnx_exact.io.cnn_reader.read_cnn` on a model holding only the chain), from the stored
weights, so the fused node means what the reader means by the chain; a chain too large for its
dense matrix (:data:`onnx_exact.io.affine_chain.MAX_DENSE_ENTRIES`) stays unfused. A Conv∘Conv
composition is read back as a kernel (the weight of each tap, gathered at the output positions
where that tap reads the input) and accepted only when that kernel's convolution matrix gives
the composed matrix back within float64 round-off (``STRUCTURE_RTOL``) and the bias is one value
per channel: a per-position constant between the two Convs makes the map no convolution, and
it stays unfused. The fused weights are stored in the model's float type (one rounding of the
float64 composition).

Never fused: across a tensor with another reader (fan-out, also in a subgraph) or that is a
graph output, across an op not listed, when a shape or a float type is unknown or the float
types differ, a Gemm with ``transA`` or a MatMul whose weight is the left operand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_exact.core.errors import OnnxExactError
from onnx_exact.core.operators import ConvOperator, resolve_auto_pad
from onnx_exact.io import affine_chain
from onnx_exact.io.affine_chain import conv_matrix
from onnx_exact.io.channel_plan import inferred_shapes
from onnx_exact.io.cnn_reader import read_cnn
from onnx_exact.io.graph import (
    FLOAT_TYPES,
    ConstantResolver,
    all_graphs,
    node_attr,
    node_label,
    read_counts,
    reader_slots,
)
from onnx_exact.io.model_stats import model_stats

STRUCTURE_RTOL = 1e-9
"""How close (relative to the largest entry) the convolution matrix of the read-back kernel
must be to the composed matrix for a Conv∘Conv fusion: float64 round-off of the composition is
~1e-16, a map that is no convolution differs by its own scale."""

UPSTREAM_OPS = frozenset({"BatchNormalization", "Add", "Sub", "Mul", "Div", "Identity", "Dropout"})
"""Ops between the first Conv and the removed Relu (one data input, the rest constants)."""

PASS_OPS = frozenset({"Identity", "Dropout"})
SPATIAL_OPS = frozenset({"Pad", "AveragePool", "GlobalAveragePool", "Transpose"})
"""Linear ops allowed between the removed Relu and the Flatten/Reshape of a Conv∘Gemm chain."""


class Unfused(Exception):
    """The chain is kept as it is; the message says why."""


@dataclass(frozen=True)
class Fusion:
    """One fused chain: ``removed`` node labels, ``into`` the node computing the composition,
    ``kind`` ``"Conv∘Gemm"``, ``"Conv∘MatMul"`` or ``"Conv∘Conv"``, and the chain's MACs."""

    kind: str
    removed: tuple[str, ...]
    into: str
    macs_before: int
    macs_after: int

    def describe(self) -> str:
        """The report's note, e.g. ``Conv 'c1' fused into Gemm 'fc' (Conv∘Gemm, MACs a -> b)``."""
        return (
            f"{', '.join(self.removed)} fused into {self.into} ({self.kind}, MACs "
            f"{self.macs_before} -> {self.macs_after})"
        )


@dataclass
class FusionResult:
    """Per removed Relu: its :class:`Fusion`, or why its neighbours stayed separate."""

    fused: dict[str, Fusion] = field(default_factory=dict)
    unfused: dict[str, str] = field(default_factory=dict)


def fuse_removed_relus(model: onnx.ModelProto, joins: Mapping[str, str]) -> FusionResult:
    """Fuse, in place, the linear chains joined at the tensors of removed identity Relus.

    Parameters
    ----------
    model : the edited model (modified in place), the Relus already removed.
    joins : removed Relu name → the tensor it read, which its readers now read.

    Returns
    -------
    :class:`FusionResult`. Every fusion replaces a chain by one node computing the same affine
    map (exact in float64, rounded once to the model's float type) with fewer MACs.
    """
    result = FusionResult()
    for name, tensor in joins.items():
        try:
            result.fused[name] = _Fuser(model).fuse(tensor)
        except Unfused as why:
            result.unfused[name] = str(why)
    return result


class _Fuser:
    """An index of the main graph and one fusion on it."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.nodes = self.graph.node
        self.constants = ConstantResolver(self.graph)
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.readers = {
            name: [index for index, _ in slots] for name, slots in reader_slots(self.graph).items()
        }
        self.read_count = read_counts(self.graph)
        self.outputs = {o.name for o in self.graph.output}
        self.taken = (
            set(self.producer)
            | {t.name for t in self.graph.initializer}
            | {i.name for i in self.graph.input}
        )
        self.detached: set[str] = set()
        self.after: dict[int, onnx.NodeProto] = {}  # node index → the node inserted after it

    # ------------------------------------------------------------------ the chain
    def label(self, index: int) -> str:
        return node_label(index, self.nodes[index])

    def short(self, index: int) -> str:
        """``Op 'name'`` (a nameless node by its output) for the report."""
        node = self.nodes[index]
        return f"{node.op_type} '{node.name or node.output[0]}'"

    def reader(self, tensor: str) -> int:
        """The one node reading ``tensor`` inside a chain (no fan-out, no graph output)."""
        if tensor in self.outputs:
            raise Unfused(f"'{tensor}' is a graph output")
        readers = self.readers.get(tensor, [])
        if self.read_count.get(tensor, 0) != 1 or len(readers) != 1:
            raise Unfused(f"'{tensor}' has {self.read_count.get(tensor, 0)} readers")
        index = readers[0]
        if self.nodes[index].domain not in ("", "ai.onnx"):
            raise Unfused(f"{self.label(index)} is not a standard ONNX op")
        return index

    def data_input(self, index: int) -> str:
        """The one non-constant input of node ``index``."""
        data = [x for x in self.nodes[index].input if x and self.constants.value(x) is None]
        if len(data) != 1:
            raise Unfused(f"{self.label(index)} has {len(data)} computed inputs")
        return data[0]

    def upstream(self, tensor: str) -> list[int]:
        """The nodes from the Conv to ``tensor``'s producer, in graph order."""
        chain: list[int] = []
        while True:
            index = self.producer.get(tensor)
            if index is None:
                raise Unfused(f"'{tensor}' is no node's output")
            node = self.nodes[index]
            if node.domain not in ("", "ai.onnx"):
                raise Unfused(f"{self.label(index)} is not a standard ONNX op")
            chain.append(index)
            if node.op_type == "Conv":
                return chain[::-1]
            if node.op_type not in UPSTREAM_OPS:
                raise Unfused(f"{self.label(index)} ({node.op_type}) is not a per-channel op")
            tensor = self.data_input(index)
            self.reader(tensor)

    def fuse(self, tensor: str) -> Fusion:
        index = self.reader(tensor)
        up = self.upstream(tensor)
        down = []
        while self.nodes[index].op_type in PASS_OPS:
            down.append(index)
            index = self.reader(self.nodes[index].output[0])
        if self.nodes[index].op_type == "Conv":
            return self.fuse_convs(up, down, index)
        return self.fuse_dense(up, down, index)

    # ------------------------------------------------------------------ composing
    def sample_shape(self, tensor: str, shapes: dict[str, tuple]) -> tuple[tuple, tuple[int, ...]]:
        shape = shapes.get(tensor)
        if shape is None or len(shape) < 2 or any(d is None or d <= 0 for d in shape[1:]):
            raise Unfused(f"the shape of '{tensor}' is unknown")
        return shape, tuple(int(d) for d in shape[1:])

    def compose(self, chain: list[int], source: str, end: str, shape: tuple) -> tuple:
        """``(W, b, dtype)``: the chain's affine map from ``source`` (flattened) to ``end``,
        composed by the CNN reader in float64 on a model holding only the chain."""
        inputs = {x for i in chain for x in self.nodes[i].input if x}
        constants, dtypes = [], set()
        for name in sorted(inputs - {source} - {o for i in chain for o in self.nodes[i].output}):
            value = self.constants.value(name)
            if value is None:
                raise Unfused(f"'{name}' is computed at run time")
            if value.dtype.kind == "f":
                dtypes.add(value.dtype)
            constants.append(numpy_helper.from_array(value, name))
        if len(dtypes) != 1:
            raise Unfused(f"the chain's float types are {sorted(map(str, dtypes)) or 'unknown'}")
        dtype = dtypes.pop()
        elem = {v: k for k, v in FLOAT_TYPES.items()}.get(dtype)
        if elem is None:
            raise Unfused(f"float type {dtype} is not supported")
        batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else "batch"
        graph = helper.make_graph(
            [self.nodes[i] for i in chain],
            "chain",
            [helper.make_tensor_value_info(source, elem, [batch, *shape[1:]])],
            [helper.make_tensor_value_info(end, elem, None)],
            constants,
        )
        sub = helper.make_model(graph, opset_imports=self.model.opset_import)
        sub.ir_version = max(self.model.ir_version, 4)
        try:
            network = read_cnn(sub, "the fused chain").network
        except OnnxExactError as exc:
            raise Unfused(str(exc)) from None
        if len(network.layers) != 1 or network.layers[0].relu or network.output_name != end:
            raise Unfused("the chain does not read as one affine map")
        layer = network.layers[0]
        if not layer.is_sparse:
            return layer.weight, layer.bias, dtype
        if layer.out_features * layer.in_features > affine_chain.MAX_DENSE_ENTRIES:
            raise Unfused("the fused map is too large to be written as a dense weight")
        return layer.weight.toarray(), layer.bias, dtype

    def macs(self, chain: list[int]) -> int:
        stats = model_stats(self.model)
        cores = [i for i in chain if self.nodes[i].op_type in ("Conv", "Gemm", "MatMul")]
        counted = [stats.nodes[i].macs for i in cores]
        if not all(counted):
            raise Unfused("a MAC count of the chain is unknown")
        return sum(counted)

    # ------------------------------------------------------------------ Conv∘Gemm
    def fuse_dense(self, up: list[int], passed: list[int], index: int) -> Fusion:
        """``Conv … → (Relu) → [spatial ops] → Flatten/Reshape → Gemm/MatMul [→ Add]``."""
        down = list(passed)
        while self.nodes[index].op_type in PASS_OPS | SPATIAL_OPS:
            down.append(index)
            index = self.reader(self.nodes[index].output[0])
        flatten = index
        if self.nodes[flatten].op_type not in ("Flatten", "Reshape"):
            raise Unfused(f"{self.label(flatten)} ({self.nodes[flatten].op_type}) is not fused")
        index = self.reader(self.nodes[flatten].output[0])
        between = []
        while self.nodes[index].op_type in PASS_OPS:
            between.append(index)
            index = self.reader(self.nodes[index].output[0])
        core, node = index, self.nodes[index]
        if node.op_type not in ("Gemm", "MatMul"):
            raise Unfused(f"{self.label(core)} ({node.op_type}) is not fused")
        data = self.nodes[between[-1]].output[0] if between else self.nodes[flatten].output[0]
        if node.input[0] != data or self.constants.value(node.input[1]) is None:
            raise Unfused(f"{self.label(core)} does not multiply the activation by a constant")
        if node.op_type == "Gemm" and node_attr(node, "transA", 0):
            raise Unfused(f"{self.label(core)} has transA=1")
        add = None
        end = node.output[0]
        if node.op_type == "MatMul" and end not in self.outputs:
            readers = self.readers.get(end, [])
            if self.read_count.get(end, 0) == 1 and len(readers) == 1:
                candidate = self.nodes[readers[0]]
                others = [x for x in candidate.input if x != end]
                if (
                    candidate.op_type == "Add"
                    and len(candidate.input) == 2
                    and len(others) == 1
                    and self.constants.value(others[0]) is not None
                ):
                    add, end = readers[0], candidate.output[0]
        chain = sorted([*up, *down, flatten, *between, core] + ([add] if add is not None else []))
        source = self.nodes[up[0]].input[0]
        shapes = inferred_shapes(self.model)
        shape, sample = self.sample_shape(source, shapes)
        weight, bias, dtype = self.compose(chain, source, end, shape)
        n_in, n_out = math.prod(sample), weight.shape[0]
        before, after = self.macs(chain), n_in * n_out
        if after >= before:
            raise Unfused(f"fusing would not lower the MACs ({before} -> {after})")
        removed, into = tuple(self.short(i) for i in [*up, *down]), self.short(core)
        self.retarget_flatten(flatten, source, n_in)
        if node.op_type == "Gemm":
            stored = weight if node_attr(node, "transB", 0) else weight.T
            self.set_input(core, 1, stored.astype(dtype))
            old = (
                self.constants.value(node.input[2])
                if len(node.input) > 2 and node.input[2]
                else None
            )
            self.set_input(core, 2, self.like(bias, old).astype(dtype))
            for attribute in node.attribute:
                if attribute.name in ("alpha", "beta"):
                    attribute.f = 1.0
        else:
            self.set_input(core, 1, weight.T.astype(dtype))
            if add is not None:
                slot = 1 if self.nodes[add].input[0] == node.output[0] else 0
                old = self.constants.value(self.nodes[add].input[slot])
                self.set_input(add, slot, self.like(bias, old).astype(dtype))
            elif np.any(bias):
                self.append_bias(core, bias.astype(dtype))
        gone = [*up, *down]
        self.remove(gone, [self.nodes[i].output[0] for i in [*gone, flatten, *between]])
        return Fusion(f"Conv∘{node.op_type}", removed, into, before, after)

    def retarget_flatten(self, index: int, source: str, n_in: int) -> None:
        """The Flatten/Reshape reads ``source`` and gives ``[batch, n_in]``."""
        node = self.nodes[index]
        if node.op_type == "Flatten":
            for attribute in node.attribute:
                if attribute.name == "axis":
                    attribute.i = 1
        else:
            target = self.constants.value(node.input[1])
            allowzero = node_attr(node, "allowzero", 0)
            if target is None or target.size != 2 or (allowzero and 0 in target):
                raise Unfused(f"{self.label(index)}: its target shape is not [batch, features]")
            first = int(target.reshape(-1)[0])
            rest = -1 if first != -1 else n_in
            self.set_input(index, 1, np.array([first, rest], dtype=target.dtype))
        node.input[0] = source

    # ------------------------------------------------------------------ Conv∘Conv
    def fuse_convs(self, up: list[int], passed: list[int], index: int) -> Fusion:
        """``Conv1 … → (Relu) → Conv2`` with Conv2 unpadded, group 1, dilation 1."""
        conv1, conv2 = self.nodes[up[0]], self.nodes[index]
        shapes = inferred_shapes(self.model)
        source = conv1.input[0]
        shape, sample = self.sample_shape(source, shapes)
        _, middle = self.sample_shape(conv1.output[0], shapes)
        _, out = self.sample_shape(conv2.output[0], shapes)
        spatial, d = sample[1:], len(sample) - 1
        k1, s1, p1 = self.window(up[0], spatial)
        k2, s2, p2 = self.window(index, middle[1:])
        if any(p2):
            raise Unfused(f"{self.label(index)} pads its input: its zeros are not Conv1's")
        if node_attr(conv2, "group", 1) != 1:
            raise Unfused(f"{self.label(index)} is grouped")
        kernel = tuple(s1[i] * (k2[i] - 1) + k1[i] for i in range(d))
        stride = tuple(s1[i] * s2[i] for i in range(d))
        end = tuple(stride[i] * (out[1 + i] - 1) + kernel[i] - p1[i] - spatial[i] for i in range(d))
        pads = (*p1[:d], *(max(e, 0) for e in end))
        chain = sorted([*up, *passed, index])
        weight, bias, dtype = self.compose(chain, source, conv2.output[0], shape)
        fused = self.read_kernel(weight, sample, out, kernel, stride, pads)
        if fused.output_shape != out:
            raise Unfused("the fused Conv's output shape differs")
        scale = max(float(np.abs(weight).max()), np.finfo(np.float64).tiny)
        if np.abs(conv_matrix(fused) - weight).max() > STRUCTURE_RTOL * scale:
            raise Unfused("the composition is no convolution (a per-position op between)")
        per_channel = bias.reshape(out[0], -1)
        spread = np.abs(per_channel - per_channel[:, :1]).max()
        if spread > STRUCTURE_RTOL * max(float(np.abs(bias).max()), scale):
            raise Unfused("the composed bias varies over positions")
        before, after = self.macs(chain), fused.macs
        if after >= before:
            raise Unfused(f"fusing would not lower the MACs ({before} -> {after})")
        removed, into = tuple(self.short(i) for i in [*up, *passed]), self.short(index)
        conv2.input[0] = source
        self.set_input(index, 1, fused.kernel.astype(dtype))
        self.set_input(index, 2, per_channel[:, 0].astype(dtype))
        del conv2.attribute[:]
        conv2.attribute.extend(
            [
                helper.make_attribute("kernel_shape", list(kernel)),
                helper.make_attribute("strides", list(stride)),
                helper.make_attribute("pads", list(pads)),
            ]
        )
        gone = [*up, *passed]
        self.remove(gone, [self.nodes[i].output[0] for i in gone])
        return Fusion("Conv∘Conv", removed, into, before, after)

    def window(self, index: int, spatial: tuple[int, ...]) -> tuple[tuple, tuple, tuple]:
        """``(kernel, strides, pads)`` of a Conv with dilation 1 (``auto_pad`` resolved)."""
        node = self.nodes[index]
        kernel = self.constants.value(node.input[1])
        d = len(spatial)
        if kernel is None or kernel.ndim != d + 2:
            raise Unfused(f"{self.label(index)}: its weight is not a constant of rank {d + 2}")
        if any(x != 1 for x in node_attr(node, "dilations", [1] * d)):
            raise Unfused(f"{self.label(index)} is dilated")
        k = tuple(int(x) for x in kernel.shape[2:])
        strides = tuple(int(x) for x in node_attr(node, "strides", [1] * d))
        auto_pad = node_attr(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        try:
            pads = resolve_auto_pad(
                auto_pad, spatial, k, strides, (1,) * d, node_attr(node, "pads", None)
            )
        except ValueError as exc:
            raise Unfused(f"{self.label(index)}: {exc}") from None
        return k, strides, tuple(pads)

    @staticmethod
    def read_kernel(weight, sample, out, kernel, stride, pads) -> ConvOperator:
        """The Conv whose matrix ``weight`` is, if it is one: each tap's weight is gathered at
        the output positions where that tap reads inside the input (a tap that never does
        multiplies only padding: 0)."""
        c_in, spatial = sample[0], sample[1:]
        c_out, out_spatial = out[0], out[1:]
        d = len(spatial)
        positions = np.indices(out_spatial).reshape(d, -1).T
        taps = np.indices(kernel).reshape(d, -1).T
        coords = positions[:, None, :] * np.array(stride) + taps[None] - np.array(pads[:d])
        inside = np.all((coords >= 0) & (coords < np.array(spatial)), axis=2)  # (P, T)
        first = np.argmax(inside, axis=0)  # per tap, the first position reading inside
        used = inside[first, np.arange(len(taps))]
        q = np.ravel_multi_index(tuple(coords[first, np.arange(len(taps))][used].T), spatial)
        n_pos, n_q = len(positions), math.prod(spatial)
        rows = np.arange(c_out)[:, None] * n_pos + first[used][None]  # (O, T')
        cols = np.arange(c_in)[:, None] * n_q + q[None]  # (C, T')
        values = np.zeros((c_out, c_in, len(taps)))
        values[:, :, used] = weight[rows[:, None, :], cols[None, :, :]]
        return ConvOperator(values.reshape(c_out, c_in, *kernel), None, spatial, pads, stride)

    # ------------------------------------------------------------------ editing
    @staticmethod
    def like(value: np.ndarray, old: np.ndarray | None) -> np.ndarray:
        """``value`` in the shape of the constant it replaces, when that holds as many."""
        return value.reshape(old.shape) if old is not None and old.size == value.size else value

    def fresh(self, stem: str) -> str:
        name, counter = f"{stem}_fused", 0
        while name in self.taken:
            counter += 1
            name = f"{stem}_fused_{counter}"
        self.taken.add(name)
        return name

    def set_input(self, index: int, slot: int, value: np.ndarray) -> None:
        """Input ``slot`` of node ``index`` reads a new initializer holding ``value``."""
        node = self.nodes[index]
        stem = node.input[slot] if slot < len(node.input) and node.input[slot] else node.output[0]
        name = self.fresh(stem)
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        if self.model.ir_version < 4:
            self.graph.input.append(
                helper.make_tensor_value_info(
                    name, self.graph.initializer[-1].data_type, value.shape
                )
            )
        while len(node.input) <= slot:
            node.input.append("")
        if node.input[slot]:
            self.detached.add(node.input[slot])
        node.input[slot] = name

    def append_bias(self, index: int, bias: np.ndarray) -> None:
        """An ``Add`` of ``bias`` after node ``index``, producing its former output."""
        node = self.nodes[index]
        out = node.output[0]
        inner = self.fresh(out)
        node.output[0] = inner
        name = self.fresh(f"{out}_bias")
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(bias), name))
        if self.model.ir_version < 4:
            self.graph.input.append(
                helper.make_tensor_value_info(
                    name, self.graph.initializer[-1].data_type, bias.shape
                )
            )
        self.after[index] = helper.make_node(
            "Add", [inner, name], [out], name=self.fresh(f"{node.name or out}_bias_add")
        )

    def remove(self, gone: list[int], reshaped: list[str]) -> None:
        """Drop nodes ``gone`` (inserting the new bias Adds), the constants and constant-making
        nodes only they read, and the value-info of ``reshaped``."""
        for i in gone:
            self.detached.update(x for x in self.nodes[i].input if x)
        keep = []
        for i, node in enumerate(self.nodes):
            if i not in gone:
                keep.append(node)
            if i in self.after:
                keep.append(self.after[i])
        nested = {x for sub in list(all_graphs(self.graph))[1:] for n in sub.node for x in n.input}
        while True:
            read = self.outputs | nested | {x for n in keep for x in n.input}
            orphans = [
                all(o in self.detached and o not in read for o in n.output)
                and n.op_type in ("Constant", "Identity", "Cast")
                and self.constants.value(n.output[0]) is not None
                for n in keep
            ]
            if not any(orphans):
                break
            for n, orphan in zip(keep, orphans, strict=True):
                if orphan:
                    self.detached.update(x for x in n.input if x)
            keep = [n for n, orphan in zip(keep, orphans, strict=True) if not orphan]
        del self.nodes[:]
        self.nodes.extend(keep)
        unread = self.detached - read
        for tensor in [t for t in self.graph.initializer if t.name in unread]:
            self.graph.initializer.remove(tensor)
        for entry in [v for v in self.graph.input if v.name in unread]:
            self.graph.input.remove(entry)
        for entry in [v for v in self.graph.value_info if v.name in set(reshaped)]:
            self.graph.value_info.remove(entry)
