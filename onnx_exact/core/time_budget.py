"""How long the analysis may run when the user does not say: the ``auto`` time limit.

A pre-deployment step runs in a pipeline with default options, so a default run must end, and
end in about the time users give such a step. Neurons a budget leaves open are kept
(UNDECIDED), so a budget never costs exactness, only compression; a longer ``--time-limit`` only
removes more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not at run time: the command line imports this module before its signal
    from onnx_exact.core.network import Network  # handlers are installed, so it loads no numpy

AUTO_TIME_LIMIT = "auto"
"""``AnalysisOptions.time_limit`` value that picks the budget from the model (:func:`time_budget`)."""
MLP_TIME_LIMIT = 300.0
"""Seconds of analysis an MLP gets under ``"auto"``: finite, so that a run with default options
ends, and long enough for the capped tiers to finish on the networks of docs/benchmarks.md."""
CNN_TIME_LIMIT = 45.0
"""Seconds of analysis a CNN gets under ``"auto"``, so that the whole job (read, analysis,
pruning, verification of the written file) fits in about a minute, the budget of a
pre-deployment step. The interval and CROWN proofs of every layer (what onnxsim's
``stable_relu_prune`` proves) come first whatever the budget; the rest goes to the costly tiers,
and every channel they leave open is kept, so a longer ``--time-limit`` only removes more."""


def time_budget(time_limit: float | str | None, network: Network) -> float | None:
    """The analysis budget in seconds (None: no limit) that ``time_limit`` asks for on ``network``.

    ``"auto"`` gives a CNN (a layer carries conv ``channels``) ``CNN_TIME_LIMIT`` and any other
    network ``MLP_TIME_LIMIT``; a number or None is taken as it is.
    """
    if time_limit != AUTO_TIME_LIMIT:
        return time_limit
    is_cnn = any(layer.channels is not None for layer in network.layers)
    return CNN_TIME_LIMIT if is_cnn else MLP_TIME_LIMIT
