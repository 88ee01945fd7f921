"""Guards on what one run may consume: memory (estimated before the work starts) and interruption.

Memory
------
A run must either finish or say up front that it cannot: an out-of-memory kill by the operating
system leaves no message and, worse, may look like a hang. :func:`estimate_peak_memory` predicts the
peak resident set from the layer sizes alone, before any array is allocated, and
:func:`check_memory` turns an estimate above the user's limit (``--max-memory``) into a
:class:`~onnx_exact.errors.ResourceError` that names the limit, the estimate, the dominant phase and
the fix.

The estimate follows the phases of :func:`onnx_exact.pipeline.compress`; they run one after the
other, so the peak is what stays resident during the whole run plus the largest phase::

    peak = interpreter + resident + max(sampling, symbolic, lp, verify)

with ``P`` parameters, ``n_0`` inputs, ``n_k`` units in layer ``k`` and ``s`` = stored bytes per
weight (4 for float32):

* ``resident``: the loaded model and its edited copy (``2 s P``), the float64 network and the
  reduced one (``16 P``);
* ``sampling``: the witness inputs (``m n_0`` doubles for ``m`` samples, twice: samples and their
  corners) and one forward-pass chunk of activations (``witness._CHUNK_VALUES`` doubles, three
  live copies);
* ``symbolic``: for the widest layer, the bound vertices (``2 n_k n_0`` doubles) and one block of
  back-substitution coefficients (``2 B max_j n_j`` doubles, four live copies, ``B`` rows a block);
* ``lp``: the triangle relaxation of the layers below the last hidden layer, ``nnz`` matrix
  entries at ``LP_BYTES_PER_NONZERO`` (HiGHS keeps the model, its row- and column-wise copies, a
  scaled copy and the factorisation or interior-point workspace; the cut tier adds dense rows),
  plus what runs beside it: ``CROWN_BAB_BYTES`` for the CROWN branch and bound (its caps) and
  the decision MILP of that layer, its model at ``LP_BYTES_PER_NONZERO`` per entry again and a
  full cut pool, ``MILP_CUT_POOL`` cuts each as long as the MILP has columns (``n_0`` inputs and
  three per neuron below the layer), at ``MILP_BYTES_PER_CUT_ENTRY``. The two are summed, not
  maxed: in measured runs that reached the MILP tier the peak exceeded the larger by about the
  branch and bound's store (freed heap the MILP's allocations did not reuse);
* ``verify``: two onnxruntime sessions (each holds the weights once more, pre-packed: ``2 s P``)
  and a chunk of samples.

The LP constants were calibrated on the synthetic 3072-2048-2048-10 model of
``bench/large_model.py``, the MILP ones on the ℓ1-free MNIST zoo nets and mnistfc (see
``docs/reliability.md`` for estimates against measured peak RSS).

Interruption
------------
HiGHS (highspy 1.16) runs Python callbacks during a solve and swallows any exception raised in them;
a ``KeyboardInterrupt`` raised by a signal handler while a callback runs is lost, the solve stops
with ``kSolveError``, and the run would go on. :func:`request_interrupt` records the signal so
that :func:`raise_if_interrupted`, called after every solve, re-raises it.

A Python signal handler runs only in the main thread, between two bytecodes: while that thread is
in one long C call (a HiGHS solve, which releases the GIL but calls back into Python only every
second or so, if at all, or a large onnxruntime batch) the handler waits for it. The command's
entry point therefore also calls :func:`end_on_signals`: a thread woken by the signal itself
(``signal.set_wakeup_fd``) kills the worker processes at once (:func:`onnx_exact.parallel.
shutdown_pools`) and, if the process is still alive :data:`INTERRUPT_GRACE_SECONDS` later, prints
the interruption's line and ends it with the documented code. Nothing is written before
verification, so nothing is left half-written by that exit; the line is printed once
(:func:`claim_interrupt_report`).

Allocator
---------
The bound and attack tiers build many short-lived arrays of one to a few MiB per numpy
operation. glibc serves them from fresh ``mmap`` pages or trims them off the heap top once freed,
so every such temporary pays its page faults again: ``c + sign(λ) r`` on a 252x784 float64 array
took 3.1 ms instead of 0.5 ms, and one CROWN branch and bound (MNIST 5x100 ℓ1 = 3e-4, third
layer, neuron 22) 13.7 s instead of 9.5 s. :func:`retain_freed_heap` raises glibc's thresholds so
that freed blocks are reused.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from onnx_exact import parallel
from onnx_exact.core.errors import ResourceError, UsageError
from onnx_exact.core.network import Network

#: Resident size of the interpreter with numpy, onnx, onnxruntime, highspy, typer and rich loaded.
INTERPRETER_BYTES = 90 * 2**20
#: HiGHS memory per constraint-matrix entry of the LP tiers (model, row- and column-wise copies,
#: scaled copy, factorisation or interior-point workspace, and the ideal-cut rows added to it),
#: measured on the 3072-2048-2048-10 benchmark with the LP and cut tiers running for 300 s.
LP_BYTES_PER_NONZERO = 160
#: What the CROWN branch and bound adds while the LP relaxation is alive: its open-node store and
#: one batch's working memory (``relu_bab.STORE_BYTES + relu_bab.BATCH_BYTES``).
CROWN_BAB_BYTES = 96 * 2**20
#: ``milp.MILP_CUT_POOL``: the cut-pool soft limit of a decision MILP, which bounds how far its
#: memory grows (with HiGHS's default pool of 10,000 and its sub-MIP heuristics one 240 s MILP grew
#: to twice as much, see ``docs/reliability.md``).
MILP_CUT_POOL = 2000
#: HiGHS memory per entry of a full cut pool of a decision MILP (the pool, its rows in the LP, the
#: search tree that grows meanwhile). One 120 s MILP alone (MNIST 5x100 ℓ1 = 0, fourth layer,
#: 1,684 columns, 100,800 entries) grew by 143 MiB, 40 bytes per entry; 56 makes the estimate
#: bound the three whole runs measured with the MILP tier (auto peak, ``bench/stability.py``):
#: 5x100 ℓ1 = 0 374 MiB (estimate 434), 4x100 ℓ1 = 0 310 MiB (399), mnistfc 256x2 prop_1_0.05
#: 419 MiB (420).
MILP_BYTES_PER_CUT_ENTRY = 56
#: Float64 values in one forward-pass chunk of the witness tier (``witness._CHUNK_VALUES``).
SAMPLING_CHUNK_VALUES = 4_000_000
#: Rows per back-substitution block of the symbolic bounds (``bounds._ROW_BLOCK``).
SYMBOLIC_ROW_BLOCK = 512
#: Witness sample count: about 2e9 multiply-accumulates, clamped (``stability`` sampling policy).
SAMPLE_MACS, SAMPLE_MIN, SAMPLE_MAX = 2e9, 256, 8192
#: Verification samples per onnxruntime chunk (``verify.CHUNK_SAMPLES``).
VERIFY_CHUNK_SAMPLES = 512

_DOUBLE = 8
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(
    r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE
)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak resident memory of a compress run, in bytes, with its parts.

    Attributes
    ----------
    resident : bytes held for the whole run (interpreter, models, float64 networks).
    phases : bytes each phase adds on top of ``resident`` while it runs.
    """

    resident: int
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def peak_phase(self) -> str:
        """The phase that sets the peak."""
        return max(self.phases, key=self.phases.__getitem__)

    @property
    def total(self) -> int:
        """``resident + max(phases)``: phases run one after the other, never together."""
        return self.resident + max(self.phases.values(), default=0)

    def describe(self) -> str:
        """One line: the total, then the resident part and each phase, largest phase first."""
        parts = ", ".join(
            f"{name} {format_bytes(size)}"
            for name, size in sorted(self.phases.items(), key=lambda item: -item[1])
        )
        return f"{format_bytes(self.total)} (resident {format_bytes(self.resident)}; {parts})"


