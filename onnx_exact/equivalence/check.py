"""Are two ReLU models the same on a box? Sampled with onnxruntime, and proved with HiGHS.

Sampling (:func:`onnx_exact.verify.compare_models`) checks the float32 artefacts on the box centre,
its corners, Bernoulli corners, uniform samples and the kink-adjacent witnesses of the stability
analysis. It cannot see a difference confined to a thin region of the box. The proof can: it bounds
``max |f_A(x) - f_B(x)|`` over *every* ``x`` in the box, in exact arithmetic on the stored weights,
per output coordinate and sign, or finds a concrete input that violates the tolerance.

How the proof goes
------------------
0. ``stability``: each network's sound bounds and sampled signs
   (:func:`onnx_exact.correspondence.quick_stability`: interval and CROWN bounds, forward passes),
   or the analysis ``compress`` already ran.
1. ``matched``: both networks are walked into one canonical form (:mod:`onnx_exact.canonical`:
   shared free variables for units that agree up to a positive factor, 0 or ``y`` for stable
   ones, rigorous error terms for every residual) and :mod:`onnx_exact.correspondence` names each
   unit matched, stable or one-sided. With ``d = e_A - e_B`` and ``d0 = c_A - c_B`` per output,
   ``sign * (d . V + d0) + err_A + err_B`` is maximised coordinate-wise over the box of ``V``
   (``x`` in the box, ``h_u`` in ``[0, max(U_u, 0)]``): a symbolic bound. For a re-export, a
   permuted and rescaled copy or a compression, ``d`` is round-off and the bound is the
   accumulated error.
2. ``stable-units``: when a direction is still open, the full stability engine runs on exactly
   the one-sided units (:func:`onnx_exact.correspondence.prove_units_stable`), and the walk and
   the symbolic bound are repeated.
3. ``milp``: the product MILP over what is left (:mod:`onnx_exact.proof_milp`), per output and
   sign, in ``jobs`` worker processes.

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

import numpy as np
import onnx

from onnx_exact.core.box import Box
from onnx_exact.core.errors import OnnxExactError, UsageError
from onnx_exact.core.network import Network
from onnx_exact.core.tolerance import DEFAULT_ATOL, DEFAULT_RTOL, tolerance_for
from onnx_exact.core.verdicts import StabilityResult
from onnx_exact.equivalence.canonical import Canonical, gamma
from onnx_exact.equivalence.correspondence import (
    METHODS,
    Correspondence,
    correspondence_of,
    prove_units_stable,
    quick_stability,
)
from onnx_exact.equivalence.proof import Counterexample, DirectionBound, milp_tier
from onnx_exact.equivalence.render import proof_verdict as proof_verdict  # re-exported: cli, report
from onnx_exact.equivalence.render import render_check as render_check
from onnx_exact.io.domain_sources import InputLayout, model_input_dims
from onnx_exact.io.onnx_reader import ReadResult, read_model
from onnx_exact.io.save import numpy_save_path, write_file_atomic
from onnx_exact.verify import (
    ROUNDOFF_FACTOR,
    EquivalenceReport,
    compare_models,
    model_roundoff,
    run_model,
)

ModelSource = str | os.PathLike | onnx.ModelProto | ReadResult
ProgressCallback = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: "matched" and "stable-units" report the directions proved so
far of all, "one-sided units proved stable" the targeted units proved so far of those targeted,
"proof" the directions the MILP decided of those it got."""
Replay = Callable[[np.ndarray, int], tuple[float, bool, str]]
"""``replay(x_raw, coordinate) -> (onnxruntime |f_A - f_B|, exceeds tol, which value that is)``:
at ``coordinate`` of the end tensor when it is a graph output, else the largest over the graph
outputs after the tail; ``exceeds`` is whether any compared value is beyond its tolerance."""

TARGETED_SHARE = 0.5
"""Fraction of the remaining time the targeted stability analyses (tier 2) may use; the rest is
the MILP's."""


