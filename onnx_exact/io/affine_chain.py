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
"""

from __future__ import annotations

import math

import numpy as np

from onnx_exact.core.operators import (
    ConvOperator,
    DenseOperator,
    IndexOperator,
    LinearOperator,
)
from onnx_exact.core.structured_map import CHEAPER_BY, ElementwiseAffine, StructuredMap


def conv_matrix(conv: ConvOperator) -> np.ndarray:
    """The dense ``(n_out, n_in)`` matrix of a convolution, built from its kernel.

    Output ``(o, p)`` reads input ``(c, s·p + d·t − pad_begin)`` with weight ``K[o, c, t]`` for
    every kernel tap ``t`` whose input position lies inside the input (outside it is a zero pad).
    For a fixed output position distinct taps read distinct inputs, so every entry of the matrix
    is set at most once.
    """
    c_out, c_in_group = conv.kernel.shape[:2]
    d = conv.kernel.ndim - 2
    spatial = np.array(conv.input_shape[1:])
    out_spatial = conv.output_shape[1:]
    kernel_spatial = conv.kernel.shape[2:]
    positions = np.indices(out_spatial).reshape(d, -1).T  # (P, d)
    taps = np.indices(kernel_spatial).reshape(d, -1).T  # (T, d)
    begin = np.array(conv.pads[:d])
    coords = (
        positions[:, None, :] * np.array(conv.strides)
        + taps[None, :, :] * np.array(conv.dilations)
        - begin
    )  # (P, T, d)
    inside = np.all((coords >= 0) & (coords < spatial), axis=2)
    p_index, t_index = np.nonzero(inside)
    q = np.ravel_multi_index(tuple(coords[p_index, t_index].T), tuple(spatial))
    n_pos, n_q = math.prod(out_spatial), math.prod(conv.input_shape[1:])
    o = np.arange(c_out)
    channel = (o // (c_out // conv.groups))[:, None] * c_in_group + np.arange(c_in_group)
    rows = o[:, None, None] * n_pos + p_index[None, None, :]  # (O, 1, N)
    cols = channel[:, :, None] * n_q + q[None, None, :]  # (O, C, N)
    taps_k = conv.kernel.reshape(c_out, c_in_group, -1)[:, :, t_index]  # (O, C, N)
    matrix = np.zeros((conv.n_out, conv.n_in))
    matrix[np.broadcast_to(rows, cols.shape), cols] = taps_k
    return matrix


class AffineChain:
    """``t = W h + c`` from ``n`` source features, starting at the identity (see the module)."""

    def __init__(self, n: int) -> None:
        self.n_src = n
        self.width = n
        self.src: np.ndarray | None = np.arange(n)
        self.coef = np.ones(n)
        self.dense: np.ndarray | None = None  # (width, n_src) once a mixing op came
        self.offset = np.zeros(n)
        self.ops = 0
        self.steps: list[LinearOperator] = []  # the operators composed, for structured_map()

    def entries_after(self, op: LinearOperator) -> int:
        """Entries of ``W`` once ``op`` is composed (index ops keep the index form)."""
        if isinstance(op, IndexOperator) and self.dense is None:
            return 0
        return op.n_out * self.n_src

    def scale(self, scale: np.ndarray, shift: np.ndarray) -> None:
        """``t ← scale ∘ t + shift`` (per element)."""
        if self.dense is None:
            self.coef = self.coef * scale
        else:
            self.dense = self.dense * scale[:, None]
        self.offset = self.offset * scale + shift
        self.ops += 1
        self.steps.append(
            ElementwiseAffine(scale * np.ones(self.width), shift * np.ones(self.width))
        )

    def apply(self, op: LinearOperator) -> None:
        """``t ← op(t)``."""
        if op.n_in != self.width:
            raise ValueError(f"AffineChain: {op.n_in} inputs for {self.width} features")
        if isinstance(op, IndexOperator) and self.dense is None:
            valid = op.source >= 0
            picked = np.where(valid, op.source, 0)
            self.src = np.where(valid, self.src[picked], -1)
            self.coef = np.where(valid, self.coef[picked], 0.0)
        elif self.dense is None:
            self.dense = self._compose_index(self._matrix(op))
        elif isinstance(op, DenseOperator):
            self.dense = op.weight @ self.dense
        else:
            self.dense = np.ascontiguousarray(op.linear(self.dense.T).T)
        self.offset = op.forward(self.offset[None])[0]
        self.width = op.n_out
        self.ops += 1
        self.steps.append(op)

    def structured_map(self, weight: np.ndarray, bias: np.ndarray) -> StructuredMap | None:
        """The composed operators as a :class:`StructuredMap` of the layer ``(weight, bias)``,
        or None when it would not be cheaper than the dense product (by ``CHEAPER_BY``) or does
        not reproduce it on random probes (a caller changed the chain by hand: a residual join
        sums two chains' matrices)."""
        if not self.steps:
            return None
        structured = StructuredMap(self.steps)
        if structured.cost * CHEAPER_BY > weight.size:
            return None
        return structured if structured.agrees_with(weight, bias) else None

    def weight(self) -> np.ndarray:
        """``W`` as a dense ``(width, n_src)`` float64 array."""
        if self.dense is not None:
            return self.dense
        matrix = np.zeros((self.width, self.n_src))
        rows = np.flatnonzero(self.src >= 0)
        matrix[rows, self.src[rows]] = self.coef[rows]
        return matrix

    @staticmethod
    def _matrix(op: LinearOperator) -> np.ndarray:
        if isinstance(op, ConvOperator):
            return conv_matrix(op)
        return op.dense()

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
