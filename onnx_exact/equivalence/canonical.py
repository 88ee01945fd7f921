"""The canonical form of two ReLU networks over shared free variables (structure sharing).

Both networks are written over one set of *free variables* ``V``: the raw input ``x`` (the box is
given on it; each network's preprocessing ``x_net = scale * x + shift`` becomes part of its first
layer) and the outputs ``h_u`` of the ReLU neurons that are not proved stable. Walking through each
network layer by layer, every quantity ``q`` is kept as an affine form ``q = e . V + c`` with an
error bound ``err``: ``|q(x) - (e . V(x) + c)| <= err`` for every ``x`` in the box. With
``y = W h + b``::

    e_y = W e_h,   c_y = W c_h + b,   err_y = |W| err_h + gamma_(n+1) (|W| (|e_h| |V|max + |c_h|) + |b|)

(``gamma_n = n u / (1 - n u)`` bounds the float64 rounding of the products; ``u = 2^-53``). Every
ReLU neuron is first matched against the free neurons registered so far (of either network): when
its pre-activation form is ``lam > 0`` times the form of ``y_u`` up to a residual, it is *shared*,
``h = lam h_u``, because ``relu`` is positively homogeneous; ``relu`` is 1-Lipschitz, so the
residual ``max_box |(e - lam e_u) . V + c - lam c_u| + err + lam err_u`` becomes the error of ``h``,
and sharing is sound whatever the residual (it is only tried below ``SHARE_RTOL``). The maximum is
exact for an affine form over the box of ``V`` (centre/radius coordinates, :meth:`value_rows`).
Unshared neurons proved INACTIVE (or with an upper bound ``<= 0``) give ``h = 0``, proved ACTIVE
ones (or a lower bound ``>= 0``) and layers without ReLU ``h = y``; an open neuron whose form
matches a stable neuron's is stable up to the residual; the rest become new free variables. This
identifies every neuron a compressor kept (removed inactive neurons are 0, folded layers and
dependent active neurons are linear, duplicates are proportional), so for ``B`` a compression of
``A`` the two output forms agree up to the float32 re-rounding of the folded weights.

What is proved is exact: "matched up to round-off" is not equality, and nothing here treats it
as such. Every residual of a match (the float32 re-rounding of a rescaled or folded row) is
bounded over the box and carried in ``err``, so a bound on ``f_A - f_B`` computed from the forms
holds in exact arithmetic on the stored weights; it is merely far below any useful tolerance.

The walk also records, per ReLU layer of each network, which free variable every neuron became
(:class:`UnitMap`): :mod:`onnx_exact.equivalence.correspondence` reads from it which neurons the two networks
share and which exist in one network only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_exact.core.box import Box
from onnx_exact.core.network import Network
from onnx_exact.core.verdicts import NeuronState, StabilityResult

SHARE_RTOL = 1e-6
"""A neuron is shared with a registered one when the residual of its value form is at most this
fraction of the form's magnitude. The residual is added to its error either way (sharing is sound
for any residual); 1e-6 admits float32 re-rounding of weights (~6e-8 relative), which a compressor
or a re-export with folded preprocessing produces, and nothing a real change of weights does."""

_UNIT_ROUNDOFF = np.finfo(np.float64).eps / 2.0


def gamma(n: int) -> float:
    """``gamma_n = n u / (1 - n u)``: bound on the relative rounding error of an n-term float sum."""
    return n * _UNIT_ROUNDOFF / (1.0 - n * _UNIT_ROUNDOFF)


@dataclass
class Form:
    """Affine forms ``q_i = coeffs[i] . V[:width] + const[i]`` with errors ``err[i]``."""

    coeffs: np.ndarray  # (m, width)
    const: np.ndarray  # (m,)
    err: np.ndarray  # (m,)

    def padded(self, width: int) -> np.ndarray:
        extra = width - self.coeffs.shape[1]
        return np.pad(self.coeffs, ((0, 0), (0, extra))) if extra else self.coeffs


@dataclass
class Batch:
    """Free neurons registered together (one layer): their pre-activation rows and bounds."""

    first: int  # index in V of the first one's h
    rows: Form  # y_u = rows . V[:rows.width] + const (+- err)
    lower: np.ndarray
    upper: np.ndarray


def _proportional(
    rows: np.ndarray, reference: np.ndarray, *, earlier_only: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row ``r``: a reference row ``s`` with ``r ~ lam s``, ``lam > 0``, or ``-1``.

    Returns ``(index, lam, gap)`` with ``gap = |r - lam s|_1``; a match needs
    ``gap <= SHARE_RTOL |r|_1``. Candidates are the most parallel reference rows (cosine above
    ``1 - 1e-6``, a cheap filter any round-off-level match passes); ``lam`` is the least-squares
    factor. With ``earlier_only`` (``reference is rows``), row ``i`` may only match rows ``j < i``
    that are not themselves matched, so every group of duplicates shares its first row.
    """
    count = rows.shape[0]
    index = np.full(count, -1, dtype=np.int64)
    lam = np.zeros(count)
    gap = np.zeros(count)
    if count == 0 or reference.shape[0] == 0:
        return index, lam, gap
    row_norm = np.linalg.norm(rows, axis=1)
    ref_norm = np.linalg.norm(reference, axis=1)
    dots = rows @ reference.T
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = np.nan_to_num(dots / np.outer(row_norm, ref_norm), nan=-1.0)
    if earlier_only:
        cosine[np.triu_indices(count, 0, reference.shape[0])] = -1.0
    for i in np.flatnonzero(cosine.max(axis=1) > 1.0 - 1e-6):
        for j in np.flatnonzero(cosine[i] > 1.0 - 1e-6):
            if earlier_only and index[j] >= 0:
                continue
            factor = dots[i, j] / ref_norm[j] ** 2
            residual = float(np.abs(rows[i] - factor * reference[j]).sum())
            if factor > 0.0 and residual <= SHARE_RTOL * np.abs(rows[i]).sum():
                index[i], lam[i], gap[i] = j, factor, residual
                break
    return index, lam, gap


