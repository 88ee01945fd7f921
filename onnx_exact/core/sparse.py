"""A layer's weight as a compressed sparse row (CSR) matrix, for CNN layers too big to be dense.

Why: the analysis reads the ops between two ReLUs of a CNN as one matrix ``W``. A convolution's
``W`` is a Toeplitz matrix whose dense form has ``n_out · n_in`` entries (a 3→32-channel 3×3
conv on a 32×32 image: 32768 × 3072 = 100 M, 800 MB of float64) while only its kernel taps,
``n_out · C_in/groups · k`` entries (0.9 M here), are not zero. Such a layer keeps ``W`` as a
:class:`SparseMatrix`; the bounds, witnesses and proofs read it through the few operations
below, which behave like the ndarray ones they replace (``W @ x``, ``l @ W``, ``W[rows]``,
``abs(W)``) and give the same numbers up to the order of float64 sums.

``ndarray @ SparseMatrix`` works (numpy defers to :meth:`SparseMatrix.__rmatmul__` because the
class sets ``__array_ufunc__ = None``). numpy only: the project's dependencies have no sparse
library, and these few operations are all the analysis needs.
"""

from __future__ import annotations

import math

import numpy as np

from onnx_exact.core.operators import (
    AveragePoolOperator,
    ConvOperator,
    DenseOperator,
    IndexOperator,
    LinearOperator,
    MeanOperator,
)

#: float64 temporaries of one product step, at most (the products run in column blocks).
_BLOCK_VALUES = 1 << 23


def _index_type(size: int) -> type:
    """int32 for indices below ``size`` where they fit (half the memory of int64)."""
    return np.int32 if size < 2**31 else np.int64