def estimate_peak_memory(
    net: Network, *, stored_bytes_per_weight: int = 4, lp: bool = True
) -> MemoryEstimate:
    """Predict the peak resident memory of compressing ``net`` (see the module docstring).

    Parameters
    ----------
    net : the network the reader extracted.
    stored_bytes_per_weight : bytes per parameter in the ONNX file (4 for float32, 8 for float64,
        2 for float16).
    lp : whether the solver tiers may run (``False`` for an analysis limited to bounds).

    Returns
    -------
    The estimate; :attr:`MemoryEstimate.total` is the number to compare with a limit.
    """
    params = net.param_count
    widths = [net.in_features] + [layer.out_features for layer in net.layers]
    resident = INTERPRETER_BYTES + 2 * stored_bytes_per_weight * params + 2 * _DOUBLE * params

    samples = int(min(max(SAMPLE_MACS / max(net.mac_count, 1), SAMPLE_MIN), SAMPLE_MAX))
    sampling = _DOUBLE * (2 * samples * net.in_features + 3 * SAMPLING_CHUNK_VALUES)

    hidden = [k for k in net.relu_layer_indices if k < len(net.layers) - 1] or [0]
    widest = max(widths[k + 1] for k in hidden)
    block = min(SYMBOLIC_ROW_BLOCK, widest)
    symbolic = _DOUBLE * (2 * widest * net.in_features + 4 * 2 * block * max(widths))

    phases = {"sampling": sampling, "symbolic": symbolic}
    if lp:
        # The deepest LP (for the last hidden layer) encodes every layer below it: their weight
        # matrices plus the triangle rows (about six more entries per unstable unit).
        deepest = hidden[-1]
        nonzeros = sum(net.layers[j].weight.size + 6 * widths[j + 1] for j in range(deepest))
        columns = net.in_features + 3 * sum(widths[1 : deepest + 1])
        model = LP_BYTES_PER_NONZERO * nonzeros  # held twice: the relaxation and the MILP
        cut_pool = MILP_BYTES_PER_CUT_ENTRY * MILP_CUT_POOL * columns
        phases["lp"] = 2 * model + CROWN_BAB_BYTES + cut_pool

    chunk = VERIFY_CHUNK_SAMPLES * (2 * net.in_features + 2 * sum(widths[1:]))
    phases["verify"] = 2 * 2 * stored_bytes_per_weight * params + stored_bytes_per_weight * chunk
    return MemoryEstimate(resident=int(resident), phases={k: int(v) for k, v in phases.items()})


