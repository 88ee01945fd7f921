"""The tiers of the stability analysis, one function each, selected through :data:`TIER_FUNCTIONS`.

Every tier function takes the :class:`onnx_exact.stability.state.Analysis` of the run, a layer
``k`` and an ``effort`` (the multiplier of its per-direction caps or rounds), works only on layer
``k``'s directions still open, forward-passes every input it finds (:meth:`Analysis.see`, which
refutes directions in *all* layers) and records its proofs through :meth:`Analysis.prove`. Which
tier runs when is the schedule's business (:mod:`onnx_exact.stability.schedule`); what each one
costs at most is in :mod:`onnx_exact.stability.policy` and the tier table
(:data:`onnx_exact.core.verdicts.TIERS`).

Proofs come from sound bounds only: interval, CROWN and α-CROWN bounds against the float
margin, LP/MILP/branch-and-bound bounds against the solver margin, input splitting against the
float margin on every leaf of a cover of the box. ``ascent``, ``probe`` and ``attack`` find
inputs and prove nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np

from onnx_exact.bounds import input_split, relu_bab
from onnx_exact.bounds.crown import interval_bounds, symbolic_bounds
from onnx_exact.core.directions import Direction, DirectionBook
from onnx_exact.core.verdicts import TIERS, NeuronState, Tier
from onnx_exact.search.attack import AttackLimits, attack_round
from onnx_exact.search.witness import (
    best_points,
    corner_ascent,
    first_layer_extremes,
    gradient_ascent,
    sample_inputs,
)
from onnx_exact.solvers import baselines, exact_tiers, lp_relaxation
from onnx_exact.stability import policy
from onnx_exact.stability.state import Analysis

TierFunction = Callable[[Analysis, int, float], None]
"""``tier(analysis, k, effort)``: one tier on layer ``k``'s open directions."""


# ----------------------------------------------------------------- whole-network steps
def collect_witnesses(analysis: Analysis, user_inputs: np.ndarray | None, sample: bool) -> None:
    """Witness tier: user inputs, sampling rounds, then the first-layer extreme vertices that
    the samples left needed (:func:`first_layer_extremes` with ``open_only``).

    The sample budget is ``SAMPLE_MACS`` multiply-accumulates (clipped to ``SAMPLE_MIN ..
    SAMPLE_MAX`` points), in rounds of ``SAMPLE_ROUND``; two rounds without a new sign end it:
    the remaining directions need bounds. With few input features (at most
    ``SPLIT_MAX_INPUTS``) the cap is ``SAMPLE_MAX_FEW_INPUTS`` and idle rounds do not end it: a
    uniform sample then covers the box densely, and a sign shown only on a sliver of it (a
    probability of ``1e-5`` per point on ACAS Xu nets) appears after many idle rounds, while
    every leaf of the input splitting that holds such a direction open is spent in vain.
    """
    with analysis.timed(Tier.WITNESS):
        if user_inputs is not None and user_inputs.size:
            analysis.see(user_inputs, Tier.WITNESS)
        if not sample:
            return
        few_inputs = analysis.net.in_features <= policy.SPLIT_MAX_INPUTS
        cap, round_size = policy.SAMPLE_MAX, policy.SAMPLE_ROUND
        if few_inputs:
            cap, round_size = policy.SAMPLE_MAX_FEW_INPUTS, policy.SAMPLE_ROUND_FEW_INPUTS
        budget = int(
            np.clip(policy.SAMPLE_MACS / max(analysis.net.mac_count, 1), policy.SAMPLE_MIN, cap)
        )
        done = 0
        obs = analysis.obs
        while done < budget and analysis.any_open() and not analysis.out_of_time():
            before = sum(int(s.sum()) for s in obs.seen_pos + obs.seen_neg)
            batch = min(round_size, budget - done)
            analysis.see(sample_inputs(analysis.box, analysis.rng, batch), Tier.WITNESS)
            done += batch
            analysis.emit(Tier.WITNESS, done, budget)
            after = sum(int(s.sum()) for s in obs.seen_pos + obs.seen_neg)
            if after == before and done >= 2 * round_size and not few_inputs:
                break
        extremes = first_layer_extremes(analysis.net, analysis.box, open_only=analysis.obs)
        if extremes.size:
            analysis.see(extremes, Tier.WITNESS)


