"""Proving two ReLU networks equal on a box, up to ``tol``, or finding an input where they differ.

The proof bounds ``max |f_A(x) - f_B(x)|`` over *every* ``x`` in the box, in exact arithmetic on
the stored weights, per output coordinate and sign, or finds a concrete input that violates the
tolerance (sampling, :func:`onnx_exact.verify.compare_models`, cannot see a difference confined to
a thin region of the box).

How the proof goes
------------------
First, when ``B`` is ``A`` with units removed and every kept weight bit-identical (what pruning
writes: :mod:`onnx_exact.equivalence.structural`), only ``A``'s removed units need a proof of
being dead (bounds of ``A`` up to the deepest of them, then the exact tiers on those left open);
then ``f_A = f_B`` exactly, every direction is proved with bound 0 by ``matched`` (nothing
removed) or ``stable-units``, and nothing below runs. Otherwise:

0. ``stability``: each network's sound bounds and sampled signs (interval and CROWN bounds,
   forward passes: :func:`onnx_exact.equivalence.correspondence.quick_stability`), or the
   analysis ``compress`` already ran.
1. ``matched``: both networks are walked into one canonical form
   (:mod:`onnx_exact.equivalence.canonical`: shared free variables for units that agree up to a
   positive factor, 0 or ``y`` for stable ones, rigorous error terms for every residual) and
   :mod:`onnx_exact.equivalence.correspondence` names each unit matched, stable or one-sided.
   With ``d = e_A - e_B`` and ``d0 = c_A - c_B`` per output,
   ``sign * (d . V + d0) + err_A + err_B`` is maximised coordinate-wise over the box of ``V``
   (``x`` in the box, ``h_u`` in ``[0, max(U_u, 0)]``): a symbolic bound. For a re-export, a
   permuted and rescaled copy or a compression, ``d`` is round-off and the bound is the
   accumulated error.
2. ``stable-units``: when a direction is still open, the full stability engine runs on exactly
   the one-sided units (:func:`onnx_exact.equivalence.correspondence.prove_units_stable`), and
   the walk and the symbolic bound are repeated.
3. ``milp``: the product MILP over what is left (:mod:`onnx_exact.equivalence.proof`), per
   output and sign, in ``jobs`` worker processes.

Every solver point is re-evaluated by float64 forward passes of both networks; a violation counts
as a counterexample only after it is made representable in the model's input dtype (inside the
box) and replayed (in onnxruntime, by the caller's ``replay``) with a difference above ``tol``. A
time limit gives "not proved" with the best bound, never "equivalent".

The proof's tolerance is absolute: ``tol`` defaults to the sampled check's ``atol`` of the output.
It is about the network's end tensor; when a model has a tail after it (Softmax, ArgMax, ...), the
proof bounds the tensor that feeds the tail, and the report says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from onnx_exact.core.box import Box
from onnx_exact.core.errors import UsageError
from onnx_exact.core.network import Network
from onnx_exact.core.verdicts import StabilityResult
from onnx_exact.equivalence.canonical import WALK_MAX_BYTES, Canonical, WalkTooLarge, gamma
from onnx_exact.equivalence.correspondence import (
    METHODS,
    Correspondence,
    correspondence_of,
    prove_units_stable,
    quick_stability,
)
from onnx_exact.equivalence.proof import Counterexample, DirectionBound, milp_tier
from onnx_exact.equivalence.results import ProofResult
from onnx_exact.equivalence.structural import TARGETED_SHARE, align_pair, prove_structurally

ProgressCallback = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: "matched" and "stable-units" report the directions proved so
far of all, "one-sided units proved stable" the targeted units proved so far of those targeted,
"proof" the directions the MILP decided of those it got."""
Replay = Callable[[np.ndarray, int], tuple[float, bool, str]]
"""``replay(x_raw, coordinate) -> (onnxruntime |f_A - f_B|, exceeds tol, which value that is)``:
at ``coordinate`` of the end tensor when it is a graph output, else the largest over the graph
outputs after the tail; ``exceeds`` is whether any compared value is beyond its tolerance."""


