"""The composition of the linear ops between two ReLUs of a CNN, as one dense affine map.

:class:`AffineChain` holds ``t = W h + c`` from the last activation ``h`` (``n_src`` features)
to the current tensor ``t`` (``width`` features) while the CNN reader walks the ops between two
ReLUs, and returns ``(W, c)`` as the layer's weight and bias.

Until the first op that mixes values (a Conv, a pool, a Gemm/MatMul), ``W`` is kept in *index
form*: ``t[j] = coef[j] · h[src[j]]`` (``src[j] = −1``: ``t[j]`` is the constant ``c[j]``).
Identity, Transpose, Pad, Reshape and per-element scales (BatchNormalization, Mul/Div) keep that
form at the cost of a gather. The first mixing op ``D`` then composes by columns,
``W = D · diag(coef) · P`` (a scatter of ``D``'s columns to ``src``), so a Conv's dense matrix is
built once, directly from its kernel (:func:`conv_matrix`: one entry per weight and output
position) instead of by pushing the identity through im2col. Later ops act on the dense ``W``:
``W ← D W`` as ``op.linear`` on its columns. float64 throughout; numpy only.

A layer whose dense ``W`` would have more than :data:`MAX_DENSE_ENTRIES` entries (a wide conv
on a large image) is composed in sparse form instead: ``D`` from its structure
(:func:`~onnx_exact.core.sparse.sparse_operator`), later ops as sparse products, as long as
the entries stay under :data:`MAX_SPARSE_ENTRIES` (:class:`LayerTooLarge` otherwise).
"""

from __future__ import annotations

import numpy as np

from onnx_exact.core.operators import (
    ConvOperator,
    DenseOperator,
    IndexOperator,
    LinearOperator,
)
from onnx_exact.core.sparse import (
    SparseMatrix,
    conv_coo,
    operator_entries,
    product_entries,
    sparse_operator,
    sparse_product,
)
from onnx_exact.core.structured_map import CHEAPER_BY, ElementwiseAffine, StructuredMap

#: Entries of a layer's matrix kept dense at most (256 MiB of float64); a bigger layer is kept
#: sparse (:class:`~onnx_exact.core.sparse.SparseMatrix`).
MAX_DENSE_ENTRIES = 1 << 25

#: Stored entries of a sparse layer matrix at most (with its transpose and row index about
#: 1 GiB); a bigger layer is refused.
MAX_SPARSE_ENTRIES = 1 << 24


def conv_matrix(conv: ConvOperator) -> np.ndarray:
    """The dense ``(n_out, n_in)`` matrix of a convolution, built from its kernel
    (:func:`onnx_exact.core.sparse.conv_coo`: one entry per weight and output position)."""
    rows, cols, values = conv_coo(conv)
    matrix = np.zeros((conv.n_out, conv.n_in))
    matrix[rows, cols] = values
    return matrix


class LayerTooLarge(ValueError):
    """The composed map of a layer would exceed the memory limits (the reader names the node)."""


