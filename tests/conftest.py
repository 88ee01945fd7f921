"""Shared test configuration: where the third-party models are, and the in-process command line.

The shared models (ACAS Xu, mnistfc, the RL nets, ... with their boxes and ``manifest.json``)
live in ``../shared/models`` relative to the repository root, never at an absolute path: a
checkout elsewhere finds them beside it, or skips the tests that need them.

``run_cli`` and ``run_main`` run :func:`onnx_exact.cli.main` in the test's own process, so
monkeypatches apply; import them with ``from conftest import run_cli``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from onnx_exact.cli import main

SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
"""``../shared/models`` relative to the repository root (may be absent)."""


@pytest.fixture(scope="session")
def shared_models() -> Path:
    """The shared models folder; the test is skipped when it is absent."""
    if not SHARED_MODELS.is_dir():
        pytest.skip("../shared/models (beside the repository) is absent")
    return SHARED_MODELS


def run_cli(args: list) -> tuple[int, str, str]:
    """``main(args)`` with stdout and stderr captured (so stderr is not a TTY).

    Returns (exit code, stdout, stderr). Arguments are passed through ``str`` (paths may be
    given as such); the exit code follows the interpreter: ``sys.exit()`` or a normal return is
    0, an exit with a non-integer value (a message) 1.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def run_main(args: list[str]) -> int:
    """The exit code of ``main(args)``, output left to pytest (read it with ``capsys``).

    Fails the test unless ``main`` ends by ``SystemExit``, as the command line always does.
    """
    with pytest.raises(SystemExit) as done:
        main(args)
    return int(done.value.code or 0)
