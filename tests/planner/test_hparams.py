"""Hyperparameter laws: DeepSeek LLM's published fit by name, the same form fitted to tuned
optima (recovered from points drawn off a known law), law files, and their refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from planner.errors import InputError
from planner.hparams import DEEPSEEK2024, fit_hparam_law, load_hparam_law, save_hparam_law
from studies.cli import main


def test_deepseeks_published_numbers() -> None:
    # DeepSeek LLM, eq. 1: at 1e20 FLOPs, eta = 0.3118 * 1e20^-0.125 and B = 0.2920 * 1e20^0.3271
    assert float(DEEPSEEK2024.learning_rate(1e20)) == pytest.approx(0.3118 * 1e20**-0.125)
    assert float(DEEPSEEK2024.batch_tokens(1e20)) == pytest.approx(0.2920 * 1e20**0.3271)
    assert load_hparam_law("deepseek2024") is DEEPSEEK2024


def test_a_fit_recovers_the_law_its_optima_came_from() -> None:
    rng = np.random.default_rng(0)
    compute = np.logspace(17, 20, 6)
    noise = np.exp(rng.normal(0, 0.05, (2, compute.size)))  # a tuned optimum is +-5%
    lr = DEEPSEEK2024.learning_rate(compute) * noise[0]
    batch = DEEPSEEK2024.batch_tokens(compute) * noise[1]
    law = fit_hparam_law(compute, lr, batch, bootstrap=200)
    assert law.learning_rate.exponent == pytest.approx(-0.125, abs=0.03)
    assert law.batch_tokens.exponent == pytest.approx(0.3271, abs=0.03)
    low, high = law.learning_rate.exponent_interval or (0, 0)
    assert low < -0.125 < high
    assert law.compute_range == (1e17, 1e20)


def test_too_few_budgets_or_a_bad_value_are_refused() -> None:
    with pytest.raises(InputError, match="2 distinct budgets; a hyperparameter law needs 3"):
        fit_hparam_law([1e18, 1e19], [1e-3, 8e-4], [1e5, 2e5])
    with pytest.raises(InputError, match="lr: -0.001 is not a positive finite number"):
        fit_hparam_law([1e18, 1e19, 1e20], [1e-3, -1e-3, 8e-4], [1e5, 2e5, 3e5])


def test_fit_writes_a_law_file_that_plan_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    compute = np.logspace(17, 20, 5)
    table = tmp_path / "optima.csv"
    scale = compute / 1e17
    optima = {"flops": compute, "lr": 2e-3 * scale**-0.2, "batch_tokens": 3e4 * scale**0.4}
    pd.DataFrame(optima).to_csv(table, index=False)
    out = tmp_path / "mine.json"
    args = ["fit", str(table), "--approach", "hparams", "--bootstrap", "50", "--out", str(out)]
    assert main([*args, "--json"]) == 0
    law = json.loads(capsys.readouterr().out)
    assert law["learning_rate"]["exponent"] == pytest.approx(-0.2)
    assert main(["plan", "--compute", "1e19", "--hparams", str(out), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["learning_rate"] == pytest.approx(2e-3 * 100**-0.2)
    assert row["batch_tokens"] == pytest.approx(3e4 * 100**0.4)
    assert row["batch_from"] == "mine"
    # a loss law is not a hyperparameter law
    loss_law = tmp_path / "loss.json"
    loss_law.write_text(json.dumps({"name": "x", "form": "chinchilla"}))
    assert main(["plan", "--compute", "1e19", "--hparams", str(loss_law)]) == 2
    assert "is not a hyperparameter law" in capsys.readouterr().err
    # and the other way round: a hyperparameter law is not a loss law
    assert main(["plan", "--compute", "1e19", "--law", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a hyperparameter law (kind hparams), not a loss law; it goes to --hparams" in err
    assert len(err.strip().splitlines()) == 1
    assert save_hparam_law(load_hparam_law(str(out)), tmp_path / "again.json").is_file()
