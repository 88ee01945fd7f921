"""``MaxPool`` / ``GlobalMaxPool`` in a CNN, read into the sequential ReLU IR exactly.

For all reals ``a, b``::

    max(a, b) = a + relu(b - a)

so the max of a window of ``K`` entries is a pairwise tree of ``⌈log2 K⌉`` levels (an odd entry
out is carried to the next level). The CNN reader closes one ReLU layer per tree level; its
neurons are all *auxiliary* (:attr:`DenseLayer.is_auxiliary`: no unit of the graph, never
reported, counted, pursued or pruned), and the layer after the pool reads each window's max as
a sum of the last level's neurons (:class:`PoolChain`). Per pair ``(a, b)`` a level holds the
*difference* ``relu(b - a)`` and carries ``a``:

* when the pool's inputs are a ReLU output (``Relu → MaxPool``, the torch and Keras order),
  every value of the tree is ``>= 0``, so ``a`` is carried by one row ``relu(a) = a``: at the
  first level a selection row of the ReLU output (a passthrough row), later the sum
  ``a' + relu(b' - a')`` of two neurons of the level below; both are ACTIVE by construction
  (:meth:`onnx_exact.stability.state.Analysis._mark_auxiliary`);
* otherwise (``Conv → MaxPool → Relu``: the pool's inputs are pre-activations and may be
  negative) ``a`` is carried as the pair ``relu(a), relu(-a)`` (as a residual skip is,
  :mod:`onnx_exact.io.cnn_residual`), ``a = relu(a) - relu(-a)``; the graph's Relu after the
  pool then closes an ordinary unit layer whose pre-activation is the window's max (its neurons
  are the pooled positions: dead iff every entry of the window is ``<= 0``).

Every value of the graph is unchanged, so bounds, CROWN, LP/MILP encodings, witnesses and
attacks need no change. Windows follow the ONNX operator: ``kernel_shape``, ``strides``,
``pads`` (a padded position is ``-inf`` for a max: it is simply not in the window),
``dilations``, ``ceil_mode`` (only windows that start inside the input or its begin pad) and
``auto_pad``; overlapping windows each get their own tree. ``GlobalMaxPool`` is one window per
channel. Each level is a matrix like a Conv layer's: the first has ``windows · K / 2``
difference rows and as many carried rows (twice as many, the pairs, before a Relu), each later
level about half the one below, and each row reads one or two values. Dense, a pool over ``n``
values costs about ``n²`` entries at its first level, so a pool over the reader's
``MAX_DENSE_ENTRIES`` gets sparse levels (:class:`~onnx_exact.core.sparse.SparseMatrix`, two
entries per difference row), within ``MAX_SPARSE_ENTRIES``.

Refused in one line naming the node: a MaxPool inside a residual block's branch or skip, a
MaxPool whose ``Indices`` output is used, and a window holding no input element.
"""

from __future__ import annotations

import math

import numpy as np

from onnx_exact.core.network import DenseLayer
from onnx_exact.core.operators import IndexOperator
from onnx_exact.core.sparse import SparseMatrix, stack_rows
from onnx_exact.io import affine_chain
from onnx_exact.io.affine_chain import AffineChain
from onnx_exact.io.graph import PathStep, node_label

#: The pools this module reads.
MAX_POOL_OPS = frozenset({"MaxPool", "GlobalMaxPool"})


