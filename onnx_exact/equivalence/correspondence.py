"""The correspondence between two ReLU networks, recovered from the models alone.

Two networks that compute the same function on a box usually do so for a structural reason: one is
a re-export of the other (BN, Mul/Add/Sub/Div, Gemm alpha/beta and MatMul layouts folded by the
reader into the same affine layers), a copy with hidden units permuted and positively rescaled
(``relu(c y) = c relu(y)`` for ``c > 0``, the next layer's columns absorbing ``1/c``), or a
compression of it (dead units removed, always-active layers folded into their neighbour,
duplicates merged). This module names, for every hidden unit of both networks, which of these it
is, from the canonical walk of :mod:`onnx_exact.equivalence.canonical`:

* **matched** — its pre-activation form is ``lam > 0`` times a unit's of the other network (the
  two share one free variable ``h = lam h_u``), or both are proved stable in the same state;
* **stable** — proved stable on the box and without a twin: dead (``h = 0``) or always active
  (``h = y``, linear, so it composes with the next layer: an all-active layer the other network
  folded away);
* **one-sided** — a free variable that only this network uses.

The proof it gives (``method`` of a direction)
----------------------------------------------
The walk writes both outputs over the same variables with rigorous error terms (the residual of
every match enters them: a float32 re-rounding is *not* equality, it is a bounded difference), so
the symbolic bound of ``f_A - f_B`` is exact arithmetic on the stored weights:

1. ``matched``: the symbolic bound proves the direction after the first walk and every unit of
   both networks is matched;
2. ``stable-units``: it proves it once the units that are not matched are stable — either already
   in the first walk (from :func:`quick_stability`'s bounds, or the analysis ``compress`` ran),
   or after :func:`prove_units_stable` ran the engine's exact solver tiers on exactly the
   one-sided units the bounds left undecided (over the bounds already proved for the layers
   below), one layer at a time from the shallowest with the walk repeated after each (a layer
   proved all active makes the next layer's units match the other network's merged layer);
3. ``milp``: the product MILP (:mod:`onnx_exact.equivalence.proof`) on what is left, with shared
   variables for matched units and no binary for stable ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from onnx_exact.bounds import input_split, relu_bab
from onnx_exact.bounds.crown import LayerBounds, interval_bounds, symbolic_bounds
from onnx_exact.core.box import Box
from onnx_exact.core.directions import Direction
from onnx_exact.core.network import Network
from onnx_exact.core.verdicts import LayerStability, NeuronState, StabilityResult
from onnx_exact.equivalence.canonical import Canonical
from onnx_exact.search.witness import first_layer_extremes, observe, sample_inputs
from onnx_exact.solvers import exact_tiers, lp_relaxation
from onnx_exact.stability.policy import (
    FLOAT_MARGIN,
    SPLIT_MAX_INPUTS,
    SUBDIVIDE_LEAVES,
    float_margins,
    neuron_scale,
    solver_margins,
)
from onnx_exact.stability.tiers import lp_dive_for

METHODS = ("matched", "stable-units", "milp")
"""How a direction was proved, from the cheapest to the costliest (see the module docstring)."""


@dataclass
class LayerMatch:
    """The roles of one ReLU layer's units of one network (indices into that layer)."""

    network: str
    layer: int
    name: str
    matched: np.ndarray
    stable: np.ndarray
    one_sided: np.ndarray
    real: np.ndarray | None = None
    """Per neuron of the layer: a unit of the graph; ``False`` for the auxiliary passthrough
    neurons of a residual CNN (``DenseLayer.auxiliary``), which take part in the proof but are
    never counted or reported. ``None``: every neuron is a unit."""

    def counted(self, role: str) -> np.ndarray:
        """The units of ``role`` ("matched", "stable", "one_sided") that are units of the graph."""
        units = getattr(self, role)
        return units if self.real is None else units[self.real[units]]

    @property
    def size(self) -> int:
        return sum(int(self.counted(role).size) for role in ("matched", "stable", "one_sided"))

    def to_json(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "layer": self.layer,
            "name": self.name,
            "size": self.size,
            "matched": int(self.counted("matched").size),
            "stable": int(self.counted("stable").size),
            "one_sided": self.counted("one_sided").tolist(),
        }


