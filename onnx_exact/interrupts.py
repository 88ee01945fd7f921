"""How a run ends on SIGINT/SIGTERM: one line, the documented exit code, nothing half-written.

Two obstacles stand between a signal and a prompt, clean exit.

HiGHS (highspy 1.16) runs Python callbacks during a solve and swallows any exception raised in
them: a ``KeyboardInterrupt`` raised by a signal handler while a callback runs is lost, the solve
stops with ``kSolveError``, and the run would go on. The handler therefore also records the
signal (:func:`request_interrupt`), and :func:`raise_if_interrupted`, called after every solve,
re-raises it.

A Python signal handler runs only in the main thread, between two bytecodes: while that thread is
in one long C call (a HiGHS solve, which releases the GIL but calls back into Python only every
second or so, if at all, or a large onnxruntime batch) the handler waits for it. The command's
entry point therefore also calls :func:`end_on_signals`: a thread woken by the signal itself
(``signal.set_wakeup_fd``) kills the worker processes at once
(:func:`onnx_exact.parallel.shutdown_pools`) and, if the process is still alive
:data:`INTERRUPT_GRACE_SECONDS` later, prints the interruption's line and ends it with the
documented code. Nothing is written before verification, so nothing is left half-written by that
exit; the line is printed once (:func:`claim_interrupt_report`).

This module imports only the standard library and :mod:`onnx_exact.parallel`, so the command line
can install its handlers before onnx, onnxruntime or highspy are loaded.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

from onnx_exact import parallel

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
    See the module docstring.
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