def interval(analysis: Analysis) -> None:
    """Interval (IBP) bounds of every layer: exact for the first layer."""
    with analysis.timed(Tier.INTERVAL):
        analysis.bounds = interval_bounds(analysis.net, analysis.box)


# ----------------------------------------------------------------- bound tiers
def symbolic(analysis: Analysis, k: int, effort: float = 1.0) -> None:
    """CROWN on the open rows, then corner ascent from the best points and the CROWN vertices.

    The ascent (credited to ``ascent``) runs Frank–Wolfe corner ascent toward the missing sign
    from the most promising observed point and from the CROWN vertex attaining the direction's
    linear bound, then projected sign-gradient ascent from the best point found so far, for
    signs shown only inside the box.
    """
    net, box = analysis.net, analysis.box
    with analysis.timed(Tier.SYMBOLIC):
        rows = np.flatnonzero(~analysis.settled(k))
        analysis.bounds[k], corners = symbolic_bounds(
            net, box, analysis.bounds, k, rows, analysis.deadline
        )
        analysis.prove_from_bounds(k, Tier.SYMBOLIC)
        analysis.propagate()
        neurons, signs = analysis.open_directions(k)
        if not neurons.size:
            return
        # Vertices attaining each open direction's linear bound: maximiser for +1, minimiser for -1.
        position = np.searchsorted(rows, neurons)
        analysis.see(corners[np.where(signs > 0, 0, 1), position], Tier.SYMBOLIC)
    with analysis.timed(Tier.ASCENT):
        neurons, signs = analysis.open_directions(k)
        if not neurons.size:
            return
        pool = np.concatenate([analysis.obs.witnesses, box.center[None, :]])
        starts = np.concatenate(
            [
                best_points(net, k, neurons, signs, pool),
                corners[np.where(signs > 0, 0, 1), np.searchsorted(rows, neurons)],
            ]
        )
        found = corner_ascent(
            net,
            box,
            k,
            np.concatenate([neurons, neurons]),
            np.concatenate([signs, signs]),
            starts,
            deadline=analysis.deadline,
        )
        analysis.see(found, Tier.ASCENT)
        neurons, signs = analysis.open_directions(k)
        if not neurons.size:
            return
        pool = np.concatenate([pool, found])
        start = best_points(net, k, neurons, signs, pool)
        found = gradient_ascent(net, box, k, neurons, signs, start, deadline=analysis.deadline)
        analysis.see(found, Tier.ASCENT)


def tighten_previous(analysis: Analysis, k: int) -> None:
    """α-CROWN bounds for the not-yet-stable neurons of layers ``1 .. k - 1``, then CROWN for k.

    Runs only when layer k still has open directions after the cheap tiers: then its LP/MILP
    models and CROWN nodes are only as strong as the big-M bounds below it. Layer 0 is skipped
    (its interval bounds are exact); each layer is tightened once, bottom-up, so every bound sees
    the tightened bounds of the layers beneath it. Optimised slopes
    (:func:`onnx_exact.bounds.relu_bab.optimised_bounds`, all neurons of a layer in one batch)
    come close to the triangle LP's bounds at a fraction of its cost. Under a time limit the
    tightening stops at half of layer k's equal share of the time left (``k`` and each ReLU
    layer above it get a share): on a CNN the layers below hold thousands of loose neurons, and
    α-CROWN over them could take the whole budget from the tiers that decide layer k's open
    directions. The bounds reached by then are sound (every α-CROWN iterate is) and kept; a
    layer cut short is tightened again by a later call (a retry round, a layer above).
    """
    deadline = analysis.deadline
    if np.isfinite(deadline):
        layers_left = sum(1 for j in analysis.net.relu_layer_indices if j >= k)
        now = time.monotonic()
        deadline = min(deadline, now + (deadline - now) / (2 * max(layers_left, 1)))
    for previous in range(1, k):
        if previous in analysis.tightened or analysis.out_of_time():
            continue
        if time.monotonic() >= deadline:
            break  # the layers left untightened may be tightened for a later layer
        analysis.tightened.add(previous)
        loose = np.flatnonzero(
            (analysis.states[previous] != NeuronState.ACTIVE)
            & (analysis.states[previous] != NeuronState.INACTIVE)
        )
        if not loose.size:
            continue
        with analysis.timed("tighten"):
            _optimise_rows(analysis, previous, loose, deadline)
            analysis.propagate()
        if time.monotonic() >= deadline:
            analysis.tightened.discard(previous)  # cut short: a later call may go on with it
    with analysis.timed(Tier.SYMBOLIC):
        analysis.prove_from_bounds(k, Tier.INTERVAL)
        rows = np.flatnonzero(~analysis.settled(k))
        if rows.size:
            analysis.bounds[k], _ = symbolic_bounds(
                analysis.net, analysis.box, analysis.bounds, k, rows
            )
            analysis.prove_from_bounds(k, Tier.SYMBOLIC)
            analysis.propagate()


