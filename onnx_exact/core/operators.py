"""Linear operators that know their structure: the layers of the CNN-capable IR.

Every operator is an affine map of one sample, ``y = A x + b``, between flattened tensors:
``x`` is the sample's input tensor of shape ``input_shape`` (batch axis excluded) flattened in C
order, ``y`` the output tensor of shape ``output_shape`` flattened likewise. The operators never
build ``A`` unless asked (:meth:`LinearOperator.dense`): a convolution is applied by im2col and
its adjoint by one strided accumulation per kernel tap, so bounds, encodings and witnesses can
run on big layers without dense Toeplitz matrices.

The common contract (:class:`LinearOperator`):

- ``forward(x)``: ``x`` of shape ``(m, n_in)`` → ``A x + b`` of shape ``(m, n_out)``;
- ``linear(x)``: the same without the bias (``A x``);
- ``transpose(l)``: row vectors ``l`` of shape ``(r, n_out)`` → ``l A`` of shape ``(r, n_in)``,
  the adjoint that CROWN back-substitution needs (``<A x, y> = <x, Aᵀ y>``);
- ``abs()``: the operator ``|A|`` (entrywise absolute value, bias 0), for interval bounds
  (``radius(y) = |A| radius(x)``);
- ``dense()``: ``A`` as an ``(n_out, n_in)`` array, for small layers and tests;
- ``bias``: ``b`` as an ``(n_out,)`` vector (a conv's per-channel bias broadcast over positions);
- ``params`` and ``macs``: stored parameters and multiply-adds per sample as onnxsim 0.8.1
  counts them (Conv: output elements × kernel size × input channels per group; Gemm/MatMul:
  ``n_out × n_in``; biases are parameters, not MACs; pooling and data movement count 0 MACs).

Dense and convolution operators also remove channels, the structured pruning step:
``select_outputs(keep)`` keeps the output channels ``keep`` (rows of a matrix, filters of a conv),
``select_inputs(keep)`` the input channels ``keep`` (columns, kernel input channels). The result
equals the dense matrix with the matching rows/columns sliced out; a grouped convolution keeps
uniform groups (a depthwise channel goes on both sides at once, ``ConvOperator.select``). They
also fold a per-channel affine map that follows them (``scale_outputs``: BatchNormalization,
per-channel Mul/Add). ``resolve_auto_pad`` turns an ``auto_pad`` attribute into explicit pads.

All arrays are float64; the numbers are the stored weights converted exactly. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Shape = tuple[int, ...]

IM2COL_ELEMENTS = 1 << 22
"""Largest im2col window matrix a convolution builds at once (float64: 32 MiB); bigger batches
are applied in blocks of samples, so ``dense()`` of a large layer does not need ``n_in`` times
that memory."""


def _as_index(keep, size: int, what: str) -> np.ndarray:
    """Sorted unique channel indices from a list of indices or a boolean mask of length ``size``."""
    keep = np.asarray(keep)
    if keep.dtype == bool:
        if keep.shape != (size,):
            raise ValueError(f"{what}: a mask needs {size} entries, got shape {keep.shape}")
        return np.flatnonzero(keep)
    index = np.unique(keep.astype(np.int64).ravel())
    if index.size and (index[0] < 0 or index[-1] >= size):
        raise ValueError(f"{what}: channel indices must lie in [0, {size})")
    return index


class LinearOperator:
    """Base class: the shapes, the bias and what follows from ``linear`` and ``transpose``.

    Subclasses set ``input_shape``, ``output_shape`` and ``bias`` and implement ``linear``,
    ``transpose`` and ``abs``.
    """

    input_shape: Shape
    output_shape: Shape
    bias: np.ndarray

    @property
    def n_in(self) -> int:
        return math.prod(self.input_shape)

    @property
    def n_out(self) -> int:
        return math.prod(self.output_shape)

    @property
    def params(self) -> int:
        return 0

    @property
    def macs(self) -> int:
        return 0

    def linear(self, x: np.ndarray) -> np.ndarray:
        """``A x`` for a batch ``x`` of shape ``(m, n_in)``; returns ``(m, n_out)``."""
        raise NotImplementedError

    def transpose(self, l: np.ndarray) -> np.ndarray:  # noqa: E741 (the CROWN name)
        """``l A`` for row vectors ``l`` of shape ``(r, n_out)``; returns ``(r, n_in)``."""
        raise NotImplementedError

    def abs(self) -> LinearOperator:
        """The operator ``|A|`` with bias 0."""
        raise NotImplementedError

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``A x + b`` for a batch ``x`` of shape ``(m, n_in)``; returns ``(m, n_out)``."""
        return self.linear(x) + self.bias

    def dense(self) -> np.ndarray:
        """``A`` materialised, shape ``(n_out, n_in)`` (``n_in`` forward passes of unit vectors)."""
        return np.ascontiguousarray(self.linear(np.eye(self.n_in)).T)

    def _batch(self, x: np.ndarray, n: int, what: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != n:
            raise ValueError(
                f"{type(self).__name__}.{what}: expected shape (m, {n}), got {x.shape}"
            )
        return x


class DenseOperator(LinearOperator):
    """``y = W x + b`` with ``W`` of shape ``(n_out, n_in)`` (a Gemm or MatMul layer).

    Channels are the rows (outputs) and columns (inputs). ``has_bias`` records whether the layer
    stores a bias (for ``params``); ``bias`` is a zero vector when it does not.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None) -> None:
        self.weight = np.asarray(weight, dtype=np.float64)
        if self.weight.ndim != 2:
            raise ValueError(f"DenseOperator: weight must be 2-D, got shape {self.weight.shape}")
        n_out, n_in = self.weight.shape
        self.has_bias = bias is not None
        self.bias = np.zeros(n_out) if bias is None else np.asarray(bias, np.float64).reshape(n_out)
        self.input_shape = (n_in,)
        self.output_shape = (n_out,)

    @property
    def params(self) -> int:
        return self.weight.size + (self.bias.size if self.has_bias else 0)

    @property
    def macs(self) -> int:
        return self.weight.size

    def linear(self, x: np.ndarray) -> np.ndarray:
        return self._batch(x, self.n_in, "linear") @ self.weight.T

    def transpose(self, l: np.ndarray) -> np.ndarray:  # noqa: E741
        return self._batch(l, self.n_out, "transpose") @ self.weight

    def abs(self) -> DenseOperator:
        return DenseOperator(np.abs(self.weight))

    def dense(self) -> np.ndarray:
        return self.weight.copy()

    def scale_outputs(self, scale: np.ndarray, shift: np.ndarray | None = None) -> DenseOperator:
        """``diag(scale)·(W x + b) + shift``: a per-output affine map folded in (a
        BatchNormalization or a per-unit Mul/Add after the layer)."""
        scale = np.asarray(scale, np.float64).reshape(self.n_out)
        shift = np.zeros(self.n_out) if shift is None else np.asarray(shift, np.float64)
        return DenseOperator(self.weight * scale[:, None], self.bias * scale + shift)

    def select_outputs(self, keep) -> DenseOperator:
        rows = _as_index(keep, self.n_out, "select_outputs")
        return DenseOperator(self.weight[rows], self.bias[rows] if self.has_bias else None)

    def select_inputs(self, keep) -> DenseOperator:
        cols = _as_index(keep, self.n_in, "select_inputs")
        return DenseOperator(self.weight[:, cols], self.bias if self.has_bias else None)


def conv_output_spatial(
    spatial: Sequence[int],
    kernel: Sequence[int],
    pads: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> Shape:
    """ONNX's output size per axis: ``⌊(S + p_begin + p_end − d(k − 1) − 1) / s⌋ + 1``.

    ``pads`` is in ONNX order ``(begin_1, …, begin_d, end_1, …, end_d)``. Raises ``ValueError``
    when the dilated kernel does not fit the padded input on some axis.
    """
    d = len(spatial)
    out = []
    for i in range(d):
        extent = dilations[i] * (kernel[i] - 1) + 1
        padded = spatial[i] + pads[i] + pads[d + i]
        if padded < extent:
            raise ValueError(
                f"axis {i}: the kernel spans {extent} elements but the padded input has {padded}"
            )
        out.append((padded - extent) // strides[i] + 1)
    return tuple(out)


def resolve_auto_pad(
    auto_pad: str,
    spatial: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int] | None = None,
) -> tuple[int, ...]:
    """Explicit ONNX ``pads`` for a Conv/pool ``auto_pad`` attribute.

    ``NOTSET`` gives ``pads`` (zeros when absent), ``VALID`` zeros; ``SAME_UPPER``/``SAME_LOWER``
    pad so that the output has ``⌈S / s⌉`` elements per axis, the total
    ``max(0, (⌈S/s⌉ − 1)·s + d(k − 1) + 1 − S)`` split evenly, the odd element at the end
    (``UPPER``) or the beginning (``LOWER``), as the ONNX operator specification says.
    """
    d = len(spatial)
    if auto_pad in ("NOTSET", ""):
        return tuple(int(p) for p in pads) if pads is not None else (0,) * (2 * d)
    if auto_pad == "VALID":
        return (0,) * (2 * d)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"unknown auto_pad {auto_pad!r}")
    begin, end = [], []
    for size, k, s, dil in zip(spatial, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max(0, (out - 1) * s + dil * (k - 1) + 1 - size)
        small = total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return (*begin, *end)


class ConvOperator(LinearOperator):
    """An ONNX ``Conv`` (1-D, 2-D or more spatial axes) on one ``(C_in, *S)`` sample, NCHW / NCW.

    ``kernel`` has shape ``(C_out, C_in / groups, *k)``; the input channels of group ``g`` are
    ``g·C_in/groups …`` and its output channels ``g·C_out/groups …`` (depthwise:
    ``groups = C_in``). ``pads`` are ONNX's ``(begin_1, …, begin_d, end_1, …, end_d)`` (zeros; an
    ``auto_pad`` is resolved by the reader), ``strides`` and ``dilations`` one per spatial axis
    (default 1). Output element ``(o, p)`` is
    ``Σ_{c in group(o), t} K[o, c, t] · x_pad[c, s·p + d·t] + b[o]``.
    """

    def __init__(
        self,
        kernel: np.ndarray,
        bias: np.ndarray | None,
        input_spatial: Sequence[int],
        pads: Sequence[int] | None = None,
        strides: Sequence[int] | None = None,
        dilations: Sequence[int] | None = None,
        groups: int = 1,
    ) -> None:
        self.kernel = np.asarray(kernel, dtype=np.float64)
        d = self.kernel.ndim - 2
        if d < 1:
            raise ValueError(
                f"ConvOperator: kernel must be (C_out, C_in/g, *k), got {kernel.shape}"
            )
        spatial = tuple(int(s) for s in input_spatial)
        self.pads = tuple(int(p) for p in pads) if pads is not None else (0,) * (2 * d)
        self.strides = tuple(int(s) for s in strides) if strides is not None else (1,) * d
        self.dilations = tuple(int(s) for s in dilations) if dilations is not None else (1,) * d
        self.groups = int(groups)
        c_out, c_in_group = self.kernel.shape[:2]
        if len(spatial) != d or len(self.pads) != 2 * d or len(self.strides) != d:
            raise ValueError("ConvOperator: spatial, pads and strides must match the kernel rank")
        if len(self.dilations) != d:
            raise ValueError("ConvOperator: one dilation per spatial axis")
        if min(self.pads) < 0 or min(self.strides) < 1 or min(self.dilations) < 1:
            raise ValueError("ConvOperator: pads must be ≥ 0, strides and dilations ≥ 1")
        if self.groups < 1 or c_out % self.groups:
            raise ValueError(
                f"ConvOperator: group={self.groups} does not divide the {c_out} output channels"
            )
        self.has_bias = bias is not None
        self.channel_bias = (
            np.zeros(c_out) if bias is None else np.asarray(bias, np.float64).reshape(c_out)
        )
        self.kernel_spatial = self.kernel.shape[2:]
        out_spatial = conv_output_spatial(
            spatial, self.kernel_spatial, self.pads, self.strides, self.dilations
        )
        self.input_shape = (c_in_group * self.groups, *spatial)
        self.output_shape = (c_out, *out_spatial)
        self.bias = np.repeat(self.channel_bias, math.prod(out_spatial))

    @property
    def params(self) -> int:
        return self.kernel.size + (self.channel_bias.size if self.has_bias else 0)

    @property
    def macs(self) -> int:
        return math.prod(self.output_shape[1:]) * self.kernel.size

    def _padded(self, x: np.ndarray) -> np.ndarray:
        """``x`` as ``(m, C_in, *S)`` zero-padded by ``pads``."""
        d = len(self.kernel_spatial)
        x = x.reshape(x.shape[0], *self.input_shape)
        width = [(0, 0), (0, 0)] + [(self.pads[i], self.pads[d + i]) for i in range(d)]
        return np.pad(x, width) if any(self.pads) else x

    def _tap_slices(self, tap: Sequence[int]) -> tuple[slice, ...]:
        """The strided slice of the padded input that kernel tap ``tap`` multiplies."""
        out_spatial = self.output_shape[1:]
        return tuple(
            slice(t * dil, t * dil + s * (o - 1) + 1, s)
            for t, dil, s, o in zip(tap, self.dilations, self.strides, out_spatial, strict=True)
        )

    def linear(self, x: np.ndarray) -> np.ndarray:
        """im2col, in blocks of samples whose window matrix stays under ``IM2COL_ELEMENTS``."""
        x = self._batch(x, self.n_in, "linear")
        window = math.prod(self.output_shape[1:]) * self.kernel.shape[1] * self.groups
        block = max(1, IM2COL_ELEMENTS // (window * math.prod(self.kernel_spatial)))
        if x.shape[0] <= block:
            return self._im2col(x)
        return np.vstack([self._im2col(x[i : i + block]) for i in range(0, x.shape[0], block)])

    def _im2col(self, x: np.ndarray) -> np.ndarray:
        """One strided view of every window, then one matrix product per group."""
        m, d, g = x.shape[0], len(self.kernel_spatial), self.groups
        padded = self._padded(x)
        extents = [
            dil * (k - 1) + 1 for dil, k in zip(self.dilations, self.kernel_spatial, strict=True)
        ]
        windows = np.lib.stride_tricks.sliding_window_view(
            padded, extents, axis=tuple(range(2, 2 + d))
        )
        out_spatial = self.output_shape[1:]
        index = (slice(None), slice(None))
        index += tuple(
            slice(0, s * (o - 1) + 1, s) for s, o in zip(self.strides, out_spatial, strict=True)
        )
        index += tuple(slice(None, None, dil) for dil in self.dilations)
        windows = windows[index]  # (m, C_in, *O, *k)
        c_out, c_in_group = self.kernel.shape[:2]
        positions = math.prod(out_spatial)
        taps = math.prod(self.kernel_spatial)
        # (m, g, C_in/g, *O, *k) -> (g, m, *O, C_in/g, *k) -> (g, m·P, C_in/g·K)
        windows = windows.reshape(m, g, c_in_group, *out_spatial, *self.kernel_spatial)
        order = (1, 0, *range(3, 3 + d), 2, *range(3 + d, 3 + 2 * d))
        cols = windows.transpose(order).reshape(g, m * positions, c_in_group * taps)
        weights = self.kernel.reshape(g, c_out // g, c_in_group * taps)
        y = cols @ weights.transpose(0, 2, 1)  # (g, m·P, C_out/g)
        y = y.reshape(g, m, positions, c_out // g).transpose(1, 0, 3, 2)
        return y.reshape(m, self.n_out)

    def transpose(self, l: np.ndarray) -> np.ndarray:  # noqa: E741
        """col2im, in blocks of rows whose window matrix stays under ``IM2COL_ELEMENTS``."""
        l = self._batch(l, self.n_out, "transpose")  # noqa: E741
        window = math.prod(self.output_shape[1:]) * self.kernel.shape[1] * self.groups
        block = max(1, IM2COL_ELEMENTS // (window * math.prod(self.kernel_spatial)))
        if l.shape[0] <= block:
            return self._col2im(l)
        return np.vstack([self._col2im(l[i : i + block]) for i in range(0, l.shape[0], block)])

    def _col2im(self, l: np.ndarray) -> np.ndarray:  # noqa: E741
        """The adjoint of :meth:`_im2col`: one matrix product per group gives every window's
        share (rows times the kernel), which each kernel tap then adds to the strided slice of
        the padded input it read; the pads are cut off."""
        r, d, g = l.shape[0], len(self.kernel_spatial), self.groups
        c_out, c_in_group = self.kernel.shape[:2]
        out_spatial = self.output_shape[1:]
        spatial = self.input_shape[1:]
        positions, taps = math.prod(out_spatial), math.prod(self.kernel_spatial)
        # (r, g, C_out/g, P) -> (g, r·P, C_out/g), times (g, C_out/g, C_in/g·K)
        rows = l.reshape(r, g, c_out // g, positions).transpose(1, 0, 3, 2)
        rows = rows.reshape(g, r * positions, c_out // g)
        cols = rows @ self.kernel.reshape(g, c_out // g, c_in_group * taps)
        # (g, r, *O, C_in/g, K) -> (K, r, g, C_in/g, *O), one contiguous block per tap
        cols = cols.reshape(g, r, *out_spatial, c_in_group, taps)
        cols = np.ascontiguousarray(cols.transpose(3 + d, 1, 0, 2 + d, *range(2, 2 + d)))
        padded_shape = tuple(s + self.pads[i] + self.pads[d + i] for i, s in enumerate(spatial))
        grad = np.zeros((r, g, c_in_group, *padded_shape))
        everything = (slice(None),) * 3  # the axes r, g, C_in/g
        for index, tap in enumerate(np.ndindex(*self.kernel_spatial)):
            grad[(*everything, *self._tap_slices(tap))] += cols[index]
        crop = tuple(slice(self.pads[i], self.pads[i] + s) for i, s in enumerate(spatial))
        grad = grad[(slice(None), slice(None), slice(None), *crop)]
        return grad.reshape(r, self.n_in)

    def _with(self, kernel: np.ndarray, bias: np.ndarray | None, groups: int) -> ConvOperator:
        return ConvOperator(
            kernel, bias, self.input_shape[1:], self.pads, self.strides, self.dilations, groups
        )

    def abs(self) -> ConvOperator:
        return self._with(np.abs(self.kernel), None, self.groups)

    def scale_outputs(self, scale: np.ndarray, shift: np.ndarray | None = None) -> ConvOperator:
        """``scale[o]·(conv + b)[o] + shift[o]`` per output channel: a BatchNormalization
        (``scale = γ/√(σ² + ε)``, ``shift = β − μ·scale``) or a per-channel Mul/Add folded in."""
        c_out = self.kernel.shape[0]
        scale = np.asarray(scale, np.float64).reshape(c_out)
        shift = np.zeros(c_out) if shift is None else np.asarray(shift, np.float64).reshape(c_out)
        kernel = self.kernel * scale.reshape(c_out, *(1,) * (self.kernel.ndim - 1))
        return self._with(kernel, self.channel_bias * scale + shift, self.groups)

    def select(self, inputs=None, outputs=None) -> ConvOperator:
        """The convolution restricted to the input channels ``inputs`` and output channels
        ``outputs`` (indices or boolean masks; ``None`` keeps all).

        A group whose input and output channels are all removed disappears (a depthwise channel
        removed on both sides); the remaining groups must keep equal numbers of input and of
        output channels, since an ONNX ``Conv`` has uniform groups. A group left with outputs but
        no inputs (its outputs would be constant) or inputs but no outputs (unused inputs) cannot
        be written as one ``Conv``: ``ValueError``.
        """
        c_out, c_in_group = self.kernel.shape[:2]
        g = self.groups
        c_in = c_in_group * g
        ins = np.arange(c_in) if inputs is None else _as_index(inputs, c_in, "select inputs")
        outs = np.arange(c_out) if outputs is None else _as_index(outputs, c_out, "select outputs")
        in_group = ins // c_in_group
        out_group = outs // (c_out // g)
        in_counts = np.bincount(in_group, minlength=g)
        out_counts = np.bincount(out_group, minlength=g)
        live = (in_counts > 0) | (out_counts > 0)
        if np.any(live & ((in_counts == 0) | (out_counts == 0))):
            raise ValueError(
                "select: a group would keep outputs without inputs or inputs without outputs"
            )
        if len(set(in_counts[live])) > 1 or len(set(out_counts[live])) > 1:
            raise ValueError(
                f"select: the {g} groups would keep unequal channel counts "
                f"(inputs {in_counts[live].tolist()}, outputs {out_counts[live].tolist()})"
            )
        live_groups = np.flatnonzero(live)
        if live_groups.size == 0:
            raise ValueError("select: no channel would remain")
        # ins is sorted and the groups are contiguous, so its rows are the live groups in order;
        # each kept output takes the kept inputs of its own group (within-group indices).
        per_group_in = ins.reshape(live_groups.size, -1) % c_in_group
        rank = np.searchsorted(live_groups, out_group)
        kernel = self.kernel[outs[:, None], per_group_in[rank]]
        bias = self.channel_bias[outs] if self.has_bias else None
        return self._with(kernel, bias, int(live.sum()))

    def select_outputs(self, keep) -> ConvOperator:
        return self.select(outputs=keep)

    def select_inputs(self, keep) -> ConvOperator:
        return self.select(inputs=keep)


class AveragePoolOperator(LinearOperator):
    """ONNX ``AveragePool`` or ``GlobalAveragePool`` on one ``(C, *S)`` sample.

    Each output is the mean of its window: with ``count_include_pad = 1`` the divisor counts the
    window's elements inside the padded input (the zero pads count), with ``count_include_pad =
    0`` only those inside the input. ``ceil_mode = 1`` rounds the output size up, keeping only
    windows that start inside the input or its begin pad; the part of such a window beyond the
    end pad counts in neither divisor. Written as a depthwise convolution with a kernel of ones
    (its end pads grown to fit the last window) followed by the per-position factor
    ``1 / divisor``; 0 parameters and 0 MACs (onnxsim's count).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        kernel_shape: Sequence[int],
        pads: Sequence[int] | None = None,
        strides: Sequence[int] | None = None,
        dilations: Sequence[int] | None = None,
        count_include_pad: bool = False,
        ceil_mode: bool = False,
    ) -> None:
        channels, *spatial = (int(s) for s in input_shape)
        d = len(spatial)
        self.kernel_shape = tuple(int(k) for k in kernel_shape)
        self.pads = tuple(int(p) for p in pads) if pads is not None else (0,) * (2 * d)
        self.strides = tuple(int(s) for s in strides) if strides is not None else (1,) * d
        self.dilations = tuple(int(s) for s in dilations) if dilations is not None else (1,) * d
        self.count_include_pad, self.ceil_mode = bool(count_include_pad), bool(ceil_mode)
        extra = self._ceil_extra(spatial) if self.ceil_mode else (0,) * d
        grown = (*self.pads[:d], *(p + e for p, e in zip(self.pads[d:], extra, strict=True)))
        ones = np.ones((channels, 1, *self.kernel_shape))
        self._conv = ConvOperator(
            ones, None, spatial, grown, self.strides, self.dilations, channels
        )
        # The divisor counts ones: over the padded input (include) or the input (exclude).
        counted = spatial
        counter_pads = grown
        if self.count_include_pad:
            counted = [s + self.pads[i] + self.pads[d + i] for i, s in enumerate(spatial)]
            counter_pads = (0,) * d + tuple(extra)
        counter = ConvOperator(
            np.ones((1, 1, *self.kernel_shape)), None, counted, counter_pads, self.strides,
            self.dilations,
        )  # fmt: skip
        divisor = counter.linear(np.ones((1, math.prod(counted))))[0]
        divisor = np.maximum(divisor, 1.0).reshape(self._conv.output_shape[1:])
        factor = np.broadcast_to(1.0 / divisor, self._conv.output_shape)
        self.factor = np.ascontiguousarray(factor).reshape(-1)
        self.input_shape = self._conv.input_shape
        self.output_shape = self._conv.output_shape
        self.bias = np.zeros(self.n_out)

    def _ceil_extra(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Elements past the end pad that ``ceil_mode`` windows reach, per axis."""
        d = len(spatial)
        extra = []
        for i, size in enumerate(spatial):
            extent = self.dilations[i] * (self.kernel_shape[i] - 1) + 1
            padded = size + self.pads[i] + self.pads[d + i]
            out = -(-(padded - extent) // self.strides[i]) + 1
            if (out - 1) * self.strides[i] >= size + self.pads[i]:
                out -= 1
            extra.append(max(0, (out - 1) * self.strides[i] + extent - padded))
        return tuple(extra)

    @classmethod
    def global_pool(cls, input_shape: Sequence[int]) -> AveragePoolOperator:
        """``GlobalAveragePool``: one window over the whole spatial extent."""
        return cls(input_shape, tuple(input_shape[1:]))

    def linear(self, x: np.ndarray) -> np.ndarray:
        return self._conv.linear(x) * self.factor

    def transpose(self, l: np.ndarray) -> np.ndarray:  # noqa: E741
        return self._conv.transpose(self._batch(l, self.n_out, "transpose") * self.factor)

    def abs(self) -> AveragePoolOperator:
        return self  # every coefficient is positive, the bias is 0

    def select_channels(self, keep) -> AveragePoolOperator:
        """The pool on the channels ``keep`` only (pooling never mixes channels)."""
        channels = _as_index(keep, self.input_shape[0], "select_channels")
        return AveragePoolOperator(
            (channels.size, *self.input_shape[1:]), self.kernel_shape, self.pads, self.strides,
            self.dilations, self.count_include_pad, self.ceil_mode,
        )  # fmt: skip


class MeanOperator(LinearOperator):
    """ONNX ``ReduceMean`` of one sample over ``axes`` (sample axes, the batch excluded): each
    output is the mean of the inputs that agree with it on the other axes; with ``keepdims``
    the reduced axes stay with extent 1, else they go. 0 parameters and 0 MACs (a pooling, as
    onnxsim counts it). Its adjoint spreads each row equally over its inputs."""

    def __init__(self, input_shape: Sequence[int], axes: Sequence[int], keepdims: bool) -> None:
        self.input_shape = tuple(int(s) for s in input_shape)
        self.axes = tuple(sorted({int(a) for a in axes}))
        if not self.axes or min(self.axes) < 0 or max(self.axes) >= len(self.input_shape):
            raise ValueError(f"MeanOperator: axes {axes} do not fit {self.input_shape}")
        self._kept = tuple(1 if i in self.axes else s for i, s in enumerate(self.input_shape))
        self.output_shape = (
            self._kept
            if keepdims
            else tuple(s for i, s in enumerate(self.input_shape) if i not in self.axes)
        )
        self.count = math.prod(self.input_shape[a] for a in self.axes)
        self.bias = np.zeros(self.n_out)

    def linear(self, x: np.ndarray) -> np.ndarray:
        x = self._batch(x, self.n_in, "linear").reshape(-1, *self.input_shape)
        return x.mean(axis=tuple(a + 1 for a in self.axes)).reshape(x.shape[0], self.n_out)

    def transpose(self, l: np.ndarray) -> np.ndarray:  # noqa: E741
        l = self._batch(l, self.n_out, "transpose").reshape(-1, *self._kept)  # noqa: E741
        spread = np.broadcast_to(l / self.count, (l.shape[0], *self.input_shape))
        return spread.reshape(l.shape[0], self.n_in).copy()

    def abs(self) -> MeanOperator:
        return self  # every coefficient is positive, the bias is 0

    def first_sources(self) -> np.ndarray:
        """For each output, the flat index of the first input it averages (how per-element
        labels such as channels follow the op when they are constant along ``axes``)."""
        grid = np.arange(self.n_in).reshape(self.input_shape)
        first = grid[
            tuple(slice(0, 1) if i in self.axes else slice(None) for i in range(grid.ndim))
        ]
        return first.reshape(-1)


class IndexOperator(LinearOperator):
    """Data movement: output ``j`` is input ``source[j]``, or 0 where ``source[j] = −1``, plus
    ``bias[j]`` (a constant pad value).

    ``Transpose``, ``Reshape``/``Flatten`` (permutations of the flat index) and constant ``Pad``
    (an injection plus constants; negative pads drop inputs) are all of this form. Each input
    feeds at most one output (checked), so the adjoint is a plain scatter of the rows back.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        output_shape: Sequence[int],
        source: np.ndarray,
        bias: np.ndarray | None = None,
    ) -> None:
        self.input_shape = tuple(int(s) for s in input_shape)
        self.output_shape = tuple(int(s) for s in output_shape)
        self.source = np.asarray(source, dtype=np.int64).reshape(-1)
        if self.source.size != self.n_out:
            raise ValueError(f"IndexOperator: {self.source.size} sources for {self.n_out} outputs")
        self.bias = np.zeros(self.n_out) if bias is None else np.asarray(bias, np.float64)
        self._targets = np.flatnonzero(self.source >= 0)
        used = self.source[self._targets]
        if used.size and (used.max() >= self.n_in or np.unique(used).size != used.size):
            raise ValueError("IndexOperator: sources must be distinct inputs")

    def linear(self, x: np.ndarray) -> np.ndarray:
        x = self._batch(x, self.n_in, "linear")
        y = np.zeros((x.shape[0], self.n_out))
        y[:, self._targets] = x[:, self.source[self._targets]]
        return y

    def transpose(self, l: np.ndarray) -> np.ndarray:  # noqa: E741
        l = self._batch(l, self.n_out, "transpose")  # noqa: E741
        out = np.zeros((l.shape[0], self.n_in))
        out[:, self.source[self._targets]] = l[:, self._targets]
        return out

    def abs(self) -> IndexOperator:
        return IndexOperator(self.input_shape, self.output_shape, self.source)


