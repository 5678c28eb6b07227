"""Shared fixtures: the reference scaling-law data beside the checkout (skip when absent), and
one torch thread for the trainer and study tests."""

from __future__ import annotations

from collections.abc import Iterator
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


@pytest.fixture(autouse=True)
def one_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Trainer and study tests train tiny models: extra intra-op threads only contend with other
    work on the machine (a 2-thread run on a busy 2-core machine is several times slower). The
    planner tests never import torch."""
    if request.path.parent.name not in ("trainer", "studies"):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
