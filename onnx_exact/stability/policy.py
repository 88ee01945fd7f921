"""Every margin, cap, effort and budget of the stability analysis, one line each with its reason.

The per-direction caps of the exact tiers (seconds, nodes) sit in the tier table
(:data:`onnx_exact.core.verdicts.TIERS`), which the solver modules read as well
(:func:`tier_direction_seconds`); everything else the schedule and the tiers use is here.
Changing a number here changes where time goes, never what a proof means: only the margins
below bear on soundness.

Margin policy
-------------
Neuron scale ``s_i = ||W_i||_1 * max|h_prev| + |b_i|``, with ``h_prev`` bounded by the previous
layer's post-activation bounds (the box for layer 0). Interval and symbolic bounds (float64
arithmetic) prove INACTIVE when ``upper <= -FLOAT_MARGIN * s_i`` and ACTIVE when ``lower >=
FLOAT_MARGIN * s_i``; this covers float64 rounding of the bound computation (relative error
~1e-16 per operation). LP, MILP and CROWN branch-and-bound proofs need ``max sign*y <=
-(SOLVER_MARGIN_REL * s_i + SOLVER_MARGIN_ABS)``, a margin above the solvers' feasibility and
optimality tolerances, applied on top of the solvers' own soundness measures (rigorous dual
bounds for LPs and every branch-and-bound node, a feasibility-tolerance slack for MILP dual
bounds). A neuron whose extreme lies within its margin of zero is neither refuted nor proved: it
is UNDECIDED and kept. Witnesses refute only on a strict float64 sign; ``y == 0`` refutes nothing.
"""

from __future__ import annotations

import numpy as np

from onnx_exact.bounds.crown import LayerBounds, layer_input_bounds
from onnx_exact.core.box import Box
from onnx_exact.core.network import Network
from onnx_exact.core.verdicts import TIERS, Tier
from onnx_exact.search.attack import AttackLimits

# --- margins (soundness) ------------------------------------------------------------------
FLOAT_MARGIN = 1e-12  # relative margin of interval/symbolic/CROWN proofs: float64 rounding
SOLVER_MARGIN_REL = 1e-7  # relative margin of LP/MILP/branch-and-bound proofs: solver tolerances
SOLVER_MARGIN_ABS = 1e-9  # absolute part of the solver margin: neurons of scale 0

# --- witness sampling -----------------------------------------------------------------------
SAMPLE_MACS = 2e9  # budget of (points x network MACs) for sampling: about a second of passes
SAMPLE_MIN = 256  # points sampled at least, however large the network
SAMPLE_MAX = 8192  # points sampled at most: later rounds rarely show a new sign
SAMPLE_ROUND = 1024  # points per round; two rounds without a new sign end the sampling
# few input features (at most SPLIT_MAX_INPUTS): a uniform sample covers the box densely, and a
# sign shown only on a sliver of it (1e-5 of an ACAS Xu envelope) is cheaper to sample than to
# leave to the input splitting, whose leaves holding such a direction are all wasted
SAMPLE_MAX_FEW_INPUTS = 131_072  # points sampled at most, with no early end on idle rounds
SAMPLE_ROUND_FEW_INPUTS = 8192

# --- exact tiers ----------------------------------------------------------------------------
SOLVER_BATCH = 32  # directions per solver call: witnesses found in one batch refute the next

# --- retries under a time limit -------------------------------------------------------------
RETRY_EFFORTS = (4.0, 16.0)  # caps multiplied in retry rounds; the last repeats until the deadline
IDLE_ROUND_SECONDS = 1.0  # a last-effort round this short that decided nothing ends the retries

# --- attack (finds inputs, proves nothing) --------------------------------------------------
ATTACK_STARTS = 64  # PGD starts per direction per round: rare signs sit in few local maxima
ATTACK_SECONDS = 1.0  # PGD seconds per direction per round
POLISH_SECONDS = 3.0  # region-LP seconds per direction per round (from PGD's end points)
PATTERN_SECONDS = 3.0  # pattern-search seconds per direction per round (near-bound points only)
PATTERN_GAP = 0.05  # pattern search only from points with -y <= gap * (bound - y)
ATTACK_ESCALATION = 4.0  # the attack's effort (rounds) grows by this before each attacked tier
ATTACK_MAX_EFFORT = 16.0  # ... up to this; also the effort after a retried tier without a cap
# rounds after a retried input search that is the only exact tier (few inputs): its leaves'
# points refute too, best first where the sign is likeliest (ring2d/smooth8: 16 rounds found none)
SEARCH_ATTACK_EFFORT = 1.0

