"""The ``onnx-exact`` command's entry point (also ``python -m onnx_exact``).

Why a separate entry point: :mod:`onnx_exact.cli` imports onnx, onnxruntime, highspy and numpy,
which take one to several seconds (over a minute on an overloaded machine). A SIGINT or SIGTERM in
that window would otherwise print a ``KeyboardInterrupt`` traceback from deep inside an import.
This module imports nothing heavy (:mod:`onnx_exact.interrupts` needs only the standard library):
it installs handlers that print the command's one-line message and exit with the documented code
(130 for SIGINT, 143 for SIGTERM; nothing has been written yet), then hands over to
:func:`onnx_exact.cli.main`, which installs its own handlers for the run. From then on a thread
also watches for those signals (:func:`onnx_exact.interrupts.end_on_signals`): the worker
processes are killed at once, and a main thread stuck in a long solve cannot keep the process
alive for more than about a second.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

from onnx_exact.interrupts import INTERRUPT_EXIT_CODES, end_on_signals, interrupt_requested


def _exit_during_start_up(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    print(f"onnx-exact: interrupted ({name}) while starting; no output written", file=sys.stderr)
    raise SystemExit(INTERRUPT_EXIT_CODES[signum])


def main() -> None:
    """Install the start-up signal handlers, then run the command line."""
    for signum in INTERRUPT_EXIT_CODES:
        signal.signal(signum, _exit_during_start_up)
    from onnx_exact.cli import main as cli_main

    end_on_signals()
    try:
        cli_main()
    except SystemExit as end:
        if interrupt_requested() is None:
            raise
        # Ended by a signal: leave now, with the signal's code. The interpreter's own exit
        # would turn it into a death by SIGINT (exit -2) when the KeyboardInterrupt passed
        # through code that extension modules run with PyRun_String (pybind11's exec/eval, as
        # in an import the signal interrupted): CPython then flags it unhandled even though it
        # was caught. Nothing is left to write: the run wrote nothing and cleaned up while
        # unwinding, and its workers are killed; the exit handlers still run (multiprocessing
        # releases its semaphores there).
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(end.code if isinstance(end.code, int) else 1)


if __name__ == "__main__":
    main()