def _optimise_rows(
    analysis: Analysis, k: int, rows: np.ndarray, deadline: float | None = None
) -> np.ndarray:
    """Intersect layer k's bounds on ``rows`` with α-CROWN's (optimised until ``deadline``, by
    default the analysis's); return the bounds' vertices."""
    lower, upper, vertices = relu_bab.optimised_bounds(
        analysis.net,
        analysis.box,
        analysis.bounds,
        analysis.solver_states(k),
        k,
        rows,
        deadline=analysis.deadline if deadline is None else deadline,
    )
    optimised = analysis.bounds[k].copy()
    optimised.lower[rows], optimised.upper[rows] = lower, upper
    analysis.bounds[k] = analysis.bounds[k].intersect(optimised)
    return vertices


def alpha_crown(analysis: Analysis, k: int, effort: float = 1.0) -> None:
    """α-CROWN bounds for layer k's open rows, all in one batch, before any LP.

    With every layer below final, the optimised slopes prove most of what the triangle LP of
    each direction would (for ``k = 1`` their optimum is that LP's), at the cost of a few dozen
    matrix products for the whole layer; the maximising vertices are witness candidates. A
    float64 CROWN bound: proofs follow the float margin. The rows are the neurons with an open
    direction (:meth:`Analysis.open_directions`: under a CNN's structural focus, only those).
    """
    with analysis.timed(Tier.ALPHA_CROWN):
        vertices = _optimise_rows(analysis, k, np.unique(analysis.open_directions(k)[0]))
        analysis.prove_from_bounds(k, Tier.ALPHA_CROWN)
        analysis.see(vertices, Tier.ALPHA_CROWN)
        analysis.propagate()


# ----------------------------------------------------------------- input splitting
def split(analysis: Analysis, k: int, effort: float = 1.0) -> None:
    """Input-splitting branch and bound for layer k's open directions (few input features).

    :class:`onnx_exact.bounds.input_split.InputSearch`: leaves of the box bounded thousands at a
    time (forward linear relaxation of every layer, CROWN for the directions' rows, both per
    leaf); a direction is closed on a leaf when its bound there clears the float margin, proved
    when closed on every leaf of a cover of the box (the largest leaf bound then bounds it on
    the box), refuted by a leaf's centre or CROWN vertex (forward-passed here too, so they refute
    directions of every layer). What is open when ``SPLIT_BOXES_PER_LAYER`` leaves are spent
    goes on to the later tiers; the search is kept for the layer's ``subdivide`` tier.
    """
    with analysis.timed(Tier.SPLIT):
        if _start_search(analysis, k):
            _run_search(analysis, k, policy.SPLIT_BOXES_PER_LAYER, Tier.SPLIT)


def subdivide(analysis: Analysis, k: int, effort: float = 1.0) -> None:
    """Layer k's input search continued for ``SUBDIVIDE_LEAVES * effort`` more leaves.

    Only above the first layer (its interval bounds are exact); a search is started if the split
    tier did not. Why a second instalment rather than the whole budget in the split tier: what
    the split tier leaves open is mostly stable directions whose extreme lies near 0, or
    unstable ones whose sign lives in a sliver; the tiers in between (an attack, or with few
    inputs only a probe, since the search refutes too) take the cheap share of the latter
    before the large budget goes to the rest. The search keeps its open leaves, so each
    call and retry continues it; directions settled elsewhere meanwhile are dropped from it.
    In the first pass (``effort`` 1) under a time limit, the call also stops at an equal share
    of the time left for this layer and each layer above it: a layer whose directions need
    many leaves must not starve the layers above, whose open directions are often decided by
    a few leaves or witnesses; the retries continue the search. Labels are the same for any
    ``jobs``.
    """
    if k == 0:
        return
    with analysis.timed(Tier.SUBDIVIDE):
        if k in analysis.searches or _start_search(analysis, k):
            deadline = analysis.deadline
            if effort <= 1.0 and np.isfinite(deadline):
                layers_left = sum(1 for j in analysis.net.relu_layer_indices if j >= k)
                now = time.monotonic()
                deadline = min(deadline, now + (deadline - now) / max(layers_left, 1))
            leaves = int(policy.SUBDIVIDE_LEAVES * effort)
            _run_search(analysis, k, leaves, Tier.SUBDIVIDE, deadline)


