"""Every path a run writes, checked against every path it reads before any analysis starts.

A run reads its model file(s), their external data files and the domain files (``--vnnlib``,
``--input-range-file``); it writes the output model, the data file the writer puts beside it, and
the JSON report / counterexample. The rule (``docs/reliability.md``, "Paths the run writes"):

* every written path is a *different file* from every read path and from every other written
  path: compared by ``os.path.realpath`` and, for files that exist, by device and inode (so a
  symbolic link or a hard link to an input is caught too);
* every written path is a regular file or absent (never a directory, FIFO, device or socket: the
  atomic rename would replace the special file by a regular one), and its folder exists and is
  writable; a path ending in ``/`` names a folder, never a file.

Any violation raises :class:`~onnx_exact.core.errors.UsageError` (exit 2) with one line that names the
written path, the path it collides with and what to do. The checks only ``stat`` files and parse
the model's protobuf header without its external data, so they run before the (long) analysis:
a doomed run fails in milliseconds instead of after the analysis, and no input is ever clobbered.

``-`` as a report path means standard output: no file, nothing to check.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx
from onnx import external_data_helper

from onnx_exact.core.errors import UsageError
from onnx_exact.io.graph import all_tensors
from onnx_exact.io.staging import external_data_path

STDOUT = "-"
"""A report path that means standard output."""


@dataclass(frozen=True)
class RunPath:
    """One file a run reads or writes.

    Attributes
    ----------
    path : the path as the user gave it (messages quote it unchanged).
    noun : how a message names it as the object of a clash, e.g. ``the input model``.
    subject : how a message names it as the written path, e.g. ``--json`` (writes only).
    """

    path: str
    noun: str
    subject: str = ""


@dataclass(frozen=True)
class RunPaths:
    """The checked plan of a run: the files it reads and the files it will write."""

    reads: tuple[RunPath, ...]
    writes: tuple[RunPath, ...]


def plan_run_paths(
    *,
    models: Sequence[tuple[str, str | os.PathLike | onnx.ModelProto | None]] = (),
    domain_files: Sequence[tuple[str, str | os.PathLike | None]] = (),
    output_model: str | os.PathLike | None = None,
    outputs: Sequence[tuple[str, str | os.PathLike | None]] = (),
) -> RunPaths:
    """Collect the run's read and written paths and refuse any clash before the analysis.

    Parameters
    ----------
    models : ``(noun, source)`` of each model read, e.g. ``("the input model", "in.onnx")``. An
        in-memory ``ModelProto`` or ``None`` reads no file. The external data files named by the
        model's tensors (``location``, relative to the model's folder) are reads too.
    domain_files : ``(option, path)`` of the domain files read, e.g. ``("--vnnlib", "p.vnnlib")``.
    output_model : the compressed model's path. Its data file (:func:`external_data_path`) is
        reserved as a write as well: whether the writer stores tensors externally (as the input
        did, or because the model exceeds protobuf's 2 GiB) is known only after the analysis.
    outputs : ``(option, path)`` of the other files written (``--json``, ``--counterexample``,
        ...); ``None`` and ``-`` (standard output) write no file.

    Returns
    -------
    RunPaths : the reads and the writes, in the order given; empty, and nothing checked, when a
        model path is not an existing file (reading it fails first, with the reader's message,
        before anything is written).

    Raises
    ------
    UsageError : a written path is a directory, FIFO, device or socket, ends in ``/``, lies in a
        missing or unwritable folder, or is the same file as a read path or another written path.
    """
    sources = [(n, os.fspath(s)) for n, s in models if isinstance(s, (str, os.PathLike))]
    if not all(os.path.isfile(path) for _, path in sources):
        # Reading that model fails before anything is written, with the reader's own message.
        return RunPaths(reads=(), writes=())
    reads: list[RunPath] = []
    for noun, path in sources:
        reads.append(RunPath(path, noun))
        reads.extend(RunPath(data, f"{noun}'s external data") for data in external_data_files(path))
    reads.extend(RunPath(os.fspath(p), f"the {option} file") for option, p in domain_files if p)

    writes: list[RunPath] = []
    if output_model is not None:
        if not os.fspath(output_model):  # '' names no file (its data file's name would be '.data')
            raise UsageError("output path '' is empty: give a file name")
        if os.fspath(output_model) == STDOUT:  # a model with external data cannot go to a pipe
            raise UsageError("output path '-': the model is written to a file; give a file name")
        output = RunPath(os.fspath(output_model), "the output model", "output path")
        _check_target(output)  # first: its data file's name needs a file name ('.' has none)
        data = os.fspath(external_data_path(output.path))
        writes.append(output)
        writes.append(RunPath(data, "the output model's data file", "the output model's data file"))
    for option, p in outputs:
        if p is not None and not os.fspath(p):  # `--json "$REPORT"` with REPORT unset
            raise UsageError(f"{option} '' is empty: give a file name, or - for standard output")
        if p is not None and os.fspath(p) != STDOUT:
            writes.append(RunPath(os.fspath(p), f"the {option} file", option))

    for written in writes:
        _check_target(written)
    for index, written in enumerate(writes):
        for other in reads + writes[:index]:
            if _same_file(written.path, other.path):
                # the data file's name follows the output's: renaming the output is the fix
                what = (
                    "output path" if written.noun == "the output model's data file" else "file name"
                )
                raise UsageError(
                    f"{written.subject} '{written.path}' is {other.noun} '{other.path}': "
                    f"choose another {what}"
                )
    return RunPaths(reads=tuple(reads), writes=tuple(writes))


def numpy_save_path(path: str | os.PathLike) -> str:
    """The file ``np.save(path, ...)`` writes: it appends ``.npy`` unless the name ends with it."""
    path = os.fspath(path)
    return path if path.endswith(".npy") else f"{path}.npy"


def write_file_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Have ``write(temporary)`` fill a temporary file beside ``path``, then rename it to ``path``.

    The rename is atomic: a reader sees the old file or the complete new one, never a truncated
    report, and an interrupted or failed write leaves no temporary file and the old file intact.
    The file gets the mode a plain ``open(path, "w")`` would give it (``0o666`` minus the umask).
    ``path`` ``-`` writes the (text) file to standard output instead.

    Raises
    ------
    UsageError : the file cannot be written (the message names ``path``).
    """
    path = os.fspath(path)
    if path == STDOUT:
        with tempfile.TemporaryDirectory() as scratch:
            temporary = os.path.join(scratch, "stdout")
            write(temporary)
            with open(temporary, encoding="utf-8") as stream:
                sys.stdout.write(stream.read())
        sys.stdout.flush()
        return
    folder = os.path.dirname(os.path.abspath(path))
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder
        )
        os.close(handle)
        write(temporary)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
        temporary = None
    except OSError as exc:
        raise UsageError(
            f"{path}: cannot write it ({exc.strerror or exc}); choose a writable path"
        ) from None
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.remove(temporary)