class TransposeOperator(IndexOperator):
    """ONNX ``Transpose`` of one sample; ``perm`` over the sample's axes (the batch axis, which
    must stay first in the model, is excluded: model perm ``(0, 2, 3, 1)`` is ``(1, 2, 0)``)."""

    def __init__(self, input_shape: Sequence[int], perm: Sequence[int]) -> None:
        flat = np.arange(math.prod(input_shape)).reshape(tuple(input_shape))
        moved = flat.transpose(tuple(perm))
        super().__init__(input_shape, moved.shape, moved.reshape(-1))
        self.perm = tuple(int(p) for p in perm)


class ReshapeOperator(IndexOperator):
    """``Reshape`` / ``Flatten`` of one sample: the C-order flat index does not change."""

    def __init__(self, input_shape: Sequence[int], output_shape: Sequence[int]) -> None:
        if math.prod(input_shape) != math.prod(output_shape):
            raise ValueError(f"ReshapeOperator: {tuple(input_shape)} → {tuple(output_shape)}")
        super().__init__(input_shape, output_shape, np.arange(math.prod(input_shape)))


class PadOperator(IndexOperator):
    """ONNX ``Pad`` in ``constant`` mode on one sample: ``pads`` as ONNX orders them over the
    sample's axes ``(begin_1, …, begin_r, end_1, …, end_r)``; negative pads crop. The padded
    positions hold ``value`` (the operator's bias)."""

    def __init__(self, input_shape: Sequence[int], pads: Sequence[int], value: float = 0.0) -> None:
        shape = tuple(int(s) for s in input_shape)
        r = len(shape)
        if len(pads) != 2 * r:
            raise ValueError(f"PadOperator: {len(pads)} pads for {r} axes")
        begin, end = list(pads[:r]), list(pads[r:])
        out_shape = tuple(s + b + e for s, b, e in zip(shape, begin, end, strict=True))
        if min(out_shape) < 0:
            raise ValueError(f"PadOperator: pads {tuple(pads)} crop more than {shape}")
        grids = np.meshgrid(
            *(np.arange(n) - b for n, b in zip(out_shape, begin, strict=True)), indexing="ij"
        )
        inside = np.ones(out_shape, dtype=bool)
        for axis, grid in enumerate(grids):
            inside &= (grid >= 0) & (grid < shape[axis])
        source = np.full(out_shape, -1, dtype=np.int64)
        if inside.any():
            source[inside] = np.ravel_multi_index(tuple(g[inside] for g in grids), shape)
        bias = np.where(inside, 0.0, float(value)).reshape(-1)
        super().__init__(shape, out_shape, source, bias)
        self.pads = tuple(int(p) for p in pads)
        self.value = float(value)
