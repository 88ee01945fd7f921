"""The code base stays ruff-clean (lint and format), checked in CI like any other test."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["onnx_exact", "tests", "bench", "models"]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff(command: list[str]) -> None:
    targets = [t for t in TARGETS if (ROOT / t).exists()]
    proc = subprocess.run(
        ["ruff", *command, *targets], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
