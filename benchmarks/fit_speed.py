"""Speed of planner.fit on Epoch's Chinchilla runs: batched multi-start fit vs a scipy loop.

Same run, same machine, same objective and analytic gradient:

1. the vectorised fit: ``fit_law`` with its 4500 Hoffmann starts, no bootstrap (median of repeats);
2. the baseline: a plain Python loop of ``scipy.optimize.minimize(method="L-BFGS-B")`` over the
   same 4500 starts, with the tolerances of the fit's polish step (``planner.fit.polish``), once;
3. the default fit with its 1000-resample bootstrap (median of repeats), and the bootstrap alone:
   the same fit started from its own optimum (one start, so nearly all the time is the refits).

It prints a table and a JSON record (``--json PATH`` also writes it to a file). Requirements: the
vectorised fit <= 10 s and >= 20x faster than the loop at the same optimum (1e-9 relative); the
bootstrap <= 30 s.

    python benchmarks/fit_speed.py --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy

from planner import fit
from planner.laws import FORMS

DEFAULT_DATA = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "scaling"
    / "chinchilla_epoch_fig4.csv"
)


def load_runs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N, D = FLOP / 6N and loss, without the 5 highest losses (Besiroglu et al. 2024)."""
    runs = pd.read_csv(path)
    n_params = runs["Model Size"].to_numpy(dtype=float)
    n_tokens = runs["Training FLOP"].to_numpy(dtype=float) / (6.0 * n_params)
    loss = runs["loss"].to_numpy(dtype=float)
    keep = loss < np.sort(loss)[-5]
    return n_params[keep], n_tokens[keep], loss[keep]


def scipy_loop(
    n_params: np.ndarray, n_tokens: np.ndarray, loss: np.ndarray
) -> tuple[float, float, int]:
    """Best objective, seconds and failures of one L-BFGS-B run per start, one after the other."""
    form = FORMS["chinchilla"]
    data = (np.log(n_params), np.log(n_tokens), np.log(loss))
    started = time.perf_counter()
    best, failures = np.inf, 0
    for start in form.init_grid():
        result = fit.polish(form, start, *data)
        best = min(best, float(result.fun))
        failures += not result.success
    return best, time.perf_counter() - started, failures


def run(data: Path, repeats: int) -> dict[str, Any]:
    n_params, n_tokens, loss = load_runs(data)
    vectorised: list[float] = []
    for _ in range(repeats):
        result = fit.fit_law(n_params, n_tokens, loss, bootstrap=0)
        vectorised.append(result.seconds)
    loop_objective, loop_seconds, loop_failures = scipy_loop(n_params, n_tokens, loss)
    with_bootstrap: list[float] = []
    bootstrap_only: list[float] = []
    optimum = FORMS["chinchilla"].to_raw(result.params)[None, :]
    for _ in range(repeats):
        full = fit.fit_law(n_params, n_tokens, loss)  # default: 1000 resamples
        with_bootstrap.append(full.seconds)
        warm = fit.fit_law(n_params, n_tokens, loss, starts=optimum)
        bootstrap_only.append(warm.seconds)
    fit_seconds = statistics.median(vectorised)
    full_seconds = statistics.median(with_bootstrap)
    bootstrap_seconds = statistics.median(bootstrap_only)
    relative_difference = abs(result.objective - loop_objective) / abs(loop_objective)
    speedup = loop_seconds / fit_seconds
    return {
        "benchmark": "planner.fit: 4500-start Chinchilla fit, vectorised vs scipy loop",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
        },
        "data": str(data),
        "n_points": int(result.n_points),
        "n_starts": int(result.n_starts),
        "repeats": repeats,
        "vectorised_fit_seconds": fit_seconds,
        "vectorised_fit_seconds_all": vectorised,
        "scipy_loop_seconds": loop_seconds,
        "scipy_loop_failed_runs": loop_failures,
        "speedup": speedup,
        "vectorised_objective": result.objective,
        "scipy_loop_objective": loop_objective,
        "objective_relative_difference": relative_difference,
        "bootstrap_resamples": 1000,
        "fit_with_bootstrap_seconds": full_seconds,
        "fit_with_bootstrap_seconds_all": with_bootstrap,
        "bootstrap_seconds": bootstrap_seconds,
        "bootstrap_seconds_all": bootstrap_only,
        "params": result.params,
        "intervals_95": full.intervals,
        "requirements_met": {
            "vectorised_fit_at_most_10s": fit_seconds <= 10.0,
            "speedup_at_least_20x": speedup >= 20.0,
            "same_optimum_1e-9": relative_difference <= 1e-9,
            "bootstrap_at_most_30s": bootstrap_seconds <= 30.0,
        },
    }


def print_table(record: dict[str, Any]) -> None:
    rows = [
        ("vectorised fit, 4500 starts (median)", f"{record['vectorised_fit_seconds']:.2f} s"),
        ("scipy L-BFGS-B loop, 4500 starts", f"{record['scipy_loop_seconds']:.1f} s"),
        ("speed-up (same run)", f"{record['speedup']:.1f}x"),
        ("best objective, vectorised", f"{record['vectorised_objective']:.15g}"),
        ("best objective, scipy loop", f"{record['scipy_loop_objective']:.15g}"),
        ("relative difference", f"{record['objective_relative_difference']:.1e}"),
        ("fit + 1000-resample bootstrap (median)", f"{record['fit_with_bootstrap_seconds']:.2f} s"),
        ("1000-resample bootstrap alone (median)", f"{record['bootstrap_seconds']:.2f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    machine = record["machine"]
    print(f"{record['benchmark']} ({record['date']})")
    print(f"{machine['platform']}, {machine['cpu_count']} CPUs, numpy {machine['numpy']}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def write_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description="Time planner.fit against a scipy loop.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Epoch's runs (CSV)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the vectorised fits")
    parser.add_argument("--json", type=Path, default=None, help="also write the record here")
    args = parser.parse_args()
    if not args.data.exists():
        parser.error(f"--data: {args.data} does not exist")
    if args.repeats < 1:
        parser.error("--repeats: expected a whole number >= 1")
    record = run(args.data, args.repeats)
    print_table(record)
    text = json.dumps(record, indent=2)
    print(text)
    if args.json is not None:
        write_atomically(args.json, text + "\n")


if __name__ == "__main__":
    main()
