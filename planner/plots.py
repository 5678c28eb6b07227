"""Figures a person looks at after a fit: IsoFLOP view, frontier with its band, residuals,
and the bootstrap distribution of tokens per parameter. Each function writes one PNG atomically.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from planner.isoflop import IsoflopResult, group_budgets
from planner.laws import FLOPS_PER_PARAM_TOKEN
from planner.published import Law
from planner.runs import Runs


@contextmanager
def _figure(path: Path, **kwargs: Any) -> Iterator[Any]:
    """A matplotlib figure saved to ``path`` (temp file, then rename) when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(**kwargs)
    try:
        yield figure, axes
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
        os.close(handle)
        try:
            figure.savefig(tmp, dpi=120)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(figure)


def _budget_colours(budgets: np.ndarray) -> tuple[np.ndarray, Any]:
    import matplotlib

    unique = np.unique(budgets)
    cmap = matplotlib.colormaps["viridis"]
    positions = np.linspace(0, 1, unique.size) if unique.size > 1 else np.zeros(1)
    return unique, {u: cmap(p) for u, p in zip(unique, positions, strict=True)}


def isoflop_view(runs: Runs, law: Law, path: Path) -> Path:
    """Loss against N for each FLOP budget: the runs and the fitted law along C = 6ND."""
    assert law.surface is not None
    budgets = group_budgets(runs)
    unique, colour = _budget_colours(budgets)
    with _figure(path, figsize=(7, 5)) as (_, ax):
        for budget in unique:
            mine = budgets == budget
            ax.scatter(runs.n_params[mine], runs.loss[mine], s=14, color=colour[budget])
            n = np.logspace(
                np.log10(runs.n_params[mine].min() / 2),
                np.log10(runs.n_params[mine].max() * 2),
                200,
            )
            d = budget / (FLOPS_PER_PARAM_TOKEN * n)
            ax.plot(
                n,
                law.surface.loss(law.params, n, d),
                color=colour[budget],
                lw=1,
                label=f"{budget:.2g} FLOPs",
            )
            n_opt = law.surface.optimal_n(law.params, budget)
            d_opt = budget / (FLOPS_PER_PARAM_TOKEN * n_opt)
            ax.plot(n_opt, law.surface.loss(law.params, n_opt, d_opt), "x", color="black")
        ax.set_xscale("log")
        ax.set_xlabel("parameters N")
        ax.set_ylabel("final loss")
        ax.set_title(f"IsoFLOP view of {law.name} (x: optimum per budget)")
        ax.legend(fontsize=7, ncol=2)
    return path


