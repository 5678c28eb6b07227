"""Shared fixtures: the reference scaling-law data beside the checkout (skip when absent), and
one torch thread for the trainer and study tests; how the tests split over pytest-xdist's
processes (`make test` runs two)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

if "PYTEST_XDIST_WORKER" in os.environ:
    # several test processes share the cores: one thread each, and for the notebook kernels and
    # subprocesses they start (read by torch at import, so before anything imports it)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

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


# Modules that start a local Ray cluster: one process runs them all, one after another (two
# clusters started side by side on one machine would compete for its cores and ports).
RAY_MODULES = {
    "test_backend_contract.py",
    "test_ray_backend.py",
    "test_ray_pbt.py",
    "test_ray_train.py",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """xdist groups (`--dist loadgroup`): a module's tests stay in one process, so its
    module-scoped fixtures are built once; each notebook is a group of its own, the longest
    units of work, and they come first."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        module = item.nodeid.split("::")[0]
        name = Path(module).name
        group = "ray" if name in RAY_MODULES else item.nodeid if "e2e" in module else module
        item.add_marker(pytest.mark.xdist_group(group))