def _analysis(
    net: Network, box: Box, given: StabilityResult | None, seed: int, deadline: float
) -> StabilityResult:
    """``given`` (e.g. ``compress``'s analysis), or :func:`quick_stability` over the raw box.

    Neurons it leaves undecided cost the proof targeting or binaries, never soundness.
    """
    return given if given is not None else quick_stability(net, box, seed, deadline=deadline)


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
    alignment = align_pair(net_a, net_b)
    if alignment is not None:
        full, pruned = (net_b, net_a) if alignment.swapped else (net_a, net_b)
        given = stability_b if alignment.swapped else stability_a
        structural, analysed = prove_structurally(
            full, pruned, box, tol, alignment, given, deadline, seed=seed, jobs=jobs
        )
        if alignment.swapped:
            stability_b = analysed
        else:
            stability_a = analysed
        if structural is not None:
            structural.best_difference = _largest_difference(net_a, net_b, box, start_points)
            structural.time_s = time.monotonic() - started
            _report(progress, "structural", structural.directions)
            return structural
    timings: dict[str, float] = {}
    if net_a.has_sparse_layers or net_b.has_sparse_layers:
        return _not_attempted(
            net_a,
            tol,
            "B is not A with units removed (no structural proof), and the canonical walk takes "
            "dense layers, which these networks are too large for: the proof was not attempted",
            timings,
            started,
        )
    stage = time.monotonic()
    stabilities = [
        _analysis(net_a, box, stability_a, seed, deadline),
        _analysis(net_b, box, stability_b, seed, deadline),
    ]
    timings["stability"] = time.monotonic() - stage

    stage = time.monotonic()
    try:
        walk = _Walk(net_a, net_b, box, stabilities)
    except WalkTooLarge as large:
        timings["matched"] = time.monotonic() - stage
        return _too_large(net_a, tol, large, timings, started)
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
            try:
                walk = _Walk(net_a, net_b, box, stabilities)
            except WalkTooLarge:
                break  # the last walk that fitted stays (its bounds hold)
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


def _too_large(
    net_a: Network, tol: float, large: WalkTooLarge, timings: dict, started: float
) -> ProofResult:
    """ "Not proved": the canonical walk of this pair would exceed ``WALK_MAX_BYTES``."""
    note = (
        f"B is not A with units removed (no structural proof), and the canonical form of these "
        f"networks would need more than {large.needed / 2**30:.1f} GiB (limit "
        f"{WALK_MAX_BYTES / 2**30:.0f} GiB): the proof was not attempted"
    )
    return _not_attempted(net_a, tol, note, timings, started)


def _not_attempted(
    net_a: Network, tol: float, note: str, timings: dict, started: float
) -> ProofResult:
    """ "Not proved", every output direction open, with ``note`` saying why."""
    directions = [
        DirectionBound(o, sign, np.inf, "", "open")
        for o in range(net_a.out_features)
        for sign in (1, -1)
    ]
    return ProofResult(
        "not proved",
        tol,
        np.inf,
        directions=directions,
        output_tensor=net_a.output_name,
        timings_s=timings,
        time_s=time.monotonic() - started,
        notes=[note],
    )


STRUCTURAL_PROBES = 16
"""Inputs (the centre, then the first start points) at which a structural proof reports the
float64 difference seen: a forward pass of a big CNN is costly, and the proof needs none."""


def _largest_difference(
    net_a: Network, net_b: Network, box: Box, start_points: np.ndarray | None
) -> float:
    """``max |f_A - f_B|`` in float64 at the box centre and the first start points."""
    points = [box.center[None, :]]
    if start_points is not None and np.size(start_points):
        points.append(np.clip(np.atleast_2d(start_points), box.lower, box.upper))
    probe = np.concatenate(points)[:STRUCTURAL_PROBES]
    return float(np.abs(net_a.forward(probe) - net_b.forward(probe)).max(initial=0.0))


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
