"""The state of one stability analysis: what a run knows and how it records what it learns.

:class:`Analysis` holds the observations (signs seen, witnesses), the bounds of every layer, the
verdicts and which tier settled each direction, timings, notes and the deadline; the tiers
(:mod:`onnx_exact.stability.tiers`) read it and record through it (:meth:`Analysis.see` for
inputs, :meth:`Analysis.prove` for proofs), and the schedule (:mod:`onnx_exact.stability.schedule`)
decides from it what runs next. It also owns the background attack beside a layer's exact tiers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from onnx_exact import parallel
from onnx_exact.bounds import input_split
from onnx_exact.bounds.crown import LayerBounds, interval_bounds
from onnx_exact.core.box import Box
from onnx_exact.core.network import Network
from onnx_exact.core.verdicts import (
    CREDIT_ORDER,
    LayerStability,
    NeuronState,
    ProofStatus,
    StabilityResult,
    Tier,
)
from onnx_exact.progress import ProgressCallback, ProgressEvent
from onnx_exact.search.attack import AttackTarget, BackgroundAttack
from onnx_exact.search.witness import Observation, observe
from onnx_exact.solvers import lp_relaxation
from onnx_exact.stability import policy


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
        for k, layer in enumerate(net.layers):
            if layer.auxiliary is not None:
                self._mark_auxiliary(k)
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.time_limit_hit = False
        self.tightened: set[int] = set()
        self.relaxation: lp_relaxation.LayerRelaxation | None = None  # of the layer being decided
        self.searches: dict[int, input_split.InputSearch] = {}  # split/subdivide's, per layer
        # per layer (n_k, 2): share of the box on which the input search proved y <= 0 (column
        # 0) and y >= 0 (column 1); NaN where no search measured it
        self.proved_share = [np.full((layer.out_features, 2), np.nan) for layer in net.layers]
        # Structural focus: only CNNs (some layer carries ``channels``) are pruned by channel;
        # the schedule turns it on (``focused``) for the costly tiers and the retries.
        self.focus = any(layer.channels is not None for layer in net.layers)
        self.focused = False

    def _mark_auxiliary(self, k: int) -> None:
        """Auxiliary neurons that sum ReLU outputs are ACTIVE by construction.

        Such a row (after the kinks) has no negative weight and no negative bias over the
        outputs of the previous layer, which carries a ReLU, so ``y >= 0`` exactly: the ReLU is
        the identity on it. Examples: a passthrough row (:attr:`DenseLayer.passthrough`: weight
        1 on one input, bias 0), the carried ``a + relu(b - a)`` of a MaxPool's max tree
        (:mod:`onnx_exact.io.cnn_maxpool`). Decided by "linear", so no tier pursues them and no
        count includes them (as for a layer without ReLU). The other auxiliary kinds are ordinary
        ReLUs that keep the verdicts of the bounds pass and witnesses and are never pursued
        (:meth:`structural`): the pair ``relu(±s)`` of a skip from a tensor that may be
        negative, and the kinks ``relu(y - c)`` of a ``Clip(0, c)`` layer
        (:attr:`DenseLayer.kinks`, before the passthrough rows).
        """
        layer = self.net.layers[k]
        if k == 0 or not self.net.layers[k - 1].relu:
            return
        first = int(layer.real.sum()) + layer.kinks.size
        tail = layer.weight[first:]
        smallest = tail.row_min() if layer.is_sparse else tail.min(axis=1, initial=0.0)
        nonnegative = (smallest >= 0.0) & (layer.bias[first:] >= 0.0)
        rows = first + np.flatnonzero(nonnegative & layer.auxiliary[first:])
        self.states[k][rows] = NeuronState.ACTIVE
        self.decided_by[k][rows] = Tier.LINEAR.value

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

    def structural(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Which neurons' ``+`` and ``-`` directions of layer k can still change the structure.

        Without focus (no layer carries ``channels``: an MLP, reduced neuron by neuron) and
        while the schedule has not turned it on (``focused``: the cheap tiers decide every
        direction, their proofs tighten the relaxations of the layers above) every direction
        can. A CNN is pruned by channel (:mod:`onnx_exact.channels`): a channel is removed only
        if every neuron of it is proved INACTIVE, and a ReLU only if every neuron of its layer
        is proved ACTIVE; a dense layer of the head (no ``channels``) has one neuron per
        channel. So the ``+`` direction of neuron i (proving it INACTIVE) matters only while no
        neuron of its channel is seen positive or proved ACTIVE (or is UNSTABLE), and the ``-``
        directions (proving ACTIVE) only while no neuron of the layer is seen negative or proved
        INACTIVE. A ``Clip(0, c)`` layer is removed only if, besides, every kink is proved
        INACTIVE (no unit reaches ``c``), so a kink seen positive, proved ACTIVE or unstable
        also ends its ``-`` directions. Recomputed at every call, so each new witness narrows
        it. Auxiliary neurons (:attr:`DenseLayer.auxiliary`, no units of the graph: passthrough
        rows, kinks) never can.
        """
        layer = self.net.layers[k]
        size = layer.out_features
        real = layer.real
        if not (self.focus and self.focused):
            return real.copy(), real.copy()
        channels = layer.channels if layer.channels is not None else np.arange(size)
        states = self.states[k]
        unstable = states == NeuronState.UNSTABLE
        not_dead = self.obs.seen_pos[k] | (states == NeuronState.ACTIVE) | unstable
        blocked = np.bincount(channels, not_dead, int(channels.max()) + 1 if size else 0) > 0
        not_identity = (self.obs.seen_neg[k] | (states == NeuronState.INACTIVE) | unstable) & real
        kinks = layer.kinks
        saturating = self.obs.seen_pos[k][kinks] | (states[kinks] == NeuronState.ACTIVE)
        not_identity[kinks] = saturating | (states[kinks] == NeuronState.UNSTABLE)
        return ~blocked[channels] & real, np.full(size, not not_identity.any()) & real

    def not_pursued(self, k: int) -> np.ndarray:
        """Unsettled neurons of layer k none of whose open directions can change the structure."""
        unsettled = ~self.settled(k)
        pos_focus, neg_focus = self.structural(k)
        pos_open = unsettled & ~self.obs.seen_pos[k] & pos_focus
        neg_open = unsettled & ~self.obs.seen_neg[k] & neg_focus
        return unsettled & ~pos_open & ~neg_open

    def open_directions(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Neuron indices and signs of layer k's directions neither proved nor refuted.

        Under the structural focus (CNNs) only those that can still change the structure
        (:meth:`structural`); the bound tiers still bound every unsettled row.
        """
        unsettled = ~self.settled(k)
        pos_focus, neg_focus = self.structural(k)
        pos_open = unsettled & ~self.obs.seen_pos[k] & pos_focus
        neg_open = unsettled & ~self.obs.seen_neg[k] & neg_focus
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
        pos_focus, neg_focus = self.structural(k)
        focus = np.where(signs > 0, pos_focus[neurons], neg_focus[neurons])
        return unsettled & ~np.where(signs > 0, seen_pos, seen_neg) & focus

    def has_open(self, k: int) -> bool:
        """Layer k has directions neither proved nor refuted, and the deadline has not passed."""
        self.background_feed()
        return bool(self.open_directions(k)[0].size) and not self.out_of_time()

    def any_open(self) -> bool:
        """Whether some ReLU layer has a neuron not yet settled (and, under focus, pursued)."""
        return self.open_count() > 0

    def open_count(self) -> int:
        """Neurons of all ReLU layers not yet settled (under focus: those still pursued)."""
        return sum(
            int((~self.settled(k) & ~self.not_pursued(k)).sum())
            for k in self.net.relu_layer_indices
        )

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

    def record_cover(
        self, k: int, neurons: np.ndarray, signs: np.ndarray, covered: np.ndarray
    ) -> None:
        """Shares of the box on which an input search proved layer k's directions."""
        self.proved_share[k][neurons, np.where(signs > 0, 0, 1)] = covered

    def undecided_share(self, k: int) -> np.ndarray:
        """Per neuron of layer k, the share of the box on which the input search proved its
        open directions (the smaller share when both signs are open); NaN where the neuron is
        decided or an open direction of it was not searched."""
        undecided = self.states[k] == NeuronState.UNDECIDED
        share = self.proved_share[k]
        pos = np.where(self.obs.seen_pos[k], np.inf, share[:, 0])
        neg = np.where(self.obs.seen_neg[k], np.inf, share[:, 1])
        smaller = np.minimum(pos, neg)  # NaN stays NaN
        return np.where(undecided & np.isfinite(smaller), smaller, np.nan)

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
            if result.status == ProofStatus.PROVED:
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

    def attack_target(self, k: int) -> AttackTarget:
        """What an attack on layer k searches, with what its pattern search builds its MILP from."""
        return AttackTarget(self.net, self.box, self.bounds, self.solver_states(k), k)

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
        may not start one (:func:`onnx_exact.parallel.can_start_workers`). Nor when the network
        holds more than ``policy.BACKGROUND_MAX_WEIGHT_BYTES`` of dense weights: the process
        gets its own copy, and a CNN's dense conv matrices (600 MB for ResNet-4b)
        would push the run's peak memory past what its analysis needs.
        """
        if self.jobs < 2 or k == 0 or self.background is not None or self.out_of_time():
            return
        if not parallel.can_start_workers():
            return
        neurons, signs = self.open_directions(k)
        if not 0 < neurons.size < self.jobs:
            return
        weight_bytes = 8 * sum(layer.weight.size for layer in self.net.layers)
        if weight_bytes > policy.BACKGROUND_MAX_WEIGHT_BYTES:
            note = (
                f"background attack not started: it would copy {weight_bytes / 2**20:.0f} MiB "
                "of dense weights into a second process; the attack tier ran here instead"
            )
            if note not in self.notes:
                self.notes.append(note)
            return
        target = self.attack_target(k)
        seed = (self.seed, k, self.backgrounds_started)
        try:
            self.background = BackgroundAttack(
                target,
                neurons,
                signs,
                seed,
                self.deadline,
                limits=policy.attack_limits(),
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

    def result(self, method: str) -> StabilityResult:
        """The verdicts, bounds, witnesses, timings and notes of the run so far.

        Under the structural focus an UNDECIDED neuron none of whose open directions can change
        the structure is reported as not pursued (``LayerStability.not_pursued``), not as open.
        """
        self.focused = True
        layers = []
        for k, layer in enumerate(self.net.layers):
            if layer.relu:
                # Witnesses found while deciding later layers may complete earlier neurons' pairs.
                self.finish_layer(k)
            not_pursued = self.not_pursued(k) & layer.real if layer.relu else None
            share = self.undecided_share(k) if layer.relu else None
            undecided = int(np.count_nonzero(self.states[k][layer.real] == NeuronState.UNDECIDED))
            if not_pursued is not None and not_pursued.any():
                undecided -= int(not_pursued.sum())
                self.notes.append(
                    f"layer {layer.name!r}: {int(not_pursued.sum())} neurons not pursued "
                    "(no open direction of theirs can change the channel structure)"
                )
            if undecided:
                self.out_of_time()  # the deadline may have passed inside the last tier
                reason = (
                    "time limit reached"
                    if self.time_limit_hit
                    else "no witness and no proof beyond the margin"
                )
                self.notes.append(
                    f"layer {layer.name!r}: {undecided} neurons undecided ({reason})"
                    + ("" if share is None else _share_phrase(share, undecided))
                )
            layers.append(
                LayerStability(
                    index=k,
                    name=layer.name,
                    states=self.states[k],
                    decided_by=self.decided_by[k],
                    lower=self.bounds[k].lower,
                    upper=self.bounds[k].upper,
                    not_pursued=not_pursued if self.focus else None,
                    proved_share=share,
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


def _share_phrase(share: np.ndarray, undecided: int) -> str:
    """``"; input splitting proved them on 96.2-99.97 % of the box"`` for the measured shares
    of the ``undecided`` neurons (empty when none is measured): how much is left to prove."""
    measured = share[np.isfinite(share)]
    if not measured.size:
        return ""
    low, high = _percent(float(measured.min())), _percent(float(measured.max()))
    span = f"{low} %" if low == high else f"{low}-{high} %"
    which = "them" if measured.size == undecided else f"{measured.size} of them"
    return f"; input splitting proved {which} on {span} of the box"


def _percent(share: float) -> str:
    """A share as a percentage of four significant digits that never rounds up to 100."""
    text = f"{100.0 * share:.4g}"
    return "> 99.99" if share < 1.0 and float(text) >= 100.0 else text
