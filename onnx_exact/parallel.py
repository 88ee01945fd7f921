"""The one worker mechanism of a run: a reused process pool and single background processes.

Why one mechanism
    Every user of ``--jobs`` in a run (the decision MILPs, the input-splitting tier, the
    equivalence proof's MILPs) shares :func:`worker_pool`: one ``spawn`` pool per ``jobs`` value,
    created on first use and kept until :func:`shutdown_pools`. Starting a worker costs about a
    second on a loaded machine (an interpreter with numpy and highspy), so a pool per call paid it
    on every call. A task carries its own context (:class:`TaskContext`), so the same workers
    serve every caller. The background attack is one process (:func:`start_process`) with the
    same guarantees.

Guarantees of every process started here (pool workers and :func:`start_process`)
    * ``spawn`` start (HiGHS hangs in forked children).
    * It dies with its parent: ``PR_SET_PDEATHSIG = SIGKILL`` through ``prctl`` on Linux (only
      when the process was started from the main thread: the kernel sends the signal when the
      *thread* that started the child ends), and a watchdog thread that ends it within
      :data:`WATCHDOG_SECONDS` once its parent is gone (other platforms, processes started from
      other threads, and a parent that died before ``prctl`` ran). A ``kill -9`` of the analysis thus leaves no worker behind, and no
      ``multiprocessing`` resource tracker either (it ends when the last holder of its pipe does).
    * SIGINT is blocked while it starts and ignored once it runs: a Ctrl-C reaches the whole
      process group, and only the main process reports it (one line, exit code 130). A worker
      dies of SIGTERM/SIGKILL, which only the main process sends (:func:`shutdown_pools`).
    * One thread of numpy's BLAS (the ``*_NUM_THREADS`` variables, in the environment it starts
      with: :class:`_ChildStart`) and of HiGHS (every model is built with ``threads=1``): the
      workers are the parallelism.
    * No onnx or onnxruntime: this module and the analysis modules a task runs (:mod:`milp`,
      :mod:`stability`, :mod:`input_split`, :mod:`proof_milp` and what they import) do not import
      them (a second or more per worker on a loaded machine, for nothing);
      ``tests/test_parallel.py`` checks it.

Interruption
    :func:`shutdown_pools` with ``kill=True`` is safe in a signal handler: it sends SIGKILL to
    every worker and background process and takes no lock, so a SIGINT/SIGTERM ends the run
    at once instead of waiting for the solves running in the workers (a decision MILP may run
    for a minute).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Any

MAX_DEFAULT_JOBS = 8
"""Cap of the default ``--jobs`` (a big machine's cores would each hold a worker's memory)."""

WATCHDOG_SECONDS = 0.5
"""How often a worker checks that its parent is alive (where ``prctl`` did not arm the kernel)."""

CONTEXT_CACHE_SIZE = 2
"""Task contexts one worker keeps unpickled (the most recently used ones): the calls of a run
mostly follow one another, and a context (a network with its bounds) may take many MiB."""

_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_CAN_BLOCK = hasattr(signal, "pthread_sigmask")  # POSIX

_pools: dict[int, ProcessPoolExecutor] = {}
_processes: list[multiprocessing.process.BaseProcess] = []
_owner_pid = os.getpid()  # pools and processes belong to the process that created them


def default_jobs() -> int:
    """The cores this process may run on (its CPU affinity), at most :data:`MAX_DEFAULT_JOBS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_JOBS))


def can_start_workers() -> bool:
    """Whether this process may start worker processes (``jobs > 1``).

    A daemonic process may not (``multiprocessing`` refuses with an AssertionError): the
    analysis then runs serially, with the same labels, instead of failing; e.g. inside a
    ``multiprocessing.Pool`` worker, or a daemonic benchmark child.
    """
    return not multiprocessing.current_process().daemon


# --------------------------------------------------------------------------- worker side
class _StartedFrom:
    """Pickled into a new process's arguments: evaluated in the thread that starts it.

    ``multiprocessing`` pickles a process's arguments in the thread that calls ``start()``
    (for a pool: the thread that submits the task that needs one more worker), so the flag
    below tells the child whether the kernel's parent-death signal will follow the process or
    only that thread.
    """

    def __init__(self) -> None:
        self.parent_pid = os.getpid()

    def __reduce__(self) -> tuple:
        main_thread = threading.current_thread() is threading.main_thread()
        return (_start_worker, (self.parent_pid, main_thread))


def _start_worker(parent_pid: int, from_main_thread: bool) -> None:
    """Run first in every process started here (see the module docstring for the guarantees)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _CAN_BLOCK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the starter
    for variable in _THREAD_VARIABLES:
        os.environ[variable] = "1"
    if from_main_thread and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still ends this process
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(
        target=_watch_parent, args=(parent_pid,), name="onnx-exact-watchdog", daemon=True
    ).start()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(WATCHDOG_SECONDS)
        if os.getppid() != parent_pid:
            os._exit(1)


def _init_pool_worker(started_from: None) -> None:
    """Pool initializer; all the work was done when ``started_from`` was unpickled."""


def _run_process(started_from: None, target: Callable, args: tuple) -> None:
    target(*args)


# --------------------------------------------------------------------------- task contexts
_context_cache: OrderedDict[str, Any] = OrderedDict()


class TaskContext:
    """A per-call context sent with every task of that call and unpickled once per worker.

    A caller's tasks share big read-only data (a network, its bounds, cuts). The value is
    pickled once here; every task carries the bytes (a copy through a pipe, no re-pickling)
    and a key, and a worker keeps the last :data:`CONTEXT_CACHE_SIZE` values it unpickled, so
    one pool serves any number of callers without a per-pool initializer.
    """

    __slots__ = ("blob", "key")

    def __init__(self, value: Any) -> None:
        self.key = uuid.uuid4().hex
        self.blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def value(self) -> Any:
        """The context, unpickled on this worker's first task of the call."""
        try:
            value = _context_cache[self.key]
        except KeyError:
            value = pickle.loads(self.blob)
            _context_cache[self.key] = value
            while len(_context_cache) > CONTEXT_CACHE_SIZE:
                _context_cache.popitem(last=False)
        else:
            _context_cache.move_to_end(self.key)
        return value

    def __getstate__(self) -> tuple[str, bytes]:
        return self.key, self.blob

    def __setstate__(self, state: tuple[str, bytes]) -> None:
        self.key, self.blob = state


def _call_with_context(function: Callable, context: TaskContext, *args: Any) -> Any:
    return function(context.value(), *args)


def with_context(function: Callable, context: TaskContext) -> Callable:
    """``function(context_value, *args)`` as a picklable callable of ``*args`` for a pool.

    ``function`` must be a module-level function (pickled by name).
    """
    return partial(_call_with_context, function, context)


# --------------------------------------------------------------------------- parent side
class _ChildStart:
    """While a child starts from this thread: SIGINT blocked and one BLAS thread in the
    environment it inherits.

    SIGINT: the child inherits the mask, so a Ctrl-C during its start-up stays pending there
    until it ignores SIGINT (then it is discarded), instead of a traceback from its imports. In
    this process the signal is taken by another thread or stays pending until the block ends:
    it is never lost.

    Threads: a spawned child re-imports the parent's main module before :func:`_start_worker`
    runs, and a user's script or a benchmark imports numpy there, so the variables
    :func:`_start_worker` sets would come too late; set in the environment the child starts
    with, they hold from its first import. (Two workers with a two-thread BLAS each on two cores
    ran the input-splitting search at half the speed of one process.) This process keeps its
    own threads: its BLAS read the variables when it loaded.
    """

    def __enter__(self) -> None:
        self.saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
        for name in _THREAD_VARIABLES:
            os.environ[name] = "1"
        if _CAN_BLOCK:
            self.previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def __exit__(self, *exc: object) -> None:
        if _CAN_BLOCK:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.previous)
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Pool(ProcessPoolExecutor):
    """A spawn pool whose workers start with :func:`_start_worker` and SIGINT blocked."""

    def __init__(self, jobs: int) -> None:
        super().__init__(
            max_workers=jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_pool_worker,
            initargs=(_StartedFrom(),),
        )

    def submit(self, fn, /, *args, **kwargs):  # noqa: D102 - ProcessPoolExecutor.submit
        with _ChildStart():  # a worker may be spawned here
            return super().submit(fn, *args, **kwargs)

    def worker_pids(self) -> list[int]:
        """Pids of the workers started so far."""
        return list((self._processes or {}).keys())


def worker_pool(jobs: int) -> concurrent.futures.Executor:
    """The run's process pool with ``jobs`` workers (started on demand), shared by every caller.

    Created on first use and reused until :func:`shutdown_pools`; a pool broken by a dead
    worker (e.g. killed by the out-of-memory killer) is replaced. Callers check
    :func:`can_start_workers` first and use ``jobs >= 2``.
    """
    if jobs < 2:
        raise ValueError(f"a worker pool needs jobs >= 2, got {jobs}")
    if not can_start_workers():
        raise RuntimeError("a daemonic process may not start workers (check can_start_workers)")
    _forget_inherited()
    pool = _pools.get(jobs)
    if pool is not None and getattr(pool, "_broken", False):
        pool.shutdown(wait=False, cancel_futures=True)
        pool = None
    if pool is None:
        pool = _pools[jobs] = _Pool(jobs)
    return pool


def start_process(target: Callable, args: tuple) -> multiprocessing.process.BaseProcess:
    """Start ``target(*args)`` in a spawned process with the guarantees of the pool's workers.

    Not daemonic (a daemonic process may not start children of its own); its owner ends it,
    and :func:`shutdown_pools` kills it if it is still running. ``target`` must be a
    module-level function.
    """
    if not can_start_workers():
        raise RuntimeError("a daemonic process may not start workers (check can_start_workers)")
    _forget_inherited()
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=_run_process, args=(_StartedFrom(), target, args))
    with _ChildStart():
        process.start()
    _processes[:] = [p for p in _processes if p.exitcode is None]
    _processes.append(process)
    return process


def shutdown_pools(kill: bool = False) -> None:
    """End the run's pools and background processes.

    ``kill=False`` (the normal end): cancel queued tasks, wait for the workers to exit, and
    terminate background processes still running. ``kill=True`` (SIGINT/SIGTERM): SIGKILL every
    worker and background process now, without waiting or taking a lock, so it is safe in a
    signal handler; the pools are forgotten (their threads notice the dead workers and end).
    """
    if os.getpid() != _owner_pid:
        return
    pools = list(_pools.values())
    _pools.clear()
    processes = list(_processes)
    _processes.clear()
    if kill:
        pids = [pid for pool in pools for pid in pool.worker_pids()]
        pids += [p.pid for p in processes if p.pid is not None and p.exitcode is None]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # already gone
        return
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)
    for process in processes:
        if process.exitcode is None:
            process.terminate()
            process.join(timeout=10.0)


def _forget_inherited() -> None:
    """A forked copy of this module must not use (or kill) its parent's pools and processes."""
    global _owner_pid
    if os.getpid() != _owner_pid:
        _pools.clear()
        _processes.clear()
        _owner_pid = os.getpid()