def check_memory(
    net: Network,
    limit_bytes: int,
    *,
    stored_bytes_per_weight: int = 4,
    lp: bool = True,
    source: str = "--max-memory",
) -> MemoryEstimate:
    """Refuse a run whose estimated peak exceeds ``limit_bytes``; return the estimate otherwise.

    Raises
    ------
    ResourceError
        The estimate is above the limit; the message gives both numbers, the phase that sets the
        peak and what to do (raise the limit, analyse a smaller model, or cap the time instead).
    """
    estimate = estimate_peak_memory(net, stored_bytes_per_weight=stored_bytes_per_weight, lp=lp)
    if estimate.total > limit_bytes:
        widths = "-".join(str(w) for w in [net.in_features, *(x.out_features for x in net.layers)])
        raise ResourceError(
            f"{source} {format_bytes(limit_bytes)}: the {widths} network needs an estimated "
            f"{estimate.describe()}, mostly in {estimate.peak_phase}; raise {source} to at least "
            f"{format_bytes(_round_up(estimate.total))} or run on a machine with more memory"
        )
    return estimate


def memory_shortfall_note(net: Network, *, stored_bytes_per_weight: int = 4) -> str | None:
    """A warning when the estimated peak exceeds the memory this process may still use, else None.

    For runs without ``--max-memory``: they are not refused (the estimate is conservative), but an
    out-of-memory kill would come without a message, so the user hears about the risk first.
    None where the available memory cannot be read (non-Linux).
    """
    available = available_memory_bytes()
    if available is None:
        return None
    estimate = estimate_peak_memory(net, stored_bytes_per_weight=stored_bytes_per_weight)
    if estimate.total <= available:
        return None
    return (
        f"estimated peak memory {format_bytes(estimate.total)} (mostly {estimate.peak_phase}) "
        f"exceeds the {format_bytes(available)} available: the operating system may stop the "
        "run; pass --max-memory to refuse such runs up front, or cap the work with --time-limit"
    )