def external_data_files(model_path: str | os.PathLike) -> list[str]:
    """The external data files a model file refers to (paths resolved against its folder).

    Only the protobuf is parsed (``load_external_data=False``), and only when the file contains
    the bytes ``location`` at all; a file that does not parse as ONNX or cannot be read has none
    (the reader reports that problem with its own message). Locations are resolved against the
    folder of the path *as given* (not of a symbolic link's target), as ``onnx.load`` and the
    reader do. The result is cached per (path, size, mtime): the CLI and the pipeline both
    asking cost one parse.
    """
    path = os.fspath(model_path)
    try:
        info = os.stat(path)
    except OSError:
        return []
    if not stat.S_ISREG(info.st_mode):
        return []
    locations = _external_data_locations(os.path.abspath(path), info.st_size, info.st_mtime_ns)
    return [os.path.join(os.path.dirname(path), location) for location in locations]


@functools.lru_cache(maxsize=8)
def _external_data_locations(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    """The distinct ``location`` entries of the model's external tensors, in order."""
    if not _mentions_location(path):
        return ()
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX / unreadable: the reader says why, with context
        return ()
    found: dict[str, None] = {}
    for tensor in all_tensors(model, sparse=True):
        if external_data_helper.uses_external_data(tensor):
            location = external_data_helper.ExternalDataInfo(tensor).location
            if location:
                found[location] = None
    return tuple(found)


def _mentions_location(path: str) -> bool:
    """Whether the file's bytes contain ``location``, the key every external tensor must store.

    A tensor's external data is found through the literal key ``location`` in its
    ``external_data`` entries, so a file without these bytes has no external data and need not
    be parsed: a scan of a memory map instead of a second protobuf parse of a large inline model
    (the reader parses it once more anyway).
    """
    try:
        with (
            open(path, "rb") as stream,
            mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as m,
        ):
            return m.find(b"location") >= 0
    except (OSError, ValueError):  # unreadable or empty: the reader reports it
        return False


def _names_a_file(path: str) -> bool:
    return not path.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep))


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _check_target(written: RunPath) -> None:
    """A written path must name a regular file or nothing, in an existing writable folder."""
    path, subject = written.path, written.subject
    if not _names_a_file(path):
        if os.path.isdir(path):
            raise UsageError(f"{subject} '{path}' is a directory: give a file name in it")
        raise UsageError(
            f"{subject} '{path}' ends with '/' (a folder) and no such folder exists: "
            "give a file name, and create its folder first"
        )
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # absent, or its folder is not a folder
        mode = None
    except OSError as exc:
        raise UsageError(
            f"{subject} '{path}': cannot use it ({exc.strerror}); choose another path"
        ) from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise UsageError(f"{subject} '{path}' is {kind}, not a regular file: give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        problem = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise UsageError(
            f"{subject} '{path}': folder '{folder}' {problem}; create it or choose another path"
        )
    if not os.access(folder, os.W_OK):
        what = "the model" if written.noun == "the output model" else "it"
        raise UsageError(
            f"{subject} '{path}': cannot write {what} (folder '{folder}' is not writable); "
            "choose a writable path"
        )


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: same resolved path, or same device and inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): different resolved paths, different files
        return False
