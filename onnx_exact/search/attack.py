"""The attack: inputs that show a direction's missing sign (finds inputs, proves nothing).

One *attack round* on a layer's open directions runs multi-start PGD
(:func:`onnx_exact.search.witness.multistart_ascent`), polishes each promising end point by LPs
over its activation region and its neighbours
(:func:`onnx_exact.search.region_search.region_ascent`) and, when the polished point has come within ``pattern_gap`` of the way from its sound bound down
to 0, by a pattern search (:func:`onnx_exact.search.region_search.pattern_search`). The stability
tiers ``attack`` and ``probe`` run rounds in the analysis's process; :class:`BackgroundAttack`
runs them in a second process beside the exact tiers. Every point found is handed to the caller,
which forward-passes it: a witness refutes a direction only by its float64 sign.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from onnx_exact import parallel
from onnx_exact.bounds.crown import LayerBounds
from onnx_exact.core.box import Box
from onnx_exact.core.network import Network
from onnx_exact.search import region_search
from onnx_exact.search.witness import multistart_ascent


@dataclass(frozen=True)
class AttackTarget:
    """The layer an attack searches, with what its pattern search builds its MILP from.

    ``bounds`` are the sound bounds of every layer (those of ``layer`` judge how close a point
    came, :func:`near_bound`), ``states`` the verdicts of the layers below ``layer``.
    """

    net: Network
    box: Box
    bounds: list[LayerBounds]
    states: list[np.ndarray]
    layer: int


@dataclass(frozen=True)
class AttackLimits:
    """Per direction caps of one attack round (see :func:`attack_round`).

    starts : PGD starts per direction.
    pgd_seconds, polish_seconds, pattern_seconds : caps of PGD, the region LPs and the pattern
        search (0: none) per direction.
    pattern_gap : pattern search only from a polished point with ``-y <= gap * (bound - y)``.
    polish_gap : region LPs only from a PGD end point with ``-y <= gap * (bound - y)``.
    """

    starts: int
    pgd_seconds: float
    polish_seconds: float
    pattern_seconds: float = 0.0
    pattern_gap: float = 0.0
    polish_gap: float = np.inf


def near_bound(
    target: AttackTarget, neurons: np.ndarray, signs: np.ndarray, points: np.ndarray, gap: float
) -> np.ndarray:
    """Per direction, whether ``points[d]`` has ``-y <= gap * (bound - y)``.

    ``y`` is the point's ``sign * y_{layer, neuron}`` and ``bound`` the sound bound on it: the
    point has come within ``gap`` of the way from the bound down to 0 (always true for an
    infinite ``gap``).
    """
    if not np.isfinite(gap):
        return np.ones(neurons.size, dtype=bool)
    rows = np.arange(neurons.size)
    reached = signs * target.net.preactivations(points)[target.layer][rows, neurons]
    layer_bounds = target.bounds[target.layer]
    bound = np.where(signs > 0, layer_bounds.upper[neurons], -layer_bounds.lower[neurons])
    return -reached <= gap * (bound - reached)


def attack_round(
    target: AttackTarget,
    neurons: np.ndarray,
    signs: np.ndarray,
    rng: np.random.Generator,
    limits: AttackLimits,
    *,
    start_points: np.ndarray | None,
    stop: float,
    see: Callable[[np.ndarray], None],
    still_open: Callable[[np.ndarray, np.ndarray], np.ndarray],
    polish_from: np.ndarray | None = None,
) -> np.ndarray:
    """One attack round on the given directions: PGD, then region LPs, then a pattern search.

    PGD runs from ``limits.starts`` starts per direction (``start_points`` replacing the first);
    each end point with ``-y <= limits.polish_gap * (bound - y)`` that ``still_open`` says is
    open is polished by LPs over its activation region and its neighbours; a direction they
    leave open gets a pattern search of at most ``limits.pattern_seconds`` from their best
    point if it has ``-y <= limits.pattern_gap * (bound - y)``. Every point goes to ``see`` as
    soon as it is found (which forward-passes it, so ``still_open`` reflects it), and nothing
    runs past ``stop``. With ``polish_from``, only end points with ``sign * y >= polish_from[d]``
    are polished. Shared by the attack and probe tiers and the background attack
    (:class:`BackgroundAttack`).

    Returns
    -------
    ``(d,)`` the PGD end point's ``sign * y`` per direction.
    """
    net, box, k = target.net, target.box, target.layer
    found = multistart_ascent(
        net,
        box,
        k,
        neurons,
        signs,
        rng,
        starts=limits.starts,
        seconds_per_direction=limits.pgd_seconds,
        start_points=start_points,
        deadline=stop,
    )
    see(found)
    reached = signs * net.preactivations(found)[k][np.arange(neurons.size), neurons]
    promising = near_bound(target, neurons, signs, found, limits.polish_gap)
    if polish_from is not None:
        promising &= reached >= polish_from
    if net.has_sparse_layers:  # the region LPs take dense maps of every layer
        promising[:] = False
    for d in np.flatnonzero(promising):
        direction = (neurons[d : d + 1], signs[d : d + 1])
        if not still_open(*direction)[0]:
            continue
        polished = region_search.region_ascent(
            net,
            box,
            k,
            *direction,
            found[d : d + 1],
            seconds_per_direction=limits.polish_seconds,
            deadline=stop,
        )
        see(polished)
        if (
            limits.pattern_seconds > 0
            and still_open(*direction)[0]
            and near_bound(target, *direction, polished, limits.pattern_gap)[0]
        ):
            searched = region_search.pattern_search(
                net,
                box,
                target.bounds,
                target.states,
                k,
                int(neurons[d]),
                int(signs[d]),
                polished[0],
                limits.pattern_seconds,
                deadline=stop,
            )
            see(searched)
    return reached


def background_attack_process(
    task: multiprocessing.Queue,
    seed: tuple[int, ...],
    deadline: float,
    found: multiprocessing.Queue,
) -> None:
    """Entry point of the background attack's process: take its task, then attack.

    The task (what :func:`run_background_attack` takes, put by :class:`BackgroundAttack`) comes
    through a queue, not with the process's arguments: those go through a pipe that the starting
    process writes synchronously, so with a network's weights in them the analysis would wait at
    every start until this process had imported numpy and the package to read them; a queue is
    written by a thread of the analysis. No file is involved, so nothing is left behind when the
    analysis is killed. Started by :func:`onnx_exact.parallel.start_process`: SIGINT ignored,
    and it dies with the analysis.
    """
    target, neurons, signs, limits, polish_quantile, warmup_rounds = task.get()
    run_background_attack(
        target, neurons, signs, limits, polish_quantile, warmup_rounds, seed, deadline, found
    )


def run_background_attack(
    target: AttackTarget,
    neurons: np.ndarray,
    signs: np.ndarray,
    limits: AttackLimits,
    polish_quantile: float,
    warmup_rounds: int,
    seed: tuple[int, ...],
    deadline: float,
    found: multiprocessing.Queue,
) -> None:
    """The background attack: attack rounds with ``limits`` until every direction is refuted.

    After ``warmup_rounds`` rounds of a direction, its PGD end point is polished only if it
    reaches the ``polish_quantile`` of the direction's earlier rounds: the rounds are many, and
    the polish (seconds) is worth it only where PGD ended unusually high.

    Puts each input that shows an open direction's sign on ``found`` (network space, one row
    per input). Runs until it has refuted all its directions, the analysis ends it (a killed
    analysis too: see :func:`onnx_exact.parallel.start_process`) or the ``deadline`` passes
    (``time.monotonic`` is system-wide).
    """
    rng = np.random.default_rng(seed)
    index = {
        direction: d
        for d, direction in enumerate(zip(neurons.tolist(), signs.tolist(), strict=True))
    }
    open_ = np.ones(neurons.size, dtype=bool)
    net, box, k = target.net, target.box, target.layer

    def see(points: np.ndarray) -> None:
        points = np.clip(np.atleast_2d(points), box.lower, box.upper)
        shown = signs * net.preactivations(points)[k][:, neurons] > 0.0
        refuting = shown[:, open_].any(axis=1)
        if refuting.any():
            found.put(points[refuting])
            open_[shown.any(axis=0)] = False

    def still_open(some_neurons: np.ndarray, some_signs: np.ndarray) -> np.ndarray:
        pairs = zip(some_neurons.tolist(), some_signs.tolist(), strict=True)
        return np.array([open_[index[pair]] for pair in pairs], dtype=bool)

    history: list[list[float]] = [[] for _ in range(neurons.size)]
    while open_.any() and time.monotonic() < deadline:
        live = np.flatnonzero(open_)
        polish_from = np.array(
            [
                np.quantile(history[d], polish_quantile)
                if len(history[d]) >= warmup_rounds
                else -np.inf
                for d in live
            ]
        )
        reached = attack_round(
            target,
            neurons[live],
            signs[live],
            rng,
            limits,
            start_points=None,
            stop=deadline,
            see=see,
            still_open=still_open,
            polish_from=polish_from,
        )
        for d, value in zip(live, reached, strict=True):
            history[d].append(float(value))


class BackgroundAttack:
    """Attack rounds in a second process while the exact tiers of one layer run in this one.

    Why: when a layer's last open directions reach the costly tiers (CROWN and LP branch and
    bound, the decision MILP), those run one direction at a time and a second core idles. On
    deep ℓ1-free nets most such directions are unstable, their rare sign found only by some
    attack rounds, while the proof tiers spend their caps in vain; the attack tier, run between
    them in the same process, waits for them. Here the attack runs all the time on the idle
    core and the tiers take its inputs in through their
    :class:`onnx_exact.core.directions.DirectionBook` feed, so the tier working on a direction
    it refutes stops within ``FEED_POLL_SECONDS``. ``limits``, ``polish_quantile`` and
    ``warmup_rounds`` are those of :func:`run_background_attack`.

    Proves nothing and changes no label: its inputs are forward-passed like any other witness.
    """

    def __init__(
        self,
        target: AttackTarget,
        neurons: np.ndarray,
        signs: np.ndarray,
        seed: tuple[int, ...],
        deadline: float,
        *,
        limits: AttackLimits,
        polish_quantile: float,
        warmup_rounds: int,
    ) -> None:
        context = multiprocessing.get_context("spawn")  # HiGHS hangs in forked children
        self.layer = target.layer
        self.directions = set(zip(neurons.tolist(), signs.tolist(), strict=True))
        self.in_features = target.net.in_features
        self.started = time.perf_counter()
        self.queue = context.Queue()
        self.task = context.Queue()
        self.task.put((target, neurons, signs, limits, polish_quantile, warmup_rounds))
        # The analysis ends it on every way out (``Analysis.background_attack``); a killed
        # analysis takes it along (parallel.start_process).
        self.process = parallel.start_process(
            background_attack_process, (self.task, seed, deadline, self.queue)
        )

    def covers(self, neurons: np.ndarray, signs: np.ndarray) -> bool:
        """Whether every given direction is among those this attack searches."""
        return set(zip(neurons.tolist(), signs.tolist(), strict=True)) <= self.directions

    def drain(self) -> np.ndarray:
        """The inputs found since the last call, ``(m, n_in)`` (possibly none)."""
        batches = [np.empty((0, self.in_features))]
        while True:
            try:
                batches.append(self.queue.get_nowait())
            except queue.Empty:
                return np.concatenate(batches)

    def stop(self) -> float:
        """End the process (inputs not yet drained are lost); return its wall time in seconds."""
        self.process.terminate()
        self.process.join(timeout=10.0)
        for channel in (self.queue, self.task):
            channel.close()
            channel.cancel_join_thread()  # the task may never have been read
        return time.perf_counter() - self.started
