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

Why: a cold dual simplex from the slack basis can stall for tens of seconds on these large
degenerate LPs, while interior point with crossover does not stall (its iteration count hardly
depends on the start) and leaves a basis for the warm dual simplex solves that follow. Small LPs
(few-input networks, the pieces of a subdivided box) keep primal simplex, which solves them in
milliseconds without interior point's start-up cost. The cold-solve timings that set the threshold
are in ``docs/benchmarks.md``, "Why the constants are what they are".
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
    solve compares it with the time since *that* run started, so passing the cumulative time there
    would let each re-run of one MILP instance take as long as all its previous runs together (the
    budget doubles per run and a run-wide time limit is overrun).
    """
    if mip:
        return float(seconds)
    return float(highs.getRunTime() + seconds)