def _start_search(analysis: Analysis, k: int) -> bool:
    """A new input search over layer k's open directions (False: none is open)."""
    neurons, signs = analysis.open_directions(k)
    if not neurons.size:
        return False
    net, box = analysis.net, analysis.box
    margin = policy.float_margins(net, box, analysis.bounds, k)[neurons]
    analysis.searches[k] = input_split.InputSearch(
        net,
        box.lower,
        box.upper,
        analysis.bounds,
        np.full(neurons.size, k),
        neurons,
        signs,
        margin,
        jobs=analysis.jobs,
    )
    return True


def _run_search(
    analysis: Analysis, k: int, leaves: int, tier: Tier, deadline: float | None = None
) -> None:
    """Continue layer k's input search for ``leaves`` leaves (until ``deadline``, by default
    the analysis's) from the analysis's current bounds; apply its verdicts as ``tier``."""
    search = analysis.searches[k]
    neurons, signs = search.neurons, search.signs
    stop = analysis.deadline if deadline is None else deadline
    search.refine(analysis.bounds)  # what other layers' proofs established meanwhile
    outcome = search.run(leaves, stop, asked=analysis.still_open(k, neurons, signs))
    analysis.see(outcome.witnesses, tier)
    analysis.record_cover(k, neurons, signs, outcome.covered)
    proved = outcome.proved & analysis.still_open(k, neurons, signs)
    analysis.prove_covered(k, neurons[proved], signs[proved], outcome.worst[proved], tier)


# ----------------------------------------------------------------- exact solver tiers
def lp_dive_for(relaxation: lp_relaxation.LayerRelaxation) -> relu_bab.Dive:
    """The LP dive over ``relaxation`` as the witness search of the CROWN branch and bound."""

    def dive(book: DirectionBook, j: int, deadline: float) -> Iterator[None]:
        return lp_relaxation.lp_dive(book, j, relaxation, deadline, relu_bab.METHOD)

    return dive


def _crown_bab_directions(analysis: Analysis, common: tuple, effort: float) -> list:
    """CROWN branch and bound (:func:`onnx_exact.bounds.relu_bab.decide_directions`)."""
    spec = TIERS[Tier.CROWN_BAB]
    return relu_bab.decide_directions(
        *common,
        effort=effort,
        dive=None if analysis.relaxation is None else lp_dive_for(analysis.relaxation),
        feed=analysis.background_feed if analysis.background is not None else None,
        time_limit=spec.direction_seconds,
        node_limit=spec.direction_nodes,
    )


def _highs_directions(tier: Tier, analysis: Analysis, common: tuple, effort: float) -> list:
    """One HiGHS tier (:func:`onnx_exact.solvers.exact_tiers.decide_directions`)."""
    return exact_tiers.decide_directions(
        *common,
        tiers=(tier.value,),
        jobs=analysis.jobs,
        effort=effort,
        relaxation=analysis.relaxation,
        feed=analysis.background_feed if analysis.background is not None else None,
    )