def parse_memory_size(text: str, source: str = "--max-memory") -> int:
    """Bytes from a size such as ``4G``, ``512MiB``, ``2.5GB`` or ``1073741824`` (binary units).

    Raises
    ------
    UsageError
        The text is not a positive size.
    """
    match = _SIZE.match(text)
    if match is None:
        raise UsageError(f"{source} {text!r}: expected a size such as 512M, 4G or 4GiB")
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if not value >= 1:
        raise UsageError(f"{source} {text!r}: the limit must be at least one byte")
    return int(value)


def available_memory_bytes() -> int | None:
    """Memory this process may still use: the cgroup limit or ``MemAvailable``, whichever is lower.

    Returns None where neither can be read (non-Linux); callers then skip the automatic guard.
    """
    candidates = []
    try:
        with open("/proc/meminfo", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            with open(limit_file, encoding="ascii") as stream:
                limit = stream.read().strip()
            with open(usage_file, encoding="ascii") as stream:
                usage = int(stream.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            candidates.append(max(int(limit) - usage, 0))
        break
    return min(candidates) if candidates else None


def format_bytes(size: float) -> str:
    """``1536 -> '1.5 KiB'``: binary units, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.3g} {unit}"
        size /= 1024
    return f"{size:.3g} TiB"


def _round_up(size: int) -> int:
    """``size`` rounded up to two significant binary digits of MiB, for a limit to suggest."""
    mib = math.ceil(size / 2**20)
    step = 2 ** max(int(math.log2(mib)) - 3, 0)
    return math.ceil(mib / step) * step * 2**20


INTERRUPT_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""Exit codes of a run ended by a signal (128 + the signal's number, like a shell)."""
INTERRUPT_GRACE_SECONDS = 1.0
"""How long the main thread has after SIGINT/SIGTERM to end by itself (unwinding its clean-up)
before :func:`end_on_signals` ends the process."""


class _Interrupt:
    signum: int | None = None
    reported = False
    report_lock = threading.Lock()
    watching = False


def request_interrupt(signum: int) -> None:
    """Record that SIGINT/SIGTERM arrived (call it from the signal handler before raising)."""
    _Interrupt.signum = signum


def interrupt_requested() -> int | None:
    """The signal recorded by :func:`request_interrupt`, or None."""
    return _Interrupt.signum


def clear_interrupt() -> None:
    """Forget a recorded signal (at the start of a new run in the same process)."""
    _Interrupt.signum = None
    _Interrupt.reported = False


def interrupted_message(signum: int) -> str:
    """The command's one line for a run ended by ``signum``."""
    return f"onnx-exact: interrupted ({signal.Signals(signum).name}); no output written"


def claim_interrupt_report() -> bool:
    """True for the first caller only: it prints the interruption's line (so there is one)."""
    with _Interrupt.report_lock:
        first, _Interrupt.reported = not _Interrupt.reported, True
    return first


def end_on_signals(report: Callable[[int], None] | None = None) -> None:
    """End the process within :data:`INTERRUPT_GRACE_SECONDS` of SIGINT/SIGTERM, whatever runs.

    For the command's entry point only (an interactive Python session must not be ended by its
    Ctrl-C): call it from the main thread once the run's signal handlers are installed; once per
    process. ``report(signum)`` prints the line (default: :func:`interrupted_message` on stderr).
    See "Interruption" in the module docstring.
    """
    if _Interrupt.watching or threading.current_thread() is not threading.main_thread():
        return
    read, write = os.pipe()
    try:
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except (OSError, ValueError):  # a platform without it (Windows wants a socket): no watcher
        os.close(read)
        os.close(write)
        return
    _Interrupt.watching = True
    threading.Thread(
        target=_watch_signals,
        args=(read, report or _print_interrupted),
        name="onnx-exact-signals",
        daemon=True,
    ).start()


def _print_interrupted(signum: int) -> None:
    print(interrupted_message(signum), file=sys.stderr)


def _watch_signals(read: int, report: Callable[[int], None]) -> None:
    while True:
        signum = os.read(read, 1)[0]
        if signum in INTERRUPT_EXIT_CODES:
            break
    parallel.shutdown_pools(kill=True)  # the workers first: nothing waits for their solves
    threading.Event().wait(INTERRUPT_GRACE_SECONDS)
    if claim_interrupt_report():
        report(signum)
    else:  # the main thread reported it and is ending: give its exit as long again
        threading.Event().wait(INTERRUPT_GRACE_SECONDS)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(INTERRUPT_EXIT_CODES[signum])


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if a signal was recorded; call it after every solver run.

    A solve whose callback swallowed the handler's exception returns normally (status
    ``kSolveError``): this brings the interruption back to the caller instead of treating it as a
    solver failure and carrying on.
    """
    if _Interrupt.signum is not None:
        name = signal.Signals(_Interrupt.signum).name
        raise KeyboardInterrupt(f"{name} received during a solve")


def raise_interrupt_for_signal(signum: int, frame: object) -> None:
    """A signal handler for SIGINT/SIGTERM: record the signal, then unwind like Ctrl-C."""
    request_interrupt(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


@dataclass(frozen=True)
class ChildUsage:
    """Exit code, peak resident set, CPU and wall time of one measured command."""

    exit_code: int
    peak_rss_bytes: int
    cpu_s: float
    wall_s: float
    stderr: str


# Runs the command given in argv and prints its usage as JSON. Started as a fresh interpreter
# because Linux folds the *parent's* resident size at fork time into the child's ru_maxrss: a
# command forked from a big process (pytest, a benchmark holding the model) would report the
# parent's size as its own peak. This launcher is ~10 MB, below anything it measures.
_LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
stderr = child.stderr.read().decode(errors="replace")
_, status, usage = os.wait4(child.pid, 0)
print(json.dumps({"exit_code": os.waitstatus_to_exitcode(status), "peak_rss_bytes":
    usage.ru_maxrss * 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
    "wall_s": time.perf_counter() - start, "stderr": stderr}))
"""


def measure_command(command: list[str]) -> ChildUsage:
    """Run ``command`` and measure its own peak RSS (``ru_maxrss``), CPU and wall time (Linux).

    Used by ``bench/large_model.py`` and the calibration test of :func:`estimate_peak_memory`.
    """
    launcher = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, *command], capture_output=True, text=True, check=True
    )
    return ChildUsage(**json.loads(launcher.stdout))


