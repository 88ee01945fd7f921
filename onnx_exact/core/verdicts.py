"""What the analysis establishes per neuron, the tiers that establish it, and the result it hands
to reduce, report and check."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum

import numpy as np


class _Name(str, Enum):
    """A name that is also its string: ``"milp" == Tier.MILP`` and ``f"{Tier.MILP}" == "milp"``.

    Reports, JSON and the ``decided_by`` arrays hold the plain strings; the Enum only names them.
    """

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(self, spec)


class ProofStatus(_Name):
    """The state of one sign direction of one neuron."""

    PROVED = "proved"  # a sound bound clears zero by the margin
    REFUTED = "refuted"  # a float64 forward pass showed the sign strictly
    UNDECIDED = "undecided"  # neither (yet)


class Tier(_Name):
    """The tiers of the stability analysis, by the name ``decided_by`` and timings carry.

    ``cuts`` is the tier's name (``analyze_stability(tiers=...)``); what it settles is credited
    to ``lp+cuts`` (:attr:`TierSpec.credit`).
    """

    WITNESS = "witness"
    INTERVAL = "interval"
    SYMBOLIC = "symbolic"
    ASCENT = "ascent"
    SPLIT = "split"
    ALPHA_CROWN = "alpha-crown"
    LP = "lp"
    CUTS = "cuts"
    PROBE = "probe"
    CROWN_BAB = "crown-bab"
    ATTACK = "attack"
    BAB = "bab"
    MILP = "milp"
    SUBDIVIDE = "subdivide"
    ISA = "isa"
    PER_NEURON = "per-neuron"
    LINEAR = "linear"


@dataclass(frozen=True)
class TierSpec:
    """One row of :data:`TIERS`: what the schedule needs to know about a tier.

    order : rank in the cheapest-first order; an UNSTABLE neuron is credited to the costlier
        (higher order) of the two tiers that refuted its directions.
    solver : selectable in ``analyze_stability(tiers=...)``; the selected ones run in this order.
    retried : run again on the directions still open, at growing effort, under a time limit.
    attacked_before : the attack tier runs on a layer's open directions just before it.
    probed_before : the probe (one short attack round) runs once before it, first pass only.
    background : a background attack may start beside it (``jobs >= 2``).
    direction_seconds, direction_nodes : per-direction caps at effort 1 (None: no such cap);
        the solver modules read them (``relu_bab.TIME_LIMIT``, ``exact_tiers.BAB_TIME_LIMIT``, ...).
    credit : the name its verdicts carry in ``decided_by`` (the tier's own name but for ``cuts``).
    """

    tier: Tier
    order: int
    solver: bool = False
    retried: bool = False
    attacked_before: bool = False
    probed_before: bool = False
    background: bool = False
    direction_seconds: float | None = None
    direction_nodes: int | None = None
    credit: str = ""

    @property
    def name(self) -> str:
        """The name ``decided_by`` carries for what this tier settles."""
        return self.credit or self.tier.value


_T = Tier
TIERS: dict[Tier, TierSpec] = {
    spec.tier: spec
    for spec in (
        TierSpec(_T.WITNESS, 0),
        TierSpec(_T.INTERVAL, 0),
        TierSpec(_T.LINEAR, 0),
        TierSpec(_T.SYMBOLIC, 1),
        TierSpec(_T.ASCENT, 2),
        TierSpec(_T.SPLIT, 3, solver=True),
        TierSpec(_T.ALPHA_CROWN, 4),
        TierSpec(_T.LP, 5, solver=True),
        TierSpec(_T.CUTS, 6, solver=True, credit="lp+cuts"),
        TierSpec(_T.PROBE, 7),
        TierSpec(
            _T.CROWN_BAB,
            8,
            solver=True,
            retried=True,
            probed_before=True,
            background=True,
            direction_seconds=20.0,  # CROWN branch and bound: thousands of nodes a second
            direction_nodes=20_000,
        ),
        TierSpec(_T.ATTACK, 9),
        TierSpec(
            _T.BAB,
            10,
            solver=True,
            retried=True,
            attacked_before=True,
            background=True,
            direction_seconds=20.0,  # LP branch and bound: an LP per node
            direction_nodes=2000,
        ),
        TierSpec(
            _T.MILP,
            11,
            solver=True,
            retried=True,
            attacked_before=True,
            background=True,
            direction_seconds=60.0,  # one decision MILP per direction
        ),
        TierSpec(_T.SUBDIVIDE, 12, solver=True, retried=True, attacked_before=True),
        TierSpec(_T.ISA, 13),
        TierSpec(_T.PER_NEURON, 14),
    )
}
"""Every tier, one row each (see :class:`TierSpec`)."""

SOLVER_TIERS: tuple[str, ...] = tuple(spec.tier.value for spec in TIERS.values() if spec.solver)
"""The exact tiers ``analyze_stability(tiers=...)`` selects from, in the order they run."""

CREDIT_ORDER: dict[str, int] = {spec.name: spec.order for spec in TIERS.values()}
"""Rank of every ``decided_by`` name (the cheapest-first order of the tiers)."""


class NeuronState(IntEnum):
    """What the analysis established for one neuron over the whole box."""

    UNSTABLE = 0  # both signs witnessed by float64 forward passes
    ACTIVE = 1  # proved y >= 0 on the box: the ReLU is the identity
    INACTIVE = 2  # proved y <= 0 on the box: the output is 0
    UNDECIDED = 3  # neither proved nor refuted (time limit, within the margin): kept as is


@dataclass
class LayerStability:
    """Per-neuron verdicts of one layer (aligned with ``Network.layers``).

    ``decided_by[i]`` names the tier that settled neuron i ("witness", "interval", "symbolic",
    "ascent", "split", "alpha-crown", "lp", "lp+cuts", "probe", "crown-bab", "attack", "bab",
    "milp", "subdivide", "isa", "per-neuron", "linear", "" when undecided).
    ``lower``/``upper`` are the tightest proved pre-activation bounds found.
    ``not_pursued`` (CNNs under the structural focus, else None) marks the UNDECIDED neurons
    left open on purpose: none of their open directions could change the channel structure
    (:meth:`onnx_exact.stability.state.Analysis.structural`); the other UNDECIDED ones are
    open for lack of time or within the margin. ``proved_share`` (None for a layer without ReLU)
    gives, per UNDECIDED neuron whose open directions an input search pursued, the share of the
    box's volume on which it proved them (NaN elsewhere): what was left to prove.
    """

    index: int
    name: str
    states: np.ndarray
    decided_by: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    not_pursued: np.ndarray | None = None
    proved_share: np.ndarray | None = None

    def counts(self) -> dict[str, int]:
        """Number of neurons per state name (``{"ACTIVE": 3, ...}``)."""
        return {state.name: int(np.count_nonzero(self.states == state)) for state in NeuronState}


@dataclass
class StabilityResult:
    layers: list[LayerStability]
    witnesses: np.ndarray  # (m, n_in) network-space inputs that refuted some direction
    timings_s: dict[str, float] = field(default_factory=dict)
    method: str = "auto"
    time_limit_hit: bool = False
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Neurons per state over the ReLU layers (layers without ReLU are not counted)."""
        total = dict.fromkeys((state.name for state in NeuronState), 0)
        for layer in self.layers:
            relu = layer.decided_by != "linear"
            for state in NeuronState:
                total[state.name] += int(np.count_nonzero(layer.states[relu] == state))
        return total

    @property
    def complete(self) -> bool:
        """True when every neuron is ACTIVE, INACTIVE or UNSTABLE (nothing left undecided)."""
        return all(not np.any(layer.states == NeuronState.UNDECIDED) for layer in self.layers)
