"""Directions (sign questions about one neuron) and the book every exact tier keeps on them.

numpy only: the HiGHS tiers (:mod:`onnx_exact.solvers.exact_tiers`) and CROWN branch and bound
(:mod:`onnx_exact.bounds.relu_bab`) both answer directions and share the bookkeeping: a direction
is refuted by the first forward-passed input that shows its sign, whichever tier produced it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from onnx_exact.core.network import Network
from onnx_exact.core.verdicts import TIERS, ProofStatus, Tier

WitnessFeed = Callable[[], np.ndarray]
"""Inputs found by a search that runs beside the exact tiers (the background attack of
:mod:`onnx_exact.search.attack`): each call returns the ``(m, n_in)`` network-space inputs found
since the last call, possibly none. Tiers forward-pass them like their own candidates."""


FEED_POLL_SECONDS = 0.25
"""How often a :class:`DirectionBook` (and a decision MILP, from HiGHS's interrupt callback) asks
its feed for new inputs: often enough that a refuted direction's tier stops within a fraction of
a second, rarely enough that the queue reads cost nothing against a node's bound."""


@dataclass(frozen=True)
class Direction:
    """One sign question about one neuron: can ``sign * y[layer][neuron]`` be positive?"""

    layer: int
    neuron: int
    sign: int


@dataclass
class DirectionResult:
    """The answer to one :class:`Direction`.

    ``bound`` is a sound upper bound on ``max sign * y`` over the box (``inf`` if none was found);
    ``witness`` is set exactly when ``status`` is :attr:`ProofStatus.REFUTED`.
    """

    direction: Direction
    status: ProofStatus
    bound: float
    method: str
    witness: np.ndarray | None = None


class DirectionBook:
    """Open directions of one layer, their best bounds and the best input seen for each.

    Shared by every exact tier (the HiGHS tiers of :mod:`onnx_exact.solvers.exact_tiers` and
    :mod:`onnx_exact.bounds.relu_bab`): a direction is refuted by the first forward-passed input
    that shows its sign, whichever tier produced it.
    """

    def __init__(
        self,
        net: Network,
        layer: int,
        directions: Sequence[Direction],
        margins,
        feed: WitnessFeed | None = None,
    ):
        self.net, self.layer = net, layer
        self.feed, self.polled = feed, -np.inf
        self.directions = list(directions)
        self.neurons = np.array([d.neuron for d in directions], dtype=np.int64)
        self.signs = np.array([d.sign for d in directions], dtype=np.float64)
        self.margins = np.asarray(margins, dtype=np.float64)[self.neurons]
        count = len(directions)
        self.status = [ProofStatus.UNDECIDED] * count
        self.method = [""] * count
        self.bound = np.full(count, np.inf)
        self.witness: list[np.ndarray | None] = [None] * count
        self.best_value = np.full(count, -np.inf)
        self.best_point: list[np.ndarray | None] = [None] * count

    def open(self) -> list[int]:
        return [j for j, s in enumerate(self.status) if s == ProofStatus.UNDECIDED]

    def absorb(self, points: np.ndarray, method: str) -> None:
        """Forward-pass candidate inputs; refute every open direction one of them shows.

        Every tier absorbs its candidates at least once per node or step, so this is also where
        the inputs of the ``feed`` (a search running beside the tiers) are taken in.
        """
        self._forward(points, method)
        self.poll()

    def poll(self) -> None:
        """Absorb the ``feed``'s new inputs, at most every ``FEED_POLL_SECONDS``."""
        if self.feed is None or time.monotonic() - self.polled < FEED_POLL_SECONDS:
            return
        self.polled = time.monotonic()
        self._forward(self.feed(), "attack")

    def settled(self, j: int) -> bool:
        """Whether direction ``j`` is proved or refuted (after taking in the feed's inputs)."""
        self.poll()
        return self.status[j] != ProofStatus.UNDECIDED

    def _forward(self, points: np.ndarray, method: str) -> None:
        if points.shape[0] == 0:
            return
        values = self.net.preactivations(points)[self.layer][:, self.neurons] * self.signs
        best = values.argmax(axis=0)
        best_values = values[best, np.arange(values.shape[1])]
        for j in np.flatnonzero(best_values > self.best_value):
            self.best_value[j] = best_values[j]
            self.best_point[j] = points[best[j]].copy()
            if best_values[j] > 0 and self.status[j] == ProofStatus.UNDECIDED:
                self.status[j], self.method[j] = ProofStatus.REFUTED, method
                self.witness[j] = points[best[j]].copy()

    def record_bound(self, j: int, bound: float, method: str, proved: bool = False) -> None:
        """Keep the tighter bound; ``proved`` marks a MILP that cleared its cutoff exactly."""
        self.bound[j] = min(self.bound[j], bound)
        proved = proved or self.bound[j] <= -self.margins[j]
        if self.status[j] == ProofStatus.UNDECIDED and proved:
            self.status[j], self.method[j] = ProofStatus.PROVED, method

    def results(self, tiers: Sequence[str]) -> list[DirectionResult]:
        """One result per direction; an undecided one names the strongest of ``tiers`` that ran
        (the decision MILP, else the LP with cuts, else the LP; else the last tier given)."""
        strongest = (Tier.MILP, Tier.CUTS, Tier.LP)
        fallback = next((TIERS[t].name for t in strongest if t in tiers), tiers[-1])
        return [
            DirectionResult(
                d, self.status[j], float(self.bound[j]), self.method[j] or fallback, self.witness[j]
            )
            for j, d in enumerate(self.directions)
        ]