@dataclass
class Correspondence:
    """What the walk matched: the hand-over from "match" to "prove".

    ``layers`` holds one :class:`LayerMatch` per ReLU layer of A, then of B.
    ``targeted``/``proved_stable`` count the one-sided units :func:`prove_units_stable` was run on
    and those it proved stable.
    """

    layers: list[LayerMatch]
    targeted: int = 0
    proved_stable: int = 0

    def count(self, role: str, network: str | None = None) -> int:
        return sum(
            layer.counted(role).size
            for layer in self.layers
            if network is None or layer.network == network
        )

    @property
    def complete(self) -> bool:
        """Every unit of both networks is matched (no stable-only or one-sided unit)."""
        return self.count("stable") == 0 and self.count("one_sided") == 0

    def targets(self, network: str, stability: StabilityResult) -> dict[int, np.ndarray]:
        """One-sided units of ``network`` that may still be proved stable (not seen in both
        signs), per layer index."""
        out = {}
        for layer in self.layers:
            if layer.network != network or not layer.one_sided.size:
                continue
            states = np.asarray(stability.layers[layer.layer].states)[layer.one_sided]
            open_units = layer.one_sided[states == NeuronState.UNDECIDED]
            if open_units.size:
                out[layer.layer] = open_units
        return out

    def summary(self) -> str:
        """The role counts of both networks on one line, and what the targeting proved."""
        line = (
            f"matched A {self.count('matched', 'A')}, B {self.count('matched', 'B')} · "
            f"stable A {self.count('stable', 'A')}, B {self.count('stable', 'B')} · "
            f"one-sided A {self.count('one_sided', 'A')}, B {self.count('one_sided', 'B')}"
        )
        if self.targeted:
            line += (
                f" · {self.targeted} one-sided units targeted, {self.proved_stable} proved stable"
            )
        return line

    def to_json(self) -> dict[str, Any]:
        return {
            "matched": {n: self.count("matched", n) for n in ("A", "B")},
            "stable": {n: self.count("stable", n) for n in ("A", "B")},
            "one_sided": {n: self.count("one_sided", n) for n in ("A", "B")},
            "targeted": self.targeted,
            "proved_stable": self.proved_stable,
            "layers": [layer.to_json() for layer in self.layers],
        }


def correspondence_of(canonical: Canonical) -> Correspondence:
    """Read the roles of every unit from a canonical walk of both networks (tags "A", "B")."""
    users: dict[int, set[str]] = {}
    for unit in canonical.units:
        for column in unit.column[unit.column >= 0].tolist():
            users.setdefault(column, set()).add(unit.network)
    layers = []
    for unit in canonical.units:
        both = np.array([len(users.get(c, ())) == 2 for c in unit.column.tolist()], dtype=bool)
        free = unit.column >= 0
        layers.append(
            LayerMatch(
                unit.network,
                unit.layer,
                unit.name,
                matched=np.flatnonzero((free & both) | unit.twin),
                stable=np.flatnonzero(~free & ~unit.twin),
                one_sided=np.flatnonzero(free & ~both),
                real=unit.real,
            )
        )
    return Correspondence(layers)


QUICK_SAMPLES = 2048
"""Box points forward-passed by :func:`quick_stability` (centre, uniform, Bernoulli corners)."""

QUICK_TARGET_SAMPLES = 256
"""The same with ``targets``: the vertices that attain the targets' bounds are the inputs that
can refute them; ``check``'s onnxruntime sampling covers the box (a numpy forward pass of a big
CNN's dense layers costs far more than onnxruntime's)."""


