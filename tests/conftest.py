"""Shared fixtures: the reference scaling-law data beside the checkout (skip when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCALING_DATA = REPO.parent / "shared" / "data" / "scaling"


@pytest.fixture
def scaling_data() -> Path:
    """Folder of published scaling-law data sets; tests using it skip where it is absent."""
    if not SCALING_DATA.is_dir():
        pytest.skip(f"reference data not found at {SCALING_DATA}")
    return SCALING_DATA
