"""The correspondence between two ReLU networks, recovered from the models alone.

Two networks that compute the same function on a box usually do so for a structural reason: one is
a re-export of the other (BN, Mul/Add/Sub/Div, Gemm alpha/beta and MatMul layouts folded by the
reader into the same affine layers), a copy with hidden units permuted and positively rescaled
(``relu(c y) = c relu(y)`` for ``c > 0``, the next layer's columns absorbing ``1/c``), or a
compression of it (dead units removed, always-active layers folded into their neighbour,
duplicates merged). This module names, for every hidden unit of both networks, which of these it
is, from the canonical walk of :mod:`onnx_exact.canonical`:

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
   in the first walk, or after :func:`prove_units_stable` ran the full stability engine on exactly
   the one-sided units (the cheap tiers a check starts with leave some undecided that
   ``compress``'s analysis had proved; the engine runs on the layers up to the deepest such unit,
   that layer restricted to the targets) and the walk was repeated;
3. ``milp``: the product MILP (:mod:`onnx_exact.proof_milp`) on what is left, with shared
   variables for matched units and no binary for stable ones.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .canonical import Canonical
from .domain import Box
from .network import DenseLayer, Network
from .stability import NeuronState, ProgressCallback, StabilityResult, analyze_stability

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

    @property
    def size(self) -> int:
        return int(self.matched.size + self.stable.size + self.one_sided.size)

    def to_json(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "layer": self.layer,
            "name": self.name,
            "size": self.size,
            "matched": int(self.matched.size),
            "stable": int(self.stable.size),
            "one_sided": self.one_sided.tolist(),
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
            getattr(layer, role).size
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
            )
        )
    return Correspondence(layers)


def prove_units_stable(
    net: Network,
    box: Box,
    stability: StabilityResult,
    targets: dict[int, np.ndarray],
    time_limit: float,
    *,
    jobs: int = 1,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> tuple[StabilityResult, int]:
    """Run the full stability engine on the ``targets`` units of ``net`` over the raw ``box``.

    The engine analyses ``net``'s layers up to the deepest target layer, that layer restricted to
    its targets (earlier layers in full: their bounds feed it). Every verdict it reaches replaces
    an UNDECIDED one of ``stability``, and the pre-activation bounds are intersected (both are
    sound). ``stability`` itself is not changed.

    Returns
    -------
    (the merged result, how many targets are now proved ACTIVE or INACTIVE).
    """
    if not targets:
        return stability, 0
    deepest = max(targets)
    rows = np.asarray(targets[deepest])
    last = net.layers[deepest]
    layers = [
        *net.layers[:deepest],
        DenseLayer(last.weight[rows], last.bias[rows], True, last.name),
    ]
    truncated = Network(layers, net.input_map, net.input_name, net.output_name)
    found = analyze_stability(
        truncated,
        box.to_network(net.input_map),
        time_limit=time_limit,
        jobs=jobs,
        seed=seed,
        progress=progress,
    )
    merged = []
    for k, old in enumerate(stability.layers):
        if k > deepest:
            merged.append(old)
            continue
        index = rows if k == deepest else np.arange(old.states.size)
        merged.append(_merge(old, found.layers[k], index))
    proved = 0
    for k, units in targets.items():
        states = merged[k].states[units]
        proved += int(
            np.count_nonzero((states == NeuronState.ACTIVE) | (states == NeuronState.INACTIVE))
        )
    result = replace(
        stability,
        layers=merged,
        witnesses=np.concatenate(
            [stability.witnesses.reshape(-1, net.in_features), found.witnesses]
        ),
    )
    return result, proved


def _merge(old, new, index: np.ndarray):
    """``old`` with ``new``'s verdicts on ``old``'s units ``index`` where ``old`` had none."""
    states = np.array(old.states, copy=True)
    decided_by = np.array(old.decided_by, dtype=object)
    lower = np.array(old.lower, dtype=np.float64, copy=True)
    upper = np.array(old.upper, dtype=np.float64, copy=True)
    fill = (states[index] == NeuronState.UNDECIDED) & (new.states != NeuronState.UNDECIDED)
    states[index[fill]] = new.states[fill]
    decided_by[index[fill]] = new.decided_by[fill]
    lower[index] = np.maximum(lower[index], new.lower)
    upper[index] = np.minimum(upper[index], new.upper)
    return replace(old, states=states, decided_by=decided_by, lower=lower, upper=upper)