# ----------------------------------------------------------------------------- results


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
    tiers : the methods that proved directions ("matched", "stable-units", "milp"; see
        :mod:`onnx_exact.correspondence`).
    directions : per output coordinate and sign, each with the method that proved it
        (``tier``) or its status "open" / "violated".
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
    correspondence: Correspondence | None = None

    @property
    def proved(self) -> bool:
        return self.status == "proved"

    @property
    def open_directions(self) -> list[DirectionBound]:
        return [d for d in self.directions if d.status == "open"]

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
            "methods": {
                m: sum(d.tier == m and d.status == "proved" for d in self.directions)
                for m in METHODS
            },  # fmt: skip
            "open": [{"output": d.output, "sign": d.sign} for d in self.open_directions],
            "correspondence": None
            if self.correspondence is None
            else self.correspondence.to_json(),
            "counterexample": None
            if example is None
            else {
                "input": example.input.tolist(),
                "output": example.output,
                "exact_difference": example.exact_difference,
                "replayed_difference": example.replayed_difference,
                "replayed_where": example.replayed_where,
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


# ----------------------------------------------------------------------------- the proof


def _analysis(net: Network, box: Box, given: StabilityResult | None, seed: int) -> StabilityResult:
    """``given`` (e.g. ``compress``'s analysis), or :func:`quick_stability` over the raw box.

    Neurons it leaves undecided cost the proof targeting or binaries, never soundness.
    """
    return given if given is not None else quick_stability(net, box, seed)


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
    jobs: int = 1,
    progress: ProgressCallback | None = None,
) -> ProofResult:
    """Prove ``max_x |f_A(x) - f_B(x)| <= tol`` over the raw box, or find a violating input.

    Parameters
    ----------
    net_a, net_b : the two networks (each with its own input map); same input and output widths.
    box : the raw-input box (before either network's preprocessing).
    tol : absolute tolerance, per output coordinate.
    time_limit : seconds for everything (stability analyses included); ``None``: no limit.
    stability_a, stability_b : verdicts already computed over ``box`` (e.g. by ``compress``);
        without them each network gets :func:`quick_stability` (bounds and forward passes).
    start_points : raw inputs ``(m, n)`` worth trying first (sampled worst cases, witnesses).
    replay : checks a violation in the deployed models (float32, onnxruntime); without it a
        float64 violation counts as a counterexample.
    input_dtype : the models' input dtype; a violating input is rounded to it (inside the box)
        and re-evaluated before it counts.
    seed : seed of the stability analyses' sampling.
    jobs : worker processes of the targeted stability analyses and the per-direction MILPs.
    progress : optional :data:`ProgressCallback`, called after each method.

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
    stabilities = [
        _analysis(net_a, box, stability_a, seed),
        _analysis(net_b, box, stability_b, seed),
    ]
    timings["stability"] = time.monotonic() - stage

    stage = time.monotonic()
    walk = _Walk(net_a, net_b, box, stabilities)
    directions = walk.directions(tol, "matched" if walk.matches.complete else "stable-units")
    timings["matched"] = time.monotonic() - stage
    _report(progress, "matched", directions)
    notes: list[str] = []
    points = [box.center[None, :]]
    if start_points is not None and np.size(start_points):
        points.append(np.clip(np.atleast_2d(start_points), box.lower, box.upper))
    pool = np.concatenate(points)
    pool_diff = net_a.forward(pool) - net_b.forward(pool)
    early = ProofResult("not proved", tol, np.inf)  # collects _confirm's notes
    example = _violated_at_start(
        net_a, net_b, box, pool, pool_diff, directions, tol, replay, np.dtype(input_dtype), early
    )
    if example is None and any(d.status == "open" for d in directions):
        stage = time.monotonic()
        targeted = proved = 0
        budget_end = stage + TARGETED_SHARE * (deadline - stage)
        done = [-1, -1]  # per network: the deepest layer whose targets were tried
        while time.monotonic() < budget_end:
            targets = [
                {k: units for k, units in walk.matches.targets(tag, st).items() if k > done[i]}
                for i, (tag, st) in enumerate(zip("AB", stabilities, strict=True))
            ]
            if not any(targets):
                break
            for index, net in enumerate((net_a, net_b)):
                if not targets[index]:
                    continue
                layer = min(targets[index])
                done[index] = layer
                budget = budget_end - time.monotonic() if np.isfinite(budget_end) else None
                stabilities[index], count = prove_units_stable(
                    net, box, stabilities[index], {layer: targets[index][layer]}, budget, jobs=jobs
                )
                targeted += targets[index][layer].size
                proved += count
                if progress is not None:
                    progress("one-sided units proved stable", proved, targeted)
            walk = _Walk(net_a, net_b, box, stabilities)
        if targeted:
            walk.matches.targeted, walk.matches.proved_stable = targeted, proved
            for old, new in zip(directions, walk.directions(tol, "stable-units"), strict=True):
                if old.status == "open":
                    old.bound, old.tier, old.status = new.bound, new.tier, new.status
            timings["stable-units"] = time.monotonic() - stage
            _report(progress, "stable-units", directions)

    canonical = walk.canonical
    result = ProofResult(
        status="proved",
        tolerance=tol,
        bound=0.0,
        directions=directions,
        free_neurons=canonical.width - canonical.n_inputs,
        shared_neurons=canonical.shared,
        output_tensor=net_a.output_name,
        error_floor=float(walk.error.max(initial=0.0)),
        correspondence=walk.matches,
    )
    notes += _one_sided_note(walk.matches) + early.notes
    if result.error_floor > tol:
        notes.append(
            f"the accumulated round-off and sharing residuals ({result.error_floor:.3g}) exceed "
            f"tol {tol:g}: no bound below them can be proved (the MILP skips those outputs); "
            "a larger --atol, or tighter bounds from a longer stability analysis, may prove it"
        )
    result.best_difference = float(np.abs(pool_diff).max(initial=0.0))
    result.counterexample = example

    open_directions = [d for d in directions if d.status == "open"]
    if open_directions and example is None:
        stage = time.monotonic()
        result.binaries = canonical.width - canonical.n_inputs
        signed = np.array([d.sign * pool_diff[:, d.output] for d in open_directions])
        starts = pool[np.argmax(signed, axis=1)]

        def confirm(found: list[np.ndarray], output: int, sign: int) -> Counterexample | None:
            return _confirm(
                net_a, net_b, box, found, output, sign, tol, replay, np.dtype(input_dtype), result
            )

        result.counterexample, milp_notes = milp_tier(
            canonical, open_directions, walk.diff, walk.offset, walk.error, tol, starts,
            signed.max(axis=1), deadline, confirm, jobs=jobs, progress=progress,
        )  # fmt: skip
        result.notes += milp_notes
        timings["milp"] = time.monotonic() - stage
    result.notes = notes + result.notes
    result.tiers = [
        m for m in METHODS if any(d.tier == m and d.status == "proved" for d in directions)
    ]
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


def _report(progress: ProgressCallback | None, phase: str, directions: list) -> None:
    if progress is not None:
        progress(phase, sum(d.status == "proved" for d in directions), len(directions))


class _Walk:
    """Both networks in one canonical form, ``f_A - f_B``'s form over it, and the matches."""

    def __init__(
        self, net_a: Network, net_b: Network, box: Box, stabilities: list[StabilityResult]
    ) -> None:
        canonical = Canonical(box)
        form_a = canonical.add_network(net_a, stabilities[0], "A")
        form_b = canonical.add_network(net_b, stabilities[1], "B")
        width = canonical.width
        coeffs_a, coeffs_b = form_a.padded(width), form_b.padded(width)
        self.canonical = canonical
        self.matches = correspondence_of(canonical)
        self.diff = coeffs_a - coeffs_b
        self.offset = form_a.const - form_b.const
        self.absmax = canonical.absmax
        rounding = gamma(2) * (
            (np.abs(coeffs_a) + np.abs(coeffs_b)) @ self.absmax
            + np.abs(form_a.const)
            + np.abs(form_b.const)
        )
        self.error = (form_a.err + form_b.err + rounding) * (1.0 + gamma(4))

    def directions(self, tol: float, method: str) -> list[DirectionBound]:
        """The symbolic bound per output and sign; those ``<= tol`` are proved by ``method``."""
        lower, upper = self.canonical.lower, self.canonical.upper
        width = self.canonical.width
        out = []
        for o in range(self.diff.shape[0]):
            for sign in (1, -1):
                d = sign * self.diff[o]
                extreme = np.maximum(d * lower, d * upper).sum() + sign * self.offset[o]
                bound = (
                    extreme
                    + self.error[o]
                    + gamma(width + 2)
                    * (np.abs(d) @ self.absmax + abs(self.offset[o]) + self.error[o])
                )
                bound = max(float(bound), 0.0) if np.isfinite(bound) else np.inf
                proved = bound <= tol
                out.append(
                    DirectionBound(
                        o, sign, bound, method if proved else "", "proved" if proved else "open"
                    )
                )
        return out