def quick_stability(
    net: Network,
    box: Box,
    seed: int = 0,
    targets: dict[int, np.ndarray] | None = None,
    deadline: float = np.inf,
) -> StabilityResult:
    """The verdicts a proof starts from, in bounded time: bounds and forward passes only.

    Interval bounds through every layer, CROWN (:func:`onnx_exact.bounds.crown.symbolic_bounds`) on
    the rows interval arithmetic leaves open, propagated; a neuron whose bound clears zero by the
    float64 margin ``1e-12 s`` is ACTIVE/INACTIVE (the engine's interval/symbolic policy). Then the
    centre, the first layer's extreme vertices, the CROWN vertices and ``QUICK_SAMPLES`` box
    points are forward-passed: a neuron seen in both signs is UNSTABLE. Everything else is
    UNDECIDED; the units that matter are then targeted by :func:`prove_units_stable`. Unlike the
    full analysis, no ascent or solver runs (its time grows with the load, not with need).

    ``box`` is the raw box; the result is over ``net``'s input space like
    :func:`onnx_exact.stability.analyze_stability`'s. With ``targets`` (units per layer that the
    proof needs decided, e.g. :meth:`onnx_exact.equivalence.structural.Alignment.targets`), CROWN
    runs only up to the deepest layer where a target is still open after interval arithmetic, and
    there only on those targets: the layers below need CROWN for tight ReLU relaxations, the
    layers above nothing (they keep their interval bounds, which are sound). Then only the
    targets' vertices (first-layer extremes, CROWN vertices) and ``QUICK_TARGET_SAMPLES`` box
    points are forward-passed. Past ``deadline`` (``time.monotonic()``) no further layer gets
    CROWN (its neurons keep their interval verdicts) and only the centre is forward-passed: the
    proof's time limit holds the bounds pass too.
    """
    box_net = box.to_network(net.input_map)
    bounds = interval_bounds(net, box_net)
    candidates = [box_net.center[None, :]]
    if targets is None:
        candidates.append(first_layer_extremes(net, box_net))
    elif 0 in targets:
        positive = net.layers[0].rows(targets[0]) > 0.0
        lo, hi = box_net.lower, box_net.upper
        candidates += [np.where(positive, hi, lo), np.where(positive, lo, hi)]
    for k in range(1, len(net.layers)):
        if time.monotonic() >= deadline:
            break
        current = bounds[k]
        rows = np.flatnonzero((current.lower < 0.0) & (current.upper > 0.0))
        if targets is not None:
            deepest = max(
                (
                    j
                    for j, units in targets.items()
                    if j >= k and _open(net, box_net, bounds, j, units)
                ),
                default=-1,
            )
            if deepest < k:
                break
            if deepest == k:
                rows = np.intersect1d(rows, targets[k])
        if not net.layers[k].relu or not rows.size:
            continue
        bounds[k], corners = symbolic_bounds(net, box_net, bounds, k, rows)
        bounds = interval_bounds(net, box_net, bounds)
        picked = np.isin(rows, targets.get(k, ())) if targets is not None else slice(None)
        candidates.append(corners[:, picked].reshape(-1, net.in_features))
    rng = np.random.default_rng(seed)
    samples = QUICK_SAMPLES if targets is None else QUICK_TARGET_SAMPLES
    candidates.append(sample_inputs(box_net, rng, samples))
    if time.monotonic() >= deadline:
        candidates = candidates[:1]  # the centre: a big CNN's forward passes cost minutes
    seen = observe(net, np.clip(np.concatenate(candidates), box_net.lower, box_net.upper))
    layers = []
    for k, layer in enumerate(net.layers):
        lower, upper = bounds[k].lower.copy(), bounds[k].upper.copy()
        states = np.full(layer.out_features, NeuronState.UNDECIDED, dtype=np.int8)
        decided_by = np.full(layer.out_features, "", dtype=object)
        if not layer.relu:
            states[:], decided_by[:] = NeuronState.ACTIVE, "linear"
        else:
            margin = FLOAT_MARGIN * neuron_scale(net, box_net, bounds, k)
            unstable = seen.seen_pos[k] & seen.seen_neg[k]
            states[unstable], decided_by[unstable] = NeuronState.UNSTABLE, "witness"
            for mask, state in (
                (upper <= -margin, NeuronState.INACTIVE),
                (lower >= margin, NeuronState.ACTIVE),
            ):
                states[mask], decided_by[mask] = state, "interval" if k == 0 else "symbolic"
        layers.append(LayerStability(k, layer.name, states, decided_by, lower, upper))
    return StabilityResult(layers, seen.witnesses)


