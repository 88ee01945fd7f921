"""Shared test configuration: where the third-party models are.

The shared models (ACAS Xu, mnistfc, the RL nets, ... with their boxes and ``manifest.json``)
live in ``../shared/models`` relative to the repository root, never at an absolute path: a
checkout elsewhere finds them beside it, or skips the tests that need them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
"""``../shared/models`` relative to the repository root (may be absent)."""


@pytest.fixture(scope="session")
def shared_models() -> Path:
    """The shared models folder; the test is skipped when it is absent."""
    if not SHARED_MODELS.is_dir():
        pytest.skip("../shared/models (beside the repository) is absent")
    return SHARED_MODELS