def _solver_tier(
    decide: Callable[[Analysis, tuple, float], list],
    tier: Tier,
    analysis: Analysis,
    k: int,
    effort: float = 1.0,
) -> None:
    """One solver tier on layer k's open directions, in batches; solution points refute early.

    ``effort`` multiplies the tier's per-direction caps. Each direction is sent at most once per
    tier, ``SOLVER_BATCH`` at a time; directions refuted by a witness from an earlier batch (of
    any layer's neuron) are dropped before their turn. Every tier but the decision MILP works on
    the layer's warm :class:`onnx_exact.solvers.lp_relaxation.LayerRelaxation`, built once the
    bounds below the layer are final; the MILP starts from its cut pool.

    Under the structural focus (CNNs) the directions go loosest first (largest proved bound on
    ``sign * y``): a channel is removed only if every position is proved, so the position most
    likely positive is asked first, and its witness drops the channel's other directions.
    """
    net, box = analysis.net, analysis.box
    with analysis.timed(tier):
        neurons, signs = analysis.open_directions(k)
        if analysis.focus and analysis.focused:
            bound = np.where(
                signs > 0, analysis.bounds[k].upper[neurons], -analysis.bounds[k].lower[neurons]
            )
            order = np.argsort(-bound, kind="stable")
            neurons, signs = neurons[order], signs[order]
        pending = list(zip(neurons.tolist(), signs.tolist(), strict=True))
        total = len(pending)
        analysis.emit(tier, 0, total)
        while pending and not analysis.out_of_time():
            neurons, signs = analysis.open_directions(k)
            still_open = set(zip(neurons.tolist(), signs.tolist(), strict=True))
            pending = [direction for direction in pending if direction in still_open]
            batch, pending = pending[: policy.SOLVER_BATCH], pending[policy.SOLVER_BATCH :]
            if not batch:
                break
            margins = policy.solver_margins(net, box, analysis.bounds, k)
            if net.has_sparse_layers:  # no LP encoding of a sparse layer (yet): no dive
                analysis.relaxation = None
            elif analysis.relaxation is None or analysis.relaxation.layer != k:
                analysis.relaxation = lp_relaxation.LayerRelaxation.build(
                    net, box, analysis.bounds, analysis.solver_states(k), k
                )
            directions = [Direction(layer=k, neuron=i, sign=s) for i, s in batch]
            common = (net, box, analysis.bounds, analysis.solver_states(k), k, directions)
            results = decide(analysis, (*common, margins, analysis.deadline), effort)
            analysis.apply_solver_results(k, results, margins)
            analysis.emit(tier, total - len(pending), total)


# ----------------------------------------------------------------- attack and probe
def attack(analysis: Analysis, k: int, effort: float = 1.0) -> None:
    """Rounds of multi-start PGD, each polished by an exact search over linear regions.

    Runs just before each tier the table marks ``attacked_before`` (and after each retried
    tier): each of them spends up to its cap on a direction before giving up, whereas one round
    costs at most ``attack_round_seconds()`` per direction (:mod:`onnx_exact.search.attack`).
    ``effort`` rounds run, from fresh uniform starts after the first, within ``effort`` times
    that budget per direction: the rare sign of a deep ℓ1-free net sits in few of its many local
    maxima, so independent rounds find it where one round with more starts does not.
    """
    with analysis.timed(Tier.ATTACK):
        attack_rounds(analysis, k, max(int(effort), 1), policy.attack_limits(), Tier.ATTACK)


def probe(analysis: Analysis, k: int, effort: float = 1.0) -> None:
    """One short attack round before the CROWN branch and bound of a layer's first pass.

    Why: a direction that the LP tiers leave open on an ℓ1-regularised net is often unstable
    with its rare sign in a sliver that a few PGD steps and one region LP reach, while CROWN
    branch and bound spends its cap trying to prove it before its vertices or LP dive land
    there. Why after the LP tiers and not before: on local boxes most open directions are
    stable and the LP tiers prove them in milliseconds each. The round has short caps
    (``PROBE_*``) and polishes only PGD end points within ``PROBE_POLISH_GAP`` of the way from
    their sound bound to 0: the directions it refutes end close to their bound, stable ones far
    from it. A heuristic only decides where time goes, never a label; the full attack with its
    longer caps still runs before bab and milp.
    """
    with analysis.timed(Tier.PROBE):
        attack_rounds(analysis, k, 1, policy.probe_limits(), Tier.PROBE)