def _open(net: Network, box: Box, bounds: list[LayerBounds], k: int, units: np.ndarray) -> bool:
    """Some of ``units`` of layer ``k`` is not stable by its bounds and the float64 margin."""
    margin = float_margins(net, box, bounds, k)[units]
    current = bounds[k]
    return bool(np.any((current.lower[units] < margin) & (current.upper[units] > -margin)))


def prove_units_stable(
    net: Network,
    box: Box,
    stability: StabilityResult,
    targets: dict[int, np.ndarray],
    time_limit: float | None,
    *,
    jobs: int = 1,
) -> tuple[StabilityResult, int]:
    """Prove the ``targets`` units of ``net`` stable over the raw ``box`` with the exact tiers.

    The stability engine's tiers run on exactly these units, layer by layer from the shallowest,
    over the proved bounds and verdicts ``stability`` already holds for the layers below, in the
    engine's order: for a network of at most ``SPLIT_MAX_INPUTS`` input features first the
    input-space branch and bound (:class:`onnx_exact.bounds.input_split.InputSearch`, up to
    ``SUBDIVIDE_LEAVES`` leaves per layer: on few inputs it decides what the box-wide tiers take
    minutes for), then per sign direction the triangle LP with a rigorous dual bound and ideal cuts,
    CROWN branch and bound, LP branch and bound and the decision MILP (their margins). (α-CROWN,
    which the engine runs first on a whole layer, is no tighter than the triangle LP and only
    pays for itself on hundreds of rows.) No witness search and no re-analysis of anything
    else: a target that is not stable is refuted by the solvers' points or left to the proof's
    MILP. A unit asks "can ``y`` be positive?" (proving it
    dead) and "can ``y`` be negative?" (always active); a sign refuted is not asked again. Every
    sound bound found tightens the unit's pre-activation bounds (an undecided unit then costs the
    MILP a tighter big-M). ``stability`` itself is not changed.

    Returns
    -------
    (the updated result, how many targets are now proved ACTIVE or INACTIVE).
    """
    if not targets:
        return stability, 0
    deadline = time.monotonic() + time_limit if time_limit is not None else np.inf
    box_net = box.to_network(net.input_map)
    layers = list(stability.layers)
    for k in targets:
        layer = layers[k]
        layers[k] = replace(
            layer,
            states=np.array(layer.states, copy=True),
            decided_by=np.array(layer.decided_by, dtype=object),
            lower=np.array(layer.lower, dtype=np.float64, copy=True),
            upper=np.array(layer.upper, dtype=np.float64, copy=True),
        )
    bounds = [LayerBounds(layer.lower, layer.upper) for layer in layers]
    proved = 0
    for k in sorted(targets):
        if time.monotonic() >= deadline:
            break
        below = [
            layers[j].states
            if net.layers[j].relu
            else np.full_like(layers[j].states, NeuronState.ACTIVE)
            for j in range(k)
        ]
        proved += _TargetLayer(net, box_net, bounds, below, layers[k], targets[k]).run(
            deadline, jobs
        )
        bounds[k] = LayerBounds(layers[k].lower, layers[k].upper)
    return replace(stability, layers=layers), proved


