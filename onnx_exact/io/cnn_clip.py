"""``Clip(0, c)`` (ReLU6 and the like) in a CNN, read into the ReLU IR exactly.

For every real ``y`` and ``c > 0``::

    clip(y, 0, c) = relu(y) - relu(y - c)

so the CNN reader closes a layer at a ``Clip(0, c)`` node with two ReLU neurons per unit of the
graph: the *unit* ``relu(y)`` (a real neuron: INACTIVE means the Clip outputs 0, ACTIVE that it
never clips at 0) and the auxiliary *kink* ``relu(y - c)`` (the same weight row, bias ``b - c``:
INACTIVE means the unit never reaches ``c``, ACTIVE that it is saturated at ``c``). The layer's
neurons are ``[units, kinks, passthrough...]`` (:attr:`DenseLayer.clip`,
:attr:`DenseLayer.kinks`); every value of the graph is unchanged, so bounds, CROWN, LP/MILP
encodings, witnesses and attacks need no change. A unit is then in one of four states over the
box: stably 0 (unit INACTIVE), stably linear (unit ACTIVE and kink INACTIVE), stably ``c`` (kink
ACTIVE) or unstable.

The next layer reads the Clip's output ``h = [I, -I] [relu(y); relu(y - c)]``:
:class:`ClipChain` composes the next layer's ops on the ``n`` Clip outputs (in index form, as for
a Relu: a Conv's matrix is built once from its kernel) and returns its weight over the layer's
real inputs, the unit columns ``W`` and the kink columns ``-W``. Columns after the kinks (the
passthrough neurons of a residual branch) are read by the carried rows, never by the chain.

Accepted: ``Clip`` with ``min = 0`` and a finite ``max = c > 0``, as attributes (opset < 11, the
torch legacy exporter) or as constant inputs (opset >= 11: torch, tf2onnx's ``Relu6``). Anything
else (``min != 0``, no or a non-positive ``max``, bounds computed at run time) is refused in one
line naming the node.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_exact.core.operators import IndexOperator
from onnx_exact.core.sparse import SparseMatrix, stack_rows
from onnx_exact.io.affine_chain import AffineChain
from onnx_exact.io.graph import node_attr, node_label

FLOAT_LIMIT = 3.4028234663852886e38
"""``numeric_limits<float>::max()``: the attribute default of an absent bound (opset < 11)."""


class ClipChain(AffineChain):
    """The chain that starts the layer after a Clip layer of ``units`` units.

    The source is the Clip layer's output ``[relu(y) (units), relu(y - c) (units), rest]`` of
    ``n_src`` features; the chain starts at the Clip's output ``relu(y) - relu(y - c)`` (width
    ``units``) and counts that difference as one op (so a fork right after a Clip is carried in
    the pair form of :mod:`onnx_exact.io.cnn_residual`, which rebuilds it exactly). Internally the
    ops compose on the unit columns only; :meth:`weight` copies them, negated, to the kink
    columns.
    """

    def __init__(self, n_src: int, units: int) -> None:
        super().__init__(n_src)
        self.apply(IndexOperator((n_src,), (units,), np.arange(units)))
        self.units = units

    def matrix(self) -> np.ndarray | SparseMatrix:
        """``W [I, -I, 0]`` as the layer keeps it (sparse for a layer too large to be dense)."""
        base = super().matrix()
        if not isinstance(base, SparseMatrix):
            return base  # dense: super().matrix() is self.weight(), the kinks filled
        on_unit = base.indices < self.units
        return SparseMatrix.from_coo(
            np.concatenate([base.row_ids, base.row_ids[on_unit]]),
            np.concatenate([base.indices, base.indices[on_unit] + self.units]),
            np.concatenate([base.data, -base.data[on_unit]]),
            base.shape,
        )

    def weight(self) -> np.ndarray:
        """``W [I, -I, 0]``: the unit columns' weights, and their negation on the kinks."""
        matrix = np.array(super().weight())
        units = self.units
        matrix[:, units : 2 * units] = -matrix[:, :units]
        return matrix


def clip_maximum(walk, index: int) -> float:
    """``c`` of the ``Clip(0, c)`` node ``index`` (as float64, exactly the stored value).

    ``walk`` is the CNN walker (:class:`onnx_exact.io.node_semantics.GraphWalk`: ``graph``,
    ``float_constant``, ``fail``). Raises ``UnsupportedModelError`` naming the node for any
    other Clip.
    """
    node = walk.graph.node[index]
    label = node_label(index, node)
    bounds = []
    for slot, what in ((1, "min"), (2, "max")):
        if len(node.input) > slot and node.input[slot]:
            value = walk.float_constant(index, node.input[slot], what)
            if value.size != 1:
                raise walk.fail(f"{label}: its {what} has {value.size} entries, not one")
            bounds.append(float(value.reshape(-1)[0]))
        else:
            default = FLOAT_LIMIT if what == "max" else -FLOAT_LIMIT
            bounds.append(float(np.float32(node_attr(node, what, default))))
    low, high = bounds
    if low != 0.0 or not 0.0 < high < FLOAT_LIMIT:
        shown = ["none" if abs(b) >= FLOAT_LIMIT else f"{b:g}" for b in bounds]
        raise walk.fail(
            f"{label}: Clip(min {shown[0]}, max {shown[1]}) is not supported; only ReLU and "
            "Clip(0, c) with c > 0 (ReLU6) activations can be analysed (a Clip(0, none) is a "
            "Relu: export it as one)"
        )
    return high


def holds_clip_activation(model: onnx.ModelProto) -> bool:
    """Whether a ``Clip`` of the main graph feeds a Conv, Gemm or MatMul (directly or through
    other nodes): an activation between layers, which the CNN reader reads (for an MLP too, whose
    reader knows only Relu); a Clip in the tail after the last layer is no activation."""
    cores = {"Conv", "Gemm", "MatMul"}
    reaches: set[str] = set()  # graph nodes are topologically sorted
    for node in reversed(model.graph.node):
        standard = node.domain in ("", "ai.onnx")
        feeds = any(o in reaches for o in node.output)
        if standard and node.op_type == "Clip" and feeds:
            return True
        if feeds or (standard and node.op_type in cores):
            reaches.update(name for name in node.input if name)
    return False


def with_kinks(
    weight: np.ndarray | SparseMatrix,
    bias: np.ndarray,
    channels: np.ndarray | None,
    auxiliary: np.ndarray | None,
    units: int,
    clip: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Insert the kink rows ``(W_u, b_u - c)`` of the first ``units`` rows right after them.

    Returns ``(weight, bias, channels, auxiliary)``: the kinks are auxiliary, their channel is
    one past the largest real channel (as for passthrough neurons), and rows after the units
    (passthrough neurons already appended) move behind the kinks.
    """
    weight = stack_rows([weight[:units], weight[:units], weight[units:]])
    bias = np.concatenate([bias[:units], bias[:units] - clip, bias[units:]])
    if auxiliary is None:
        auxiliary = np.zeros(units, dtype=bool)
    auxiliary = np.concatenate([auxiliary[:units], np.ones(units, bool), auxiliary[units:]])
    if channels is not None:
        sentinel = int(channels[:units].max()) + 1 if units else 0
        kinks = np.full(units, sentinel, dtype=np.int64)
        channels = np.concatenate([channels[:units], kinks, channels[units:]])
    return weight, bias, channels, auxiliary