def frontier_plot(
    law: Law,
    path: Path,
    compute_range: tuple[float, float],
    runs: Runs | None = None,
    level: float = 0.8,
) -> Path:
    """Compute-optimal N and D against compute, with the bootstrap band."""
    from planner.allocate import frontier

    rows = frontier(law, compute_range, points=40, level=level)
    compute = np.array([r["compute_flops"] for r in rows])
    with _figure(path, figsize=(7, 5)) as (_, ax):
        for key, label, colour in (("n_params", "params N", "C0"), ("n_tokens", "tokens D", "C1")):
            ax.plot(compute, [r[key] for r in rows], color=colour, label=f"optimal {label}")
            if rows[0].get(f"{key}_low") is not None:
                ax.fill_between(
                    compute,
                    [r[f"{key}_low"] for r in rows],
                    [r[f"{key}_high"] for r in rows],
                    color=colour,
                    alpha=0.2,
                    label=f"{level:.0%} band",
                )
        if runs is not None:
            ax.axvspan(
                runs.compute_flops.min(),
                runs.compute_flops.max(),
                color="grey",
                alpha=0.15,
                label="compute range of the runs",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel("count")
        ax.set_title(f"Compute-optimal frontier of {law.name}")
        ax.legend(fontsize=8)
    return path


def residuals_plot(runs: Runs, law: Law, path: Path) -> Path:
    """log L_pred - log L_obs for each run, against N, coloured by budget."""
    assert law.surface is not None
    residual = np.log(law.surface.loss(law.params, runs.n_params, runs.n_tokens)) - np.log(
        runs.loss
    )
    budgets = group_budgets(runs)
    _, colour = _budget_colours(budgets)
    with _figure(path, ncols=2, figsize=(10, 4)) as (_, (left, right)):
        left.scatter(runs.n_params, residual, s=12, c=[colour[b] for b in budgets])
        left.axhline(0, color="black", lw=0.8)
        left.set_xscale("log")
        left.set_xlabel("parameters N")
        left.set_ylabel("log predicted - log observed loss")
        left.set_title("Residuals by run (colour: budget)")
        right.hist(residual, bins=30, color="C0")
        right.set_xlabel("log residual")
        right.set_title(f"RMSE {np.sqrt(np.mean(residual**2)):.4f}")
    return path


def tokens_per_param_plot(law: Law, compute_flops: float, path: Path) -> Path:
    """Bootstrap distribution of the compute-optimal tokens per parameter at one budget."""
    from planner.allocate import compute_optimal

    samples = [
        Law.model_validate({**law.model_dump(), "params": p, "bootstrap": None})
        for p in law.bootstrap_params()
    ]
    ratios = [compute_optimal(s, [compute_flops])[0]["tokens_per_param"] for s in samples]
    point = compute_optimal(law, [compute_flops])[0]["tokens_per_param"]
    with _figure(path, figsize=(6, 4)) as (_, ax):
        if ratios:
            ax.hist(ratios, bins=40, color="C2", alpha=0.8)
        ax.axvline(point, color="black", label=f"point estimate {point:.1f}")
        ax.set_xlabel(f"optimal tokens per parameter at C = {compute_flops:.3g} FLOPs")
        ax.set_ylabel("bootstrap resamples")
        ax.set_title(f"{len(ratios)} bootstrap fits of {law.name}")
        ax.legend()
    return path


def isoflop_profiles(runs: Runs, result: IsoflopResult, path: Path) -> Path:
    """Approach 2: each budget's runs, its parabola in log N and its vertex (grey: left out)."""
    budgets = group_budgets(runs)
    _, colour = _budget_colours(budgets)
    with _figure(path, ncols=2, figsize=(11, 4.5)) as (_, (left, right)):
        for fit in result.budgets:
            mine = budgets == fit.budget_flops
            shade = colour[fit.budget_flops] if fit.flagged is None else "lightgrey"
            left.scatter(runs.n_params[mine], runs.loss[mine], s=12, color=shade)
            if fit.flagged is None:
                x = np.linspace(np.log(fit.n_range[0]), np.log(fit.n_range[1]), 100)
                left.plot(
                    np.exp(x),
                    np.polyval(fit.coefficients_n, x),
                    color=shade,
                    lw=1,
                    label=f"{fit.budget_flops:.2g}",
                )
                left.plot(fit.n_opt, fit.loss_at_opt, "x", color="black")
        left.set_xscale("log")
        left.set_xlabel("parameters N")
        left.set_ylabel("final loss")
        left.set_title("IsoFLOP profiles (x: vertex; grey: left out)")
        left.legend(fontsize=7, ncol=2)
        used = result.used
        c = np.array([b.budget_flops for b in used])
        grid = np.logspace(np.log10(c.min()) - 1, np.log10(c.max()) + 1, 50)
        right.scatter(c, [b.n_opt for b in used], color="C0", label="N_opt per budget")
        right.plot(
            grid,
            result.n_coefficient * grid**result.n_exponent,
            color="C0",
            label=f"N_opt ∝ C^{result.n_exponent:.3f}",
        )
        right.scatter(c, [b.d_opt for b in used], color="C1", label="D_opt per budget")
        right.plot(
            grid,
            result.d_coefficient * grid**result.d_exponent,
            color="C1",
            label=f"D_opt ∝ C^{result.d_exponent:.3f}",
        )
        right.set_xscale("log")
        right.set_yscale("log")
        right.set_xlabel("training compute C (FLOPs)")
        right.set_title("Power laws through the vertices")
        right.legend(fontsize=8)
    return path
