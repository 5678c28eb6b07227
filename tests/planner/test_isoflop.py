"""Approach 2: IsoFLOP parabolas, flagged budgets, and the published exponent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from planner.errors import InputError
from planner.isoflop import fit_isoflop
from planner.runs import Runs, load_runs


def _synthetic(exponent: float, rng: np.random.Generator, noise: float = 0.002) -> Runs:
    """IsoFLOP runs whose true N_opt is k C^exponent, with a parabolic profile in log N."""
    n, d, loss, budget = [], [], [], []
    for c in np.logspace(18, 21, 6):
        n_opt = 0.1 * c**exponent
        for x in np.linspace(-1.5, 1.5, 9):
            size = n_opt * np.exp(x)
            n.append(size)
            d.append(c / (6 * size))
            loss.append((3.0 - 0.1 * np.log10(c)) + 0.05 * x**2 + rng.normal(0, noise))
            budget.append(c)
    return Runs(np.array(n), np.array(d), np.array(loss), np.array(budget), "synthetic")


def test_approach2_on_chinchilla_isoflops_gives_a_of_about_0_49(scaling_data: Path) -> None:
    # Hoffmann et al. 2022, Table 2: Approach 2 gives a = 0.49 (0.462, 0.534).
    runs = load_runs(scaling_data / "chinchilla_isoflops.csv")
    result = fit_isoflop(runs, bootstrap=200)
    assert 0.485 <= result.n_exponent <= 0.505
    low, high = result.n_exponent_interval
    assert low < result.n_exponent < high
    assert result.n_coefficient * 5.76e23**result.n_exponent == pytest.approx(63e9, rel=0.05)


def test_synthetic_exponent_is_recovered() -> None:
    runs = _synthetic(0.5, np.random.default_rng(0))
    result = fit_isoflop(runs, bootstrap=100)
    assert result.n_exponent == pytest.approx(0.5, abs=0.01)
    assert result.n_exponent_interval[0] <= 0.5 <= result.n_exponent_interval[1]
    assert not result.warnings


def test_budget_with_minimum_at_the_edge_is_flagged_not_used() -> None:
    runs = _synthetic(0.5, np.random.default_rng(1))
    # Keep only the larger half of the model sizes at the smallest budget: the minimum is lost.
    smallest = runs.budget_flops == runs.budget_flops.min()  # type: ignore[union-attr]
    keep = ~smallest | (runs.n_params > np.median(runs.n_params[smallest]))
    cut = Runs(
        runs.n_params[keep], runs.n_tokens[keep], runs.loss[keep], runs.budget_flops[keep], "cut"
    )  # type: ignore[index]
    result = fit_isoflop(cut, bootstrap=0)
    flagged = [b for b in result.budgets if b.flagged]
    assert len(flagged) == 1 and flagged[0].budget_flops == runs.budget_flops.min()  # type: ignore[union-attr]
    assert "smallest sampled N" in (flagged[0].flagged or "")
    assert any("left out" in w for w in result.warnings)
    assert len(result.used) == 5


def test_budgets_are_grouped_by_compute_when_the_table_has_no_budget_column() -> None:
    runs = _synthetic(0.45, np.random.default_rng(2))
    unlabelled = Runs(runs.n_params, runs.n_tokens, runs.loss, None, "unlabelled")
    assert fit_isoflop(unlabelled, bootstrap=0).n_exponent == pytest.approx(0.45, abs=0.01)


def test_too_few_budgets_is_an_input_error() -> None:
    runs = _synthetic(0.5, np.random.default_rng(3))
    one = runs.budget_flops == runs.budget_flops.min()  # type: ignore[union-attr]
    single = Runs(
        runs.n_params[one], runs.n_tokens[one], runs.loss[one], runs.budget_flops[one], "single"
    )  # type: ignore[index]
    with pytest.raises(InputError, match="at least 2 budgets"):
        fit_isoflop(single, bootstrap=0)