# --- background attack (jobs >= 2, fewer open directions than jobs) -------------------------
BACKGROUND_POLISH_QUANTILE = 0.75  # polish only PGD ends in the top quarter of earlier rounds
BACKGROUND_WARMUP_ROUNDS = 4  # rounds polished unconditionally before that quantile applies
BACKGROUND_MAX_WEIGHT_BYTES = 256 * 2**20  # dense float64 weights a background process may copy

# --- probe (one short attack round before a layer's CROWN branch and bound) ----------------
PROBE_STARTS = 16  # PGD starts per direction: refuted as often as 64 in a third of the time
PROBE_SECONDS = 0.05  # PGD seconds per direction
PROBE_POLISH_SECONDS = 0.15  # region-LP seconds per direction
PROBE_POLISH_GAP = 0.3  # region LPs only from PGD ends with -y <= gap * (bound - y)

# --- input splitting (few-input networks) ---------------------------------------------------
SPLIT_MAX_INPUTS = 16  # input features up to which split and subdivide run
SPLIT_BOXES_PER_LAYER = 20_000  # leaves the split tier bounds per layer before handing on
SUBDIVIDE_LEAVES = 100_000  # leaves per subdivide call (times its effort)
SUBDIVIDE_ONLY_MAX_INPUTS = 8  # up to this many features subdivide replaces the box-wide tiers


def attack_round_seconds() -> float:
    """The most one attack round spends per direction (PGD, region LPs, pattern search)."""
    return ATTACK_SECONDS + POLISH_SECONDS + PATTERN_SECONDS


def attack_limits() -> AttackLimits:
    """The caps of one round of the attack tier and of the background attack."""
    return AttackLimits(ATTACK_STARTS, ATTACK_SECONDS, POLISH_SECONDS, PATTERN_SECONDS, PATTERN_GAP)


def probe_limits() -> AttackLimits:
    """The caps of the probe's one round (no pattern search)."""
    return AttackLimits(
        PROBE_STARTS, PROBE_SECONDS, PROBE_POLISH_SECONDS, polish_gap=PROBE_POLISH_GAP
    )


def retry_attack_effort(tier: Tier, effort: float, search_only: bool = False) -> float:
    """Attack rounds after a retry of ``tier`` at ``effort``: one attack second per proof second.

    A direction still open after the first pass is either unstable with its sign in a sliver of
    the box, or stable with a proof out of reach of the capped tiers, and nothing tells the two
    apart in advance. Giving the directions a retried tier leaves open as many attack seconds
    each as that tier could spend on them (its cap ``tier_direction_seconds(tier) * effort``, one
    round costing at most ``attack_round_seconds()``) at most doubles the time to either
    answer, against the order that would have been right; a fixed number of rounds instead
    starves the refutation when one round succeeds rarely. After the tier, not before:
    directions it proves cost no attack. A tier without a per-direction cap (subdivide) is
    followed by ``ATTACK_MAX_EFFORT`` rounds, or by ``SEARCH_ATTACK_EFFORT`` when it is the
    input search and no other exact tier runs (``search_only``): the search is a refuter too,
    forward-passing points of its most promising leaves first, so the attack is only the
    shortcut to a sign in a sliver.
    """
    if search_only:
        return SEARCH_ATTACK_EFFORT
    seconds = tier_direction_seconds(tier)
    if seconds is None:
        return ATTACK_MAX_EFFORT
    return max(seconds * effort / attack_round_seconds(), 1.0)


def tier_direction_seconds(tier: Tier | str) -> float | None:
    """The cap in seconds one direction gets from ``tier`` at effort 1 (None: no such cap)."""
    return TIERS[Tier(tier)].direction_seconds


def neuron_scale(net: Network, box: Box, bounds: list[LayerBounds], layer: int) -> np.ndarray:
    """``s_i = ||W_i||_1 * max|h_prev| + |b_i|``: the magnitude a rounding error is relative to."""
    lower, upper = layer_input_bounds(net, box, bounds, layer)
    peak = float(np.max(np.maximum(np.abs(lower), np.abs(upper)), initial=0.0))
    current = net.layers[layer]
    return current.row_abs_sums() * peak + np.abs(current.bias)


def float_margins(net: Network, box: Box, bounds: list[LayerBounds], layer: int) -> np.ndarray:
    """Margins float64 bound proofs (interval, symbolic, CROWN) must clear: ``1e-12 * s_i``."""
    return FLOAT_MARGIN * neuron_scale(net, box, bounds, layer)


def solver_margins(net: Network, box: Box, bounds: list[LayerBounds], layer: int) -> np.ndarray:
    """Margins LP/MILP proofs must clear: ``1e-7 * s_i + 1e-9``."""
    return SOLVER_MARGIN_REL * neuron_scale(net, box, bounds, layer) + SOLVER_MARGIN_ABS
