"""Approach 2 (IsoFLOP profiles): a parabola per budget, then N_opt ∝ C^a and D_opt ∝ C^b.

Hoffmann et al. 2022, sec. 3.2: for each FLOP budget, fit loss as a parabola in log N and take its
vertex as the compute-optimal size; then fit power laws through the vertices. The same is done in
log D for D_opt. Intervals come from resampling runs within each budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from planner.errors import InputError
from planner.published import Allocation, Law
from planner.runs import Runs


@dataclass(frozen=True)
class BudgetFit:
    """One IsoFLOP profile: its parabolas' vertices, or why it was left out."""

    budget_flops: float
    n_points: int
    n_opt: float
    d_opt: float
    loss_at_opt: float
    n_range: tuple[float, float]
    coefficients_n: tuple[float, float, float]  # loss = c0 x^2 + c1 x + c2, x = ln N
    flagged: str | None  # reason the budget is not used for the power law; None when used


@dataclass(frozen=True)
class IsoflopResult:
    budgets: list[BudgetFit]
    n_exponent: float  # a in N_opt = k_N C^a
    n_coefficient: float
    d_exponent: float  # b in D_opt = k_D C^b
    d_coefficient: float
    interval_level: float
    n_exponent_interval: tuple[float, float]
    d_exponent_interval: tuple[float, float]
    bootstrap_n_exponent: np.ndarray
    bootstrap_d_exponent: np.ndarray
    warnings: list[str] = field(default_factory=list)

    @property
    def used(self) -> list[BudgetFit]:
        return [b for b in self.budgets if b.flagged is None]

    def to_law(self, name: str, source: str) -> Law:
        """An allocation-only law that ``scaleplan plan --law FILE`` reads."""
        return allocation_law(
            self,
            name,
            f"Approach 2 (Hoffmann et al. 2022, sec. 3.2) fitted by scaleplan to {source}",
            {
                "approach": "isoflop",
                "n_budgets": len(self.budgets),
                "n_budgets_used": len(self.used),
                "flagged": {f"{b.budget_flops:.3g}": b.flagged for b in self.budgets if b.flagged},
                "warnings": self.warnings,
            },
        )


def allocation_law(result: Any, name: str, citation: str, fit: dict[str, Any]) -> Law:
    """The allocation-only law of an Approach 1 or 2 result (its exponents, coefficient and
    intervals): N and D for a budget, not the loss."""
    return Law(
        name=name,
        form="allocation",
        citation=citation,
        allocation=Allocation(
            n_coefficient=result.n_coefficient,
            n_exponent=result.n_exponent,
            n_exponent_interval=result.n_exponent_interval,
            d_exponent=result.d_exponent,
            d_exponent_interval=result.d_exponent_interval,
        ),
        interval_level=result.interval_level,
        fit=fit,
        notes="Allocation only: predicts N and D, not the loss.",
    )


def group_budgets(
    runs: Runs, gap_decades: float = 0.1, max_span_decades: float = 0.25
) -> np.ndarray:
    """The budget of each run: the table's budget column, else clusters of 6ND in log space.

    Runs whose compute differs by less than ``gap_decades`` join one cluster. When the runs'
    compute is spread continuously (clusters wider than ``max_span_decades``), they are binned to
    the nearest quarter decade instead.
    """
    if runs.budget_flops is not None:
        return runs.budget_flops
    log_c = np.log10(runs.compute_flops)
    order = np.argsort(log_c)
    labels = np.empty_like(log_c)
    start = 0
    for i in range(1, order.size + 1):
        if i == order.size or log_c[order[i]] - log_c[order[i - 1]] > gap_decades:
            members = order[start:i]
            if np.ptp(log_c[members]) > max_span_decades:
                return np.asarray(10 ** (np.round(log_c * 4) / 4))
            labels[members] = 10 ** np.median(log_c[members])
            start = i
    return labels


def _vertex(x: np.ndarray, loss: np.ndarray) -> tuple[float, float, tuple[float, float, float]]:
    c0, c1, c2 = np.polyfit(x, loss, 2)
    if c0 <= 0:
        return np.nan, np.nan, (c0, c1, c2)
    x_opt = -c1 / (2 * c0)
    return x_opt, c2 - c1**2 / (4 * c0), (c0, c1, c2)