def _one_sided_note(matches: Correspondence) -> list[str]:
    """Units of one model only that stayed free: the reason a proof needs the MILP."""
    counts = {tag: matches.count("one_sided", tag) for tag in "AB"}
    return [
        f"model {tag}: {count} hidden units have no counterpart in the other model and were not "
        "proved stable (free variables of the MILP)"
        for tag, count in counts.items()
        if count
    ]


def _violated_at_start(
    net_a: Network,
    net_b: Network,
    box: Box,
    pool: np.ndarray,
    pool_diff: np.ndarray,
    directions: list[DirectionBound],
    tol: float,
    replay: Replay | None,
    input_dtype: np.dtype,
    result: ProofResult,
) -> Counterexample | None:
    """A counterexample among the start points (the sampled worst input), before any tier.

    When sampling already found a difference above ``tol``, it is confirmed (exact difference at
    the input as fed, replayed in onnxruntime) right away, and that direction is "violated":
    the targeted stability analyses and the MILP, which may take half the time limit each, can
    only confirm a verdict the samples already give.
    """
    open_now = [d for d in directions if d.status == "open"]
    if not open_now or pool.shape[0] == 0:
        return None
    signed = np.array([d.sign * pool_diff[:, d.output] for d in open_now])
    for index in np.argsort(-signed.max(axis=1)):
        if signed[index].max() <= tol:
            break
        direction = open_now[index]
        found = list(pool[signed[index] > tol])
        example = _confirm(
            net_a, net_b, box, found, direction.output, direction.sign, tol, replay,
            input_dtype, result,
        )  # fmt: skip
        if example is not None:
            direction.status = "violated"
            return example
    return None


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
        if replay is None:
            replayed, exceeds, where = abs(exact), True, "float64"
        else:
            replayed, exceeds, where = replay(fed, output)
        if exceeds:
            return Counterexample(fed, output, exact, replayed, where)
        note = (
            f"output {output}: an input with exact difference {exact:.3g} > {tol:g} does not "
            f"replay in onnxruntime beyond the tolerance ({where}: {replayed:.3g})"
        )
        if note not in result.notes:
            result.notes.append(note)
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