class _TargetLayer:
    """The targets of one layer and their open sign directions through the exact tiers."""

    def __init__(self, net, box, bounds, below, layer, units) -> None:
        self.net, self.box, self.bounds, self.below, self.layer = net, box, bounds, below, layer
        self.k = layer.index
        self.units = np.asarray(units, dtype=np.int64)
        self.refuted: set[tuple[int, int]] = set()
        self.proved = 0

    def decide(self, unit: int, sign: int, tier: str) -> None:
        if self.layer.states[unit] == NeuronState.UNDECIDED:
            self.layer.states[unit] = NeuronState.INACTIVE if sign > 0 else NeuronState.ACTIVE
            self.layer.decided_by[unit] = tier
            self.proved += 1

    def open_directions(self) -> list[Direction]:
        """Both signs of every undecided target, the likelier to prove first, minus refuted."""
        out = []
        for i in self.units.tolist():
            if self.layer.states[i] != NeuronState.UNDECIDED:
                continue
            first = 1 if self.layer.upper[i] <= -self.layer.lower[i] else -1
            out += [Direction(self.k, i, s) for s in (first, -first) if (i, s) not in self.refuted]
        return out

    def split(self, deadline: float, jobs: int) -> None:
        """The input-space branch and bound on the open directions (few input features): a
        direction is proved when every leaf of a cover of the box clears the float margin, and
        its largest leaf bound ``worst`` then bounds the unit on the box."""
        directions = self.open_directions()
        if not directions:
            return
        neurons = np.array([d.neuron for d in directions], dtype=np.int64)
        signs = np.array([d.sign for d in directions], dtype=np.int64)
        margins = float_margins(self.net, self.box, self.bounds, self.k)[neurons]
        search = input_split.InputSearch(
            self.net,
            self.box.lower,
            self.box.upper,
            self.bounds,
            np.full(neurons.size, self.k),
            neurons,
            signs,
            margins,
            jobs=jobs,
        )
        outcome = search.run(SUBDIVIDE_LEAVES, deadline)
        for i, sign, proved, refuted, worst in zip(
            neurons, signs, outcome.proved, outcome.refuted, outcome.worst, strict=True
        ):
            if proved:
                if sign > 0:
                    self.layer.upper[i] = min(self.layer.upper[i], worst)
                else:
                    self.layer.lower[i] = max(self.layer.lower[i], -worst)
                self.decide(int(i), int(sign), "split")
            elif refuted:
                self.refuted.add((int(i), int(sign)))

    def run(self, deadline: float, jobs: int) -> int:
        layer, k = self.layer, self.k
        if self.net.in_features <= SPLIT_MAX_INPUTS and not self.net.has_sparse_layers:
            self.split(deadline, jobs)
        margins = solver_margins(self.net, self.box, self.bounds, k)
        relaxation = None
        # the HiGHS encodings take dense rows: a network with a sparse layer gets CROWN-BaB only
        highs = not self.net.has_sparse_layers
        tiers = (("lp", "cuts"), "crown-bab", ("bab", "milp")) if highs else ("crown-bab",)
        for tier in tiers:
            directions = self.open_directions()
            if not directions or time.monotonic() >= deadline:
                break
            if relaxation is None and highs:
                relaxation = lp_relaxation.LayerRelaxation.build(
                    self.net, self.box, self.bounds, self.below, k
                )
            common = (self.net, self.box, self.bounds, self.below, k, directions, margins, deadline)
            if tier == "crown-bab":
                dive = lp_dive_for(relaxation) if relaxation is not None else None
                results = relu_bab.decide_directions(*common, dive=dive)
            else:
                results = exact_tiers.decide_directions(
                    *common, tiers=tier, jobs=jobs, relaxation=relaxation
                )
            for result in results:
                i, sign = result.direction.neuron, result.direction.sign
                if np.isfinite(result.bound):
                    if sign > 0:
                        layer.upper[i] = min(layer.upper[i], result.bound)
                    else:
                        layer.lower[i] = max(layer.lower[i], -result.bound)
                if result.status == "proved":
                    self.decide(i, sign, result.method)
                elif result.status == "refuted":
                    self.refuted.add((i, sign))
        return self.proved