class SparseMatrix:
    """``(n_out, n_in)`` float64 matrix in CSR form: row ``i``'s entries are
    ``data[indptr[i]:indptr[i+1]]`` at columns ``indices[...]`` (sorted, distinct, no zero).

    ``size`` is the number of stored entries (what a product costs and the matrix occupies),
    not ``n_out · n_in`` as for an ndarray.
    """

    __array_ufunc__ = None  # ndarray @ self -> self.__rmatmul__
    ndim = 2
    dtype = np.dtype(np.float64)

    def __init__(
        self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]
    ) -> None:
        self.data = np.asarray(data, dtype=np.float64)
        self.indices = np.asarray(indices, dtype=_index_type(shape[1]))
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.shape = (int(shape[0]), int(shape[1]))
        if self.indptr.shape != (self.shape[0] + 1,) or self.indptr[-1] != self.data.size:
            raise ValueError("SparseMatrix: indptr does not fit the rows and entries")
        self._row_ids: np.ndarray | None = None
        self._transposed: SparseMatrix | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_coo(
        cls, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int]
    ) -> SparseMatrix:
        """The matrix with ``M[rows[e], cols[e]] += values[e]`` (duplicates summed, zeros
        dropped)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        cols = np.asarray(cols, dtype=np.int64).reshape(-1)
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        key = rows * int(shape[1]) + cols  # row-major position: one sort key
        if rows.size and not np.all(key[1:] > key[:-1]):  # a conv's entries come in order
            order = np.argsort(key, kind="stable")
            key, rows, cols, values = key[order], rows[order], cols[order], values[order]
            first = np.ones(rows.size, dtype=bool)
            first[1:] = key[1:] != key[:-1]
            if not first.all():
                starts = np.flatnonzero(first)
                values = np.add.reduceat(values, starts)
                rows, cols = rows[starts], cols[starts]
        keep = values != 0.0
        rows, cols, values = rows[keep], cols[keep], values[keep]
        indptr = np.zeros(shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
        return cls(values, cols, indptr, shape)

    @classmethod
    def from_dense(cls, matrix: np.ndarray) -> SparseMatrix:
        matrix = np.asarray(matrix, dtype=np.float64)
        rows, cols = np.nonzero(matrix)
        return cls.from_coo(rows, cols, matrix[rows, cols], matrix.shape)

    # ------------------------------------------------------------------ shape and copies
    @property
    def nnz(self) -> int:
        return int(self.data.size)

    @property
    def size(self) -> int:
        return self.nnz

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.indices.nbytes + self.indptr.nbytes)

    @property
    def row_ids(self) -> np.ndarray:
        """The row of every stored entry."""
        if self._row_ids is None:
            rows = np.arange(self.shape[0], dtype=_index_type(self.shape[0]))
            self._row_ids = np.repeat(rows, np.diff(self.indptr))
        return self._row_ids

    def copy(self) -> SparseMatrix:
        return SparseMatrix(self.data.copy(), self.indices.copy(), self.indptr.copy(), self.shape)

    def toarray(self) -> np.ndarray:
        out = np.zeros(self.shape)
        out[self.row_ids, self.indices] = self.data
        return out

    def count_nonzero(self) -> int:
        return self.nnz

    @property
    def T(self) -> SparseMatrix:  # noqa: N802 (the ndarray name)
        if self._transposed is None:
            self._transposed = SparseMatrix.from_coo(
                self.indices, self.row_ids, self.data, (self.shape[1], self.shape[0])
            )
            self._transposed._transposed = self
        return self._transposed

    def __abs__(self) -> SparseMatrix:
        return SparseMatrix(np.abs(self.data), self.indices, self.indptr, self.shape)

    def __neg__(self) -> SparseMatrix:
        return SparseMatrix(-self.data, self.indices, self.indptr, self.shape)

    def scale_rows(self, scale: np.ndarray) -> SparseMatrix:
        """``diag(scale) · M`` (entries a zero scale empties are dropped)."""
        scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), (self.shape[0],))
        return SparseMatrix.from_coo(
            self.row_ids, self.indices, self.data * scale[self.row_ids], self.shape
        )

    def row_abs_sums(self) -> np.ndarray:
        """``Σ_j |M_ij|`` per row."""
        return np.bincount(self.row_ids, weights=np.abs(self.data), minlength=self.shape[0])

    def row_min(self) -> np.ndarray:
        """The smallest entry of each row, implicit zeros included (``0`` for a row with
        fewer entries than columns)."""
        out = np.zeros(self.shape[0])
        full = np.diff(self.indptr) == self.shape[1]
        out[full] = np.inf
        np.minimum.at(out, self.row_ids, self.data)
        return out

    # ------------------------------------------------------------------ rows
    def __getitem__(self, key) -> SparseMatrix:
        """Rows only (an int array, a boolean mask or a slice), as a SparseMatrix;
        :meth:`rows` gives them dense."""
        if isinstance(key, tuple):
            raise TypeError("SparseMatrix: only row selection is supported")
        rows = np.arange(self.shape[0])[key]
        if np.ndim(rows) == 0:
            rows = np.array([rows])
        counts = np.diff(self.indptr)[rows]
        indptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        where = np.repeat(self.indptr[rows] - indptr[:-1], counts) + np.arange(indptr[-1])
        return SparseMatrix(
            self.data[where], self.indices[where], indptr, (rows.size, self.shape[1])
        )

    def rows(self, key) -> np.ndarray:
        """Rows ``key`` as a dense ``(len(key), n_in)`` array (one row, 1-D, for an int)."""
        if isinstance(key, (int, np.integer)):
            return self[key].toarray()[0]
        return self[key].toarray()

    # ------------------------------------------------------------------ products
    def __matmul__(self, x: np.ndarray) -> np.ndarray:
        """``M x`` for ``x`` of shape ``(n_in,)`` or ``(n_in, m)``."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[0] != self.shape[1]:
            raise ValueError(f"SparseMatrix: {self.shape} @ {x.shape}")
        if x.ndim == 1:
            return np.bincount(
                self.row_ids, weights=self.data * x[self.indices], minlength=self.shape[0]
            )
        out = np.zeros((self.shape[0], x.shape[1]))
        filled = np.flatnonzero(np.diff(self.indptr))
        if not filled.size:
            return out
        starts = self.indptr[filled]
        step = max(1, _BLOCK_VALUES // max(self.nnz, 1))
        for begin in range(0, x.shape[1], step):
            block = x[self.indices, begin : begin + step] * self.data[:, None]
            out[filled, begin : begin + step] = np.add.reduceat(block, starts, axis=0)
        return out

    def __rmatmul__(self, rows: np.ndarray) -> np.ndarray:
        """``l M`` for ``l`` of shape ``(n_out,)`` or ``(r, n_out)``."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim == 1:
            return self.T @ rows
        return (self.T @ rows.T).T


def conv_coo(conv: ConvOperator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The entries ``(rows, cols, values)`` of a convolution's matrix, from its kernel.

    Output ``(o, p)`` reads input ``(c, s·p + d·t − pad_begin)`` with weight ``K[o, c, t]`` for
    every kernel tap ``t`` whose input position lies inside the input (outside it is a zero pad).
    For a fixed output position distinct taps read distinct inputs, so no entry repeats.
    """
    c_out, c_in_group = conv.kernel.shape[:2]
    d = conv.kernel.ndim - 2
    spatial = np.array(conv.input_shape[1:])
    out_spatial = conv.output_shape[1:]
    positions = np.indices(out_spatial).reshape(d, -1).T  # (P, d)
    taps = np.indices(conv.kernel.shape[2:]).reshape(d, -1).T  # (T, d)
    coords = (
        positions[:, None, :] * np.array(conv.strides)
        + taps[None, :, :] * np.array(conv.dilations)
        - np.array(conv.pads[:d])
    )  # (P, T, d)
    inside = np.all((coords >= 0) & (coords < spatial), axis=2)
    p_index, t_index = np.nonzero(inside)
    q = np.ravel_multi_index(tuple(coords[p_index, t_index].T), tuple(spatial))
    n_pos, n_q = math.prod(out_spatial), math.prod(conv.input_shape[1:])
    o = np.arange(c_out)
    channel = (o // (c_out // conv.groups))[:, None] * c_in_group + np.arange(c_in_group)
    rows = o[:, None, None] * n_pos + p_index[None, None, :]  # (O, 1, N)
    cols = channel[:, :, None] * n_q + q[None, None, :]  # (O, C, N)
    values = conv.kernel.reshape(c_out, c_in_group, -1)[:, :, t_index]  # (O, C, N)
    return np.broadcast_to(rows, cols.shape), cols, values


def operator_entries(op: LinearOperator) -> int:
    """An upper bound on the stored entries of ``op``'s matrix (the kernel taps of a conv or
    pool, one per output of data movement, every entry of a dense op)."""
    if isinstance(op, ConvOperator):
        return op.n_out * op.kernel.shape[1] * math.prod(op.kernel.shape[2:])
    if isinstance(op, AveragePoolOperator):
        return op.n_out * math.prod(op.kernel_shape)
    if isinstance(op, MeanOperator):
        return op.n_in
    if isinstance(op, IndexOperator):
        return op.n_out
    return op.n_out * op.n_in


def sparse_operator(op: LinearOperator) -> SparseMatrix:
    """The matrix of ``op`` (without its bias) in sparse form, built from its structure."""
    shape = (op.n_out, op.n_in)
    if isinstance(op, ConvOperator):
        return SparseMatrix.from_coo(*conv_coo(op), shape)
    if isinstance(op, AveragePoolOperator):
        return sparse_operator(op._conv).scale_rows(op.factor)
    if isinstance(op, MeanOperator):
        grid = np.arange(op.n_in).reshape(op.input_shape)
        kept = tuple(1 if i in op.axes else s for i, s in enumerate(op.input_shape))
        coords = np.indices(op.input_shape).reshape(len(op.input_shape), -1)
        coords[list(op.axes)] = 0
        rows = np.ravel_multi_index(tuple(coords), kept)
        return SparseMatrix.from_coo(
            rows, grid.reshape(-1), np.full(op.n_in, 1.0 / op.count), shape
        )
    if isinstance(op, IndexOperator):
        rows = np.flatnonzero(op.source >= 0)
        return SparseMatrix.from_coo(rows, op.source[rows], np.ones(rows.size), shape)
    if isinstance(op, DenseOperator):
        return SparseMatrix.from_dense(op.weight)
    return SparseMatrix.from_dense(op.dense())


def product_entries(left: SparseMatrix, right: SparseMatrix) -> int:
    """The terms :func:`sparse_product` expands before summing (its memory)."""
    return int(np.diff(right.indptr)[left.indices].sum())


def sparse_product(left: SparseMatrix, right: SparseMatrix) -> SparseMatrix:
    """``left · right``: every entry ``(i, j)`` of ``left`` times row ``j`` of ``right``,
    expanded and summed per ``(i, column)``."""
    if left.shape[1] != right.shape[0]:
        raise ValueError(f"sparse_product: {left.shape} · {right.shape}")
    counts = np.diff(right.indptr)[left.indices]
    total = int(counts.sum())
    offsets = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    where = np.repeat(right.indptr[left.indices] - offsets[:-1], counts) + np.arange(total)
    rows = np.repeat(left.row_ids, counts)
    values = np.repeat(left.data, counts) * right.data[where]
    return SparseMatrix.from_coo(
        rows, right.indices[where], values, (left.shape[0], right.shape[1])
    )


def stack_rows(parts: list, add: bool = False) -> np.ndarray | SparseMatrix:
    """The parts' rows one after the other (``add``: the parts summed instead), dense when every
    part is an ndarray, else a :class:`SparseMatrix` (a layer too large to be dense)."""
    if all(isinstance(part, np.ndarray) for part in parts):
        return sum(parts[1:], parts[0].copy()) if add else np.vstack(parts)
    start, rows, cols, values = 0, [], [], []
    for part in parts:
        part = part if isinstance(part, SparseMatrix) else SparseMatrix.from_dense(part)
        rows.append(part.row_ids.astype(np.int64) + (0 if add else start))
        cols.append(part.indices)
        values.append(part.data)
        start += part.shape[0]
    shape = (parts[0].shape[0] if add else start, parts[0].shape[1])
    return SparseMatrix.from_coo(
        np.concatenate(rows), np.concatenate(cols), np.concatenate(values), shape
    )