def _runnable(read: ReadResult) -> onnx.ModelProto | os.PathLike:
    """What onnxruntime runs: the file a model was read from (loaded as a user loads it, so a
    file onnxruntime cannot load fails), else the in-memory model."""
    return read.path if read.path is not None else read.model


def _onnx_replay(
    model_a: onnx.ModelProto | os.PathLike,
    model_b: onnx.ModelProto | os.PathLike,
    outputs: list[str],
    tols: list[float],
    same_tensor: bool,
) -> Replay:
    """Replay a raw input in onnxruntime (see :data:`Replay`). ``same_tensor``: ``outputs`` is
    the networks' end tensor alone, so a coordinate of the proof is a coordinate of it."""

    def replay(x_raw: np.ndarray, coordinate: int) -> tuple[float, bool, str]:
        values_a = run_model(model_a, x_raw)
        values_b = run_model(model_b, x_raw)
        largest, exceeds, at_coordinate = 0.0, False, None
        for name, tol in zip(outputs, tols, strict=True):
            a, b = np.asarray(values_a[name]), np.asarray(values_b[name])
            if not (np.issubdtype(a.dtype, np.number) and np.issubdtype(b.dtype, np.number)):
                continue
            gaps = np.abs(a.astype(np.float64) - b.astype(np.float64)).ravel()
            largest = max(largest, float(gaps.max(initial=0.0)))
            exceeds = exceeds or bool((gaps > tol).any())
            if same_tensor and coordinate < gaps.size:
                at_coordinate = float(gaps[coordinate])
        if at_coordinate is not None:
            return at_coordinate, exceeds, f"onnxruntime at the same coordinate of {outputs[0]!r}"
        names = ", ".join(repr(name) for name in outputs)
        return (
            largest,
            exceeds,
            f"onnxruntime, largest on the graph outputs {names} (after the tail)",
        )

    return replay


