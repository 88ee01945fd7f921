"""Are two ReLU models the same on a box? Sampled with onnxruntime, and proved with HiGHS.

Sampling (:func:`onnx_exact.verify.compare_models`) checks the float32 artefacts on the box centre,
its corners, Bernoulli corners, uniform samples and the kink-adjacent witnesses of the stability
analysis. It cannot see a difference confined to a thin region of the box. The proof can: it bounds
``max |f_A(x) - f_B(x)|`` over *every* ``x`` in the box, in exact arithmetic on the stored weights,
per output coordinate and sign, or finds a concrete input that violates the tolerance.

The canonical form (structure sharing)
--------------------------------------
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

The tiers
---------
0. ``stability``: each network's cheap stability tiers (witnesses, interval, symbolic; at most
   ``STABILITY_TIME_LIMIT``), or the analysis ``compress`` already ran; stable neurons need no
   binary.
1. ``symbolic``: ``d = e_A - e_B`` and ``d0 = c_A - c_B`` per output; over the product box of ``V``
   (``x`` in the box, ``h_u`` in ``[0, max(U_u, 0)]``), ``sign * (d . V + d0) + err_A + err_B`` is
   maximised coordinate-wise. For a compressed model ``d`` is round-off and the bound is the
   accumulated error (1e-11 .. 1e-6 on the shared models; ~1e-2 on ACAS Xu, whose outputs reach
   1e3 and whose folded float32 weights are amplified through six layers).
2. ``milp``: one HiGHS model over ``V`` for all outputs and signs: ``x`` in the box; per free neuron
   ``u`` a column ``y_u`` in its proved bounds ``[L_u, U_u]`` with the row
   ``y_u - e_u . V`` in ``[c_u - err_u, c_u + err_u]`` (a relaxation of the true network point) and
   the big-M ReLU ``h_u = relu(y_u)`` with one binary (:func:`onnx_exact.milp._relu_rows`); shared
   neurons need no column and no binary. Per output and sign (largest symbolic bound first), the
   decision MILP minimises ``-sign d . V`` with cutoff ``sign d0 + err + slack - tol`` (a pruned
   search proves ``max sign Delta <= tol``) and target ``sign d0 - tol - slack`` (stop at a likely
   violation). The slack ``1e-9 (|d| . |V|max + |d0| + 1)`` covers the solver's feasibility
   tolerance (1e-9 here), the policy of :mod:`onnx_exact.milp`; MILP dual bounds are not
   certifiable beyond it. Outputs whose error floor ``err + slack`` reaches ``tol`` are not sent
   to the MILP (it could not prove them, and the widened rows admit spurious violations).

Every solver point is re-evaluated by float64 forward passes of both networks; a violation counts
as a counterexample only after it is made representable in the model's input dtype (inside the
box) and replayed in onnxruntime with a difference above ``tol``. A time limit gives "not proved"
with the best bound, never "equivalent".

The proof's tolerance is absolute: ``tol`` defaults to the sampled check's ``atol`` of the output.
It is about the network's end tensor; when a model has a tail after it (Softmax, ArgMax, ...), the
proof bounds the tensor that feeds the tail, and the report says so.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import highspy
import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from . import milp
from .domain import Box, InputLayout, model_input_dims
from .errors import OnnxExactError, UsageError
from .network import Network
from .onnx_reader import ReadResult, read_model
from .stability import NeuronState, StabilityResult, analyze_stability
from .verify import EquivalenceReport, compare_models, run_model

ModelSource = str | os.PathLike | onnx.ModelProto | ReadResult
Replay = Callable[[np.ndarray], tuple[float, bool]]
"""``replay(x_raw) -> (largest onnxruntime |f_A - f_B| on the proved outputs, exceeds tol)``."""

PROOF_FEASIBILITY_TOLERANCE = 1e-9
"""Primal and MIP feasibility tolerance of the proof MILP; the basis of its slack."""

SHARE_RTOL = 1e-6
"""A neuron is shared with a registered one when the residual of its value form is at most this
fraction of the form's magnitude. The residual is added to its error either way (sharing is sound
for any residual); 1e-6 admits float32 re-rounding of weights (~6e-8 relative), which a compressor
or a re-export with folded preprocessing produces, and nothing a real change of weights does."""

STABILITY_SHARE = 0.25
"""Fraction of a proof's time limit each network's stability analysis may use."""

STABILITY_TIME_LIMIT = 10.0
"""Cap (seconds) on each network's stability analysis inside a proof: the analysis only saves
binaries (an undecided neuron is a free variable of the MILP), so it must not eat the proof."""

PROOF_STABILITY_TIERS: tuple[str, ...] = ()
"""Solver tiers of those analyses: none. Witnesses, interval and symbolic bounds settle most
neurons in well under a second; per-neuron LPs and MILPs would decide the rest one by one, which
the single product MILP does jointly (and only when the symbolic tier could not prove)."""

_UNIT_ROUNDOFF = np.finfo(np.float64).eps / 2.0
_INF = highspy.kHighsInf
_MODEL_STATUS = highspy.HighsModelStatus


def _gamma(n: int) -> float:
    """``gamma_n = n u / (1 - n u)``: bound on the relative rounding error of an n-term float sum."""
    return n * _UNIT_ROUNDOFF / (1.0 - n * _UNIT_ROUNDOFF)


# ----------------------------------------------------------------------------- results


@dataclass
class DirectionBound:
    """The proof's answer for one output coordinate and sign: ``max sign * (f_A - f_B)``.

    ``bound`` is a proved upper bound (``inf`` if none); ``tier`` the tier that gave it
    ("symbolic", "milp"); ``status`` is "proved" (``bound <= tol``), "violated" (a replayed
    counterexample) or "open".
    """

    output: int
    sign: int
    bound: float
    tier: str
    status: str


@dataclass
class Counterexample:
    """An input in the box where the models differ by more than the tolerance.

    ``input`` is the raw flattened input exactly as fed to onnxruntime (representable in the
    input dtype, inside the box); ``exact_difference`` is ``f_A - f_B`` of output coordinate
    ``output`` in float64 on the stored weights; ``replayed_difference`` the largest
    ``|f_A - f_B|`` onnxruntime gives on the compared outputs.
    """

    input: np.ndarray
    output: int
    exact_difference: float
    replayed_difference: float


@dataclass
class ProofResult:
    """The verdict of :func:`prove_equivalence`.

    Attributes
    ----------
    status : "proved" (every output and sign bounded by ``tol``), "counterexample" (a violation
        that replays), "not proved" (time limit, or a violation that does not replay in float32),
        "not applicable" (a model the reader cannot turn into a ReLU network, or mismatched
        interfaces; ``notes`` say why).
    tolerance : the absolute ``tol`` proved against.
    bound : ``max`` over outputs and signs of the proved bounds on ``|f_A - f_B|`` (``inf`` when
        some direction has none); when proved, the ``epsilon`` of "equivalent up to epsilon".
    tiers : the tiers that proved directions ("symbolic", "milp").
    directions : per output coordinate and sign.
    counterexample : set iff ``status == "counterexample"``.
    best_difference : the largest ``|f_A - f_B|`` (float64) seen at a concrete input of the box.
    free_neurons, shared_neurons, binaries : size of the canonical form: registered free neurons,
        neurons shared with one of them, and binaries of the MILP (0 if it was not needed).
    output_tensor : the tensor the proof is about (the network's end tensor).
    time_limit_hit : the deadline passed with some direction still open.
    error_floor : the largest accumulated error of the canonical forms (float64 round-off of the
        forms, plus the residuals of shared neurons: e.g. a compressor's float32 re-rounding of
        folded weights); no tier can prove a bound below it.
    """

    status: str
    tolerance: float
    bound: float
    tiers: list[str] = field(default_factory=list)
    directions: list[DirectionBound] = field(default_factory=list)
    counterexample: Counterexample | None = None
    best_difference: float = 0.0
    free_neurons: int = 0
    shared_neurons: int = 0
    binaries: int = 0
    time_s: float = 0.0
    timings_s: dict[str, float] = field(default_factory=dict)
    output_tensor: str = ""
    notes: list[str] = field(default_factory=list)
    time_limit_hit: bool = False
    error_floor: float = 0.0

    @property
    def proved(self) -> bool:
        return self.status == "proved"

    def to_json(self) -> dict[str, Any]:
        example = self.counterexample
        return {
            "status": self.status,
            "tolerance": _json_float(self.tolerance),
            "bound": _json_float(self.bound),
            "tiers": self.tiers,
            "best_difference": _json_float(self.best_difference),
            "output_tensor": self.output_tensor,
            "free_neurons": self.free_neurons,
            "shared_neurons": self.shared_neurons,
            "binaries": self.binaries,
            "time_s": self.time_s,
            "time_limit_hit": self.time_limit_hit,
            "error_floor": _json_float(self.error_floor),
            "timings_s": self.timings_s,
            "directions": [
                {
                    "output": d.output,
                    "sign": d.sign,
                    "bound": _json_float(d.bound),
                    "tier": d.tier,
                    "status": d.status,
                }
                for d in self.directions
            ],
            "counterexample": None
            if example is None
            else {
                "input": example.input.tolist(),
                "output": example.output,
                "exact_difference": example.exact_difference,
                "replayed_difference": example.replayed_difference,
            },
            "notes": self.notes,
        }


@dataclass
class CheckReport:
    """Sampled comparison plus (optionally) the proof, for ``onnx-exact check``.

    ``passed`` is the exit-code verdict: the samples passed and the proof found no counterexample
    (a proof that ran out of time does not fail the check; ``proof.status`` says it).
    """

    model_a: str
    model_b: str
    box: Box
    sampled: EquivalenceReport
    proof: ProofResult | None
    counterexample_path: str | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.sampled.passed and (self.proof is None or self.proof.status != "counterexample")

    def to_json(self) -> dict[str, Any]:
        sampled = self.sampled
        return {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "domain_source": self.box.source,
            "passed": self.passed,
            "sampled": {
                "samples": sampled.samples,
                "passed": sampled.passed,
                "atol": sampled.atol,
                "rtol": sampled.rtol,
                "max_abs_diff": _json_float(sampled.max_abs_diff),
                "max_rel_diff": _json_float(sampled.max_rel_diff),
                "outputs": [
                    {
                        "name": o.name,
                        "passed": o.passed,
                        "max_abs_diff": _json_float(o.max_abs_diff),
                        "max_rel_diff": _json_float(o.max_rel_diff),
                        "where": o.where_abs,
                        "required_atol": _json_float(o.required_atol),
                        "required_rtol": _json_float(o.required_rtol),
                        "mismatched_elements": o.mismatched_elements,
                    }
                    for o in sampled.outputs
                ],
            },
            "proof": None if self.proof is None else self.proof.to_json(),
            "counterexample_path": self.counterexample_path,
            "timings_s": self.timings_s,
        }

    def write_json(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_json(), handle, indent=2)


def _json_float(value: float) -> float | str:
    """JSON has no infinities: write them as strings."""
    return float(value) if math.isfinite(value) else str(float(value))


# ----------------------------------------------------------------------------- canonical form


@dataclass
class _Form:
    """Affine forms ``q_i = coeffs[i] . V[:width] + const[i]`` with errors ``err[i]``."""

    coeffs: np.ndarray  # (m, width)
    const: np.ndarray  # (m,)
    err: np.ndarray  # (m,)

    def padded(self, width: int) -> np.ndarray:
        extra = width - self.coeffs.shape[1]
        return np.pad(self.coeffs, ((0, 0), (0, extra))) if extra else self.coeffs


@dataclass
class _Batch:
    """Free neurons registered together (one layer): their pre-activation rows and bounds."""

    first: int  # index in V of the first one's h
    rows: _Form  # y_u = rows . V[:rows.width] + const (+- err)
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


class _Canonical:
    """The free variables ``V`` shared by both networks and the output forms over them."""

    def __init__(self, box: Box) -> None:
        self.box = box
        self.n_inputs = box.size
        self.v_lower = [np.asarray(box.lower, dtype=np.float64)]
        self.v_upper = [np.asarray(box.upper, dtype=np.float64)]
        self.batches: list[_Batch] = []
        self.stable: list[_Form] = []  # value rows of stable neurons; const = +1 active, -1 not
        self.shared = 0

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

    def add_network(self, net: Network, stability: StabilityResult) -> _Form:
        """Walk ``net`` layer by layer; return the form of its output (after a final ReLU)."""
        scale, shift = net.input_map.scale, net.input_map.shift
        form: _Form | None = None
        for k, layer in enumerate(net.layers):
            absmax = self.absmax
            weight, bias = layer.weight, layer.bias
            abs_weight = np.abs(weight)
            if form is None:
                coeffs = np.pad(weight * scale, ((0, 0), (0, self.width - self.n_inputs)))
                const = weight @ shift + bias
                magnitude = np.abs(scale) * absmax[: self.n_inputs] + np.abs(shift)
                err = _gamma(weight.shape[1] + 1) * (abs_weight @ magnitude + np.abs(bias))
            else:
                inner = form.padded(self.width)
                coeffs = weight @ inner
                const = weight @ form.const + bias
                magnitude = np.abs(inner) @ absmax + np.abs(form.const)
                err = abs_weight @ form.err + _gamma(weight.shape[1] + 2) * (
                    abs_weight @ magnitude + np.abs(bias)
                )
            err = err * (1.0 + _gamma(4))
            pre = _Form(coeffs, const, err)
            form = self._activate(pre, stability.layers[k]) if layer.relu else pre
        return form

    def _activate(self, pre: _Form, verdict) -> _Form:
        """Forms of ``h = relu(y)`` for one ReLU layer.

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
        self.stable.append(
            _Form(values[stable], np.where(active[stable], 1.0, -1.0), slack[stable])
        )

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
        err[shared] = residual[shared] * (1.0 + _gamma(width + 3))
        coeffs[leaders, first_col + np.arange(leaders.size)] = 1.0
        self.shared += int(np.count_nonzero(shared))
        return _Form(coeffs, const, err)

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
        return _gamma(width + 4) * magnitude

    def batch_values(self, width: int) -> list[np.ndarray]:
        """The registered free neurons' pre-activation forms as :meth:`value_rows`."""
        return [self.value_rows(b.rows.padded(width), b.rows.const) for b in self.batches]

    def _register(self, pre: _Form, neurons: np.ndarray, lower, upper) -> None:
        self.batches.append(
            _Batch(
                first=self.width,
                rows=_Form(pre.coeffs[neurons], pre.const[neurons], pre.err[neurons]),
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


# ----------------------------------------------------------------------------- the proof MILP


class _ProofModel:
    """The product MILP over the canonical form (see the module docstring, tier 2)."""

    def __init__(self, canonical: _Canonical) -> None:
        self.canonical = canonical
        highs = milp._new_highs()
        milp._set_options(
            highs,
            primal_feasibility_tolerance=PROOF_FEASIBILITY_TOLERANCE,
            mip_feasibility_tolerance=PROOF_FEASIBILITY_TOLERANCE,
            mip_heuristic_run_feasibility_jump=False,
        )
        self.highs = highs
        absmax = canonical.absmax
        self.x = milp._add_columns(highs, canonical.box.lower, canonical.box.upper)
        v_cols = [self.x]
        y_cols, z_cols = [], []
        for batch in canonical.batches:
            rows = batch.rows
            m, width = rows.coeffs.shape
            upper = np.maximum(batch.upper, batch.lower)
            y = milp._add_columns(highs, batch.lower, upper)
            h = milp._add_columns(highs, np.zeros(m), np.maximum(upper, 0.0))
            z = milp._add_columns(highs, np.zeros(m), np.ones(m), integer=True)
            prefix = np.concatenate(v_cols)
            y_absmax = np.maximum(np.abs(batch.lower), np.abs(upper))
            row_ids, positions = np.nonzero(rows.coeffs)
            order = np.argsort(np.concatenate([np.arange(m), row_ids]), kind="stable")
            milp._add_rows(
                highs,
                rows.const - rows.err,
                rows.const + rows.err,
                np.concatenate([np.arange(m), row_ids])[order],
                np.concatenate([y, prefix[positions]])[order],
                np.concatenate([np.ones(m), -rows.coeffs[row_ids, positions]])[order],
                np.concatenate([y_absmax, absmax[:width][positions]])[order],
            )
            milp._relu_rows(highs, y, h, z, batch.lower, upper, np.zeros(m))
            v_cols.append(h)
            y_cols.append(y)
            z_cols.append(z)
        self.v_cols = np.concatenate(v_cols).astype(np.int32)
        self.y_cols = np.concatenate(y_cols) if y_cols else np.zeros(0, dtype=np.int64)
        self.z_cols = np.concatenate(z_cols) if z_cols else np.zeros(0, dtype=np.int64)

    @property
    def binaries(self) -> int:
        return int(self.z_cols.shape[0])

    def start(self, x_raw: np.ndarray) -> None:
        """Hand HiGHS the full point of a raw input as a starting incumbent."""
        v, y = self.canonical.values(x_raw)
        cols = np.concatenate([self.v_cols, self.y_cols, self.z_cols]).astype(np.int32)
        vals = np.concatenate([v, y, (y >= 0.0).astype(np.float64)])
        self.highs.setSolution(cols.shape[0], cols, vals)

    def minimise(
        self,
        costs: np.ndarray,
        cutoff: float,
        target: float,
        time_limit: float,
        start: np.ndarray | None,
    ) -> tuple[float, list[np.ndarray], highspy.HighsModelStatus]:
        """Minimise ``costs . V``; return (lower bound, inputs of every incumbent, status).

        Decide from the bound, not the status: an infeasible run (everything pruned by the cutoff)
        proves the minimum is at least ``cutoff``; otherwise the bound is ``mip_dual_bound``.
        """
        highs = self.highs
        highs.changeColsCost(self.v_cols.shape[0], self.v_cols, costs)
        milp._set_options(
            highs,
            objective_bound=float(cutoff),
            objective_target=float(target),
            time_limit=milp.time_limit_option(highs, time_limit, mip=self.binaries > 0),
        )
        harvested: list[np.ndarray] = []
        x_cols = self.x

        def on_solution(event) -> None:
            harvested.append(np.array(event.data_out.mip_solution[x_cols], dtype=np.float64))

        highs.cbMipSolution.subscribe(on_solution)
        if start is not None:
            self.start(start)
        highs.run()
        highs.cbMipSolution.unsubscribe(on_solution)
        status = highs.getModelStatus()
        solution = highs.getSolution()
        if solution.value_valid:
            harvested.append(np.asarray(solution.col_value)[x_cols].copy())
        if status in (_MODEL_STATUS.kInfeasible, _MODEL_STATUS.kObjectiveBound):
            return float(cutoff), harvested, status
        dual = float(highs.getInfo().mip_dual_bound)
        return (dual if math.isfinite(dual) else -np.inf), harvested, status


# ----------------------------------------------------------------------------- the proof


def stability_budget(time_limit: float | None) -> float:
    """Seconds each network's stability analysis may take within a proof's time limit."""
    if time_limit is None:
        return STABILITY_TIME_LIMIT
    return min(STABILITY_TIME_LIMIT, STABILITY_SHARE * time_limit)


def _analysis(
    net: Network, box: Box, given: StabilityResult | None, time_limit: float | None, seed: int
) -> StabilityResult:
    """``given``, or a time-limited analysis over the raw box mapped into ``net``'s input space.

    Neurons it leaves undecided only cost the proof binaries, never soundness.
    """
    if given is not None:
        return given
    return analyze_stability(
        net,
        box.to_network(net.input_map),
        time_limit=stability_budget(time_limit),
        seed=seed,
        tiers=PROOF_STABILITY_TIERS,
    )


def prove_equivalence(
    net_a: Network,
    net_b: Network,
    box: Box,
    tol: float,
    time_limit: float | None = None,
    *,
    stability_a: StabilityResult | None = None,
    stability_b: StabilityResult | None = None,
    start_points: np.ndarray | None = None,
    replay: Replay | None = None,
    input_dtype: np.dtype | type = np.float32,
    seed: int = 0,
) -> ProofResult:
    """Prove ``max_x |f_A(x) - f_B(x)| <= tol`` over the raw box, or find a violating input.

    Parameters
    ----------
    net_a, net_b : the two networks (each with its own input map); same input and output widths.
    box : the raw-input box (before either network's preprocessing).
    tol : absolute tolerance, per output coordinate.
    time_limit : seconds for everything (stability analyses included); ``None``: no limit.
    stability_a, stability_b : verdicts already computed over ``box`` (e.g. by ``compress``);
        without them each network is analysed here with a quarter of the time limit.
    start_points : raw inputs ``(m, n)`` worth trying first (sampled worst cases, witnesses).
    replay : checks a violation in the deployed models (float32, onnxruntime); without it a
        float64 violation counts as a counterexample.
    input_dtype : the models' input dtype; a violating input is rounded to it (inside the box)
        and re-evaluated before it counts.
    seed : seed of the stability analyses' sampling.

    Returns
    -------
    ProofResult; "proved" only when every output coordinate and sign has a proved bound ``<= tol``.
    """
    started = time.monotonic()
    deadline = started + time_limit if time_limit is not None else np.inf
    if not tol >= 0.0:
        raise UsageError(f"the proof tolerance must be a non-negative number, got {tol!r}")
    if net_a.in_features != box.size or net_b.in_features != box.size:
        raise UsageError(
            f"the box has {box.size} features; the networks read {net_a.in_features} and "
            f"{net_b.in_features}"
        )
    if net_a.out_features != net_b.out_features:
        return ProofResult(
            "not applicable",
            tol,
            np.inf,
            notes=[
                f"the networks' outputs differ in width ({net_a.out_features} vs "
                f"{net_b.out_features})"
            ],
        )
    timings: dict[str, float] = {}
    stage = time.monotonic()
    stability_a = _analysis(net_a, box, stability_a, time_limit, seed)
    stability_b = _analysis(net_b, box, stability_b, time_limit, seed)
    timings["stability"] = time.monotonic() - stage

    stage = time.monotonic()
    canonical = _Canonical(box)
    form_a = canonical.add_network(net_a, stability_a)
    form_b = canonical.add_network(net_b, stability_b)
    width = canonical.width
    diff = form_a.padded(width) - form_b.padded(width)
    offset = form_a.const - form_b.const
    absmax = canonical.absmax
    rounding = _gamma(2) * (
        (np.abs(form_a.padded(width)) + np.abs(form_b.padded(width))) @ absmax
        + np.abs(form_a.const)
        + np.abs(form_b.const)
    )
    error = (form_a.err + form_b.err + rounding) * (1.0 + _gamma(4))
    lower, upper = canonical.lower, canonical.upper
    directions: list[DirectionBound] = []
    for o in range(diff.shape[0]):
        for sign in (1, -1):
            d = sign * diff[o]
            extreme = np.maximum(d * lower, d * upper).sum() + sign * offset[o]
            bound = (
                extreme
                + error[o]
                + _gamma(width + 2) * (np.abs(d) @ absmax + abs(offset[o]) + error[o])
            )
            bound = max(float(bound), 0.0) if np.isfinite(bound) else np.inf
            proved = bound <= tol
            directions.append(
                DirectionBound(o, sign, bound, "symbolic", "proved" if proved else "open")
            )
    timings["symbolic"] = time.monotonic() - stage

    result = ProofResult(
        status="proved",
        tolerance=tol,
        bound=0.0,
        directions=directions,
        free_neurons=width - canonical.n_inputs,
        shared_neurons=canonical.shared,
        output_tensor=net_a.output_name,
        error_floor=float(error.max(initial=0.0)),
    )
    notes = [*_undecided_note("A", stability_a), *_undecided_note("B", stability_b)]
    if result.error_floor > tol:
        notes.append(
            f"the accumulated round-off and sharing residuals ({result.error_floor:.3g}) exceed "
            f"tol {tol:g}: no bound below them can be proved (the MILP skips those outputs); "
            "a larger --atol, or tighter bounds from a longer stability analysis, may prove it"
        )
    points = [box.center[None, :]]
    if start_points is not None and np.size(start_points):
        points.append(np.clip(np.atleast_2d(start_points), box.lower, box.upper))
    pool = np.concatenate(points)
    pool_diff = net_a.forward(pool) - net_b.forward(pool)
    result.best_difference = float(np.abs(pool_diff).max(initial=0.0))

    open_directions = [d for d in directions if d.status == "open"]
    if open_directions:
        stage = time.monotonic()
        model = _ProofModel(canonical)
        result.binaries = model.binaries
        timings["build"] = time.monotonic() - stage
        stage = time.monotonic()
        _milp_tier(
            model, net_a, net_b, diff, offset, error, absmax, tol, open_directions, pool,
            pool_diff, deadline, replay, np.dtype(input_dtype), result,
        )  # fmt: skip
        timings["milp"] = time.monotonic() - stage
    result.notes = notes + result.notes
    result.tiers = sorted({d.tier for d in directions if d.status == "proved"})
    bounds = [d.bound for d in directions]
    result.bound = max(bounds, default=0.0)
    if result.counterexample is not None:
        result.status = "counterexample"
    elif all(d.status == "proved" for d in directions):
        result.status = "proved"
    else:
        result.status = "not proved"
        result.time_limit_hit = time.monotonic() >= deadline
        if result.time_limit_hit:
            result.notes.append("the time limit was reached before every output was decided")
    result.timings_s = timings
    result.time_s = time.monotonic() - started
    return result


def _undecided_note(label: str, stability: StabilityResult) -> list[str]:
    undecided = stability.counts().get("UNDECIDED", 0)
    if not undecided:
        return []
    return [f"model {label}: {undecided} neurons not decided by the stability analysis (kept free)"]


def _milp_tier(
    model: _ProofModel,
    net_a: Network,
    net_b: Network,
    diff: np.ndarray,
    offset: np.ndarray,
    error: np.ndarray,
    absmax: np.ndarray,
    tol: float,
    directions: list[DirectionBound],
    pool: np.ndarray,
    pool_diff: np.ndarray,
    deadline: float,
    replay: Replay | None,
    input_dtype: np.dtype,
    result: ProofResult,
) -> None:
    """Decision MILPs for the directions the symbolic tier left open, largest bound first.

    Directions whose error floor (``error + slack``) reaches ``tol`` are skipped: the widened rows
    make the MILP unable to prove them and let it return spurious violations. Stops at the first
    replayed counterexample (the verdict is then settled).
    """
    box = model.canonical.box
    ordered = sorted(directions, key=lambda d: -d.bound)
    for position, direction in enumerate(ordered):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        o, sign = direction.output, direction.sign
        costs = -sign * diff[o]
        base = sign * offset[o]
        slack = PROOF_FEASIBILITY_TOLERANCE * (np.abs(diff[o]) @ absmax + abs(offset[o]) + 1.0)
        if error[o] + slack >= tol:
            continue
        cutoff = base + error[o] + slack - tol
        target = base - tol - slack
        start = pool[int(np.argmax(sign * pool_diff[:, o]))]
        share = remaining / (len(ordered) - position) if np.isfinite(remaining) else _INF
        for _attempt in range(2):
            time_limit = min(share, deadline - time.monotonic())
            if time_limit <= 0:
                break
            lower_bound, harvested, status = model.minimise(
                costs, cutoff, target, time_limit, start
            )
            bound = base - lower_bound + error[o] + slack
            if bound < direction.bound:
                direction.bound, direction.tier = float(bound), "milp"
            if direction.bound <= tol:
                seen = float((sign * pool_diff[:, o]).max())
                if seen > tol:  # a known point contradicts the proof: the model is not sound
                    result.notes.append(
                        f"output {o}: the MILP claims a bound the input pool contradicts "
                        f"({seen:.3g} > {tol:g}); left open"
                    )
                    direction.status, direction.bound = "open", np.inf
                    break
                direction.status = "proved"
                break
            example = _confirm(
                net_a, net_b, box, harvested, o, sign, tol, replay, input_dtype, result
            )
            if example is not None:
                direction.status = "violated"
                result.counterexample = example
                return
            if status != _MODEL_STATUS.kObjectiveTarget:
                break
            target = -_INF


def _confirm(
    net_a: Network,
    net_b: Network,
    box: Box,
    points: list[np.ndarray],
    output: int,
    sign: int,
    tol: float,
    replay: Replay | None,
    input_dtype: np.dtype,
    result: ProofResult,
) -> Counterexample | None:
    """The best solver point that violates ``tol`` in float64 and (if given) replays."""
    if not points:
        return None
    x = np.clip(np.array(points).reshape(-1, box.size), box.lower, box.upper)
    delta = net_a.forward(x) - net_b.forward(x)
    result.best_difference = max(result.best_difference, float(np.abs(delta).max(initial=0.0)))
    order = np.argsort(-sign * delta[:, output])
    for row in order[:5]:
        if sign * delta[row, output] <= tol:
            break
        fed = _representable_inside(x[row], box, input_dtype)
        exact = float((net_a.forward(fed) - net_b.forward(fed))[0, output])
        if sign * exact <= tol:
            continue
        replayed, exceeds = (abs(exact), True) if replay is None else replay(fed)
        if exceeds:
            return Counterexample(fed, output, exact, replayed)
        result.notes.append(
            f"output {output}: an input with exact difference {exact:.3g} > {tol:g} does not "
            f"replay in onnxruntime beyond the tolerance (largest difference {replayed:.3g})"
        )
    return None


def _representable_inside(x: np.ndarray, box: Box, dtype: np.dtype) -> np.ndarray:
    """``x`` rounded to ``dtype`` (as float64), stepped back inside the box where rounding left it."""
    cast = x.astype(dtype)
    above = cast.astype(np.float64) > box.upper
    below = cast.astype(np.float64) < box.lower
    cast = np.where(above, np.nextafter(cast, dtype.type(-np.inf)), cast)
    cast = np.where(below, np.nextafter(cast, dtype.type(np.inf)), cast)
    return cast.astype(np.float64)


# ----------------------------------------------------------------------------- the check


def _read(source: ModelSource) -> tuple[ReadResult | None, str, str]:
    """``(read result or None, label, why the proof cannot use it)``."""
    if isinstance(source, ReadResult):
        label = str(source.path) if source.path else "<in-memory model>"
        return source, label, ""
    label = "<in-memory model>" if isinstance(source, onnx.ModelProto) else os.fspath(source)
    try:
        return read_model(source), label, ""
    except OnnxExactError as err:
        if isinstance(err, UsageError):
            raise
        return None, label, str(err)


def _raw_witnesses(net: Network, box: Box, stability: StabilityResult) -> np.ndarray:
    """The analysis's kink-adjacent witnesses, mapped back to raw inputs inside the box."""
    if stability.witnesses.size == 0:
        return np.zeros((0, box.size))
    raw = net.input_map.invert(stability.witnesses, box.center)
    return np.clip(raw, box.lower, box.upper)


def _tolerance_of(value: float | dict[str, float], name: str) -> float:
    """Polygraphy-style lookup: the output's entry, else the default under ``""``, else 1e-5."""
    if isinstance(value, dict):
        return float(value.get(name, value.get("", value.get("*", 1e-5))))
    return float(value)


def _onnx_replay(
    model_a: onnx.ModelProto, model_b: onnx.ModelProto, outputs: list[str], tols: list[float]
) -> Replay:
    """Replay a raw input in onnxruntime: the largest ``|a - b|`` and whether one output's
    difference exceeds its tolerance."""

    def replay(x_raw: np.ndarray) -> tuple[float, bool]:
        values_a = run_model(model_a, x_raw)
        values_b = run_model(model_b, x_raw)
        largest, exceeds = 0.0, False
        for name, tol in zip(outputs, tols, strict=True):
            a, b = np.asarray(values_a[name]), np.asarray(values_b[name])
            if not (np.issubdtype(a.dtype, np.number) and np.issubdtype(b.dtype, np.number)):
                continue
            a, b = a.astype(np.float64), b.astype(np.float64)
            gap = float(np.abs(a - b).max(initial=0.0))
            largest = max(largest, gap)
            exceeds = exceeds or gap > tol
        return largest, exceeds

    return replay


def check_equivalence(
    a: ModelSource,
    b: ModelSource,
    box: Box,
    *,
    atol: float | dict[str, float] = 1e-5,
    rtol: float | dict[str, float] = 1e-5,
    samples: int = 10_000,
    seed: int = 0,
    prove: bool = True,
    time_limit: float | None = None,
    counterexample_path: str | os.PathLike | None = None,
    stability_a: StabilityResult | None = None,
) -> CheckReport:
    """Compare two models on a box: onnxruntime samples, then (if possible) a proof.

    Parameters
    ----------
    a, b : paths, ModelProtos or :class:`ReadResult`; ``a`` is the reference.
    box : raw-input box (``onnx_exact.domain.resolve_domain``).
    atol, rtol : Polygraphy tolerances for the samples (a number or ``{output: value}`` with a
        default under ``""``); the proof's absolute tolerance is ``atol`` of the proved output.
    samples, seed : random inputs of the sampled check (plus centre, corners and witnesses).
    prove : run the proof when both models are ReLU networks the reader accepts.
    time_limit : seconds for the stability analyses and the proof together (what sampling took is
        deducted); on expiry the proof is "not proved", never "equivalent".
    counterexample_path : where to ``np.save`` a counterexample (the model's per-sample input
        shape, its input dtype) when the proof finds one.
    stability_a : a stability analysis of ``a`` over ``box`` to reuse (``compress`` has one).

    Raises
    ------
    VerificationError
        The models' output names or per-sample shapes differ (no tolerance applies).
    """
    timings: dict[str, float] = {}
    started = stage = time.monotonic()
    read_a, label_a, why_a = _read(a)
    read_b, label_b, why_b = _read(b)
    model_a = read_a.model if read_a is not None else a
    model_b = read_b.model if read_b is not None else b
    timings["read"] = time.monotonic() - stage

    stage = time.monotonic()
    readable = read_a is not None and read_b is not None
    stabilities: list[StabilityResult | None] = [stability_a, None]
    witnesses = [np.zeros((0, box.size))]
    if readable:
        for index, read in enumerate((read_a, read_b)):
            net = read.network
            if net.in_features != box.size:
                break
            if stabilities[index] is None:
                stabilities[index] = _analysis(net, box, None, time_limit, seed)
            witnesses.append(_raw_witnesses(net, box, stabilities[index]))
    timings["witnesses"] = time.monotonic() - stage

    stage = time.monotonic()
    extra = np.concatenate(witnesses)
    sampled = compare_models(
        model_a, model_b, box, extra_inputs=extra, samples=samples, seed=seed, atol=atol, rtol=rtol
    )
    timings["sampling"] = time.monotonic() - stage

    proof = None
    if prove:
        stage = time.monotonic()
        remaining = None if time_limit is None else max(time_limit - (stage - started), 1e-3)
        proof = _prove_models(
            read_a, read_b, why_a or why_b, box, atol, sampled, extra, stabilities, remaining,
            seed,
        )  # fmt: skip
        timings["proof"] = time.monotonic() - stage
    report = CheckReport(label_a, label_b, box, sampled, proof, timings_s=timings)
    if proof is not None and proof.counterexample is not None and counterexample_path is not None:
        _save_counterexample(read_a, proof.counterexample, counterexample_path)
        report.counterexample_path = os.fspath(counterexample_path)
    return report


def _prove_models(
    read_a: ReadResult | None,
    read_b: ReadResult | None,
    why_not: str,
    box: Box,
    atol: float | dict[str, float],
    sampled: EquivalenceReport,
    extra: np.ndarray,
    stabilities: list[StabilityResult | None],
    time_limit: float | None,
    seed: int,
) -> ProofResult:
    """The proof on two read models: tolerance, replay in onnxruntime, notes about tails."""
    if read_a is None or read_b is None:
        return ProofResult("not applicable", _tolerance_of(atol, ""), np.inf, notes=[why_not])
    net_a, net_b = read_a.network, read_b.network
    end_a, end_b = read_a.binding.output_tensor, read_b.binding.output_tensor
    graph_outputs = [o.name for o in read_a.model.graph.output]
    tol = _tolerance_of(atol, end_a)
    notes = []
    if end_a in graph_outputs and end_b in {o.name for o in read_b.model.graph.output}:
        replay_outputs, replay_tols = [end_a], [tol]
    else:
        notes.append(
            f"the proof bounds the networks' end tensors ({end_a!r}, {end_b!r}); the tails after "
            "them are not part of it"
        )
        replay_outputs = [o.name for o in sampled.outputs]
        replay_tols = [_tolerance_of(atol, name) for name in replay_outputs]
    replay = _onnx_replay(read_a.model, read_b.model, replay_outputs, replay_tols)
    starts = np.concatenate([np.atleast_2d(sampled.worst_input).astype(np.float64), extra])
    result = prove_equivalence(
        net_a,
        net_b,
        box,
        tol,
        time_limit,
        stability_a=stabilities[0],
        stability_b=stabilities[1],
        start_points=starts,
        replay=replay,
        input_dtype=read_a.input_dtype,
        seed=seed,
    )
    result.output_tensor = end_a
    result.notes = notes + result.notes
    return result


def _save_counterexample(
    read: ReadResult, example: Counterexample, path: str | os.PathLike
) -> None:
    """``np.save`` the input in the model's per-sample shape and input dtype."""
    name = read.binding.input_name
    layout = InputLayout.from_dims(name, model_input_dims(read.model, name), example.input.shape[0])
    try:
        np.save(path, example.input.astype(read.input_dtype).reshape(layout.sample_shape))
    except OSError as exc:
        raise UsageError(f"--counterexample {os.fspath(path)}: cannot write it ({exc})") from None


# ----------------------------------------------------------------------------- rendering


def render_check(report: CheckReport, console: Console) -> None:
    """Per-output PASSED/FAILED lines (Polygraphy style), the difference table, the proof verdict."""
    sampled = report.sampled
    table = Table(title=f"sampled comparison ({sampled.samples} inputs, {report.box.source})")
    for column in ("output", "max abs diff", "max rel diff", "at input", "min atol", "min rtol"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for out in sampled.outputs:
        table.add_row(
            out.name,
            f"{out.max_abs_diff:.3g}",
            f"{out.max_rel_diff:.3g}",
            str(out.where_abs),
            f"{out.required_atol:.3g}",
            f"{out.required_rtol:.3g}",
        )
    console.print(table)
    for out in sampled.outputs:
        atol = _tolerance_of(sampled.atol, out.name)
        rtol = _tolerance_of(sampled.rtol, out.name)
        if out.passed:
            console.print(
                f"[green]PASSED[/green] | Output: {out.name!r} | Difference is within tolerance "
                f"(rel={rtol:g}, abs={atol:g})"
            )
        else:
            console.print(
                f"[red]FAILED[/red] | Output: {out.name!r} | Difference exceeds tolerance "
                f"(rel={rtol:g}, abs={atol:g}): {out.mismatched_elements} elements, max abs diff "
                f"{out.max_abs_diff:.3g}"
            )
    proof = report.proof
    if proof is not None:
        console.print(proof_verdict(proof))
        for note in proof.notes:
            console.print(f"  note: {note}")
    if report.counterexample_path:
        console.print(f"counterexample written to {report.counterexample_path}")
    console.print(
        "[green]PASSED[/green]" if report.passed else "[red]FAILED[/red]",
        f"| {report.model_a} vs {report.model_b}",
    )


def proof_verdict(proof: ProofResult) -> str:
    if proof.status == "proved":
        return (
            f"[green]proved equivalent on the box up to ε = {proof.bound:.3g}[/green] "
            f"(|f_A - f_B| ≤ {proof.tolerance:g} on {proof.output_tensor!r}; "
            f"tiers: {', '.join(proof.tiers)}; {proof.time_s:.2f} s)"
        )
    if proof.status == "counterexample":
        example = proof.counterexample
        return (
            f"[red]NOT equivalent: counterexample[/red] at output {example.output}: exact "
            f"difference {example.exact_difference:.6g}, onnxruntime {example.replayed_difference:.6g}"
            f" > {proof.tolerance:g} ({proof.time_s:.2f} s)"
        )
    if proof.status == "not applicable":
        return "proof not applicable"
    why = "within the time limit" if proof.time_limit_hit else "(see the notes)"
    return (
        f"[yellow]not proved {why}[/yellow] (best bound {proof.bound:.3g} > "
        f"{proof.tolerance:g}; largest difference seen {proof.best_difference:.3g}; "
        f"{proof.time_s:.2f} s)"
    )