def _profile(budget: float, n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> BudgetFit:
    x_n, x_d = np.log(n), np.log(d)
    n_range = (float(n.min()), float(n.max()))
    flagged = None
    if np.unique(x_n).size < 3:
        return BudgetFit(
            budget,
            n.size,
            np.nan,
            np.nan,
            np.nan,
            n_range,
            (0, 0, 0),
            "fewer than 3 distinct model sizes",
        )
    xn_opt, loss_opt, coefficients = _vertex(x_n, loss)
    xd_opt, _, _ = _vertex(x_d, loss)
    lowest = int(np.argmin(loss))
    if not np.isfinite(xn_opt) or not np.isfinite(xd_opt):
        flagged = "the profile is not convex (no minimum)"
    elif x_n[lowest] in (x_n.min(), x_n.max()):
        flagged = (
            f"the lowest loss is at the {'smallest' if x_n[lowest] == x_n.min() else 'largest'}"
            " sampled N: the minimum is not bracketed"
        )
    elif not x_n.min() <= xn_opt <= x_n.max():
        flagged = "the parabola's minimum lies outside the sampled N range"
    return BudgetFit(
        budget_flops=float(budget),
        n_points=int(n.size),
        n_opt=float(np.exp(xn_opt)),
        d_opt=float(np.exp(xd_opt)),
        loss_at_opt=float(loss_opt),
        n_range=n_range,
        coefficients_n=tuple(float(c) for c in coefficients),  # type: ignore[arg-type]
        flagged=flagged,
    )


def _power_law(budgets: np.ndarray, optimum: np.ndarray) -> tuple[float, float]:
    """Least squares of ln optimum = exponent ln C + ln coefficient."""
    exponent, log_coefficient = np.polyfit(np.log(budgets), np.log(optimum), 1)
    return float(exponent), float(np.exp(log_coefficient))


def fit_isoflop(
    runs: Runs, *, bootstrap: int = 1000, interval_level: float = 0.95, seed: int = 0
) -> IsoflopResult:
    """Approach 2 on a runs table. Budgets whose minimum is not bracketed are flagged, not used."""
    labels = group_budgets(runs)
    groups = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    profiles = [
        _profile(labels[g[0]], runs.n_params[g], runs.n_tokens[g], runs.loss[g]) for g in groups
    ]
    used = [i for i, p in enumerate(profiles) if p.flagged is None]
    if len(used) < 2:
        reasons = "; ".join(f"{p.budget_flops:.3g}: {p.flagged}" for p in profiles if p.flagged)
        raise InputError(
            f"{runs.source}: Approach 2 needs at least 2 budgets with a bracketed minimum,"
            f" found {len(used)} of {len(profiles)} ({reasons or 'too few budgets'})"
        )
    budgets = np.array([profiles[i].budget_flops for i in used])
    n_exponent, n_coefficient = _power_law(budgets, np.array([profiles[i].n_opt for i in used]))
    d_exponent, d_coefficient = _power_law(budgets, np.array([profiles[i].d_opt for i in used]))

    rng = np.random.default_rng(seed)
    samples_a, samples_b = [], []
    for _ in range(bootstrap):
        n_opts, d_opts = [], []
        for i in used:
            pick = rng.choice(groups[i], size=groups[i].size, replace=True)
            if np.unique(runs.n_params[pick]).size < 3:
                break
            xn, _, _ = _vertex(np.log(runs.n_params[pick]), runs.loss[pick])
            xd, _, _ = _vertex(np.log(runs.n_tokens[pick]), runs.loss[pick])
            n_opts.append(xn)
            d_opts.append(xd)
        if len(n_opts) == len(used) and np.all(np.isfinite(n_opts + d_opts)):
            samples_a.append(_power_law(budgets, np.exp(n_opts))[0])
            samples_b.append(_power_law(budgets, np.exp(d_opts))[0])
    tail = 100 * (1 - interval_level) / 2
    boot_a, boot_b = np.array(samples_a), np.array(samples_b)

    def interval(values: np.ndarray, point: float) -> tuple[float, float]:
        if values.size < 2:
            return (point, point)
        return (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))

    warnings = [
        f"budget {p.budget_flops:.3g} FLOPs left out: {p.flagged}" for p in profiles if p.flagged
    ]
    if bootstrap and boot_a.size < 0.9 * bootstrap:
        warnings.append(f"only {boot_a.size} of {bootstrap} resamples gave convex profiles")
    return IsoflopResult(
        budgets=profiles,
        n_exponent=n_exponent,
        n_coefficient=n_coefficient,
        d_exponent=d_exponent,
        d_coefficient=d_coefficient,
        interval_level=interval_level,
        n_exponent_interval=interval(boot_a, n_exponent),
        d_exponent_interval=interval(boot_b, d_exponent),
        bootstrap_n_exponent=boot_a,
        bootstrap_d_exponent=boot_b,
        warnings=warnings,
    )
