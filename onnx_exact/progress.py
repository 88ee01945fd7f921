"""Progress of a long run: the events the analysis (or a proof) reports, and how they are shown.

A run reports :class:`ProgressEvent` values to a :data:`ProgressCallback`: where it is (layer and
tier), how far the current tier is (``done`` of ``total`` directions, samples or pieces), how many
neurons are still open and how much time is left against the limit. The command line shows them
in one of two ways (:func:`progress_display`):

* on a terminal, one live line (rich), redrawn four times a second from the latest event;
* elsewhere (CI logs, a file), one plain line on stderr every ``interval`` seconds
  (:class:`Heartbeat`; 30 s by default), printed by a timer thread from the latest event, so
  that it keeps coming while one tier runs for minutes without reporting. A run shorter than
  the interval prints nothing.

Any other job can report through the same type: the equivalence prover of ``check`` may call a
:data:`ProgressCallback` with ``phase`` naming its stage and ``open`` the output directions it
has not yet proved (``layer`` left empty). The displays here also take the shorter call
``callback(phase, done, total)`` (:func:`as_event`).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

HEARTBEAT_SECONDS = 30.0


@dataclass(frozen=True)
class ProgressEvent:
    """Where a run is, as reported by the analysis or a proof.

    Attributes
    ----------
    phase : what runs now: a tier of the analysis ("witness", "symbolic", "milp", ...), "bounds"
        for the first (cheap) pass over every layer, or a stage of a proof.
    done, total : units of the phase done and in all (directions, samples, pieces, layers);
        ``total == 0`` when the phase does not count its work.
    layer : name of the layer worked on ("" for whole-network phases).
    layer_number, layers : 1-based position of that layer among the ReLU layers, and their
        number (0 when not applicable).
    open : neurons (or, for a proof, output directions) neither proved nor refuted yet; None
        when unknown.
    elapsed : seconds since the run started.
    time_left : seconds until the run's time limit; None without a limit.
    """

    phase: str
    done: int = 0
    total: int = 0
    layer: str = ""
    layer_number: int = 0
    layers: int = 0
    open: int | None = None
    elapsed: float = 0.0
    time_left: float | None = None


ProgressCallback = Callable[[ProgressEvent], None]


def as_event(event: ProgressEvent | str, done: int = 0, total: int = 0) -> ProgressEvent:
    """The event of a call in either form: ``callback(event)`` or ``callback(phase, done, total)``.

    The renderers here accept both, so a caller that knows only a phase and a count (the
    proof's MILP tier) can report without building an event.
    """
    if isinstance(event, ProgressEvent):
        return event
    return ProgressEvent(phase=str(event), done=done, total=total)


def describe(event: ProgressEvent, since: float = 0.0, elapsed: float | None = None) -> str:
    """One line for an event, ``since`` seconds after it was reported (the clock moves on).

    ``layer relu3 (3/9) · milp 12/40 · 37 open · 95 s elapsed, 205 s left``; ``elapsed``
    replaces the event's own (a display counts from the start of the command).
    """
    parts = []
    if event.layer:
        where = f" ({event.layer_number}/{event.layers})" if event.layers else ""
        parts.append(f"layer {event.layer}{where}")
    parts.append(f"{event.phase} {event.done}/{event.total}" if event.total else event.phase)
    if event.open is not None:
        parts.append(f"{event.open} open")
    clock = f"{event.elapsed + since if elapsed is None else elapsed:.0f} s elapsed"
    if event.time_left is not None:
        clock += f", {max(event.time_left - since, 0.0):.0f} s left"
    parts.append(clock)
    return " · ".join(parts)


class Heartbeat:
    """A plain progress line on ``stream`` every ``interval`` seconds, from the latest event.

    Use as a context manager; the object itself is the callback. A timer thread wakes every
    ``interval`` seconds and prints ``onnx-exact: <describe(latest event)>`` if any event has
    arrived, so a tier that runs for minutes without reporting still shows a line per interval
    (with its elapsed time and time left moved on). Nothing is printed after the context ends.
    """

    def __init__(self, stream: TextIO | None = None, interval: float = HEARTBEAT_SECONDS) -> None:
        if not interval > 0:
            raise ValueError(f"the heartbeat interval must be positive, got {interval!r}")
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.latest: tuple[ProgressEvent, float] | None = None  # the event, when it arrived
        self.started = time.monotonic()
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._beat, name="onnx-exact-heartbeat", daemon=True)

    def __call__(self, event: ProgressEvent | str, done: int = 0, total: int = 0) -> None:
        with self.lock:
            self.latest = (as_event(event, done, total), time.monotonic())

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                latest = self.latest
            if latest is None:
                continue
            event, arrived = latest
            now = time.monotonic()
            line = f"onnx-exact: {describe(event, now - arrived, now - self.started)}"
            try:
                print(line, file=self.stream, flush=True)
            except (OSError, ValueError):  # stderr closed or a broken pipe: stop, quietly
                return


@contextmanager
def _live_line(stream: TextIO | None) -> Iterator[ProgressCallback]:
    """One rich status line on a terminal, redrawn on each event and as time passes."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    latest: list[tuple[ProgressEvent, float]] = []
    started = time.monotonic()

    class _Line:
        def __rich__(self) -> Text:
            if not latest:
                return Text("")
            event, arrived = latest[-1]
            now = time.monotonic()
            return Text(describe(event, now - arrived, now - started), style="dim")

    console = Console(file=stream, stderr=stream is None)
    with Live(_Line(), console=console, refresh_per_second=4, transient=True):

        def update(event: ProgressEvent | str, done: int = 0, total: int = 0) -> None:
            latest[:] = [(as_event(event, done, total), time.monotonic())]

        yield update


@contextmanager
def progress_display(
    enabled: bool,
    tty: bool,
    *,
    interval: float = HEARTBEAT_SECONDS,
    stream: TextIO | None = None,
) -> Iterator[ProgressCallback | None]:
    """The callback that shows a run's progress, or None when ``enabled`` is false (``--quiet``).

    ``tty``: a live line (rich) on ``stream``; otherwise a :class:`Heartbeat` every ``interval``
    seconds. ``stream`` defaults to stderr, so stdout keeps only the report.
    """
    if not enabled:
        yield None
    elif tty:
        with _live_line(stream) as update:
            yield update
    else:
        with Heartbeat(stream, interval) as heartbeat:
            yield heartbeat