def _pad_values(values: np.ndarray, width: int) -> np.ndarray:
    """Value rows ``[e * r, e . m + c]`` over ``V[:w]`` widened to ``V[:width]`` (const last)."""
    extra = width + 1 - values.shape[1]
    if not extra:
        return values
    return np.concatenate(
        [values[:, :-1], np.zeros((values.shape[0], extra)), values[:, -1:]], axis=1
    )


@dataclass
class UnitMap:
    """Where the neurons of one ReLU layer of one network went in the canonical form.

    ``column[i]`` is the column of ``V`` whose multiple ``h_i`` is (``h_i = lam V[column[i]]``,
    shared or newly registered), ``-1`` for a stable neuron (``h_i = 0`` or ``h_i = y_i``, proved
    by the analysis or by matching a proved-stable neuron). ``twin[i]`` marks a stable neuron
    whose pre-activation form is a positive multiple of a stable neuron's of the other network
    in the same state (reporting only: stable neurons need no sharing).
    """

    network: str
    layer: int
    name: str
    column: np.ndarray
    twin: np.ndarray
    real: np.ndarray | None = None  # units of the graph (``DenseLayer.real``); None: all

    @property
    def stable(self) -> np.ndarray:
        return self.column < 0


WALK_MAX_BYTES = 1 << 30
"""Largest memory a walk step may hold (its dense forms are ``rows x width`` float64, and the
width grows with every free neuron): a pair of big CNNs that are not one pruned from the other
(:mod:`onnx_exact.equivalence.structural`) would need many GiB. Beyond it the walk stops with
:class:`WalkTooLarge` and the proof says "not proved" instead of exhausting the machine."""

FORM_COPIES = 6
"""Arrays of one layer's ``rows x width`` alive at once in a walk step: the previous form padded,
its absolute value, the new coefficients, the value rows, the activated coefficients, their
padding."""


