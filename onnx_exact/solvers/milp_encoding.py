"""The big-M MILP encoding of a ReLU network over a box (one binary per uncertain ReLU).

See :mod:`onnx_exact.solvers` for the encoding and its soundness policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import highspy
import numpy as np

from onnx_exact.core.box import Box
from onnx_exact.core.network import Network
from onnx_exact.core.verdicts import NeuronState
from onnx_exact.solvers.highs_model import FEASIBILITY_TOLERANCE, INF, add_columns, add_rows


@dataclass
class NetworkEncoding:
    """Column indices of a network encoded by :func:`add_network_encoding`.

    ``h[k][i] == -1`` means ``h`` is identically 0 (proved inactive; then ``y[k][i]`` is a free
    column in its bounds, its defining row omitted), or, where ``folded[i]``, a first-layer
    neuron proved active that has no column at all: ``h = W_0[i] x + b_0[i]`` enters the objective
    as that affine function of the input (``y[0][i] == -1`` too); for other proved active neurons
    and linear layers ``h[k][i] == y[k][i]``. ``z[k][i] == -1`` means the neuron has no indicator.
    ``h_lower``/``h_upper`` are the column bounds of ``h`` (0 where ``h`` is 0).
    """

    x: np.ndarray
    box: Box
    y: list[np.ndarray] = field(default_factory=list)
    h: list[np.ndarray] = field(default_factory=list)
    z: list[np.ndarray] = field(default_factory=list)
    h_lower: list[np.ndarray] = field(default_factory=list)
    h_upper: list[np.ndarray] = field(default_factory=list)
    thresholds: list[np.ndarray] = field(default_factory=list)
    upper_rows: list[np.ndarray] = field(default_factory=list)
    """Per layer, ``(2, n)`` row indices of ``h <= U z`` and ``h <= y - L (1 - z)`` (-1: none)."""
    folded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    """Mask over the first layer's neurons encoded as affine functions of ``x`` (see above)."""

    @property
    def has_binaries(self) -> bool:
        """Whether any neuron has an indicator (else the model is an LP)."""
        return any(bool(np.any(z >= 0)) for z in self.z)

    def input_cols(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Live input columns of ``layer``: (mask over its inputs, columns, lower, upper)."""
        if layer == 0:
            live = np.ones(self.x.shape[0], dtype=bool)
            return live, self.x, self.box.lower, self.box.upper
        cols = self.h[layer - 1]
        live = cols >= 0
        return live, cols[live], self.h_lower[layer - 1][live], self.h_upper[layer - 1][live]

    def solution_from_input(self, net: Network, x_net: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All column values of the network point of input ``x_net``, for ``Highs.setSolution``."""
        pre = net.preactivations(x_net)
        cols = [self.x]
        vals = [np.asarray(x_net, dtype=np.float64).reshape(-1)]
        for k, (y_cols, h_cols, z_cols) in enumerate(zip(self.y, self.h, self.z, strict=True)):
            y = pre[k][0]
            binary, encoded = z_cols >= 0, y_cols >= 0
            cols += [y_cols[encoded], h_cols[binary], z_cols[binary]]
            vals += [
                y[encoded],
                np.maximum(y[binary], 0.0),
                (y[binary] >= self.thresholds[k][binary]).astype(np.float64),
            ]
        return np.concatenate(cols).astype(np.int32), np.concatenate(vals)


def _input_absmax(net: Network, box: Box, bounds: Sequence, layer: int) -> np.ndarray:
    """``max(|lo|, |hi|)`` of the inputs of ``layer`` (the box, or the previous layer's outputs)."""
    if layer == 0:
        return np.maximum(np.abs(box.lower), np.abs(box.upper))
    lo, hi = bounds[layer - 1].lower, bounds[layer - 1].upper
    if net.layers[layer - 1].relu:
        lo, hi = np.maximum(lo, 0.0), np.maximum(hi, 0.0)
    return np.maximum(np.abs(lo), np.abs(hi))


def milp_slack(net: Network, box: Box, bounds: Sequence, layer: int) -> np.ndarray:
    """Per-neuron slack added to MILP dual bounds of ``layer`` (see the module's policy).

    ``slack_i = 1e-6 * (sum_j |W_ij| max(|lo_j|, |hi_j|) + |b_i|)``: a MIP point may violate each
    bound and row by the feasibility tolerance, which moves ``y_i`` by at most about this much.
    """
    weight = net.layers[layer].weight
    scale = np.abs(weight) @ _input_absmax(net, box, bounds, layer) + np.abs(net.layers[layer].bias)
    return FEASIBILITY_TOLERANCE * scale


def relu_rows(
    highs: highspy.Highs,
    y: np.ndarray,
    h: np.ndarray,
    z: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    threshold: np.ndarray,
) -> None:
    """Big-M rows of ``h = relu(y)`` with an indicator ``z`` whose threshold is ``t``.

    ``z = 1`` allows exactly ``y >= t``, ``z = 0`` exactly ``y <= t``; with ``Lm = min(L, 0)``,
    ``Up = max(U, 0)``, ``t+ = max(t, 0)``, ``t- = min(t, 0)``::

        h - y >= 0
        h - (Up - t+) z <= t+                      (h <= U z when t <= 0)
        h - y - (Lm - t-) z <= -Lm                 (h <= y - L (1 - z) when t >= 0)
        y - (U - t) z <= t,   y - (t - L) z >= L   (only where t != 0; implied when t = 0)

    Every network point satisfies them with ``z = [y >= t]`` (for ``t < 0`` and ``y`` in
    ``[t, 0]``, ``h = 0 <= y - t``; for ``t > 0`` and ``y`` in ``[0, t]``, ``h = y <= t``), so the
    model stays a relaxation; ``t = 0`` gives the classic big-M and, relaxed, the triangle.
    """
    n = int(y.shape[0])
    if n == 0:
        return
    lm, up = np.minimum(lower, 0.0), np.maximum(upper, 0.0)
    t_pos, t_neg = np.maximum(threshold, 0.0), np.minimum(threshold, 0.0)
    y_abs = np.maximum(np.abs(lower), np.abs(upper))
    one, zero = np.ones(n), np.zeros(n)
    blocks = [  # (lower, upper, [(cols, vals, absmax), ...])
        (zero, np.full(n, INF), [(h, one, up), (y, -one, y_abs)]),
        (np.full(n, -INF), t_pos, [(h, one, up), (z, -(up - t_pos), one)]),
        (np.full(n, -INF), -lm, [(h, one, up), (y, -one, y_abs), (z, -(lm - t_neg), one)]),
    ]
    shifted = threshold != 0
    if shifted.any():
        s = shifted
        blocks.append(
            (
                np.full(s.sum(), -INF),
                threshold[s],
                [(y[s], one[s], y_abs[s]), (z[s], -(upper[s] - threshold[s]), one[s])],
            )
        )
        blocks.append(
            (
                lower[s],
                np.full(s.sum(), INF),
                [(y[s], one[s], y_abs[s]), (z[s], -(threshold[s] - lower[s]), one[s])],
            )
        )
    offset = 0
    lows, ups, rows, cols, vals, absmax = [], [], [], [], [], []
    for block_lower, block_upper, terms in blocks:
        m = int(block_lower.shape[0])
        lows.append(block_lower)
        ups.append(block_upper)
        rows.append(np.repeat(np.arange(offset, offset + m), len(terms)))
        cols.append(np.stack([t[0] for t in terms], axis=1).ravel())
        vals.append(np.stack([t[1] for t in terms], axis=1).ravel())
        absmax.append(np.stack([t[2] for t in terms], axis=1).ravel())
        offset += m
    add_rows(
        highs,
        np.concatenate(lows),
        np.concatenate(ups),
        np.concatenate(rows),
        np.concatenate(cols),
        np.concatenate(vals),
        np.concatenate(absmax),
    )


def add_network_encoding(
    highs: highspy.Highs,
    net: Network,
    box: Box,
    bounds: Sequence,
    states: Sequence[np.ndarray],
    upto_layer: int,
    input_cols: np.ndarray | None = None,
    *,
    integral: bool = True,
    thresholds: Sequence[np.ndarray] | None = None,
    fold_active_first_layer: bool = False,
) -> NetworkEncoding:
    """Encode layers ``0..upto_layer`` of ``net`` over the network-space ``box`` into ``highs``.

    Parameters
    ----------
    bounds : sound ``LayerBounds`` of layers ``0..upto_layer`` (they become the columns' bounds and
        the big-M constants).
    states : ``NeuronState`` arrays for a prefix of the layers; ACTIVE gives ``h = y`` (and clips
        ``L`` to 0), INACTIVE gives ``h = 0`` (and clips ``U`` to 0), anything else -- and layers
        beyond the prefix -- gets an indicator when ``L < t < U``, else follows its bounds.
    input_cols : existing input columns to share (two networks over one input); new ones otherwise.
    integral : binaries (MILP) or continuous ``z`` in ``[0, 1]`` (triangle LP).
    thresholds : per layer, the indicator threshold ``t`` (default 0) -- the ISA's margin shift.
    fold_active_first_layer : with ``upto_layer == 0``, give the first layer's proved-active
        neurons no column and no row (``NetworkEncoding.folded``); the objective of
        :func:`direction_objective` takes them as affine functions of ``x``. Why: their rows are redundant,
        the first layer's bounds being its exact interval bounds over the box, and on a regularised
        network the proved-active rows can be most of the dense first-layer rows, which are the
        largest part of the matrix.
    """
    active_state, inactive_state = NeuronState.ACTIVE, NeuronState.INACTIVE
    if input_cols is None:
        x = add_columns(highs, box.lower, box.upper)
    else:
        x = np.asarray(input_cols, dtype=np.int64)
    enc = NetworkEncoding(x=x, box=box)
    for k in range(upto_layer + 1):
        layer = net.layers[k]
        n = layer.out_features
        lower = np.array(bounds[k].lower, dtype=np.float64)
        upper = np.array(bounds[k].upper, dtype=np.float64)
        state = np.asarray(states[k]) if k < len(states) else np.full(n, NeuronState.UNDECIDED)
        if layer.relu:
            lower = np.where(state == active_state, np.maximum(lower, 0.0), lower)
            upper = np.where(state == inactive_state, np.minimum(upper, 0.0), upper)
            upper = np.maximum(upper, lower)
        threshold = np.zeros(n) if thresholds is None else np.asarray(thresholds[k], dtype=float)
        folded = np.zeros(n, dtype=bool)
        if layer.relu and fold_active_first_layer and k == 0 == upto_layer and thresholds is None:
            folded = (state == active_state) | ((lower >= 0) & (state != inactive_state))
            enc.folded = folded
        y = np.full(n, -1, dtype=np.int64)
        y[~folded] = add_columns(highs, lower[~folded], upper[~folded])
        z = np.full(n, -1, dtype=np.int64)
        upper_rows = np.full((2, n), -1, dtype=np.int64)
        if layer.relu:
            proved = (state == active_state) | (state == inactive_state)
            binary = (lower < threshold) & (threshold < upper) & ~proved
            active = ~binary & ((state == active_state) | ((lower >= 0) & ~proved))
            inactive = ~binary & ~active
            if np.any(inactive & (upper > 0) & (state != inactive_state)):
                raise ValueError(
                    f"layer {k}: an indicator threshold lies outside its neuron's bounds"
                )
        else:
            inactive = np.zeros(n, dtype=bool)

        # y = W h_prev + b; an inactive neuron's row is omitted (its h is 0 whatever y is).
        live, in_cols, in_lo, in_hi = enc.input_cols(k)
        rows = np.flatnonzero(~inactive & ~folded)
        weight = layer.weight[rows][:, live]
        n_rows, m = int(rows.shape[0]), int(in_cols.shape[0])
        in_absmax = np.maximum(np.abs(in_lo), np.abs(in_hi))
        y_absmax = np.maximum(np.abs(lower), np.abs(upper))[rows]
        add_rows(
            highs,
            layer.bias[rows],
            layer.bias[rows],
            np.repeat(np.arange(n_rows), m + 1),
            np.concatenate([y[rows, None], np.broadcast_to(in_cols, (n_rows, m))], axis=1).ravel(),
            np.concatenate([np.ones((n_rows, 1)), -weight], axis=1).ravel(),
            np.concatenate(
                [y_absmax[:, None], np.broadcast_to(in_absmax, (n_rows, m))], axis=1
            ).ravel(),
        )

        if not layer.relu:
            h, h_lo, h_hi = y, lower, upper
        else:
            h = np.where(active & ~folded, y, -1)
            h_binary = add_columns(highs, np.zeros(binary.sum()), np.maximum(upper[binary], 0.0))
            z_binary = add_columns(
                highs, np.zeros(binary.sum()), np.ones(binary.sum()), integer=integral
            )
            h[binary], z[binary] = h_binary, z_binary
            first_row, n_binary = highs.getNumRow(), int(binary.sum())
            upper_rows[:, binary] = (
                first_row + n_binary * np.arange(1, 3)[:, None] + np.arange(n_binary)
            )
            relu_rows(
                highs,
                y[binary],
                h_binary,
                z_binary,
                lower[binary],
                upper[binary],
                threshold[binary],
            )
            h_lo = np.where(active, lower, 0.0)
            h_hi = np.where(active, upper, np.where(binary, np.maximum(upper, 0.0), 0.0))
        enc.y.append(y)
        enc.h.append(h)
        enc.z.append(z)
        enc.h_lower.append(h_lo)
        enc.h_upper.append(h_hi)
        enc.thresholds.append(threshold)
        enc.upper_rows.append(upper_rows)
    return enc


def layer_encoding(
    highs: highspy.Highs,
    net: Network,
    box: Box,
    bounds: Sequence,
    states: Sequence[np.ndarray],
    layer: int,
    *,
    integral: bool,
) -> NetworkEncoding:
    """The layers below ``layer``, as the tiers of that layer encode them (first-layer folding on).

    The triangle LP and the decision MILP of one layer must number their columns alike: the
    MILP adds the LP's cut rows (:attr:`LayerRelaxation.cuts`) by column index. Both build their
    model here, from the same bounds and states, so only the indicators' integrality differs.
    """
    return add_network_encoding(
        highs, net, box, bounds, states, layer - 1, integral=integral, fold_active_first_layer=True
    )