def pooled_size(
    size: int, kernel: int, begin: int, end: int, stride: int, dilation: int, ceil: bool
) -> int:
    """Output elements on one axis: ONNX's floor (or ``ceil_mode``) formula, where a ceil
    window must start inside the input or its begin pad."""
    extent = dilation * (kernel - 1) + 1
    padded = size + begin + end
    if padded < extent:
        raise ValueError(f"the kernel spans {extent} elements but the padded input has {padded}")
    if not ceil:
        return (padded - extent) // stride + 1
    out = -(-(padded - extent) // stride) + 1
    if (out - 1) * stride >= size + begin:
        out -= 1
    return out


def window_table(
    sample_shape: tuple[int, ...],
    kernel: tuple[int, ...],
    pads: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
    ceil: bool,
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The flat input indices of every window of a max pool on one ``(C, *S)`` sample.

    Returns ``(table, output_shape)``: ``table[j]`` lists the inputs of output ``j`` (NCHW flat
    order of both), the inputs inside the input first, then ``-1`` for taps in the padding or
    beyond it. Raises ``ValueError`` for a kernel that does not fit or a window of padding only.
    """
    channels, *spatial = sample_shape
    d = len(spatial)
    out_shape, per_axis = [], []
    for i in range(d):
        out = pooled_size(
            spatial[i], kernel[i], pads[i], pads[d + i], strides[i], dilations[i], ceil
        )
        coords = np.arange(out)[:, None] * strides[i] + np.arange(kernel[i]) * dilations[i]
        coords = coords - pads[i]
        coords[(coords < 0) | (coords >= spatial[i])] = -1
        out_shape.append(out)
        per_axis.append(coords)
    positions = np.indices(out_shape).reshape(d, -1).T  # (P, d)
    taps = np.indices(kernel).reshape(d, -1).T  # (T, d)
    coord = np.stack(
        [per_axis[i][positions[:, i][:, None], taps[None, :, i]] for i in range(d)], axis=-1
    )  # (P, T, d)
    inside = np.all(coord >= 0, axis=-1)
    if not inside.any(axis=1).all():
        raise ValueError("a window holds padding only")
    flat = np.ravel_multi_index(tuple(np.where(inside[..., None], coord, 0).T), tuple(spatial))
    flat = np.where(inside, flat.T, -1)  # (P, T)
    order = np.argsort(~inside, axis=1, kind="stable")  # inside entries first
    flat = np.take_along_axis(flat, order, axis=1)
    offsets = np.arange(channels)[:, None, None] * math.prod(spatial)
    table = np.where(flat[None] >= 0, flat[None] + offsets, -1)
    return table.reshape(channels * flat.shape[0], flat.shape[1]), (channels, *out_shape)


class PoolChain(AffineChain):
    """The chain that starts at a max pool's output, over the last tree level's neurons.

    Every pooled value is a sum ``Σ f_t · n_t`` of the level's neurons (``f_t = ±1``, no
    constant), and each neuron is a term of exactly one value, so ``W M`` (``M`` the map from
    the neurons to the values) has column ``n`` equal to ``f_n`` times the column of its value.
    Like :class:`onnx_exact.io.cnn_clip.ClipChain`, the ops compose on one *representative*
    column per value (a term of factor 1) in index form, and :meth:`weight` copies each other
    term's column from its value's. The sum counts as one op, so a fork right after the pool is
    carried in the pair form of :mod:`onnx_exact.io.cnn_residual`.
    """

    def __init__(self, n_src: int, terms: np.ndarray, factors: np.ndarray) -> None:
        super().__init__(n_src)
        self.apply(IndexOperator((n_src,), (terms.shape[0],), terms[:, 0]))
        self.terms, self.factors = terms, factors

    def structured_map(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """None: the copied term columns are no operator of ``steps``, so the layer after the
        pool is applied densely."""
        return None

    def matrix(self) -> np.ndarray | SparseMatrix:
        """``W M`` as the layer keeps it (sparse for a layer too large to be dense)."""
        base = super().matrix()
        if not isinstance(base, SparseMatrix):
            return base  # dense: super().matrix() is self.weight(), the copies made
        value_of = np.full(self.n_src, -1)
        value_of[self.terms[:, 0]] = np.arange(self.terms.shape[0])
        value = value_of[base.indices]  # every entry sits in a representative column
        rows, cols, values = [base.row_ids], [base.indices], [base.data]
        for t in range(1, self.terms.shape[1]):
            used = self.terms[value, t] >= 0
            rows.append(base.row_ids[used])
            cols.append(self.terms[value[used], t])
            values.append(base.data[used] * self.factors[value[used], t])
        return SparseMatrix.from_coo(
            np.concatenate(rows), np.concatenate(cols), np.concatenate(values), base.shape
        )

    def weight(self) -> np.ndarray:
        """``W M``: the representative columns, and ``f_t`` times them for the other terms."""
        matrix = np.array(super().weight())
        for t in range(1, self.terms.shape[1]):
            used = self.terms[:, t] >= 0
            columns = self.terms[used, 0]
            matrix[:, self.terms[used, t]] = matrix[:, columns] * self.factors[used, t]
        return matrix


class MaxPoolWalk:
    """The max-pool part of the CNN walker (:class:`onnx_exact.io.cnn_reader._CnnWalker`)."""

    def max_pool(self, index: int, limit: int) -> None:
        """Read MaxPool/GlobalMaxPool node ``index``: close its tree levels (dense up to
        ``limit`` entries, else sparse), start the chain at the pooled values (see the
        module)."""
        node = self.graph.node[index]
        label = node_label(index, node)
        if self.in_branch:
            raise self.fail(
                f"{label}: a {node.op_type} inside a residual block is not supported; only "
                "MaxPools on the main path of a CNN can be analysed"
            )
        if len(node.output) > 1 and node.output[1] and self._is_read(node.output[1]):
            raise self.fail(
                f"{label}: its Indices output '{node.output[1]}' is used; only the pooled "
                "values can be analysed"
            )
        channels, spatial = self._spatial_input(index)
        if node.op_type == "GlobalMaxPool":
            kernel, d = tuple(spatial), len(spatial)
            pads, strides, dilations, ceil = (0,) * (2 * d), (1,) * d, (1,) * d, False
        else:
            kernel, pads, strides, dilations, ceil = self._pool_window(index, spatial)
        try:
            table, out_shape = window_table(
                self.sample_shape, kernel, pads, strides, dilations, ceil
            )
        except ValueError as exc:
            raise self.fail(f"{label}: {exc}") from None
        table = table[:, : int(np.max(np.count_nonzero(table >= 0, axis=1)))]
        if table.shape[1] == 1:  # every window one element: data movement only
            self._apply(index, IndexOperator(self.sample_shape, out_shape, table[:, 0]), "linear")
        else:
            self._max_tree(index, table, limit)
        self._set_shape(out_shape, by_channel=True)

    def _is_read(self, tensor: str) -> bool:
        return tensor in self.graph_outputs or bool(self.consumers.get(tensor))

    def _max_tree(self, index: int, table: np.ndarray, limit: int) -> None:
        """Close one auxiliary ReLU layer per level of the windows' max trees (all dense if
        every level fits ``limit`` entries, else all sparse)."""
        node = self.graph.node[index]
        chain = self.chain
        selects = (
            type(chain) is AffineChain
            and chain.dense is None
            and chain.sparse is None
            and bool(self.layers)
            and self.layers[-1].relu
            and bool(np.all(chain.src >= 0))
            and bool(np.all(chain.coef == 1.0))
            and bool(np.all(chain.offset == 0.0))
        )  # the pool reads a ReLU output: every value of the tree is >= 0
        levels = [_pair_up(slots) for slots in _tree_slots(table)]
        n_src, largest = chain.n_src, 0
        for _, _, pair, live in levels:
            rows = int(pair.sum()) + int(live.sum()) * (1 if selects else 2)
            largest, n_src = max(largest, rows * n_src), rows
        if chain.dense is None:  # the pool's inputs are rows of the chain's matrix
            largest = max(largest, chain.width * chain.n_src)
        # Levels over the dense limit are built sparse (each row reads two values).
        sparse = largest > limit or chain.is_sparse
        # The values: level 0 are the pool's inputs (rows of the chain's matrix over its
        # source), later ones sums of the last level's neurons (terms, factors).
        weight, offset = (chain.sparse_matrix() if sparse else chain.weight()), chain.offset
        terms = factors = None
        for level, (left, right, pair, live) in enumerate(levels, 1):
            a, b, carried = left[pair], right[pair], left[live]
            n_diff, n_carry = a.size, carried.size
            rows = [(b, a), (carried, None)] + ([] if selects else [(None, carried)])
            n_src = self.layers[-1].out_features if terms is not None else 0
            parts = [_rows(weight, offset, terms, factors, n_src, *r, sparse) for r in rows]
            layer_weight = stack_rows([w for w, _ in parts])
            if sparse:
                self._check_size(index, layer_weight.nnz)
            self.layers.append(
                DenseLayer(
                    layer_weight,
                    np.concatenate([c for _, c in parts]),
                    True,
                    f"{node.name or node.output[0]}/max{level}",
                    auxiliary=np.ones(layer_weight.shape[0], dtype=bool),
                )
            )
            # Next level's values: carried a (+ relu(b - a)) (- relu(-a)), one per live slot.
            terms = np.full((n_carry, 3), -1)
            terms[:, 0] = n_diff + np.arange(n_carry)
            terms[np.flatnonzero(pair[live]), 1] = np.arange(n_diff)
            if not selects:
                terms[:, 2] = n_diff + n_carry + np.arange(n_carry)
            factors = np.tile([1.0, 1.0, -1.0], (n_carry, 1))
            weight = offset = None
        self.path.append(PathStep(index, "maxpool", len(self.layers), 0, self.width))
        self.chain = PoolChain(self.layers[-1].out_features, terms, factors)
        self.width = self.chain.width
        self.at_input = False

    def _check_size(self, index: int, entries: int) -> None:
        limit = affine_chain.MAX_SPARSE_ENTRIES
        if entries > limit:
            node = self.graph.node[index]
            raise self.fail(
                f"{node_label(index, node)}: a level of its max tree would have {entries} "
                f"nonzero entries, over the limit of {limit}; MaxPools this large are not "
                "supported yet"
            )


def _tree_slots(table: np.ndarray) -> list[np.ndarray]:
    """The slots of each tree level: ``table`` (the windows' input values, ``-1`` empty) for
    the first, then per window the values the level below leaves (numbered in order over the
    live slots, ``-1`` empty), until one per window is left."""
    levels = []
    slots = table
    while slots.shape[1] > 1:
        if slots.shape[1] % 2:
            slots = np.hstack([slots, np.full((slots.shape[0], 1), -1)])
        levels.append(slots)
        live = slots[:, 0::2] >= 0
        new = np.full(live.shape, -1)
        new[live] = np.arange(int(live.sum()))
        slots = new
    return levels


def _pair_up(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(left, right, pair, live)`` of one level: the operands of each pair of slots
    (flattened in window order), where both are values, and where the left one is."""
    left, right = slots[:, 0::2].reshape(-1), slots[:, 1::2].reshape(-1)
    live = left >= 0
    return left, right, live & (right >= 0), live


def _rows(
    weight: np.ndarray | SparseMatrix | None,
    offset: np.ndarray | None,
    terms: np.ndarray | None,
    factors: np.ndarray | None,
    n_src: int,
    plus: np.ndarray | None,
    minus: np.ndarray | None,
    sparse: bool = False,
) -> tuple[np.ndarray | SparseMatrix, np.ndarray]:
    """Rows ``value[plus] - value[minus]`` (either side may be None) over the current source:
    rows of ``(weight, offset)`` at the first level, else the values' terms scattered over the
    ``n_src`` neurons of the level below; a :class:`SparseMatrix` if ``sparse`` (a level over
    the dense limit; then ``weight`` is sparse too)."""
    count = (plus if plus is not None else minus).size
    bias = np.zeros(count)
    if isinstance(weight, np.ndarray):
        rows = np.zeros((count, weight.shape[1]))
        for values, sign in ((plus, 1.0), (minus, -1.0)):
            if values is not None:
                rows += sign * weight[values]
                bias += sign * offset[values]
        return rows, bias
    entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for values, sign in ((plus, 1.0), (minus, -1.0)):
        if values is None:
            continue
        if weight is not None:
            part = weight[values]
            entries.append((part.row_ids, part.indices, sign * part.data))
            bias += sign * offset[values]
        else:
            used = terms[values] >= 0
            row_index = np.broadcast_to(np.arange(count)[:, None], used.shape)
            entries.append((row_index[used], terms[values][used], sign * factors[values][used]))
    width = weight.shape[1] if weight is not None else n_src
    rows, cols, coefs = (np.concatenate(column) for column in zip(*entries, strict=True))
    matrix = SparseMatrix.from_coo(rows, cols, coefs, (count, width))
    return (matrix if sparse else matrix.toarray()), bias
