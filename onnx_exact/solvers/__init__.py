"""Solvers: every HiGHS model of onnx-exact (LP, ideal cuts, LP branch and bound, decision MILP, baselines).

A *direction* ``(k, i, sign)`` asks "can ``sign * y_{k,i}`` be positive on the box?". A "no" proves
neuron ``i`` of layer ``k`` stably inactive (``sign = +1``) or stably active (``sign = -1``); a "yes"
is shown by one input whose float64 forward pass (:meth:`Network.preactivations`) gives
``sign * y > 0``. Every answer of this module is one of those two kinds of evidence, or "undecided".

Encoding (big-M, one binary per uncertain ReLU)
    Layer ``k`` gets columns ``y_k`` with its proved bounds ``[L, U]`` and rows
    ``y_k - W_k h_{k-1} = b_k``. A ReLU neuron with ``L < 0 < U`` gets ``h`` in ``[0, U]`` and
    ``z`` in ``[0, 1]`` (integer for a MILP) with ``h >= y``, ``h <= U z`` and
    ``h <= y - L (1 - z)``; with ``z`` continuous this is exactly the triangle relaxation. Proved
    active neurons use ``h = y``, proved inactive ones ``h = 0`` (no column), layers without ReLU are
    linear. The ISA baseline moves the indicator's threshold from 0 to ``t`` (see
    :func:`add_network_encoding`).

Soundness policy
    * HiGHS drops matrix entries below ``small_matrix_value``; it is lowered to 1e-12 and entries
      still below are taken out of the matrix by us, widening the row's bounds by
      ``|w| max(|lo|, |hi|)`` of the dropped term, so the model stays a relaxation of the network.
    * LP proofs are rigorous: the bound is re-derived from the row duals with the
      Neumaier-Shcherbina bound (every column is boxed), minus a forward error bound of the float
      sums. A direction is proved iff ``bound <= -margin``.
    * Branch and bound on ReLU phases (:func:`_bab_direction`) fixes indicator columns of the
      same LP to 0 or 1; every node's bound is that rigorous LP bound, and a direction is proved
      when every leaf clears the margin, so no MILP slack applies.
    * MILP dual bounds are not certifiable. A MILP proof needs ``bound <= -margin`` with
      ``bound = sign b - dual_bound + slack`` and ``slack = 1e-6 (sum_j |W_ij| max(|lo_j|, |hi_j|)
      + |b_i|)``: the change of ``y`` that the MIP feasibility tolerance (1e-6 per row and bound)
      allows, scaled to the neuron. Extremes closer to 0 than ``margin + slack`` stay undecided.
    * A witness is an input inside the box (solver points are clipped to it) whose float64 forward
      pass shows the sign; solver values of ``z``, ``p`` or the objective never count.
    * A time limit leaves a direction undecided.
"""