def attack_rounds(
    analysis: Analysis, k: int, rounds: int, limits: AttackLimits, tier: Tier
) -> None:
    """``rounds`` attack rounds on layer k's open directions, credited to ``tier``.

    Each direction gets at most ``pgd + polish + pattern`` seconds of ``limits`` per round; the
    first round starts from the best point seen so far (one of the starts per direction), later
    ones from fresh uniform starts only (:func:`onnx_exact.search.attack.attack_round`).
    """
    neurons, signs = analysis.open_directions(k)
    if not neurons.size:
        return
    per_round = limits.pgd_seconds + limits.polish_seconds + limits.pattern_seconds
    stop = min(analysis.deadline, time.monotonic() + per_round * rounds * neurons.size)
    pool = np.concatenate([analysis.obs.witnesses, analysis.box.center[None, :]])
    start_points = best_points(analysis.net, k, neurons, signs, pool)
    target = analysis.attack_target(k)
    for _round in range(rounds):
        if not neurons.size or time.monotonic() >= stop:
            break
        attack_round(
            target,
            neurons,
            signs,
            analysis.rng,
            limits,
            start_points=start_points,
            stop=stop,
            see=partial(analysis.see, tier=tier),
            still_open=partial(analysis.still_open, k),
        )
        still = analysis.still_open(k, neurons, signs)
        neurons, signs, start_points = neurons[still], signs[still], None


# ----------------------------------------------------------------- baselines
def _isa(analysis: Analysis, margins: list[np.ndarray]) -> tuple:
    """The paper's single-MILP algorithm, after witness preprocessing."""
    obs = analysis.obs
    return baselines.isa_stability(
        analysis.net,
        analysis.box,
        analysis.bounds,
        obs.seen_pos,
        obs.seen_neg,
        margins,
        analysis.deadline,
    )


def _per_neuron(analysis: Analysis, margins: list[np.ndarray]) -> tuple:
    """Two MILPs per neuron, without witness preprocessing."""
    return baselines.per_neuron_stability(
        analysis.net, analysis.box, analysis.bounds, margins, analysis.deadline
    )


def baseline(analysis: Analysis, method: Tier) -> None:
    """``method="isa"`` or ``"per-neuron"``: CROWN bounds of every layer, then the baseline."""
    net = analysis.net
    with analysis.timed(Tier.SYMBOLIC):
        for k in range(len(net.layers)):
            if k > 0:
                analysis.bounds[k], _ = symbolic_bounds(net, analysis.box, analysis.bounds, k)
                analysis.propagate()
    margins = [
        policy.solver_margins(net, analysis.box, analysis.bounds, k) for k in range(len(net.layers))
    ]
    with analysis.timed(method):
        states, witnesses, timed_out = BASELINES[method](analysis, margins)
    if len(witnesses):
        analysis.see(np.asarray(witnesses), method)
    analysis.time_limit_hit |= bool(timed_out)
    for k, layer in enumerate(net.layers):
        if not layer.relu:
            analysis.mark_linear(k)
            continue
        for state in (NeuronState.INACTIVE, NeuronState.ACTIVE):
            analysis.prove(k, np.flatnonzero(np.asarray(states[k]) == state), state, method)
        analysis.finish_layer(k)


BASELINES: dict[Tier, Callable[[Analysis, list[np.ndarray]], tuple]] = {
    Tier.ISA: _isa,
    Tier.PER_NEURON: _per_neuron,
}
"""The paper's algorithms: ``(states, witnesses, timed_out)`` per method."""

TIER_FUNCTIONS: dict[Tier, TierFunction] = {
    Tier.SYMBOLIC: symbolic,
    Tier.SPLIT: split,
    Tier.ALPHA_CROWN: alpha_crown,
    Tier.LP: partial(_solver_tier, partial(_highs_directions, Tier.LP), Tier.LP),
    Tier.CUTS: partial(_solver_tier, partial(_highs_directions, Tier.CUTS), Tier.CUTS),
    Tier.PROBE: probe,
    Tier.CROWN_BAB: partial(_solver_tier, _crown_bab_directions, Tier.CROWN_BAB),
    Tier.ATTACK: attack,
    Tier.BAB: partial(_solver_tier, partial(_highs_directions, Tier.BAB), Tier.BAB),
    Tier.MILP: partial(_solver_tier, partial(_highs_directions, Tier.MILP), Tier.MILP),
    Tier.SUBDIVIDE: subdivide,
}
"""The tiers that work on one layer, by name; the schedule looks each up when it runs it."""


def run(analysis: Analysis, tier: Tier | str, k: int, effort: float = 1.0) -> None:
    """Run ``tier`` on layer ``k`` at ``effort`` (through :data:`TIER_FUNCTIONS`)."""
    TIER_FUNCTIONS[Tier(tier)](analysis, k, effort)
