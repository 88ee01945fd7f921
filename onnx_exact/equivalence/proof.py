"""The product MILP of two networks over their canonical form: the last tier of a proof.

One HiGHS model over ``V`` (:mod:`onnx_exact.equivalence.canonical`) serves every output and sign:
``x`` in the box; per free neuron ``u`` a column ``y_u`` in its proved bounds ``[L_u, U_u]`` with
the row ``y_u - e_u . V`` in ``[c_u - err_u, c_u + err_u]`` (a relaxation of the true network point)
and the big-M ReLU ``h_u = relu(y_u)`` with one binary
(:func:`onnx_exact.solvers.milp_encoding.relu_rows`); shared and stable neurons need no column and
no binary. Per output and sign (largest symbolic bound first), the decision MILP minimises ``-sign d
. V`` with cutoff ``sign d0 + err + slack - tol`` (a pruned search proves ``max sign Delta <= tol``)
and target ``sign d0 - tol - slack`` (stop at a likely violation). The slack ``1e-9 (|d| . |V|max +
|d0| + 1)`` covers the solver's feasibility tolerance (1e-9 here), the policy of
:mod:`onnx_exact.solvers`; MILP dual bounds are not certifiable beyond it. Outputs whose error floor
``err + slack`` reaches ``tol`` are not sent to the MILP (it could not prove them, and the widened
rows admit spurious violations).

The per-direction MILPs are independent: with ``jobs > 1`` they run in the run's shared worker
pool (:func:`onnx_exact.parallel.worker_pool`), each worker building the model once per proof.
A direction whose MILP reached its target (a likely violation) that the caller could not confirm
is solved again without a target.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass, field

import numpy as np

from onnx_exact import parallel
from onnx_exact.equivalence.canonical import Canonical
from onnx_exact.solvers import highs_model, milp_encoding

PROOF_FEASIBILITY_TOLERANCE = 1e-9
"""Primal and MIP feasibility tolerance of the proof MILP; the basis of its slack."""

INF = highs_model.INF
_MODEL_STATUS = highs_model.MODEL_STATUS


@dataclass
class DirectionBound:
    """The proof's answer for one output coordinate and sign: ``max sign * (f_A - f_B)``.

    ``bound`` is a proved upper bound (``inf`` if none); ``tier`` the method that gave it
    ("matched", "stable-units", "milp": see :mod:`onnx_exact.equivalence.correspondence`); ``status`` is
    "proved" (``bound <= tol``), "violated" (a replayed counterexample) or "open".
    """

    output: int
    sign: int
    bound: float
    tier: str
    status: str


@dataclass
class Counterexample:
    """An input in the box where the models differ by more than the tolerance.

    ``input`` is the raw flattened input exactly as fed to onnxruntime (representable in the
    input dtype, inside the box); ``exact_difference`` is ``f_A - f_B`` of output coordinate
    ``output`` in float64 on the stored weights; ``replayed_difference`` what onnxruntime gives
    for it and ``replayed_where`` which value that is: ``|f_A - f_B|`` at the same coordinate
    when the networks' end tensor is a graph output, else the largest difference on the graph
    outputs after the tail (e.g. probabilities after a Softmax, not comparable with logits).
    """

    input: np.ndarray
    output: int
    exact_difference: float
    replayed_difference: float
    replayed_where: str = ""


class ProofModel:
    """The product MILP over the canonical form (see the module docstring, tier 2)."""

    def __init__(self, canonical: Canonical) -> None:
        self.canonical = canonical
        highs = highs_model.new_highs()
        highs_model.set_options(
            highs,
            primal_feasibility_tolerance=PROOF_FEASIBILITY_TOLERANCE,
            mip_feasibility_tolerance=PROOF_FEASIBILITY_TOLERANCE,
            mip_heuristic_run_feasibility_jump=False,
        )
        self.highs = highs
        absmax = canonical.absmax
        self.x = highs_model.add_columns(highs, canonical.box.lower, canonical.box.upper)
        v_cols = [self.x]
        y_cols, z_cols = [], []
        for batch in canonical.batches:
            rows = batch.rows
            m, width = rows.coeffs.shape
            upper = np.maximum(batch.upper, batch.lower)
            y = highs_model.add_columns(highs, batch.lower, upper)
            h = highs_model.add_columns(highs, np.zeros(m), np.maximum(upper, 0.0))
            z = highs_model.add_columns(highs, np.zeros(m), np.ones(m), integer=True)
            prefix = np.concatenate(v_cols)
            y_absmax = np.maximum(np.abs(batch.lower), np.abs(upper))
            row_ids, positions = np.nonzero(rows.coeffs)
            order = np.argsort(np.concatenate([np.arange(m), row_ids]), kind="stable")
            highs_model.add_rows(
                highs,
                rows.const - rows.err,
                rows.const + rows.err,
                np.concatenate([np.arange(m), row_ids])[order],
                np.concatenate([y, prefix[positions]])[order],
                np.concatenate([np.ones(m), -rows.coeffs[row_ids, positions]])[order],
                np.concatenate([y_absmax, absmax[:width][positions]])[order],
            )
            milp_encoding.relu_rows(highs, y, h, z, batch.lower, upper, np.zeros(m))
            v_cols.append(h)
            y_cols.append(y)
            z_cols.append(z)
        self.v_cols = np.concatenate(v_cols).astype(np.int32)
        self.y_cols = np.concatenate(y_cols) if y_cols else np.zeros(0, dtype=np.int64)
        self.z_cols = np.concatenate(z_cols) if z_cols else np.zeros(0, dtype=np.int64)

    @property
    def binaries(self) -> int:
        return int(self.z_cols.shape[0])

    def start(self, x_raw: np.ndarray) -> None:
        """Hand HiGHS the full point of a raw input as a starting incumbent."""
        v, y = self.canonical.values(x_raw)
        cols = np.concatenate([self.v_cols, self.y_cols, self.z_cols]).astype(np.int32)
        vals = np.concatenate([v, y, (y >= 0.0).astype(np.float64)])
        self.highs.setSolution(cols.shape[0], cols, vals)

    def minimise(
        self,
        costs: np.ndarray,
        cutoff: float,
        target: float,
        time_limit: float,
        start: np.ndarray | None,
    ) -> tuple[float, list[np.ndarray], highs_model.MODEL_STATUS]:
        """Minimise ``costs . V``; return (lower bound, inputs of every incumbent, status).

        Decide from the bound, not the status: an infeasible run (everything pruned by the cutoff)
        proves the minimum is at least ``cutoff``; otherwise the bound is ``mip_dual_bound``.
        """
        highs = self.highs
        highs.changeColsCost(self.v_cols.shape[0], self.v_cols, costs)
        highs_model.set_options(
            highs,
            objective_bound=float(cutoff),
            objective_target=float(target),
            time_limit=highs_model.time_limit_option(highs, time_limit, mip=self.binaries > 0),
        )
        harvested: list[np.ndarray] = []
        x_cols = self.x

        def on_solution(event) -> None:
            harvested.append(np.array(event.data_out.mip_solution[x_cols], dtype=np.float64))

        highs.cbMipSolution.subscribe(on_solution)
        if start is not None:
            self.start(start)
        highs.run()
        highs.cbMipSolution.unsubscribe(on_solution)
        status = highs.getModelStatus()
        solution = highs.getSolution()
        if solution.value_valid:
            harvested.append(np.asarray(solution.col_value)[x_cols].copy())
        if status in (_MODEL_STATUS.kInfeasible, _MODEL_STATUS.kObjectiveBound):
            return float(cutoff), harvested, status
        dual = float(highs.getInfo().mip_dual_bound)
        return (dual if math.isfinite(dual) else -np.inf), harvested, status


@dataclass
class _Query:
    """One decision MILP: minimise ``costs . V`` against ``cutoff`` / ``target``."""

    direction: int  # index into the caller's list of directions
    costs: np.ndarray
    cutoff: float
    target: float
    time_limit: float
    start: np.ndarray | None


@dataclass
class _Answer:
    lower_bound: float
    points: list[np.ndarray] = field(default_factory=list)
    target_reached: bool = False


def _solve(model: ProofModel, query: _Query) -> _Answer:
    lower, points, status = model.minimise(
        query.costs, query.cutoff, query.target, query.time_limit, query.start
    )
    return _Answer(lower, points, status == _MODEL_STATUS.kObjectiveTarget)


_WORKER_MODELS: weakref.WeakKeyDictionary[Canonical, ProofModel] = weakref.WeakKeyDictionary()
"""A worker's models, one per canonical form it holds (the pool's context cache keeps those)."""


def _solve_in_worker(canonical: Canonical, query: _Query) -> _Answer:
    """A decision MILP in a worker of :func:`parallel.worker_pool`; the model is built on the
    worker's first task of the proof."""
    model = _WORKER_MODELS.get(canonical)
    if model is None:
        model = _WORKER_MODELS[canonical] = ProofModel(canonical)
    return _solve(model, query)