class AffineChain:
    """``t = W h + c`` from ``n`` source features, starting at the identity (see the module)."""

    def __init__(self, n: int) -> None:
        self.n_src = n
        self.width = n
        self.src: np.ndarray | None = np.arange(n)
        self.coef = np.ones(n)
        self.dense: np.ndarray | None = None  # (width, n_src) once a mixing op came
        self.sparse: SparseMatrix | None = None  # instead of dense for a too large layer
        self.offset = np.zeros(n)
        self.ops = 0
        self.steps: list[LinearOperator] = []  # the operators composed, for structured_map()

    def entries_after(self, op: LinearOperator) -> int:
        """Entries of a dense ``W`` once ``op`` is composed (index ops keep the index form)."""
        if isinstance(op, IndexOperator) and self.dense is None and self.sparse is None:
            return 0
        return op.n_out * self.n_src

    @property
    def is_sparse(self) -> bool:
        return self.sparse is not None

    def scale(self, scale: np.ndarray, shift: np.ndarray) -> None:
        """``t ← scale ∘ t + shift`` (per element)."""
        if self.sparse is not None:
            self.sparse = self.sparse.scale_rows(scale * np.ones(self.width))
        elif self.dense is None:
            self.coef = self.coef * scale
        else:
            self.dense = self.dense * scale[:, None]
        self.offset = self.offset * scale + shift
        self.ops += 1
        self.steps.append(
            ElementwiseAffine(scale * np.ones(self.width), shift * np.ones(self.width))
        )

    def apply(self, op: LinearOperator) -> None:
        """``t ← op(t)``; raises :class:`LayerTooLarge` past the sparse limit."""
        if op.n_in != self.width:
            raise ValueError(f"AffineChain: {op.n_in} inputs for {self.width} features")
        index_form = self.dense is None and self.sparse is None
        if isinstance(op, IndexOperator) and index_form:
            valid = op.source >= 0
            picked = np.where(valid, op.source, 0)
            self.src = np.where(valid, self.src[picked], -1)
            self.coef = np.where(valid, self.coef[picked], 0.0)
        elif index_form and self.entries_after(op) <= MAX_DENSE_ENTRIES:
            self.dense = self._compose_index(self._matrix(op))
        elif index_form:
            self.sparse = self._compose_index_sparse(op)
        elif self.sparse is None and self.entries_after(op) <= MAX_DENSE_ENTRIES:
            if isinstance(op, DenseOperator):
                self.dense = op.weight @ self.dense
            else:
                self.dense = np.ascontiguousarray(op.linear(self.dense.T).T)
        else:
            if self.sparse is None:
                self.sparse, self.dense = SparseMatrix.from_dense(self.dense), None
            self.sparse = self._compose_sparse(op)
        self.offset = op.forward(self.offset[None])[0]
        self.width = op.n_out
        self.ops += 1
        self.steps.append(op)

    def _operator(self, op: LinearOperator) -> SparseMatrix:
        if operator_entries(op) > MAX_SPARSE_ENTRIES:
            raise LayerTooLarge(self._too_large(op, operator_entries(op)))
        return sparse_operator(op)

    def _too_large(self, op: LinearOperator, entries: int) -> str:
        return (
            f"its layer would be a {op.n_out} x {self.n_src} matrix with {entries} nonzero "
            f"entries, over the limit of {MAX_SPARSE_ENTRIES}; CNNs this large are not "
            "supported yet"
        )

    def _compose_index_sparse(self, op: LinearOperator) -> SparseMatrix:
        """``D · diag(coef) · P`` in sparse form: ``D``'s column ``j`` moves to ``src[j]``."""
        matrix = self._operator(op)
        sources = self.src[matrix.indices]
        keep = sources >= 0
        return SparseMatrix.from_coo(
            matrix.row_ids[keep],
            sources[keep],
            matrix.data[keep] * self.coef[matrix.indices[keep]],
            (op.n_out, self.n_src),
        )

    def _compose_sparse(self, op: LinearOperator) -> SparseMatrix:
        """``D · W`` with ``W`` sparse."""
        matrix = self._operator(op)
        entries = product_entries(matrix, self.sparse)
        if entries > MAX_SPARSE_ENTRIES:
            raise LayerTooLarge(self._too_large(op, entries))
        return sparse_product(matrix, self.sparse)

    def structured_map(self, weight: np.ndarray, bias: np.ndarray) -> StructuredMap | None:
        """The composed operators as a :class:`StructuredMap` of the layer ``(weight, bias)``,
        or None when it would not be cheaper than the dense product (by ``CHEAPER_BY``; a sparse
        product in numpy is always dearer than the operators' BLAS products) or does
        not reproduce it on random probes (a caller changed the chain by hand: a residual join
        sums two chains' matrices)."""
        if not self.steps:
            return None
        structured = StructuredMap(self.steps)
        if structured.cost * CHEAPER_BY > weight.size and not isinstance(weight, SparseMatrix):
            return None
        return structured if structured.agrees_with(weight, bias) else None

    def matrix(self) -> np.ndarray | SparseMatrix:
        """``W`` as the layer keeps it: sparse for a layer too large to be dense."""
        too_large = self.dense is None and self.width * self.n_src > MAX_DENSE_ENTRIES
        return self.sparse_matrix() if self.sparse is not None or too_large else self.weight()

    def sparse_matrix(self) -> SparseMatrix:
        """``W`` in sparse form, whatever form the chain holds it in."""
        if self.sparse is not None:
            return self.sparse
        if self.dense is not None:
            return SparseMatrix.from_dense(self.dense)
        rows = np.flatnonzero(self.src >= 0)
        return SparseMatrix.from_coo(
            rows, self.src[rows], self.coef[rows], (self.width, self.n_src)
        )

    def weight(self) -> np.ndarray:
        """``W`` as a dense ``(width, n_src)`` float64 array (:class:`LayerTooLarge` if that
        is over :data:`MAX_DENSE_ENTRIES`: only sequential layers can be sparse)."""
        if self.sparse is not None:
            if self.sparse.shape[0] * self.sparse.shape[1] > MAX_DENSE_ENTRIES:
                raise LayerTooLarge(
                    f"a residual join, MaxPool or Clip over a {self.sparse.shape[0]} x "
                    f"{self.n_src} layer needs it dense, over the limit of {MAX_DENSE_ENTRIES} "
                    "entries; CNNs this large are not supported yet"
                )
            return self.sparse.toarray()
        if self.dense is not None:
            return self.dense
        matrix = np.zeros((self.width, self.n_src))
        rows = np.flatnonzero(self.src >= 0)
        matrix[rows, self.src[rows]] = self.coef[rows]
        return matrix

    @staticmethod
    def _matrix(op: LinearOperator) -> np.ndarray:
        """The op's dense matrix, built from its structure (``op.dense()`` pushes an identity
        of ``n_in`` columns through it: 2 GB for a pool over a 16 x 32 x 32 map)."""
        if isinstance(op, ConvOperator):
            return conv_matrix(op)
        if isinstance(op, DenseOperator):
            return op.weight
        return sparse_operator(op).toarray()

    def _compose_index(self, matrix: np.ndarray) -> np.ndarray:
        """``matrix · diag(coef) · P``: the columns of ``matrix`` scattered to ``src``."""
        rows = np.flatnonzero(self.src >= 0)
        scaled = matrix[:, rows] * self.coef[rows]
        out = np.zeros((matrix.shape[0], self.n_src))
        targets = self.src[rows]
        if np.unique(targets).size == targets.size:
            out[:, targets] = scaled
        else:
            np.add.at(out, (slice(None), targets), scaled)
        return out
