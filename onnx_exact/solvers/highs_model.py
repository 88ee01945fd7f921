"""HiGHS through its array API: one place for options, columns, rows, statuses and time limits.

Every other solver module builds its models with these helpers, so the soundness measures live
here once: matrix entries HiGHS would drop are moved into the row bounds (:func:`add_rows`), the
banner is silenced, and time limits are clipped to what the caller has left.
"""

from __future__ import annotations

import os
import sys
import time

import highspy
import numpy as np

from onnx_exact.core.errors import SolverError

SMALL_MATRIX_VALUE = 1e-12
"""Smallest matrix entry HiGHS accepts; smaller ones are moved into the row bounds."""


FEASIBILITY_TOLERANCE = 1e-6
"""``mip_feasibility_tolerance`` of every MILP, the basis of the MILP slack."""


IPM_NONZEROS = 40_000
"""LP relaxations with more matrix entries solve their first LP with the interior-point method.

Measured on 784-400-400 (layer-2 LP, 317k entries): a cold dual simplex took 16 s, IPM 3-4 s per
LP, and IPM (with crossover) once followed by warm dual simplex 4.6 s, then 0.8-2.3 s per LP.
Measured on the MNIST zoo's first LP of each layer (50k-240k entries, 11 cold solves; dual
simplex / primal simplex / IPM with crossover): dual 0.07-0.76 s but 9.7 s and over 20 s on two;
primal 0.07-0.79 s; IPM 0.14-0.21 s, 0.41-0.52 s on the 239k-entry 2x400 LP. Below 40k entries
(ACAS Xu, the pieces of a subdivided box) primal simplex is kept: those LPs solve in milliseconds.
"""


FLOAT_EPS = np.finfo(np.float64).eps


INF = highspy.kHighsInf


MODEL_STATUS = highspy.HighsModelStatus
"""HiGHS's model statuses (``MODEL_STATUS.kOptimal``, ...), so callers need not import highspy."""

HighsBasis = highspy.HighsBasis
"""A simplex basis: the warm start a neighbouring LP is given."""


#: Model statuses after which HiGHS's dual bound is a valid bound (the solve ran and stopped
#: cleanly); after any other status (errors, a solve that never ran) nothing is proved.
BOUND_STATUSES = frozenset(
    {
        MODEL_STATUS.kOptimal,
        MODEL_STATUS.kInfeasible,
        MODEL_STATUS.kObjectiveBound,
        MODEL_STATUS.kObjectiveTarget,
        MODEL_STATUS.kTimeLimit,
        MODEL_STATUS.kIterationLimit,
        MODEL_STATUS.kSolutionLimit,
        MODEL_STATUS.kInterrupt,
    }
)


def set_options(highs: highspy.Highs, **options) -> None:
    """Set HiGHS options, turning a rejected name or value into a :class:`SolverError`."""
    for name, value in options.items():
        if highs.setOptionValue(name, value) == highspy.HighsStatus.kError:
            raise SolverError(
                f"HiGHS rejected option {name}={value!r}; install highspy>=1.16 (pip install -U highspy)"
            )


_BANNER_SILENCED = False


def _silence_banner() -> None:
    """Construct the process's first Highs with fd 1 on /dev/null.

    HiGHS prints its copyright banner from C++ on the first construction in a process, before any
    option can be set; a command-line tool (and ``--quiet``) must not print it.
    """
    global _BANNER_SILENCED
    if _BANNER_SILENCED:
        return
    _BANNER_SILENCED = True
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def new_highs() -> highspy.Highs:
    """A silent single-threaded HiGHS instance that keeps matrix entries down to 1e-12."""
    _silence_banner()
    highs = highspy.Highs()
    set_options(
        highs,
        output_flag=False,
        small_matrix_value=SMALL_MATRIX_VALUE,
        threads=1,
        random_seed=0,
        mip_feasibility_tolerance=FEASIBILITY_TOLERANCE,
    )
    return highs


def check_status(status: highspy.HighsStatus, what: str) -> None:
    if status == highspy.HighsStatus.kError:
        raise SolverError(f"HiGHS failed to {what}; the affected neurons are kept")


def add_columns(
    highs: highspy.Highs, lower: np.ndarray, upper: np.ndarray, integer: bool = False
) -> np.ndarray:
    """Append boxed columns and return their indices."""
    first = highs.getNumCol()
    count = int(lower.shape[0])
    if count == 0:
        return np.empty(0, dtype=np.int64)
    check_status(
        highs.addVars(count, lower.astype(np.float64), upper.astype(np.float64)), "add columns"
    )
    cols = np.arange(first, first + count)
    if integer:
        kinds = np.full(count, highspy.HighsVarType.kInteger)
        check_status(
            highs.changeColsIntegrality(count, cols.astype(np.int32), kinds), "mark integers"
        )
    return cols


def add_rows(
    highs: highspy.Highs,
    lower: np.ndarray,
    upper: np.ndarray,
    row_ids: np.ndarray,
    cols: np.ndarray,
    vals: np.ndarray,
    entry_absmax: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Append rows ``lower <= sum vals * x[cols] <= upper`` given as row-sorted COO entries.

    Entries with ``|v| < SMALL_MATRIX_VALUE`` (HiGHS would drop them, or fail) are removed and
    their largest possible contribution ``|v| * entry_absmax`` (``entry_absmax`` = the largest
    magnitude of the entry's column) widens the row's bounds, outward by at least one ulp, so
    every point of the exact row still satisfies the relaxed one. Returns the rows as added:
    (lower, upper, row ids counted from 0, cols, vals).
    """
    count = int(lower.shape[0])
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    small = np.abs(vals) <= SMALL_MATRIX_VALUE
    if small.any():
        widen = np.bincount(
            row_ids[small], weights=np.abs(vals[small]) * entry_absmax[small], minlength=count
        )
        grow = widen > 0
        lower = np.where(grow, np.nextafter(lower - widen, -np.inf), lower)
        upper = np.where(grow, np.nextafter(upper + widen, np.inf), upper)
        row_ids, cols, vals = row_ids[~small], cols[~small], vals[~small]
    starts = np.searchsorted(row_ids, np.arange(count)).astype(np.int32)
    if count:
        status = highs.addRows(
            count, lower, upper, int(vals.shape[0]), starts, cols.astype(np.int32), vals
        )
        check_status(status, "add rows")
    return lower, upper, row_ids, cols, vals


def seconds_left(deadline: float) -> float:
    return deadline - time.monotonic()


def time_limit_option(highs: highspy.Highs, seconds: float, *, mip: bool) -> float:
    """The ``time_limit`` option value that allows ``seconds`` more for the next ``run()``.

    HiGHS (highspy 1.16) measures the two kinds of solve differently. An LP solve compares
    ``time_limit`` with the *cumulative* run time of the ``Highs`` object (HiGHS issues #1331,
    #1477; there is no ``zeroAllClocks``), so a model solved many times -- the warm per-layer
    relaxation -- would otherwise stop at once with ``kTimeLimit`` and a meaningless primal. A MIP
    solve compares it with the time since *that* run started: one MILP instance re-run with the
    option at cumulative run time + 3 s ran 11.3, 22.5 and 45.1 s (MNIST 5x100, fourth layer), and
    ``--method per-neuron --time-limit 60`` took 117 s on MNIST 4x100 ℓ1 = 3e-4.
    """
    if mip:
        return float(seconds)
    return float(highs.getRunTime() + seconds)