def check_equivalence(
    a: ModelSource,
    b: ModelSource,
    box: Box,
    *,
    atol: float | dict[str, float] = DEFAULT_ATOL,
    rtol: float | dict[str, float] = DEFAULT_RTOL,
    samples: int = 10_000,
    seed: int = 0,
    prove: bool = True,
    time_limit: float | None = None,
    counterexample_path: str | os.PathLike | None = None,
    stability_a: StabilityResult | None = None,
    jobs: int = 1,
    progress: ProgressCallback | None = None,
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
    jobs : worker processes of the proof (targeted stability analyses, per-direction MILPs).
    progress : optional ``progress(phase, done, total)`` callback of the proof.

    Raises
    ------
    VerificationError
        The models' output names or per-sample shapes differ (no tolerance applies).
    """
    timings: dict[str, float] = {}
    started = stage = time.monotonic()
    read_a, label_a, why_a = _read(a)
    read_b, label_b, why_b = _read(b)
    model_a = _runnable(read_a) if read_a is not None else a
    model_b = _runnable(read_b) if read_b is not None else b
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
                stabilities[index] = _analysis(net, box, None, seed)
            witnesses.append(_raw_witnesses(net, box, stabilities[index]))
    timings["analysis"] = time.monotonic() - stage

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
            seed, jobs, progress,
        )  # fmt: skip
        timings["proof"] = time.monotonic() - stage
        if proof.proved and not sampled.passed:
            _judge_roundoff(sampled, proof, read_a, read_b, box, seed)
    report = CheckReport(label_a, label_b, box, sampled, proof, timings_s=timings)
    if proof is not None and proof.counterexample is not None and counterexample_path is not None:
        _save_counterexample(read_a, proof.counterexample, counterexample_path)
        report.counterexample_path = numpy_save_path(counterexample_path)
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
    jobs: int,
    progress: ProgressCallback | None,
) -> ProofResult:
    """The proof on two read models: tolerance, replay in onnxruntime, notes about tails."""
    if read_a is None or read_b is None:
        return ProofResult("not applicable", tolerance_for(atol, ""), np.inf, notes=[why_not])
    net_a, net_b = read_a.network, read_b.network
    end_a, end_b = read_a.binding.output_tensor, read_b.binding.output_tensor
    graph_outputs = [o.name for o in read_a.model.graph.output]
    tol = tolerance_for(atol, end_a)
    notes = []
    same_tensor = end_a in graph_outputs and end_b in {o.name for o in read_b.model.graph.output}
    if same_tensor:
        replay_outputs, replay_tols = [end_a], [tol]
    else:
        notes.append(
            f"the proof bounds the networks' end tensors ({end_a!r}, {end_b!r}); the tails after "
            "them are not part of it"
        )
        replay_outputs = [o.name for o in sampled.outputs]
        replay_tols = [tolerance_for(atol, name) for name in replay_outputs]
    replay = _onnx_replay(
        _runnable(read_a), _runnable(read_b), replay_outputs, replay_tols, same_tensor
    )
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
        jobs=jobs,
        progress=progress,
    )
    result.output_tensor = end_a
    result.notes = notes + result.notes
    return result


def _judge_roundoff(
    sampled: EquivalenceReport,
    proof: ProofResult,
    read_a: ReadResult,
    read_b: ReadResult,
    box: Box,
    seed: int,
) -> None:
    """Re-judge a failed sampled comparison that the proof shows to be float round-off.

    The proof bounds the *exact* difference of the stored weights by ``proof.bound <= tol`` on
    the whole box, so whatever onnxruntime shows beyond that on the proved output is float
    evaluation error: ``|a - b| <= |a - f_A| + |f_A - f_B| + |f_B - b|``. Two exports of one
    function (folded BN, rescaled units, compress's own output) evaluated in float32 differ by
    up to the sum of their errors, which exceeds the default ``atol`` (``DEFAULT_ATOL``) once the hidden
    values reach ~10. As ``compress`` judges its own output (:func:`onnx_exact.pipeline.
    model_roundoff`), that output's atol is raised to ``ROUNDOFF_FACTOR * (r_A + r_B)``, with
    ``r`` each model's measured ``max |f_onnxruntime - f_float64|``, and the samples are judged
    again (``required_atol`` is the smallest atol that passes at the given rtol); a note says so.
    Nothing changes unless the proof covers every failing output (no tail, one end tensor) and
    every failure fits the allowance: a larger sampled difference still fails the check.
    """

    end = proof.output_tensor
    failing = [out for out in sampled.outputs if not out.passed]
    if read_b.binding.output_tensor != end or any(out.name != end for out in failing):
        return
    graph_b = [o.name for o in read_b.model.graph.output]
    if end not in [o.name for o in read_a.model.graph.output] or end not in graph_b:
        return
    errors = [
        model_roundoff(read.model, read.network, read.input_dtype, box, seed, path=read.path)
        for read in (read_a, read_b)
    ]
    if any(end not in error for error in errors):
        return
    roundoff = errors[0][end] + errors[1][end]
    atol = max(tolerance_for(sampled.atol, end), ROUNDOFF_FACTOR * roundoff)
    if not (np.isfinite(atol) and all(out.required_atol <= atol for out in failing)):
        return
    for out in failing:
        out.passed, out.mismatched_elements = True, 0
    default = tolerance_for(sampled.atol, "")
    given = sampled.atol if isinstance(sampled.atol, dict) else {"": default}
    sampled.atol = {**given, end: atol}
    sampled.passed = all(out.passed for out in sampled.outputs)
    proof.notes.append(
        f"sampled differences on {end!r} up to {max(o.max_abs_diff for o in failing):.3g} are "
        f"float round-off: onnxruntime vs exact float64 is up to {errors[0][end]:.3g} (A) and "
        f"{errors[1][end]:.3g} (B) and the exact difference is at most {proof.bound:.3g}; "
        f"samples judged at atol {atol:.3g} ({ROUNDOFF_FACTOR:g} x the round-off, as compress "
        "judges its output)"
    )


def _save_counterexample(
    read: ReadResult, example: Counterexample, path: str | os.PathLike
) -> None:
    """``np.save`` the input in the model's per-sample shape and input dtype."""
    name = read.binding.input_name
    layout = InputLayout.from_dims(name, model_input_dims(read.model, name), example.input.shape[0])
    array = example.input.astype(read.input_dtype).reshape(layout.sample_shape)

    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            np.save(handle, array)

    try:
        write_file_atomic(numpy_save_path(path), write)
    except OSError as exc:
        raise UsageError(f"--counterexample {os.fspath(path)}: cannot write it ({exc})") from None
