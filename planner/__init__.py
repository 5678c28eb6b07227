"""Scaling-law planning: published laws, fits to your own runs, compute-optimal allocation.

Pure numerics (numpy, scipy, pandas, matplotlib); never imports torch, ray or optuna.

>>> from planner import compute_optimal, published_law
>>> row = compute_optimal(published_law("hoffmann2022"), [5.76e23])[0]
>>> round(row["n_params"] / 1e9)
40
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from planner.errors import InputError

if TYPE_CHECKING:
    from planner.allocate import (
        compute_optimal,
        frontier,
        inference_budget_optimal,
        inference_optimal,
    )
    from planner.fit import FitResult, fit_law
    from planner.hardware import gpu_hours_to_flops
    from planner.isoflop import IsoflopResult, fit_isoflop
    from planner.laws import FORMS
    from planner.published import PUBLISHED, Law, load_law, published_law, save_law
    from planner.runs import Runs, load_runs

# Public names and the module that defines each; imported on first use so that `import planner`
# (and the CLI's --help) stays fast.
_EXPORTS = {
    "compute_optimal": "planner.allocate",
    "frontier": "planner.allocate",
    "inference_optimal": "planner.allocate",
    "inference_budget_optimal": "planner.allocate",
    "FitResult": "planner.fit",
    "fit_law": "planner.fit",
    "gpu_hours_to_flops": "planner.hardware",
    "IsoflopResult": "planner.isoflop",
    "fit_isoflop": "planner.isoflop",
    "FORMS": "planner.laws",
    "PUBLISHED": "planner.published",
    "Law": "planner.published",
    "load_law": "planner.published",
    "published_law": "planner.published",
    "save_law": "planner.published",
    "Runs": "planner.runs",
    "load_runs": "planner.runs",
}

__all__ = [
    "FORMS",
    "PUBLISHED",
    "FitResult",
    "InputError",
    "IsoflopResult",
    "Law",
    "Runs",
    "compute_optimal",
    "fit_isoflop",
    "fit_law",
    "frontier",
    "gpu_hours_to_flops",
    "inference_budget_optimal",
    "inference_optimal",
    "load_law",
    "load_runs",
    "published_law",
    "save_law",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'planner' has no attribute {name!r}")