class WalkTooLarge(Exception):
    """The next walk step would hold more than ``WALK_MAX_BYTES`` (``needed`` bytes)."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


class Canonical:
    """The free variables ``V`` shared by both networks and the output forms over them."""

    def __init__(self, box: Box) -> None:
        self.box = box
        self.n_inputs = box.size
        self.v_lower = [np.asarray(box.lower, dtype=np.float64)]
        self.v_upper = [np.asarray(box.upper, dtype=np.float64)]
        self.batches: list[Batch] = []
        self.stable: list[Form] = []  # value rows of stable neurons; const = +1 active, -1 not
        self.stable_units: list[tuple[UnitMap, np.ndarray]] = []  # whose rows ``stable`` holds
        self.shared = 0
        self.units: list[UnitMap] = []

    @property
    def width(self) -> int:
        return self.n_inputs + sum(b.lower.shape[0] for b in self.batches)

    @property
    def lower(self) -> np.ndarray:
        return np.concatenate(self.v_lower)

    @property
    def upper(self) -> np.ndarray:
        return np.concatenate(self.v_upper)

    @property
    def absmax(self) -> np.ndarray:
        return np.maximum(np.abs(self.lower), np.abs(self.upper))

    def add_network(self, net: Network, stability: StabilityResult, tag: str = "A") -> Form:
        """Walk ``net`` layer by layer; return the form of its output (after a final ReLU).

        Every ReLU layer's :class:`UnitMap` is appended to ``units`` under ``tag``.
        """
        scale, shift = net.input_map.scale, net.input_map.shift
        form: Form | None = None
        for k, layer in enumerate(net.layers):
            self._check_size(layer.out_features, layer.in_features)
            absmax = self.absmax
            weight, bias = layer.weight, layer.bias
            abs_weight = np.abs(weight)
            if form is None:
                coeffs = np.pad(weight * scale, ((0, 0), (0, self.width - self.n_inputs)))
                const = weight @ shift + bias
                magnitude = np.abs(scale) * absmax[: self.n_inputs] + np.abs(shift)
                err = gamma(weight.shape[1] + 1) * (abs_weight @ magnitude + np.abs(bias))
            else:
                inner = form.padded(self.width)
                coeffs = weight @ inner
                const = weight @ form.const + bias
                magnitude = np.abs(inner) @ absmax + np.abs(form.const)
                err = abs_weight @ form.err + gamma(weight.shape[1] + 2) * (
                    abs_weight @ magnitude + np.abs(bias)
                )
            err = err * (1.0 + gamma(4))
            pre = Form(coeffs, const, err)
            if layer.relu:
                real = None if layer.auxiliary is None else layer.real
                unit = UnitMap(tag, k, layer.name, np.zeros(0, np.int64), np.zeros(0, bool), real)
                form = self._activate(pre, stability.layers[k], unit)
                self.units.append(unit)
            else:
                form = pre
        return form

    def _check_size(self, rows: int, previous: int) -> None:
        """Raise :class:`WalkTooLarge` when the next step's forms and what is kept exceed
        ``WALK_MAX_BYTES``."""
        width = self.width + 1
        kept = sum(f.coeffs.nbytes for f in self.stable) + sum(
            b.rows.coeffs.nbytes for b in self.batches
        )
        needed = 8 * width * FORM_COPIES * max(rows, previous) + kept
        if needed > WALK_MAX_BYTES:
            raise WalkTooLarge(needed)

    def _activate(self, pre: Form, verdict, unit: UnitMap) -> Form:
        """Forms of ``h = relu(y)`` for one ReLU layer; fills ``unit``'s columns and twins.

        Every neuron is first matched against the registered free neurons (of either network):
        a match is shared, ``h = lam h_u``, even when this network's analysis proved the neuron
        stable, so that both networks' later layers are written over the same variables. The
        others: stable neurons (by the analysis or their bounds) give 0 or ``y``; an open neuron is
        matched against (a) the stable neurons seen so far: when ``y ~ lam y_s`` with ``y_s >= 0``
        on the box, ``|relu(y) - y| <= |y - lam y_s|``, so ``h = y`` up to that residual (``h = 0``
        likewise for ``y_s <= 0``); (b) earlier open neurons of the same layer; the rest become new
        free variables.
        """
        n = pre.coeffs.shape[0]
        states = np.asarray(verdict.states)
        lower, upper = np.asarray(verdict.lower, float), np.asarray(verdict.upper, float)
        inactive = (states == NeuronState.INACTIVE) | (upper <= 0.0)
        active = ~inactive & ((states == NeuronState.ACTIVE) | (lower >= 0.0))
        width = pre.coeffs.shape[1]
        values = self.value_rows(pre.coeffs, pre.const)
        # A form's error plus the float64 rounding of its value row (what a residual may miss).
        slack = pre.err + self.row_rounding(pre.coeffs, pre.const)
        share_of = np.full(n, -1, dtype=np.int64)  # V column of the free neuron shared, or -1
        factor = np.zeros(n)
        residual = np.zeros(n)  # bound on |y - lam y_u|
        if self.batches:
            registered_err = np.concatenate(
                [
                    b.rows.err + self.row_rounding(b.rows.padded(width), b.rows.const)
                    for b in self.batches
                ]
            )
            registered_col = np.concatenate(
                [b.first + np.arange(b.lower.shape[0]) for b in self.batches]
            )
            match, lam, gap = _proportional(values, np.concatenate(self.batch_values(width)))
            hit = np.flatnonzero(match >= 0)
            share_of[hit] = registered_col[match[hit]]
            factor[hit] = lam[hit]
            residual[hit] = gap[hit] + slack[hit] + lam[hit] * registered_err[match[hit]]
        shared = share_of >= 0
        active &= ~shared
        inactive &= ~shared
        coeffs = np.where(active[:, None], pre.coeffs, 0.0)
        const = np.where(active, pre.const, 0.0)
        err = np.where(active, pre.err, 0.0)

        open_now = np.flatnonzero(~shared & ~active & ~inactive)
        known = [rows for rows in self.stable if rows.coeffs.shape[0]]
        if known and open_now.size:
            signs = np.concatenate([rows.const for rows in known])
            known_err = np.concatenate([rows.err for rows in known])
            stable_values = np.concatenate([_pad_values(rows.coeffs, width) for rows in known])
            match, lam, gap = _proportional(values[open_now], stable_values)
            for position in np.flatnonzero(match >= 0):
                i, j = open_now[position], match[position]
                distance = gap[position] + slack[i] + lam[position] * known_err[j]
                if signs[j] > 0:
                    coeffs[i], const[i], err[i] = pre.coeffs[i], pre.const[i], pre.err[i]
                err[i] += distance
            open_now = open_now[match < 0]
        stable = np.flatnonzero(active | inactive)
        signs_now = np.where(active[stable], 1.0, -1.0)
        unit.twin = self._twins(unit.network, values[stable], signs_now, width, n, stable)
        self.stable.append(Form(values[stable], signs_now, slack[stable]))
        self.stable_units.append((unit, stable))

        match, lam, gap = _proportional(values[open_now], values[open_now], earlier_only=True)
        leaders = open_now[match < 0]
        first_col = self.width
        for position in np.flatnonzero(match >= 0):
            i, leader = open_now[position], open_now[match[position]]
            share_of[i] = first_col + int(np.searchsorted(leaders, leader))
            factor[i] = lam[position]
            residual[i] = gap[position] + slack[i] + lam[position] * slack[leader]
        self._register(pre, leaders, lower[leaders], upper[leaders])

        coeffs = np.pad(coeffs, ((0, 0), (0, self.width - width)))
        shared = share_of >= 0
        coeffs[shared, share_of[shared]] = factor[shared]
        err[shared] = residual[shared] * (1.0 + gamma(width + 3))
        coeffs[leaders, first_col + np.arange(leaders.size)] = 1.0
        self.shared += int(np.count_nonzero(shared))
        unit.column = share_of.copy()
        unit.column[leaders] = first_col + np.arange(leaders.size)
        return Form(coeffs, const, err)

    def _twins(
        self, network: str, values: np.ndarray, signs: np.ndarray, width: int, n: int, rows
    ) -> np.ndarray:
        """Mark the stable neurons ``rows`` (of ``n``) proportional to the other network's stable
        neurons in the same state, and those partners (see :class:`UnitMap`)."""
        twin = np.zeros(n, dtype=bool)
        others = [(u, idx, f) for (u, idx), f in zip(self.stable_units, self.stable, strict=True)
                  if u.network != network and idx.size]  # fmt: skip
        if not others or not rows.size:
            return twin
        reference = np.concatenate([_pad_values(f.coeffs, width) for _, _, f in others])
        ref_signs = np.concatenate([f.const for _, _, f in others])
        owners = [(u, i) for u, idx, _ in others for i in idx]
        match, _, _ = _proportional(values, reference)
        for position in np.flatnonzero(match >= 0):
            if ref_signs[match[position]] == signs[position]:
                twin[rows[position]] = True
                partner, i = owners[match[position]]
                partner.twin[i] = True
        return twin

    def value_rows(self, coeffs: np.ndarray, const: np.ndarray) -> np.ndarray:
        """Forms ``e . V + c`` in box-centred coordinates ``[e * r, e . m + c]``.

        ``m`` and ``r`` are the centre and radius of the box of ``V[:width]``. The l1 norm of a
        row is exactly ``max |e . V + c|`` over that box, so the l1 residual of two rows is the
        largest difference of the two forms: the error a match costs. (Centring matters: raw
        inputs far from 0, like ACAS Xu's ranges in feet, would inflate ``|e| |V|max``.)
        """
        width = coeffs.shape[1]
        lower, upper = self.lower[:width], self.upper[:width]
        centre, radius = (lower + upper) / 2.0, (upper - lower) / 2.0
        return np.concatenate([coeffs * radius, (coeffs @ centre + const)[:, None]], axis=1)

    def row_rounding(self, coeffs: np.ndarray, const: np.ndarray) -> np.ndarray:
        """Bound on the float64 rounding of :meth:`value_rows` and of residuals computed from it."""
        width = coeffs.shape[1]
        magnitude = np.abs(coeffs) @ self.absmax[:width] + np.abs(const)
        return gamma(width + 4) * magnitude

    def batch_values(self, width: int) -> list[np.ndarray]:
        """The registered free neurons' pre-activation forms as :meth:`value_rows`."""
        return [self.value_rows(b.rows.padded(width), b.rows.const) for b in self.batches]

    def _register(self, pre: Form, neurons: np.ndarray, lower, upper) -> None:
        self.batches.append(
            Batch(
                first=self.width,
                rows=Form(pre.coeffs[neurons], pre.const[neurons], pre.err[neurons]),
                lower=np.asarray(lower, dtype=np.float64),
                upper=np.asarray(upper, dtype=np.float64),
            )
        )
        self.v_lower.append(np.zeros(neurons.size))
        self.v_upper.append(np.maximum(upper, 0.0))

    def values(self, x_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(V, y)`` at a raw input: every free variable and free pre-activation, from the forms."""
        v = np.zeros(self.width)
        v[: self.n_inputs] = x_raw
        ys = []
        for batch in self.batches:
            rows = batch.rows
            y = rows.coeffs @ v[: rows.coeffs.shape[1]] + rows.const
            v[batch.first : batch.first + y.shape[0]] = np.maximum(y, 0.0)
            ys.append(np.clip(y, batch.lower, np.maximum(batch.upper, batch.lower)))
        return v, (np.concatenate(ys) if ys else np.zeros(0))