# --------------------------------------------------------------------------- allocator
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
#: Blocks up to this size come from the heap, not from their own ``mmap`` (glibc's default
#: starts at 128 KiB and adapts only up to 32 MiB, after a block of that size was freed).
HEAP_BLOCK_BYTES = 64 * 2**20
#: Free memory the heap keeps at its top instead of returning it to the system.
HEAP_RETAIN_BYTES = 512 * 2**20
_allocator_tuned: bool | None = None  # None: not tried yet in this process


def retain_freed_heap() -> bool:
    """Make glibc reuse freed blocks instead of returning them to the system (once per process).

    Why: see "Allocator" in the module docstring. The cost is that up to
    :data:`HEAP_RETAIN_BYTES` of freed memory stays resident until the process exits; the peak
    is not raised, since the retained blocks are what the next temporaries reuse. A no-op (False)
    where the C library has no ``mallopt`` (musl, macOS, Windows). The outcome is kept, so later
    calls cost nothing.
    """
    global _allocator_tuned
    if _allocator_tuned is None:
        try:  # the symbols already loaded into this process, libc among them
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError, TypeError):
            _allocator_tuned = False
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _allocator_tuned = bool(mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES)) and bool(
                mallopt(_M_TRIM_THRESHOLD, HEAP_RETAIN_BYTES)
            )
    return _allocator_tuned
