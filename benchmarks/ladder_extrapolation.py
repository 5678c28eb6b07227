"""The ladder's extrapolation check, first look: fit on all but the largest budget, predict the
largest budget's losses, compare with the runs the ladder trained there.

Reads a finished ladder's runs.csv (``scaleplan ladder studies/configs/ladder.yaml --out
runs/ladder``), fits Approach 3 (Chinchilla's L = E + A/N^alpha + B/D^beta, planner.fit, with
bootstrap intervals) on the runs below the largest budget, then prints, for every run at the
largest budget, the predicted loss, its interval and the relative error, and the predicted
compute-optimal N there against the IsoFLOP parabola's vertex of the runs themselves.

    python benchmarks/ladder_extrapolation.py runs/ladder/runs.csv [--design wsd]

The compute-optimal run itself (a shape made for the predicted N) is not trained here: the
largest budget's ladder runs, trained at that budget, stand in for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.fit import fit_law  # noqa: E402
from planner.isoflop import fit_isoflop  # noqa: E402
from planner.laws import FORMS  # noqa: E402
from planner.runs import load_runs  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--bootstrap", type=int, default=300)
    parser.add_argument("--design", choices=("isoflop", "wsd"), help="fit and check one design")
    args = parser.parse_args()
    runs = load_runs(args.runs, where={"design": args.design} if args.design else None)
    if runs.budget_flops is None:
        parser.error(f"{args.runs}: no budget column; expected a ladder's runs.csv")
    largest = runs.budget_flops.max()
    train = runs.budget_flops < largest
    fit = fit_law(
        runs.n_params[train], runs.n_tokens[train], runs.loss[train], bootstrap=args.bootstrap
    )
    form = FORMS["chinchilla"]
    print(f"fitted on {int(train.sum())} runs below {largest:.3g} FLOPs: {fit.params}")
    for warning in fit.warnings:
        print(f"warning: {warning}")
    samples = fit.bootstrap if fit.bootstrap is not None else np.empty((0, 5))
    names = list(fit.params)
    held = np.flatnonzero(~train)
    errors = []
    print("| N | D | measured | predicted [95%] | error |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for i in held:
        n, d, loss = runs.n_params[i], runs.n_tokens[i], runs.loss[i]
        predicted = float(form.loss(fit.params, n, d))
        draws = [float(form.loss(dict(zip(names, row, strict=True)), n, d)) for row in samples]
        low, high = np.percentile(draws, [2.5, 97.5]) if draws else (predicted, predicted)
        error = predicted / loss - 1
        errors.append(error)
        covered = "yes" if low <= loss <= high else "no"
        print(
            f"| {n:,.0f} | {d:,.0f} | {loss:.4f} | {predicted:.4f} [{low:.4f}, {high:.4f}] "
            f"| {error:+.1%} (covered: {covered}) |"
        )
    print(f"median |error| {np.median(np.abs(errors)):.1%} over {len(errors)} runs")
    n_opt = float(form.optimal_n(fit.params, largest))
    vertex = fit_isoflop(load_runs(args.runs, where={"design": "isoflop"}), bootstrap=0)
    at_largest = [b for b in vertex.budgets if b.budget_flops == largest]
    seen = at_largest[0].n_opt if at_largest else float("nan")
    print(f"predicted N_opt at {largest:.3g}: {n_opt:,.0f}; the runs' own vertex: {seen:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
