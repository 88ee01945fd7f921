"""Stability analysis: which ReLU neurons are provably always active / always inactive on a box.

A neuron ``i`` of layer ``k`` has two *directions*: "+1: can ``y_{k,i}`` be > 0 on the box?" (a
proof of "no" makes it INACTIVE) and "-1: can it be < 0?" (a proof of "no" makes it ACTIVE). A
direction is *refuted* by one input whose float64 forward pass shows the sign strictly, and
*proved* by a sound bound that clears zero by the margin of :mod:`onnx_exact.stability.policy`.
A neuron with both directions refuted is UNSTABLE; one with a direction neither proved nor
refuted (time limit, or an extreme within the margin of 0) is UNDECIDED and kept, which keeps the
compression exact.

The default pipeline (``method="auto"``) settles the layers in order; each tier works only on
the directions still open, and every input any tier produces is forward-passed (refuting
directions in *all* layers) before the next tier runs (tiers in
:mod:`onnx_exact.stability.tiers`, their order and flags in :data:`onnx_exact.core.verdicts.TIERS`):

1. ``witness`` — box centre, uniform samples, Bernoulli corners, the exact first-layer extreme
   vertices and user inputs;
2. ``interval`` — IBP bounds (exact for the first layer, together with its extreme vertices);
3. ``symbolic`` — CROWN back-substitution for the rows IBP leaves open; its concretisation
   vertices are witness candidates; then ``ascent``: corner ascent and PGD toward the missing
   sign;
4. ``split`` — for networks with at most ``SPLIT_MAX_INPUTS`` input features, input-space branch
   and bound (:class:`onnx_exact.bounds.input_split.InputSearch`): a direction is proved when its
   bound clears the margin on every leaf of a cover of the box;
5. ``alpha-crown`` — optimised-slope CROWN bounds of the open rows, after the layers below are
   tightened the same way;
6. ``lp``, ``cuts``, ``crown-bab``, ``bab``, ``milp`` — triangle LP, LP with ideal cuts, CROWN
   branch and bound on ReLU phases (:mod:`onnx_exact.bounds.relu_bab`, with the LP dive for
   witnesses), LP branch and bound, decision MILP (:mod:`onnx_exact.solvers.exact_tiers`), one
   tier at a time over batches of directions, each with a per-direction cap. A ``probe`` (one
   short attack round) precedes ``crown-bab``; an ``attack`` (rounds of multi-start PGD polished
   by region LPs and a pattern search, :mod:`onnx_exact.search.attack`) precedes ``bab``,
   ``milp`` and ``subdivide``; with ``jobs >= 2`` and fewer open directions than jobs, a
   background attack in a second process replaces it beside the costly tiers;
7. ``subdivide`` — the input search of tier 4 continued on what the attack left open, with a
   larger leaf budget; up to ``SUBDIVIDE_ONLY_MAX_INPUTS`` input features it replaces the
   box-wide tier 6.

Under a time limit, directions still open after every layer's first pass get the retried tiers
again (caps times ``RETRY_EFFORTS``, the last repeated until the deadline), each followed by an
attack of equal time.

Anytime order: before any layer gets the tiers above, a first pass gives *every* layer its
interval and CROWN bounds, bottom-up, and applies their proofs; it is finished even when the
deadline passes inside it. A run stopped at any deadline therefore holds every proof of
interval + CROWN over the whole network.

Bounds: before the solver tiers of layer ``k`` run, the not-yet-stable neurons of layers
``1 .. k-1`` get α-CROWN bounds (once per layer, bottom-up), layer ``k`` gets CROWN again on top
of them, and all later layers' bounds are re-propagated from the intersected bounds. The sound
bound each solver answer carries (plus its margin) also tightens the layer's bounds.

``method="isa"`` (the paper's single-MILP algorithm, after witness preprocessing) and
``method="per-neuron"`` (two MILPs per neuron) run the baselines of
:mod:`onnx_exact.solvers.baselines`. A time limit leaves the directions still open UNDECIDED and
sets ``time_limit_hit``.

Modules: :mod:`~onnx_exact.stability.policy` (margins, caps, budgets),
:mod:`~onnx_exact.stability.tiers` (one function per tier), :mod:`~onnx_exact.stability.schedule`
(the run's state and the order of the tiers; :func:`analyze_stability`).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["analyze_stability"]


def __getattr__(name: str) -> Any:
    """``analyze_stability`` (from :mod:`onnx_exact.stability.schedule`), loaded on first use.

    PEP 562: importing one module of this package (``policy``, say) does not load the others,
    and no module of the package imports its ``__init__`` back.
    """
    if name == "analyze_stability":
        return importlib.import_module("onnx_exact.stability.schedule").analyze_stability
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
