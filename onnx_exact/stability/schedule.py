"""The schedule of the stability analysis: which tier runs when, on which layer, at which effort.

:func:`analyze_stability` builds the run's :class:`onnx_exact.stability.state.Analysis`, collects
witnesses and interval bounds, then (``method="auto"``) :func:`run_tiers`: the bounds pass over
every layer (:func:`bounds_pass`), each layer's tiers in order (:func:`decide_layer`), and the
retries under a time limit. Which tiers are retried, attacked before, probed before or
accompanied by a background attack is read from the tier table
(:data:`onnx_exact.core.verdicts.TIERS`); the tiers themselves are looked up in
:data:`onnx_exact.stability.tiers.TIER_FUNCTIONS`; every budget comes from
:mod:`onnx_exact.stability.policy`.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from onnx_exact.bounds.crown import symbolic_bounds
from onnx_exact.core.box import Box
from onnx_exact.core.errors import DomainError, UsageError
from onnx_exact.core.network import Network
from onnx_exact.core.verdicts import SOLVER_TIERS, TIERS, NeuronState, StabilityResult, Tier
from onnx_exact.progress import ProgressCallback
from onnx_exact.resources import retain_freed_heap
from onnx_exact.stability import policy
from onnx_exact.stability import tiers as tier_impl
from onnx_exact.stability.state import Analysis

METHODS = ("auto", Tier.ISA.value, Tier.PER_NEURON.value)

#: The tiers whose HiGHS models are built from the layers' dense rows.
HIGHS_TIERS = (Tier.LP, Tier.CUTS, Tier.BAB, Tier.MILP)


def analyze_stability(
    net: Network,
    box: Box,
    *,
    method: str = "auto",
    time_limit: float | None = None,
    jobs: int = 1,
    seed: int = 0,
    user_inputs: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    tiers: tuple[str, ...] = SOLVER_TIERS,
) -> StabilityResult:
    """Decide every ReLU neuron of ``net`` over the network-space box ``box``.

    Parameters
    ----------
    net : the network.
    box : the input box in *network* space (``Box.to_network`` of the user's box).
    method : "auto" (tiered pipeline), "isa" (the paper's single MILP) or "per-neuron" (two MILPs
        per neuron).
    time_limit : seconds for the whole analysis; directions open at the deadline stay UNDECIDED.
        With ``method="auto"`` the interval and CROWN proofs of every layer are made whatever
        the limit (the first pass, finished even past the deadline), so the result holds at least
        those; the run may overrun a tiny limit by that pass.
    jobs : worker processes the solver tiers may use.
    seed : seed of the witness sampler.
    user_inputs : optional ``(m, n_in)`` network-space inputs (e.g. training data), clipped into the
        box and used as witnesses.
    progress : optional callback that gets a :class:`onnx_exact.progress.ProgressEvent` at the
        start of every tier and as a tier works through its directions (layer, tier, open
        neurons, time left).
    tiers : exact tiers of the auto pipeline, a subset of SOLVER_TIERS ("split", "lp", "cuts",
        "crown-bab", "bab", "milp"), run in that order; with fewer tiers the analysis is faster
        but may leave neurons UNDECIDED.

    Returns
    -------
    StabilityResult with one LayerStability per layer of ``net``; layers without ReLU are all
    ACTIVE, decided by "linear".
    """
    if method not in METHODS:
        raise UsageError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if time_limit is not None and not time_limit > 0:
        raise UsageError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    unknown = [tier for tier in tiers if tier not in SOLVER_TIERS]
    if unknown:
        raise UsageError(f"tiers {unknown} are not among {', '.join(SOLVER_TIERS)}")
    if method != "auto" and net.has_sparse_layers:
        raise UsageError(
            f"--method {method} builds one MILP of the whole network, and this CNN has layers "
            "too large to encode densely; use --method auto"
        )
    if box.size != net.in_features:
        raise DomainError(
            f"the box for input {box.input_name!r} has {box.size} features, "
            f"the network expects {net.in_features}"
        )
    if user_inputs is not None:
        user_inputs = np.asarray(user_inputs, dtype=np.float64)
        if user_inputs.ndim != 2 or user_inputs.shape[1] != net.in_features:
            raise UsageError(
                f"user_inputs must have shape (m, {net.in_features}), got {user_inputs.shape}"
            )
    deadline = time.monotonic() + time_limit if time_limit is not None else np.inf
    retain_freed_heap()  # numpy temporaries reuse freed blocks (see resources, "Allocator")
    analysis = Analysis(net, box, deadline, seed, jobs, progress)
    # The old per-neuron approach has no witness preprocessing: only user inputs are observed.
    tier_impl.collect_witnesses(analysis, user_inputs, sample=method != Tier.PER_NEURON)
    tier_impl.interval(analysis)
    if method == "auto":
        run_tiers(analysis, tuple(Tier(tier) for tier in SOLVER_TIERS if tier in tiers))
    else:
        tier_impl.baseline(analysis, Tier(method))
    return analysis.result(method)


def run_tiers(analysis: Analysis, solver_tiers: tuple[Tier, ...]) -> None:
    """Every layer bottom-up with capped tiers, then retry rounds over the layers left open.

    Why two passes: one hard direction (a neuron whose extreme lies within a hair of 0) can
    absorb any budget, and with retries inside the layer pass it starves every layer above
    it. The first pass gives every layer its capped tiers; only then do the retries at
    ``policy.RETRY_EFFORTS`` (longer caps per direction) go round the layers still open,
    lowest first, with the tiers the table marks ``retried``, each followed by an attack of
    equal time, or of one round after an input search that is the only retried tier
    (:func:`policy.retry_attack_effort`). Deciding a neuron late is sound for the layers
    above: while it was open they treated it as unstable, a relaxation that covers both of
    its phases.

    Without a time limit the caps are what bounds the run, so there are no retries. With one,
    the last effort is repeated until the deadline: a retry continues the subdivision queue
    and restarts the attack from new random starts, so later rounds are not wasted. Only a
    round that returns within ``IDLE_ROUND_SECONDS`` without deciding anything ends the
    retries early: its tiers had nothing left to try.

    For a CNN (:attr:`Analysis.focus`) the per-layer tiers and the retries pursue only the
    directions that can still change the channel structure (:meth:`Analysis.structural`); the
    bounds pass, the CROWN bounds of every unsettled row and the α-CROWN tightening of the
    layers below still cover every neuron. What is left open that way is reported as not
    pursued, apart from what the time limit left undecided.

    With ``subdivide`` among the tiers and at most ``SUBDIVIDE_ONLY_MAX_INPUTS`` input
    features, the box-wide LP, cut, branch-and-bound and MILP tiers are not run: input
    splitting decides such networks far sooner, and the box-wide tiers would spend the
    budget the layers above need. A network with a sparse layer (a CNN too large to be
    dense) runs no HiGHS tier: their encodings are built from dense rows.
    """
    few_inputs = analysis.net.in_features <= policy.SUBDIVIDE_ONLY_MAX_INPUTS
    if Tier.SUBDIVIDE in solver_tiers and few_inputs:
        solver_tiers = tuple(t for t in solver_tiers if t in (Tier.SPLIT, Tier.SUBDIVIDE))
    if analysis.net.has_sparse_layers:  # HiGHS encodings take dense rows
        solver_tiers = tuple(t for t in solver_tiers if t not in HIGHS_TIERS)
    relu_layers = analysis.net.relu_layer_indices
    bounds_pass(analysis)
    for k in range(len(analysis.net.layers)):
        if not analysis.net.layers[k].relu:
            analysis.mark_linear(k)
            continue
        decide_layer(analysis, k, solver_tiers)
    retry_tiers = tuple(tier for tier in solver_tiers if TIERS[tier].retried)
    search_only = search_alone(solver_tiers)
    if not retry_tiers or not np.isfinite(analysis.deadline):
        return
    efforts = policy.RETRY_EFFORTS
    analysis.focused = analysis.focus  # retries run the costly tiers only
    for round_index, effort in enumerate(itertools.chain(efforts, itertools.repeat(efforts[-1]))):
        if not analysis.any_open() or analysis.out_of_time():
            return
        started, open_before = time.monotonic(), analysis.open_count()
        for k in (k for k in relu_layers if k > 0):  # layer 0 is decided by interval bounds
            analysis.layer_now = k
            with analysis.background_attack(k):
                for tier in retry_tiers:
                    if not analysis.has_open(k):  # also false once time is up
                        break
                    if TIERS[tier].background:
                        analysis.start_background_attack(k)
                    tier_impl.run(analysis, tier, k, effort)
                    if analysis.has_open(k) and not analysis.attacked_in_background(k):
                        rounds = policy.retry_attack_effort(tier, effort, search_only)
                        tier_impl.run(analysis, Tier.ATTACK, k, rounds)
            analysis.finish_layer(k)
        idle = time.monotonic() - started < policy.IDLE_ROUND_SECONDS
        if round_index >= len(efforts) - 1 and idle and analysis.open_count() == open_before:
            return  # the tiers returned at once and decided nothing: they have nothing left


def search_alone(solver_tiers: tuple[Tier, ...]) -> bool:
    """Whether the input search (``subdivide``) is the only exact tier after the split tier.

    Then it is also the run's refuter (it forward-passes points of its most promising leaves),
    so the attack is only the shortcut to a sign in a sliver: a probe before each layer's first
    instalment, one round after each instalment (:func:`decide_layer`, :func:`run_tiers`).
    """
    return tuple(tier for tier in solver_tiers if tier != Tier.SPLIT) == (Tier.SUBDIVIDE,)


def bounds_pass(analysis: Analysis) -> None:
    """Pass 1 of the anytime order: interval and CROWN proofs on every ReLU layer, bottom-up.

    Why first: every later tier of a layer can take minutes, and the layers above wait for
    it; a deadline reached there would leave them with interval proofs only, far fewer than
    CROWN gives in seconds. After this pass the run holds, whenever it stops, every proof of
    interval + CROWN over the whole network (what onnxsim's ``stable_relu_prune`` proves); the
    per-layer tiers that follow start from these bounds and may tighten them.

    CROWN bounds every row not proved stable, the unstable ones included (their bounds fix
    the relaxation the layers above are bounded with), as long as a later layer has open
    neurons; otherwise only the open rows of the layer, if any. Layer 0 needs none: its
    interval bounds are exact. The pass is finished even when the deadline passes inside
    it (it costs about one CROWN per layer, seconds on MLPs); only the forward passes of
    the CROWN vertices (witness candidates) stop at the deadline. A network with a sparse
    layer (a CNN too large to be dense, tens of thousands of rows per layer, where CROWN
    takes minutes) stops the pass at the deadline too: the rows not reached keep their
    interval bounds.
    """
    relu_layers = analysis.net.relu_layer_indices
    stop = analysis.deadline if analysis.net.has_sparse_layers else np.inf
    for number, k in enumerate(relu_layers, 1):
        analysis.layer_now = k
        with analysis.timed(Tier.INTERVAL):
            analysis.prove_from_bounds(k, Tier.INTERVAL)
        if k > 0:
            with analysis.timed(Tier.SYMBOLIC):
                proved = (analysis.states[k] == NeuronState.ACTIVE) | (
                    analysis.states[k] == NeuronState.INACTIVE
                )
                later_open = any(not analysis.settled(j).all() for j in relu_layers[number:])
                rows = np.flatnonzero(~proved if later_open else ~analysis.settled(k))
                if rows.size and time.monotonic() < stop:
                    analysis.bounds[k], corners = symbolic_bounds(
                        analysis.net, analysis.box, analysis.bounds, k, rows, stop
                    )
                    analysis.prove_from_bounds(k, Tier.SYMBOLIC)
                    analysis.propagate()
                    neurons, signs = analysis.open_directions(k)
                    if neurons.size and not analysis.out_of_time():
                        position = np.searchsorted(rows, neurons)
                        analysis.see(corners[np.where(signs > 0, 0, 1), position], Tier.SYMBOLIC)
        analysis.emit("bounds", number, len(relu_layers))


def decide_layer(analysis: Analysis, k: int, solver_tiers: tuple[Tier, ...]) -> None:
    """The tiers cheapest first, each only while layer k has open directions and time is left.

    interval → symbolic (+ ascent) → split → α-CROWN (after tightening the layers below) →
    the selected exact tiers in table order, a probe before the first ``probed_before`` one,
    an attack (at growing effort) before each ``attacked_before`` one unless a background
    attack (started before a ``background`` tier) covers the layer already.

    When the input search (``subdivide``) is the only tier after the split (few inputs), a probe
    runs before it and one attack round after it, on what its instalment left: the search
    forward-passes points of its leaves, the most promising first, so it refutes as it proves,
    and an attack round before it was mostly spent on directions the search then proved
    (2-input ring2d: 26 s of a 63 s run, no sign found). The retries attack one round after
    each instalment (:func:`policy.retry_attack_effort`).
    """
    analysis.layer_now = k
    # A CNN's tiers pursue only the directions that can change its structure (CROWN still
    # bounds every unsettled row, tighten_previous every loose neuron below).
    analysis.focused = analysis.focus
    with analysis.timed(Tier.INTERVAL):
        analysis.prove_from_bounds(k, Tier.INTERVAL)
    if k > 0 and analysis.has_open(k):
        tier_impl.run(analysis, Tier.SYMBOLIC, k)
    few_inputs = analysis.net.in_features <= policy.SPLIT_MAX_INPUTS
    if Tier.SPLIT in solver_tiers and few_inputs and analysis.has_open(k):
        tier_impl.run(analysis, Tier.SPLIT, k)
    milp_tiers = tuple(tier for tier in solver_tiers if tier != Tier.SPLIT)
    if milp_tiers and k > 1 and analysis.has_open(k):
        tier_impl.tighten_previous(analysis, k)
    if milp_tiers and k > 0 and analysis.has_open(k):
        tier_impl.run(analysis, Tier.ALPHA_CROWN, k)
    attack_effort, probed = 1.0, False
    search_only = search_alone(solver_tiers)
    with analysis.background_attack(k):
        for tier in milp_tiers:
            spec = TIERS[tier]
            if not analysis.has_open(k):
                break
            if spec.probed_before and k > 0 and not probed:
                tier_impl.run(analysis, Tier.PROBE, k)
                probed = True
                if not analysis.has_open(k):
                    break
            if spec.background:
                analysis.start_background_attack(k)
            if spec.attacked_before and k > 0 and search_only:
                tier_impl.run(analysis, Tier.PROBE, k)
                probed = True
                if not analysis.has_open(k):
                    break
            elif spec.attacked_before and k > 0 and not analysis.attacked_in_background(k):
                tier_impl.run(analysis, Tier.ATTACK, k, attack_effort)
                attack_effort = min(
                    attack_effort * policy.ATTACK_ESCALATION, policy.ATTACK_MAX_EFFORT
                )
                if not analysis.has_open(k):
                    break
            tier_impl.run(analysis, tier, k)
            if search_only and k > 0 and analysis.has_open(k):  # what the instalment left
                tier_impl.run(analysis, Tier.ATTACK, k)
    analysis.focused = False
    analysis.finish_layer(k)
