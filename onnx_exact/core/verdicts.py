"""What the analysis establishes per neuron, and the result it hands to reduce, report and check."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np


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
    """

    index: int
    name: str
    states: np.ndarray
    decided_by: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

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