class _Inline(Executor):
    """The serial case behind the executor interface: ``submit`` solves at once."""

    def __init__(self, canonical: Canonical) -> None:
        self.model = ProofModel(canonical)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(_solve(self.model, *args))
        return future


Confirm = Callable[[list[np.ndarray], int, int], Counterexample | None]
"""``confirm(points, output, sign)``: a replayed counterexample among solver points, or None."""

Progress = Callable[[str, int, int], None]


def milp_tier(
    canonical: Canonical,
    directions: list[DirectionBound],
    diff: np.ndarray,
    offset: np.ndarray,
    error: np.ndarray,
    tol: float,
    starts: np.ndarray,
    seen: np.ndarray,
    deadline: float,
    confirm: Confirm,
    *,
    jobs: int = 1,
    progress: Progress | None = None,
) -> tuple[Counterexample | None, list[str]]:
    """Decision MILPs for the open ``directions`` (updated in place), largest bound first.

    Parameters
    ----------
    canonical : the shared form; ``diff``/``offset``/``error`` are ``f_A - f_B``'s form over it.
    directions : the open directions; each gets ``bound``/``tier``/``status`` updated.
    starts : per direction, the raw input handed to HiGHS as a first incumbent (rows aligned).
    seen : per direction, the largest ``sign * (f_A - f_B)`` known at a concrete input: a MILP
        bound below it would contradict a known point (the model would not be sound), and the
        direction stays open with a note.
    deadline : ``time.monotonic()`` value after which nothing new starts.
    confirm : turns violating solver points into a replayed counterexample.
    jobs : worker processes (``1``: in this process).
    progress : ``progress("proof", decided, total)`` after each direction.

    Returns
    -------
    (the first confirmed counterexample or None, notes). Stops at the first counterexample.
    """
    absmax = canonical.absmax
    notes: list[str] = []
    todo: deque[_Query] = deque()
    for position in sorted(range(len(directions)), key=lambda i: -directions[i].bound):
        o, sign = directions[position].output, directions[position].sign
        slack = PROOF_FEASIBILITY_TOLERANCE * (np.abs(diff[o]) @ absmax + abs(offset[o]) + 1.0)
        if error[o] + slack >= tol:
            continue
        base = sign * offset[o]
        todo.append(
            _Query(
                position, -sign * diff[o], base + error[o] + slack - tol, base - tol - slack,
                INF, starts[position],
            )
        )  # fmt: skip
    if not todo:
        return None, notes
    total, decided = len(todo), 0
    workers = min(jobs, total)
    if workers > 1 and parallel.can_start_workers():
        executor: Executor = parallel.worker_pool(jobs)
        solve = parallel.with_context(_solve_in_worker, parallel.TaskContext(canonical))
    else:
        executor, workers, solve = _Inline(canonical), 1, _solve
    running: dict[Future, _Query] = {}
    try:
        while todo or running:
            remaining = deadline - time.monotonic()
            while todo and len(running) < workers and remaining > 0:
                query = todo.popleft()
                rounds = math.ceil((len(todo) + len(running) + 1) / workers)
                query.time_limit = remaining / rounds if math.isfinite(remaining) else INF
                running[executor.submit(solve, query)] = query
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                query = running.pop(future)
                direction = directions[query.direction]
                answer = future.result()
                o, sign = direction.output, direction.sign
                slack = PROOF_FEASIBILITY_TOLERANCE * (
                    np.abs(diff[o]) @ absmax + abs(offset[o]) + 1.0
                )
                bound = sign * offset[o] - answer.lower_bound + error[o] + slack
                if bound < direction.bound:
                    direction.bound, direction.tier = float(bound), "milp"
                if direction.bound <= tol and seen[query.direction] > tol:
                    notes.append(
                        f"output {o}: the MILP claims a bound the input pool contradicts "
                        f"({seen[query.direction]:.3g} > {tol:g}); left open"
                    )
                    direction.status, direction.bound = "open", np.inf
                elif direction.bound <= tol:
                    direction.status = "proved"
                else:
                    example = confirm(answer.points, o, sign)
                    if example is not None:
                        direction.status = "violated"
                        return example, notes
                    if answer.target_reached and query.target > -INF:
                        query.target = -INF
                        todo.appendleft(query)
                        continue
                decided += 1
                if progress is not None:
                    progress("proof", decided, total)
    finally:
        for future in running:  # the shared pool outlives this call: drop what has not started
            future.cancel()
    return None, notes
