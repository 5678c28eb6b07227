"""Approach 1 (the lower envelope of the training curves) recovers the allocation exponent of
a known loss surface, reads a curves table, and refuses curves it cannot use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from planner.envelope import Curves, fit_envelope, load_curves
from planner.errors import InputError

# Hoffmann et al. 2022's Approach 3 fit: N_opt grows as C^(beta / (alpha + beta)) = C^0.456
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def surface_curves(sizes: np.ndarray, points: int = 60) -> Curves:
    """Each size's curve as if every point were a run trained to that many tokens."""
    tokens = [np.logspace(np.log10(20 * n) - 1.5, np.log10(20 * n) + 1.5, points) for n in sizes]
    loss = [E + A / n**ALPHA + B / t**BETA for n, t in zip(sizes, tokens, strict=True)]
    return Curves([f"n{i}" for i in range(sizes.size)], sizes, tokens, loss, "surface")


def test_the_envelope_recovers_the_surfaces_allocation_exponent() -> None:
    result = fit_envelope(surface_curves(np.logspace(7, 10, 25)), bootstrap=50)
    expected = BETA / (ALPHA + BETA)
    assert result.n_exponent == pytest.approx(expected, abs=0.03)
    assert result.d_exponent == pytest.approx(1 - expected, abs=0.03)
    low, high = result.n_exponent_interval
    assert low <= result.n_exponent <= high
    law = result.to_law("mine", "surface")
    assert law.allocation is not None and law.form == "allocation"


def test_a_curves_table_is_read_by_run(tmp_path: Path) -> None:
    curves = surface_curves(np.logspace(7, 9, 5), points=8)
    rows = [
        {"run": run, "params": n, "tokens": t, "loss": loss, "design": "isoflop"}
        for run, n, ts, ls in zip(
            curves.runs, curves.n_params, curves.tokens, curves.loss, strict=True
        )
        for t, loss in zip(ts, ls, strict=True)
    ]
    rows.append({"run": "n0", "params": 1e7, "tokens": 0, "loss": 5.5, "design": "isoflop"})
    path = tmp_path / "curves.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    read = load_curves(path, where={"design": "isoflop"})
    assert read.runs == curves.runs and all(t[0] > 0 for t in read.tokens)  # step 0 left out
    with pytest.raises(InputError, match="no column 'flops'"):
        load_curves(path, tokens_col="flops")


def test_sizes_that_bracket_nothing_are_refused() -> None:
    with pytest.raises(InputError, match="2 model sizes; Approach 1 needs 3 or more"):
        fit_envelope(surface_curves(np.array([1e9, 2e9])), bootstrap=0)
    # three sizes whose curves never cross: the middle one never wins
    curves = surface_curves(np.array([1e8, 1e9, 1e10]))
    worse = [curves.loss[0], curves.loss[1] + 1.0, curves.loss[2]]
    bad = Curves(curves.runs, curves.n_params, curves.tokens, worse, "never")
    with pytest.raises(InputError, match="do not bracket the optimum"):
        fit_envelope(bad, bootstrap=0)


def test_fit_envelope_from_the_command_line_writes_a_law_plan_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from studies.cli import main

    curves = surface_curves(np.logspace(7, 10, 12), points=20)
    rows = [
        {"run": run, "params": n, "tokens": t, "loss": loss}
        for run, n, ts, ls in zip(
            curves.runs, curves.n_params, curves.tokens, curves.loss, strict=True
        )
        for t, loss in zip(ts, ls, strict=True)
    ]
    table = tmp_path / "curves.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    law = tmp_path / "mine.json"
    args = ["fit", str(table), "--approach", "envelope", "--bootstrap", "20"]
    assert main([*args, "--out", str(law), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["n_exponent"] == pytest.approx(BETA / (ALPHA + BETA), abs=0.05)
    assert main(["plan", "--compute", "1e21", "--law", str(law), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["n_params"] > 0
