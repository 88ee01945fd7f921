"""Branch and bound on ReLU phases over optimised CROWN bounds (β-CROWN style), batched in numpy.

Why this tier exists
    The LP branch and bound of :mod:`onnx_exact.solvers.exact_tiers` solves one HiGHS LP per node,
    tens of milliseconds on an MNIST-sized net, so a hard direction that needs a few thousand nodes
    costs minutes. The same node bound can be had without an LP solver: CROWN back-substitution with
    *optimised* lower-line slopes ``α`` and Lagrange multipliers ``β`` for the split constraints is
    a valid bound for every ``α ∈ [0, 1]`` and ``β ≥ 0``, and its optimum over them equals the
    triangle LP with the same splits (Wang et al. 2021, "Beta-CROWN"). Every node of a batch is
    bounded by the same few matrix products, so hundreds of nodes cost what one LP costs, and a few
    projected gradient steps (warm-started from the parent's ``α``, ``β``) get most of the LP's
    tightness, at two orders of magnitude more nodes a second than the LP branch and bound (the
    measurement is in ``docs/benchmarks.md``, "Why the constants are what they are").

The bound of one node
    Target ``F = a · h_{k-1} + c`` (``a = sign W_k[i]``, ``c = sign b_k[i]``) over the box. Walking
    back from ``λ_{k-1} = a``, each ReLU layer ``j`` (pre-activation ``z_j`` with proved bounds
    ``[l, u]``) turns ``λ_j · h_j`` into ``μ_j · z_j + const``:

    * stably active (proved, or ``l >= 0``) or split active: ``h = z``; stably inactive or split
      inactive: ``h = 0``;
    * free unstable neuron with ``λ_m >= 0``: upper line ``h <= s (z - l)``, ``s = u / (u - l)``,
      so ``μ_m = λ_m s`` and ``const += -λ_m s l``; with ``λ_m < 0``: lower line ``h >= α_m z``,
      ``μ_m = λ_m α_m``;
    * constraints ``L' <= z_m <= U'`` enter with multipliers ``σ_m, ρ_m >= 0``:
      ``F <= F + ρ_m (U' - z_m) + σ_m (z_m - L')`` wherever they hold, so ``μ_m += σ_m - ρ_m`` and
      ``const += ρ_m U' - σ_m L'``. A split sets ``L' = 0`` (active) or ``U' = 0`` (inactive); the
      search optimises only those split multipliers (β-CROWN's ``β``).

    Then ``const += μ_j · b_j`` and ``λ_{j-1} = W_j^T μ_j``; at the input,
    ``F <= const + λ · centre + |λ| · radius``, attained at the vertex ``where(λ > 0, hi, lo)``
    (a witness candidate). The gradient of that bound with respect to ``α`` and the multipliers
    is one more pass the other way (``∂B/∂μ_j = W_j ∂B/∂λ_{j-1} + b_j``), so Adam steps on ``α``
    (projected to ``[0, 1]``) and the multipliers (projected to ``>= 0``) cost two products per
    layer. Every iterate's bound is valid; each node keeps its smallest, and never more than its
    parent's (which holds on the child too).

The search
    Best-first over nodes (largest bound first), in batches: every chosen node is split on the free
    neuron with the largest intercept contribution ``λ_m s_m (-l_m)`` (BaBSR's estimate of what the
    split removes from the bound), its two children inherit ``α`` and the multipliers and are
    optimised together. A child whose bound is ``<= -margin`` is closed; the direction is proved
    when no node is open (the children of a node cover it, so the largest closed bound bounds
    ``max F``), and refuted as soon as a forward-passed point shows ``sign * y > 0``. CROWN
    vertices are box corners, so a sign that shows only inside the box is looked for by a
    :data:`Dive` the caller supplies (the analysis gives the LP dive of
    :func:`onnx_exact.solvers.lp_relaxation.lp_dive`), which takes turns with the search and gets
    :data:`DIVE_SHARE` of the time. It stops undecided at the node or time cap, or when an open
    node has every neuron split (its bound can then only be tightened by the LP tiers, which also
    have the cut pool and the intermediate bound constraints this bound lacks).

Soundness
    Float64 throughout on the exact weights; ``α`` and the multipliers are projected onto their
    domains before the bound is evaluated, so every bound used is the bound of a valid
    relaxation. A node whose split constraints are infeasible has no point to bound; any value is
    then correct. Rounding of the products is covered by the solver margin (``1e-7 s_i + 1e-9``,
    far above float64 rounding of these sums), the same margin the LP tiers must clear.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from onnx_exact.core.box import Box
from onnx_exact.core.directions import Direction, DirectionBook, DirectionResult, WitnessFeed
from onnx_exact.core.network import DenseLayer, Network
from onnx_exact.core.verdicts import TIERS, NeuronState, ProofStatus, Tier

METHOD = Tier.CROWN_BAB.value

Dive = Callable[[DirectionBook, int, float], Iterator[None]]
"""A witness search that takes turns with the branch and bound of one direction: ``dive(book, j,
deadline)`` is a generator, each ``next`` one step; it forward-passes its points through ``book``
(refuting direction ``j`` there), proves nothing, and is closed when the search ends."""

NODE_LIMIT = TIERS[Tier.CROWN_BAB].direction_nodes
"""Nodes one direction may bound (times the tier's effort; the tier table's cap)."""
TIME_LIMIT = TIERS[Tier.CROWN_BAB].direction_seconds
"""Seconds one direction may take (times the tier's effort).

Why this cap (the tier table's ``direction_seconds``): a stable direction whose maximum is only a
hair below 0 can need several seconds of search and dive; a cap below that leaves it undecided,
and the slower tiers after it (LP branch and bound, MILP) then spend their own, larger caps on it
before a retry at a higher effort proves it, so a too-small cap costs far more run time than it
saves.
(The measurement is in ``docs/benchmarks.md``, "Why the constants are what they are".)"""

ROOT_STEPS = 60
"""Adam steps on the root node: it starts from DeepPoly's slopes and has no parent to inherit from."""
CHILD_STEPS = 12
"""Adam steps on each batch of children, warm-started from the parent's ``α`` and ``β``."""
_ALPHA_RATE, _MULTIPLIER_RATE, _RATE_DECAY = 0.3, 0.05, 0.98
_ADAM_B1, _ADAM_B2, _ADAM_EPS = 0.9, 0.999, 1e-300
BATCH_BYTES = 32 * 2**20
"""Working memory of one batch of nodes (sets the batch size, see :func:`_nodes_within`)."""
OPTIMISE_BYTES = 512 * 2**20
"""Working memory of one batch of :func:`optimised_bounds` (a layer's rows go in batches:
a CNN layer's thousands of rows over tens of thousands of neurons below would take GBs)."""
_BATCH_MIN, _BATCH_MAX = 8, 512
DIVE_SHARE = 0.25
"""Fraction of a direction's time the LP dive gets (the search gets the rest).

Why not half: the probe and attack tiers already look for the thin regions the dive is there for,
while a stable direction's proof waits for the dive's share, so a larger share delays (or, within
the cap, prevents) proofs for little gain in witnesses."""
_DIVE_RATIO = DIVE_SHARE / (1.0 - DIVE_SHARE)
STORE_BYTES = 64 * 2**20
"""Memory the open nodes of one search may hold; the node cap is lowered to fit it."""


@dataclass(frozen=True)
class SubNetwork:
    """The layers below the target layer, with each ReLU classified by its proved bounds.

    ``unstable[j]`` lists the neurons of layer ``j`` with ``l < 0 < u`` (not proved either way);
    they are the branching candidates and own the slice ``offsets[j] : offsets[j + 1]`` of a
    node's flat ``phase`` / ``α`` vectors. ``fixed_slope[j]`` is 1 for stably active and linear
    neurons and 0 for stably inactive ones (unstable entries are overwritten per node). Every
    neuron of every layer below owns the slice ``hidden[j] : hidden[j + 1]`` of the bound
    multipliers, with its proved pre-activation bounds ``lower[j]``, ``upper[j]`` (clipped at 0 on
    the proved side of a stable ReLU). ``layers[j]`` is layer ``j`` itself: back-substitution
    carries the multipliers through it by :meth:`DenseLayer.pullback` and the gradient forward by
    :meth:`DenseLayer.apply`, so a conv layer with a structured map
    (:mod:`onnx_exact.core.structured_map`) costs its convolution, not its dense matrix.
    """

    layers: list[DenseLayer]
    biases: list[np.ndarray]
    relu: list[bool]
    fixed_slope: list[np.ndarray]
    unstable: list[np.ndarray]
    offsets: np.ndarray
    hidden: np.ndarray
    lower: list[np.ndarray]
    upper: list[np.ndarray]
    upper_slope: list[np.ndarray]  # s = u / (u - l) of the unstable neurons
    upper_intercept: list[np.ndarray]  # -s l (>= 0)
    initial_alpha: list[np.ndarray]  # DeepPoly's lower slope: 1 if u > -l else 0
    box: Box

    @property
    def count(self) -> int:
        """Number of unstable neurons (the length of a node's phase vector)."""
        return int(self.offsets[-1])

    @property
    def neurons(self) -> int:
        """Number of neurons below the target layer (half the length of a multiplier vector)."""
        return int(self.hidden[-1])

    @classmethod
    def below(
        cls, net: Network, box: Box, bounds: Sequence, states: Sequence[np.ndarray], layer: int
    ) -> SubNetwork:
        """Classify the ReLUs of layers ``0 .. layer - 1`` by ``states`` and ``bounds``."""
        fixed, unstable, slopes, intercepts, alphas, lowers, uppers = [], [], [], [], [], [], []
        for j in range(layer):
            current = net.layers[j]
            lower = np.array(bounds[j].lower, dtype=np.float64)
            upper = np.array(bounds[j].upper, dtype=np.float64)
            if not current.relu:
                fixed.append(np.ones(current.out_features))
                loose = np.empty(0, dtype=np.int64)
            else:
                state = np.asarray(states[j])
                inactive = (state == NeuronState.INACTIVE) | (upper <= 0.0)
                active = ~inactive & ((state == NeuronState.ACTIVE) | (lower >= 0.0))
                upper = np.where(inactive, np.minimum(upper, 0.0), upper)
                lower = np.where(active, np.maximum(lower, 0.0), lower)
                loose = np.flatnonzero(~inactive & ~active)
                fixed.append(active.astype(np.float64))
            lowers.append(np.minimum(lower, upper))
            uppers.append(upper)
            unstable.append(loose)
            lo, hi = lower[loose], upper[loose]
            slope = hi / (hi - lo)
            slopes.append(slope)
            intercepts.append(-slope * lo)
            alphas.append((hi > -lo).astype(np.float64))
        offsets = np.concatenate([[0], np.cumsum([u.size for u in unstable])]).astype(np.int64)
        widths = [net.layers[j].out_features for j in range(layer)]
        hidden = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        return cls(
            layers=list(net.layers[:layer]),
            biases=[net.layers[j].bias for j in range(layer)],
            relu=[net.layers[j].relu for j in range(layer)],
            fixed_slope=fixed,
            unstable=unstable,
            offsets=offsets,
            hidden=hidden,
            lower=lowers,
            upper=uppers,
            upper_slope=slopes,
            upper_intercept=intercepts,
            initial_alpha=alphas,
            box=box,
        )

    def initial_alphas(self) -> np.ndarray:
        return np.concatenate([np.empty(0)] + self.initial_alpha)


@dataclass
class NodeBounds:
    """The result of bounding a batch of nodes once."""

    value: np.ndarray  # (N,) upper bound on max F over each node
    grad_alpha: np.ndarray | None  # (N, U)
    grad_multipliers: np.ndarray | None  # (N, 2H)
    score: np.ndarray  # (N, U) branching score (-inf where not free)
    vertex: np.ndarray  # (N, n_in) input vertex attaining the bound
    coefficient_scale: np.ndarray  # (N,) mean |λ| over the neurons below: the multipliers' units


def bound_nodes(
    sub: SubNetwork,
    target: np.ndarray,
    offset: float,
    phase: np.ndarray,
    alpha: np.ndarray,
    multipliers: np.ndarray,
    gradient: bool = True,
) -> NodeBounds:
    """Upper bounds of ``F = target · h_{k-1} + offset`` over N nodes (see the module docstring).

    ``target`` is one row ``(n_{k-1},)`` shared by the nodes or one per node ``(N, n_{k-1})``, and
    ``offset`` a scalar or ``(N,)`` to match.

    ``phase`` is ``(N, U)`` int8: -1 free, 0 split inactive, 1 split active; ``alpha`` is
    ``(N, U)`` in ``[0, 1]``; ``multipliers`` is ``(N, 2H)`` and ``>= 0``: ``ρ`` (first ``H``) of the
    constraints ``z <= U'``, ``σ`` (last ``H``) of ``z >= L'``, where ``[L', U']`` is the neuron's
    proved interval, cut at 0 on the side a split fixes.
    """
    n_nodes = phase.shape[0]
    n_hidden = sub.neurons
    lam = np.broadcast_to(target, (n_nodes, target.shape[-1])).copy()
    const = np.broadcast_to(np.asarray(offset, dtype=np.float64), (n_nodes,)).copy()
    tape = []
    score = np.full(phase.shape, -np.inf)
    magnitude = np.zeros(n_nodes)
    for j in range(len(sub.layers) - 1, -1, -1):
        cells = slice(int(sub.hidden[j]), int(sub.hidden[j + 1]))
        rho = multipliers[:, cells]
        sigma = multipliers[:, n_hidden + cells.start : n_hidden + cells.stop]
        node_lower = np.broadcast_to(sub.lower[j], rho.shape).copy()
        node_upper = np.broadcast_to(sub.upper[j], rho.shape).copy()
        magnitude += np.abs(lam).sum(axis=1)
        if sub.relu[j]:
            idx = sub.unstable[j]
            cut = slice(int(sub.offsets[j]), int(sub.offsets[j + 1]))
            lam_u = lam[:, idx]
            ph = phase[:, cut]
            free = ph < 0
            upper_line = free & (lam_u >= 0.0)
            lower_line = free & ~upper_line
            slope = np.where(ph == 1, 1.0, 0.0)
            slope = np.where(upper_line, sub.upper_slope[j], slope)
            slope = np.where(lower_line, alpha[:, cut], slope)
            node_lower[:, idx] = np.where(ph == 1, 0.0, node_lower[:, idx])
            node_upper[:, idx] = np.where(ph == 0, 0.0, node_upper[:, idx])
            mu = lam * sub.fixed_slope[j]
            mu[:, idx] = lam_u * slope
            intercept_terms = np.where(upper_line, lam_u * sub.upper_intercept[j], 0.0)
            const += intercept_terms.sum(axis=1)
            score[:, cut] = np.where(free, intercept_terms, -np.inf)
            tape.append((j, cells, node_lower, node_upper, idx, cut, slope, upper_line, lam_u))
        else:
            mu = lam.copy()
            tape.append((j, cells, node_lower, node_upper, None, None, None, None, None))
        mu += sigma - rho
        const += (rho * node_upper).sum(axis=1) - (sigma * node_lower).sum(axis=1)
        const += mu @ sub.biases[j]
        lam = sub.layers[j].pullback(mu)
    box = sub.box
    value = const + lam @ box.center + np.abs(lam) @ box.radius
    # lower + mask * width: cheaper than np.where broadcasting two (n_in,) rows into (N, n_in)
    vertex = box.lower + (lam > 0.0) * (box.upper - box.lower)
    scale = magnitude / max(n_hidden, 1)
    if not gradient:
        return NodeBounds(value, None, None, score, vertex, scale)
    grad_alpha = np.zeros(phase.shape)
    grad_multipliers = np.zeros(multipliers.shape)
    d_lam = vertex  # dB / d lambda at the input (a subgradient where lambda = 0)
    for j, cells, node_lower, node_upper, idx, cut, slope, upper_line, lam_u in reversed(tape):
        d_mu = sub.layers[j].apply(d_lam)
        grad_multipliers[:, cells] = node_upper - d_mu
        grad_multipliers[:, n_hidden + cells.start : n_hidden + cells.stop] = d_mu - node_lower
        if idx is not None:
            d_mu_u = d_mu[:, idx]
            lower_line = (phase[:, cut] < 0) & ~upper_line
            grad_alpha[:, cut] = np.where(lower_line, d_mu_u * lam_u, 0.0)
        if j == len(sub.layers) - 1:
            break  # lambda_{k-1} is the fixed target row
        if idx is None:
            d_lam = d_mu
        else:
            d_lam = d_mu * sub.fixed_slope[j]
            d_lam[:, idx] = d_mu_u * slope + np.where(upper_line, sub.upper_intercept[j], 0.0)
    return NodeBounds(value, grad_alpha, grad_multipliers, score, vertex, scale)


def split_multipliers(sub: SubNetwork, phase: np.ndarray) -> np.ndarray:
    """``(N, 2H)`` 0/1 mask of the multipliers :func:`optimise_nodes` adjusts: the split constraints.

    A split-inactive neuron gets ``ρ`` (``z <= 0``), a split-active one ``σ`` (``z >= 0``): with
    just these, the optimised bound is β-CROWN's. Multipliers on the proved intervals of the other
    neurons are valid too (:func:`bound_nodes` takes them), but they add a multiplier per neuron to
    the gradient steps, which then converge more slowly than the extra multipliers tighten the bound.
    """
    mask = np.zeros((phase.shape[0], 2 * sub.neurons))
    for j, idx in enumerate(sub.unstable):
        if not idx.size:
            continue
        ph = phase[:, int(sub.offsets[j]) : int(sub.offsets[j + 1])]
        mask[:, sub.hidden[j] + idx] = ph == 0
        mask[:, sub.neurons + sub.hidden[j] + idx] = ph == 1
    return mask


def optimise_nodes(
    sub: SubNetwork,
    target: np.ndarray,
    offset: float,
    phase: np.ndarray,
    alpha: np.ndarray,
    multipliers: np.ndarray,
    steps: int,
    deadline: float = np.inf,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, NodeBounds]:
    """Adam on ``α`` and the bound multipliers of N nodes; returns (best bound, α, multipliers, last).

    Every evaluated iterate is a valid bound, so the best per node is kept, and the loop may stop
    after any step: at ``deadline`` (``time.monotonic()``) it returns the best bound so far. Multiplier steps are
    scaled per node by the magnitude of the back-substituted coefficients (mean ``|λ|`` at the
    first step): multipliers are in the units of ``λ``, which differ by orders of magnitude
    between networks, while ``α`` is a slope in ``[0, 1]``.
    """
    alpha = np.clip(np.asarray(alpha, dtype=np.float64), 0.0, 1.0)
    multipliers = np.maximum(np.asarray(multipliers, dtype=np.float64), 0.0)
    moments = [
        (np.zeros_like(alpha), np.zeros_like(alpha)),
        (np.zeros_like(multipliers), np.zeros_like(multipliers)),
    ]
    allowed = split_multipliers(sub, phase)
    multipliers *= allowed
    best = np.full(phase.shape[0], np.inf)
    scale = None
    rate = 1.0
    result = None
    for step in range(max(steps, 1)):
        result = bound_nodes(
            sub, target, offset, phase, alpha, multipliers, gradient=step < steps - 1
        )
        best = np.minimum(best, result.value)
        if step >= steps - 1 or time.monotonic() >= deadline:
            break
        if scale is None:
            scale = (result.coefficient_scale + 1e-300)[:, None]
        t = step + 1
        for (value, upper, size), grad, (m, v) in zip(
            (
                (alpha, 1.0, _ALPHA_RATE * rate),
                (multipliers, np.inf, _MULTIPLIER_RATE * rate * scale),
            ),
            (result.grad_alpha, result.grad_multipliers),
            moments,
            strict=True,
        ):
            m *= _ADAM_B1
            m += (1.0 - _ADAM_B1) * grad
            v *= _ADAM_B2
            v += (1.0 - _ADAM_B2) * grad * grad
            m_hat = m / (1.0 - _ADAM_B1**t)
            v_hat = v / (1.0 - _ADAM_B2**t)
            value -= size * m_hat / (np.sqrt(v_hat) + _ADAM_EPS)
            np.clip(value, 0.0, upper, out=value)
        multipliers *= allowed
        rate *= _RATE_DECAY
    return best, alpha, multipliers, result


def optimised_bounds(
    net: Network,
    box: Box,
    bounds: Sequence,
    states: Sequence[np.ndarray],
    layer: int,
    neurons: np.ndarray,
    steps: int = ROOT_STEPS,
    deadline: float = np.inf,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """α-CROWN bounds ``(lower, upper)`` on ``y_{layer, neurons}``, and the bounds' input vertices.

    At most ``steps`` optimisation steps, fewer when ``deadline`` passes (the bounds of the steps
    made are valid: see :func:`optimise_nodes`).

    Both signs of every neuron are one batch of root nodes (one target row each) whose lower
    slopes are optimised together, so the whole layer costs a few dozen matrix products instead
    of two LPs per neuron. Each bound is valid for its own slopes; it is about as tight as the
    triangle LP without the LP's intermediate bound constraints. The vertices (one per row,
    maximisers first, then minimisers, of the last slopes) are witness candidates. Rows go in
    batches of :data:`OPTIMISE_BYTES`; rows whose batch the deadline leaves out get
    ``(-inf, inf)`` and no vertex.
    """
    neurons = np.asarray(neurons, dtype=np.int64)
    sub = SubNetwork.below(net, box, bounds, states, layer)
    lower, upper = np.full(neurons.size, -np.inf), np.full(neurons.size, np.inf)
    maximisers, minimisers = [], []
    step = _nodes_within(sub, OPTIMISE_BYTES) // 2  # two nodes (signs) per row
    for start in range(0, neurons.size, step):
        if start and time.monotonic() >= deadline:
            break  # the rows left keep their bounds (the caller intersects)
        chunk = neurons[start : start + step]
        weight, bias = net.layers[layer].rows(chunk), net.layers[layer].bias[chunk]
        rows = 2 * chunk.size
        best, _, _, last = optimise_nodes(
            sub,
            np.concatenate([weight, -weight]),
            np.concatenate([bias, -bias]),
            np.full((rows, sub.count), -1, dtype=np.int8),
            np.broadcast_to(sub.initial_alphas(), (rows, sub.count)),
            np.zeros((rows, 2 * sub.neurons)),
            steps,
            deadline,
        )
        upper[start : start + chunk.size], lower[start : start + chunk.size] = (
            best[: chunk.size],
            -best[chunk.size :],
        )
        maximisers.append(last.vertex[: chunk.size])
        minimisers.append(last.vertex[chunk.size :])
    vertices = np.concatenate(maximisers + minimisers) if maximisers else np.empty((0, box.size))
    return lower, upper, vertices


def _nodes_within(sub: SubNetwork, budget: int) -> int:
    """Nodes whose optimisation fits ``budget`` bytes, at least :data:`_BATCH_MIN`.

    Per node, :func:`bound_nodes` keeps about a dozen float64 rows per layer (coefficients,
    slopes, node bounds and their gradients) over the layers and the input, and
    :func:`optimise_nodes` six copies of the multipliers (values, gradient, two Adam moments).
    """
    per_node = 8 * (12 * (sub.neurons + sub.box.size) + 6 * 2 * sub.neurons)
    return int(max(_BATCH_MIN, budget // max(per_node, 1)))


def _batch_size(sub: SubNetwork) -> int:
    """Nodes per batch of the branch and bound: within :data:`BATCH_BYTES`, at most
    :data:`_BATCH_MAX`."""
    return min(_nodes_within(sub, BATCH_BYTES), _BATCH_MAX)


def _branch_direction(
    book: DirectionBook,
    j: int,
    sub: SubNetwork,
    net: Network,
    deadline: float,
    node_limit: int,
    dive: Dive | None,
) -> None:
    """Branch and bound for direction ``j`` of ``book`` (see the module docstring).

    The root is optimised from DeepPoly's slopes; if it does not settle the direction, the
    best-first search runs, with the ``dive`` (when given) taking turns with it at
    :data:`DIVE_SHARE` of the time: CROWN vertices refute where the sign shows at a vertex, the
    dive's points (LP optima, for the LP dive) where it shows only in a thin region.
    """
    direction = book.directions[j]
    layer = net.layers[direction.layer]
    target = direction.sign * layer.rows(direction.neuron)
    offset = direction.sign * float(layer.bias[direction.neuron])
    root = np.full((1, sub.count), -1, dtype=np.int8)
    bound, alpha, multipliers, last = optimise_nodes(
        sub,
        target,
        offset,
        root,
        sub.initial_alphas()[None, :],
        np.zeros((1, 2 * sub.neurons)),
        ROOT_STEPS,
    )
    book.absorb(last.vertex, METHOD)
    book.record_bound(j, float(bound[0]), METHOD, proved=bool(bound[0] <= -book.margins[j]))
    if book.status[j] != ProofStatus.UNDECIDED:
        return
    steps = dive(book, j, deadline) if dive is not None else None
    try:
        start = _stored(root[0], alpha[0], multipliers[0], last.score[0], bound[0])
        _best_first(book, j, sub, target, offset, start, deadline, node_limit, steps)
    finally:
        if steps is not None:
            steps.close()


def _best_first(
    book: DirectionBook,
    j: int,
    sub: SubNetwork,
    target: np.ndarray,
    offset: float,
    root: tuple,
    deadline: float,
    node_limit: int,
    dive: Iterator[None] | None,
) -> None:
    """The best-first loop: split the open nodes with the largest bounds, a batch at a time.

    Open nodes wait in a heap keyed by their bound; their ``α`` and multipliers are kept in
    float32 (warm starts only: they are cast back and projected before any bound is computed).
    A child's bound is the smaller of its own and its parent's (both hold on the child). Proves
    the direction, with the largest closed bound, once no node is open.
    """
    margin = float(book.margins[j])
    evaluated, started, dive_time = 1, time.perf_counter(), 0.0
    heap: list[tuple[float, int]] = [(-float(root[4]), 0)]
    store = {0: root}
    next_id, worst_closed = 1, -np.inf
    batch_size = _batch_size(sub)
    while heap:
        if book.status[j] != ProofStatus.UNDECIDED:
            return
        if evaluated >= node_limit or time.monotonic() >= deadline:
            return
        chosen = [heapq.heappop(heap)[1] for _ in range(min(max(batch_size // 2, 1), len(heap)))]
        parents = [store.pop(node) for node in chosen]
        p_phase, p_alpha, p_mult, p_score, p_bound = (
            np.stack([p[i] for p in parents]) for i in range(5)
        )
        p_score = np.where(p_phase < 0, p_score, -np.inf)
        rows = np.arange(len(parents))
        branch = np.argmax(p_score, axis=1)
        stuck = ~np.isfinite(p_score[rows, branch])
        if stuck.any():
            # No priced neuron: split any free one; a node with none free cannot be refined here.
            free = p_phase < 0
            if not free[stuck].any(axis=1).all():
                return
            branch = np.where(stuck, np.argmax(free, axis=1), branch)
        c_phase = np.concatenate([p_phase, p_phase])
        c_phase[rows, branch] = 0
        c_phase[rows + len(parents), branch] = 1
        c_best, c_alpha, c_mult, last = optimise_nodes(
            sub,
            target,
            offset,
            c_phase,
            np.concatenate([p_alpha, p_alpha]),
            np.concatenate([p_mult, p_mult]),
            CHILD_STEPS,
        )
        c_best = np.minimum(c_best, np.concatenate([p_bound, p_bound]))
        evaluated += c_phase.shape[0]
        book.absorb(last.vertex, METHOD)
        closed = c_best <= -margin
        if closed.any():
            worst_closed = max(worst_closed, float(c_best[closed].max()))
        for row in np.flatnonzero(~closed):
            store[next_id] = _stored(
                c_phase[row], c_alpha[row], c_mult[row], last.score[row], c_best[row]
            )
            heapq.heappush(heap, (-float(c_best[row]), next_id))
            next_id += 1
        if dive is not None:
            search_time = time.perf_counter() - started - dive_time
            dive, dive_time = _advance(dive, dive_time, search_time * _DIVE_RATIO)
    if book.status[j] == ProofStatus.UNDECIDED:
        book.record_bound(j, worst_closed, METHOD, proved=True)


def _advance(
    dive: Iterator[None], spent: float, share: float
) -> tuple[Iterator[None] | None, float]:
    """Run LP dive steps until the dive has used ``share`` seconds in all; None once it ended."""
    while spent < share:
        start = time.perf_counter()
        try:
            next(dive)
        except StopIteration:
            return None, spent + time.perf_counter() - start
        spent += time.perf_counter() - start
    return dive, spent


def _stored(phase, alpha, multipliers, score, bound) -> tuple:
    """One open node as kept in the heap's store (warm starts in float32)."""
    return (
        phase,
        alpha.astype(np.float32),
        multipliers.astype(np.float32),
        score.astype(np.float32),
        np.float64(bound),
    )


def decide_directions(
    net: Network,
    box: Box,
    bounds: Sequence,
    states: Sequence[np.ndarray],
    layer: int,
    directions: Sequence[Direction],
    margins: np.ndarray,
    deadline: float,
    *,
    effort: float = 1.0,
    dive: Dive | None = None,
    feed: WitnessFeed | None = None,
    time_limit: float | None = None,
    node_limit: int | None = None,
) -> list[DirectionResult]:
    """Prove or refute sign directions of ``layer`` by CROWN branch and bound, one at a time.

    Parameters are those of :func:`onnx_exact.solvers.exact_tiers.decide_directions`; ``effort``
    multiplies the per-direction caps ``node_limit`` and ``time_limit`` (default
    :data:`NODE_LIMIT` and :data:`TIME_LIMIT`; the node cap is lowered so that the open nodes, at
    most half of those bounded, fit in :data:`STORE_BYTES`). Every vertex bounded on the way is
    forward-passed against all the given directions. With a ``dive`` (the analysis passes the
    LP dive over the layer's relaxation), it takes turns with each search; without one, only
    CROWN vertices can refute.
    """
    book = DirectionBook(net, layer, directions, margins, feed)
    if not directions or time.monotonic() >= deadline:
        return book.results((METHOD,))
    sub = SubNetwork.below(net, box, bounds, states, layer)
    book.absorb(box.center[None, :], METHOD)
    per_node = sub.count * (1 + 4 + 4) + 2 * sub.neurons * 4  # phase, α, score, multipliers
    nodes = NODE_LIMIT if node_limit is None else node_limit
    seconds = TIME_LIMIT if time_limit is None else time_limit
    node_cap = min(int(nodes * effort), 2 * STORE_BYTES // max(per_node, 1))
    for j in book.open():
        if book.status[j] != ProofStatus.UNDECIDED:
            continue
        if time.monotonic() >= deadline:
            break
        cap = min(deadline, time.monotonic() + seconds * effort)
        _branch_direction(book, j, sub, net, cap, node_cap, dive)
    return book.results((METHOD,))
