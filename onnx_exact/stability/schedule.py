"""The state of one stability analysis and the schedule of its tiers.

:class:`Analysis` holds what a run knows (observations, bounds, verdicts, which tier settled
what, timings, deadline) and decides which tier of :mod:`onnx_exact.stability.tiers` runs next,
on which layer, at which effort: the bounds pass, the layer order, the probe/attack/background
attack around the exact tiers, the retries under a time limit. Which tiers are retried, attacked
before, probed before or accompanied by a background attack is read from the tier table
(:data:`onnx_exact.core.verdicts.TIERS`); every budget from :mod:`onnx_exact.stability.policy`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from onnx_exact import parallel
from onnx_exact.bounds import input_split
from onnx_exact.bounds.crown import LayerBounds, interval_bounds, symbolic_bounds
from onnx_exact.core.box import Box
from onnx_exact.core.errors import DomainError, UsageError
from onnx_exact.core.network import Network
from onnx_exact.core.verdicts import (
    CREDIT_ORDER,
    SOLVER_TIERS,
    TIERS,
    LayerStability,
    NeuronState,
    StabilityResult,
    Tier,
)
from onnx_exact.progress import ProgressCallback, ProgressEvent
from onnx_exact.resources import retain_freed_heap
from onnx_exact.search.attack import AttackLimits, BackgroundAttack
from onnx_exact.search.witness import Observation, observe
from onnx_exact.solvers import lp_relaxation
from onnx_exact.stability import policy
from onnx_exact.stability import tiers as tier_impl

METHODS = ("auto", Tier.ISA.value, Tier.PER_NEURON.value)


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
        analysis.run_tiers(tuple(Tier(tier) for tier in SOLVER_TIERS if tier in tiers))
    else:
        tier_impl.baseline(analysis, Tier(method))
    return analysis.result(method)


def retry_attack_effort(tier: Tier, effort: float) -> float:
    """Attack rounds after a retry of ``tier`` at ``effort``: one attack second per proof second.

    A direction still open after the first pass is either unstable with its sign in a sliver of
    the box, or stable with a proof out of reach of the capped tiers, and nothing tells the two
    apart in advance. Giving the directions a retried tier leaves open as many attack seconds
    each as that tier could spend on them (its cap ``tier_direction_seconds(tier) * effort``, one
    round costing at most ``policy.attack_round_seconds()``) at most doubles the time to either
    answer, against the order that would have been right; a fixed number of rounds instead
    starves the refutation when one round succeeds rarely. After the tier, not before:
    directions it proves cost no attack. A tier without a per-direction cap (subdivide) is
    followed by ``ATTACK_MAX_EFFORT`` rounds.
    """
    seconds = tier_direction_seconds(tier)
    if seconds is None:
        return policy.ATTACK_MAX_EFFORT
    return max(seconds * effort / policy.attack_round_seconds(), 1.0)


def tier_direction_seconds(tier: Tier | str) -> float | None:
    """The cap in seconds one direction gets from ``tier`` at effort 1 (None: no such cap)."""
    return TIERS[Tier(tier)].direction_seconds


class Analysis:
    """Mutable state of one analysis: observations, bounds, verdicts and bookkeeping."""

    def __init__(
        self,
        net: Network,
        box: Box,
        deadline: float,
        seed: int,
        jobs: int,
        progress: ProgressCallback | None,
    ) -> None:
        self.net, self.box, self.deadline, self.jobs = net, box, deadline, jobs
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.background: BackgroundAttack | None = None  # beside the exact tiers of one layer
        self.backgrounds_started = 0
        self.progress = progress
        self.started = time.monotonic()
        self.layer_now: int | None = None  # the layer the tiers work on, for progress events
        self.obs = Observation.empty(net)
        self.bounds: list[LayerBounds] = []
        self.states = [
            np.full(layer.out_features, NeuronState.UNDECIDED, dtype=np.int8)
            for layer in net.layers
        ]
        self.decided_by = [np.full(layer.out_features, "", dtype=object) for layer in net.layers]
        self.refuted_pos_by = [
            np.full(layer.out_features, "", dtype=object) for layer in net.layers
        ]
        self.refuted_neg_by = [
            np.full(layer.out_features, "", dtype=object) for layer in net.layers
        ]
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.time_limit_hit = False
        self.tightened: set[int] = set()
        self.relaxation: lp_relaxation.LayerRelaxation | None = None  # of the layer being decided
        self.searches: dict[int, input_split.InputSearch] = {}  # split/subdivide's, per layer

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Add the block's wall time to ``timings[key]``; a progress event says it started."""
        key = str(key)
        self.emit(key)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start

    def emit(self, phase: str, done: int = 0, total: int = 0) -> None:
        """Report where the analysis is to the progress callback (nothing without one)."""
        if self.progress is None:
            return
        relu_layers = self.net.relu_layer_indices
        k = self.layer_now
        now = time.monotonic()
        self.progress(
            ProgressEvent(
                phase=str(phase),
                done=done,
                total=total,
                layer=self.net.layers[k].name if k is not None else "",
                layer_number=relu_layers.index(k) + 1 if k in relu_layers else 0,
                layers=len(relu_layers),
                open=self.open_count(),
                elapsed=now - self.started,
                time_left=self.deadline - now if np.isfinite(self.deadline) else None,
            )
        )

    def out_of_time(self) -> bool:
        """Whether the deadline has passed (and, once it has, ``time_limit_hit``)."""
        if time.monotonic() >= self.deadline:
            self.time_limit_hit = True
        return self.time_limit_hit

    def see(self, points: np.ndarray, tier: str) -> None:
        """Forward-pass candidate inputs (clipped into the box) and credit new signs to ``tier``."""
        tier = str(tier)
        points = np.clip(np.atleast_2d(points), self.box.lower, self.box.upper)
        before_pos = [seen.copy() for seen in self.obs.seen_pos]
        before_neg = [seen.copy() for seen in self.obs.seen_neg]
        observe(self.net, points, self.obs)
        for k in range(len(self.net.layers)):
            self.refuted_pos_by[k][self.obs.seen_pos[k] & ~before_pos[k]] = tier
            self.refuted_neg_by[k][self.obs.seen_neg[k] & ~before_neg[k]] = tier

    def settled(self, k: int) -> np.ndarray:
        """Which neurons of layer k are proved stable or seen in both signs."""
        proved = (self.states[k] == NeuronState.ACTIVE) | (self.states[k] == NeuronState.INACTIVE)
        return proved | (self.obs.seen_pos[k] & self.obs.seen_neg[k])

    def open_directions(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Neuron indices and signs of layer k's directions neither proved nor refuted."""
        unsettled = ~self.settled(k)
        pos_open, neg_open = unsettled & ~self.obs.seen_pos[k], unsettled & ~self.obs.seen_neg[k]
        pos, neg = np.flatnonzero(pos_open), np.flatnonzero(neg_open)
        neurons = np.concatenate([pos, neg])
        signs = np.concatenate(
            [np.ones(pos.size, dtype=np.int64), -np.ones(neg.size, dtype=np.int64)]
        )
        return neurons, signs

    def still_open(self, k: int, neurons: np.ndarray, signs: np.ndarray) -> np.ndarray:
        """Which of the given directions of layer k are neither proved nor refuted yet."""
        unsettled = ~self.settled(k)[neurons]
        seen_pos, seen_neg = self.obs.seen_pos[k][neurons], self.obs.seen_neg[k][neurons]
        return unsettled & ~np.where(signs > 0, seen_pos, seen_neg)

    def has_open(self, k: int) -> bool:
        """Layer k has directions neither proved nor refuted, and the deadline has not passed."""
        self.background_feed()
        return bool(self.open_directions(k)[0].size) and not self.out_of_time()

    def any_open(self) -> bool:
        """Whether some ReLU layer has a neuron not yet settled."""
        return any(
            self.net.layers[k].relu and not self.settled(k).all()
            for k in range(len(self.net.layers))
        )

    def open_count(self) -> int:
        """Neurons of all ReLU layers not yet settled."""
        return sum(int((~self.settled(k)).sum()) for k in self.net.relu_layer_indices)

    def prove(self, k: int, neurons: np.ndarray, state: NeuronState, tier: str) -> None:
        """Record proofs; a proof contradicted by a witness is reported and not applied."""
        tier = str(tier)
        seen = self.obs.seen_pos[k] if state == NeuronState.INACTIVE else self.obs.seen_neg[k]
        open_now = ~self.settled(k)[neurons]
        contradicted = neurons[open_now & seen[neurons]]
        if contradicted.size:
            self.notes.append(
                f"layer {self.net.layers[k].name!r}: {tier} bound contradicts a witness for "
                f"neurons {contradicted.tolist()}; kept as unstable"
            )
        accepted = neurons[open_now & ~seen[neurons]]
        self.states[k][accepted] = state
        self.decided_by[k][accepted] = tier

    def prove_from_bounds(self, k: int, tier: str) -> None:
        """Apply the float64 margin policy to layer k's current bounds."""
        margin = policy.float_margins(self.net, self.box, self.bounds, k)
        self.prove(k, np.flatnonzero(self.bounds[k].upper <= -margin), NeuronState.INACTIVE, tier)
        self.prove(k, np.flatnonzero(self.bounds[k].lower >= margin), NeuronState.ACTIVE, tier)

    def prove_covered(
        self, k: int, neurons: np.ndarray, signs: np.ndarray, worst: np.ndarray, tier: str
    ) -> None:
        """Directions proved piecewise: ``sign * y_{k,i} <= worst`` on every part of a cover."""
        for sign, state in ((1, NeuronState.INACTIVE), (-1, NeuronState.ACTIVE)):
            chosen = np.flatnonzero(signs == sign)
            i = neurons[chosen]
            if sign > 0:
                self.bounds[k].upper[i] = np.maximum(
                    np.minimum(self.bounds[k].upper[i], worst[chosen]), self.bounds[k].lower[i]
                )
            else:
                self.bounds[k].lower[i] = np.minimum(
                    np.maximum(self.bounds[k].lower[i], -worst[chosen]), self.bounds[k].upper[i]
                )
            self.prove(k, i, state, tier)
        self.propagate()

    def apply_solver_results(self, k: int, results: list, margins: np.ndarray) -> None:
        """Witnesses are forward-passed; proofs and sound bounds tighten layer k."""
        for result in results:
            if result.witness is not None:
                self.see(result.witness, result.method)
        for result in results:
            i, sign = result.direction.neuron, result.direction.sign
            if np.isfinite(result.bound):
                # max sign*y <= bound (+ margin for solver tolerance)
                limit = result.bound + margins[i]
                if sign > 0:
                    self.bounds[k].upper[i] = max(
                        min(self.bounds[k].upper[i], limit), self.bounds[k].lower[i]
                    )
                else:
                    self.bounds[k].lower[i] = min(
                        max(self.bounds[k].lower[i], -limit), self.bounds[k].upper[i]
                    )
            if result.status == "proved":
                state = NeuronState.INACTIVE if sign > 0 else NeuronState.ACTIVE
                self.prove(k, np.array([i]), state, result.method)
        self.propagate()

    def propagate(self) -> None:
        """Re-run interval propagation from the current (intersected) bounds of every layer."""
        self.bounds = interval_bounds(self.net, self.box, self.bounds)

    def solver_states(self, layer: int) -> list[np.ndarray]:
        """Verdicts of the layers below ``layer`` as the solver expects them."""
        states = []
        for k in range(layer):
            current = self.states[k].copy()
            if not self.net.layers[k].relu:
                current[:] = NeuronState.ACTIVE
            states.append(current)
        return states

    def finish_layer(self, k: int) -> None:
        """Both signs witnessed → UNSTABLE, credited to the tier that found the later witness."""
        self.relaxation = None
        unstable = (
            self.obs.seen_pos[k]
            & self.obs.seen_neg[k]
            & (self.states[k] != NeuronState.ACTIVE)
            & (self.states[k] != NeuronState.INACTIVE)
        )
        self.states[k][unstable] = NeuronState.UNSTABLE
        order = CREDIT_ORDER
        pos_rank = np.array([order.get(t, 0) for t in self.refuted_pos_by[k]], dtype=np.int64)
        neg_rank = np.array([order.get(t, 0) for t in self.refuted_neg_by[k]], dtype=np.int64)
        later = np.where(pos_rank >= neg_rank, self.refuted_pos_by[k], self.refuted_neg_by[k])
        self.decided_by[k][unstable] = later[unstable]

    def mark_linear(self, k: int) -> None:
        """A layer without ReLU: every neuron ACTIVE (the identity), decided by "linear"."""
        self.states[k][:] = NeuronState.ACTIVE
        self.decided_by[k][:] = Tier.LINEAR.value

    @contextmanager
    def background_attack(self, k: int) -> Iterator[None]:
        """Scope of the exact tiers of layer k: a background attack started inside ends here."""
        try:
            yield
        finally:
            if self.background is not None:
                self.background_feed()
                seconds = self.background.stop()
                self.timings["background"] = self.timings.get("background", 0.0) + seconds
                self.background = None

    def start_background_attack(self, k: int) -> None:
        """Start a :class:`BackgroundAttack` on layer k's open directions if a core would idle.

        Only with ``jobs >= 2`` and fewer open directions than ``jobs``: the exact tiers then
        work on one direction at a time (a layer's decision MILPs run in parallel only for two
        or more directions), so the attack takes a core nothing else uses. Never for the first
        layer (its interval bounds are exact), when one is already running, or in a process that
        may not start one (:func:`onnx_exact.parallel.can_start_workers`).
        """
        if self.jobs < 2 or k == 0 or self.background is not None or self.out_of_time():
            return
        if not parallel.can_start_workers():
            return
        neurons, signs = self.open_directions(k)
        if not 0 < neurons.size < self.jobs:
            return
        target = tier_impl.attack_target(self, k)
        seed = (self.seed, k, self.backgrounds_started)
        limits = AttackLimits(
            policy.ATTACK_STARTS,
            policy.ATTACK_SECONDS,
            policy.POLISH_SECONDS,
            policy.PATTERN_SECONDS,
            policy.PATTERN_GAP,
        )
        try:
            self.background = BackgroundAttack(
                target,
                neurons,
                signs,
                seed,
                self.deadline,
                limits=limits,
                polish_quantile=policy.BACKGROUND_POLISH_QUANTILE,
                warmup_rounds=policy.BACKGROUND_WARMUP_ROUNDS,
            )
        except OSError as err:  # no process: the attack tier runs here
            note = f"background attack not started ({err}); the attack tier ran instead"
            if note not in self.notes:
                self.notes.append(note)
            return
        self.backgrounds_started += 1

    def background_feed(self) -> np.ndarray:
        """Forward-pass the background attack's new inputs (credited to "attack"); return them.

        The exact tiers call it through their direction book's feed, and :meth:`has_open` before
        every tier.
        """
        if self.background is None:
            return np.empty((0, self.net.in_features))
        points = self.background.drain()
        if points.shape[0]:
            self.see(points, Tier.ATTACK)
        return points

    def attacked_in_background(self, k: int) -> bool:
        """Whether a background attack searches every open direction of layer k already."""
        return (
            self.background is not None
            and self.background.layer == k
            and self.background.covers(*self.open_directions(k))
        )

    def run_tiers(self, solver_tiers: tuple[Tier, ...]) -> None:
        """Every layer bottom-up with capped tiers, then retry rounds over the layers left open.

        Why two passes: one hard direction (a neuron whose extreme lies within a hair of 0) can
        absorb any budget, and with retries inside the layer pass it starves every layer above
        it. The first pass gives every layer its capped tiers; only then do the retries at
        ``policy.RETRY_EFFORTS`` (longer caps per direction) go round the layers still open,
        lowest first, with the tiers the table marks ``retried``, each followed by an attack of
        equal time (:func:`retry_attack_effort`). Deciding a neuron late is sound for the layers
        above: while it was open they treated it as unstable, a relaxation that covers both of
        its phases.

        Without a time limit the caps are what bounds the run, so there are no retries. With one,
        the last effort is repeated until the deadline: a retry continues the subdivision queue
        and restarts the attack from new random starts, so later rounds are not wasted. Only a
        round that returns within ``IDLE_ROUND_SECONDS`` without deciding anything ends the
        retries early: its tiers had nothing left to try.

        With ``subdivide`` among the tiers and at most ``SUBDIVIDE_ONLY_MAX_INPUTS`` input
        features, the box-wide LP, cut, branch-and-bound and MILP tiers are not run: input
        splitting decides such networks far sooner, and the box-wide tiers would spend the
        budget the layers above need.
        """
        few_inputs = self.net.in_features <= policy.SUBDIVIDE_ONLY_MAX_INPUTS
        if Tier.SUBDIVIDE in solver_tiers and few_inputs:
            solver_tiers = tuple(t for t in solver_tiers if t in (Tier.SPLIT, Tier.SUBDIVIDE))
        relu_layers = self.net.relu_layer_indices
        self.bounds_pass()
        for k in range(len(self.net.layers)):
            if not self.net.layers[k].relu:
                self.mark_linear(k)
                continue
            self.decide_layer(k, solver_tiers)
        retry_tiers = tuple(tier for tier in solver_tiers if TIERS[tier].retried)
        if not retry_tiers or not np.isfinite(self.deadline):
            return
        efforts = policy.RETRY_EFFORTS
        for round_index, effort in enumerate(
            itertools.chain(efforts, itertools.repeat(efforts[-1]))
        ):
            if not self.any_open() or self.out_of_time():
                return
            started, open_before = time.monotonic(), self.open_count()
            for k in (k for k in relu_layers if k > 0):  # layer 0 is decided by interval bounds
                self.layer_now = k
                with self.background_attack(k):
                    for tier in retry_tiers:
                        if not self.has_open(k):  # also false once time is up
                            break
                        if TIERS[tier].background:
                            self.start_background_attack(k)
                        tier_impl.run(self, tier, k, effort)
                        if self.has_open(k) and not self.attacked_in_background(k):
                            tier_impl.run(self, Tier.ATTACK, k, retry_attack_effort(tier, effort))
                self.finish_layer(k)
            idle = time.monotonic() - started < policy.IDLE_ROUND_SECONDS
            if round_index >= len(efforts) - 1 and idle and self.open_count() == open_before:
                return  # the tiers returned at once and decided nothing: they have nothing left

    def bounds_pass(self) -> None:
        """Pass 1 of the anytime order: interval and CROWN proofs on every ReLU layer, bottom-up.

        Why first: every later tier of a layer can take minutes, and the layers above wait for
        it; a deadline reached there left them with interval proofs only, far fewer than CROWN
        gives in seconds (far fewer than onnxsim's interval + CROWN, on deep nets). After this pass the run holds, whenever it stops,
        every proof of interval + CROWN over the whole network; the per-layer tiers that follow
        start from these bounds and may tighten them.

        CROWN bounds every row not proved stable, the unstable ones included (their bounds fix
        the relaxation the layers above are bounded with), as long as a later layer has open
        neurons; otherwise only the open rows of the layer, if any. Layer 0 needs none: its
        interval bounds are exact. The pass is finished even when the deadline passes inside
        it (it costs about one CROWN per layer, seconds on MLPs); only the forward passes of
        the CROWN vertices (witness candidates) stop at the deadline.
        """
        relu_layers = self.net.relu_layer_indices
        for number, k in enumerate(relu_layers, 1):
            self.layer_now = k
            with self.timed(Tier.INTERVAL):
                self.prove_from_bounds(k, Tier.INTERVAL)
            if k > 0:
                with self.timed(Tier.SYMBOLIC):
                    proved = (self.states[k] == NeuronState.ACTIVE) | (
                        self.states[k] == NeuronState.INACTIVE
                    )
                    later_open = any(not self.settled(j).all() for j in relu_layers[number:])
                    rows = np.flatnonzero(~proved if later_open else ~self.settled(k))
                    if rows.size:
                        self.bounds[k], corners = symbolic_bounds(
                            self.net, self.box, self.bounds, k, rows
                        )
                        self.prove_from_bounds(k, Tier.SYMBOLIC)
                        self.propagate()
                        neurons, signs = self.open_directions(k)
                        if neurons.size and not self.out_of_time():
                            position = np.searchsorted(rows, neurons)
                            self.see(corners[np.where(signs > 0, 0, 1), position], Tier.SYMBOLIC)
            self.emit("bounds", number, len(relu_layers))

    def decide_layer(self, k: int, solver_tiers: tuple[Tier, ...]) -> None:
        """The tiers cheapest first, each only while layer k has open directions and time is left.

        interval → symbolic (+ ascent) → split → α-CROWN (after tightening the layers below) →
        the selected exact tiers in table order, a probe before the first ``probed_before`` one,
        an attack (at growing effort) before each ``attacked_before`` one unless a background
        attack (started before a ``background`` tier) covers the layer already.
        """
        self.layer_now = k
        with self.timed(Tier.INTERVAL):
            self.prove_from_bounds(k, Tier.INTERVAL)
        if k > 0 and self.has_open(k):
            tier_impl.run(self, Tier.SYMBOLIC, k)
        few_inputs = self.net.in_features <= policy.SPLIT_MAX_INPUTS
        if Tier.SPLIT in solver_tiers and few_inputs and self.has_open(k):
            tier_impl.run(self, Tier.SPLIT, k)
        milp_tiers = tuple(tier for tier in solver_tiers if tier != Tier.SPLIT)
        if milp_tiers and k > 1 and self.has_open(k):
            tier_impl.tighten_previous(self, k)
        if milp_tiers and k > 0 and self.has_open(k):
            tier_impl.run(self, Tier.ALPHA_CROWN, k)
        attack_effort, probed = 1.0, False
        with self.background_attack(k):
            for tier in milp_tiers:
                spec = TIERS[tier]
                if not self.has_open(k):
                    break
                if spec.probed_before and k > 0 and not probed:
                    tier_impl.run(self, Tier.PROBE, k)
                    probed = True
                    if not self.has_open(k):
                        break
                if spec.background:
                    self.start_background_attack(k)
                if spec.attacked_before and k > 0 and not self.attacked_in_background(k):
                    tier_impl.run(self, Tier.ATTACK, k, attack_effort)
                    attack_effort = min(
                        attack_effort * policy.ATTACK_ESCALATION, policy.ATTACK_MAX_EFFORT
                    )
                    if not self.has_open(k):
                        break
                tier_impl.run(self, tier, k)
        self.finish_layer(k)

    def result(self, method: str) -> StabilityResult:
        """The verdicts, bounds, witnesses, timings and notes of the run so far."""
        layers = []
        for k, layer in enumerate(self.net.layers):
            if layer.relu:
                # Witnesses found while deciding later layers may complete earlier neurons' pairs.
                self.finish_layer(k)
            undecided = int(np.count_nonzero(self.states[k] == NeuronState.UNDECIDED))
            if undecided:
                self.out_of_time()  # the deadline may have passed inside the last tier
                reason = (
                    "time limit reached"
                    if self.time_limit_hit
                    else "no witness and no proof beyond the margin"
                )
                self.notes.append(f"layer {layer.name!r}: {undecided} neurons undecided ({reason})")
            layers.append(
                LayerStability(
                    index=k,
                    name=layer.name,
                    states=self.states[k],
                    decided_by=self.decided_by[k],
                    lower=self.bounds[k].lower,
                    upper=self.bounds[k].upper,
                )
            )
        return StabilityResult(
            layers=layers,
            witnesses=self.obs.witnesses,
            timings_s=self.timings,
            method=method,
            time_limit_hit=self.time_limit_hit,
            notes=self.notes,
        )
