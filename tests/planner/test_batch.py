"""planner.batch: McCandlish's steps/examples trade-off fit and Kaplan's B_crit(L)."""

from __future__ import annotations

import numpy as np
import pytest

from planner.batch import fit_tradeoff, kaplan_critical_batch, scale_critical_batch
from planner.errors import InputError


def test_kaplan_bcrit_doubles_for_every_13_percent_less_loss() -> None:
    # Kaplan et al. 2020, sec. 5.1: "B_crit ... roughly doubles for every 13% decrease in loss"
    ratio = float(kaplan_critical_batch(0.87 * 3.0) / kaplan_critical_batch(3.0))
    assert ratio == pytest.approx(2.0, rel=0.05)
    # eq. 5.1 with B* = 2e8 tokens, alpha_B = 0.21: about a million tokens at 3 nats
    assert float(kaplan_critical_batch(3.0)) == pytest.approx(2e8 / 3.0 ** (1 / 0.21))
    assert 0.9e6 < float(kaplan_critical_batch(3.0)) < 1.2e6


def test_a_measured_bcrit_is_carried_with_kaplans_exponent() -> None:
    assert float(scale_critical_batch(1000.0, 3.0, 3.0)) == pytest.approx(1000.0)
    assert float(scale_critical_batch(1000.0, 3.0, 0.87 * 3.0)) == pytest.approx(1940, rel=0.02)


def test_tradeoff_fit_recovers_a_known_curve_with_an_interval_around_it() -> None:
    rng = np.random.default_rng(1)
    batches = np.array([8, 16, 32, 64, 128, 256], dtype=float)
    s_min, b_crit = 200.0, 50.0
    steps = (s_min + s_min * b_crit / batches) * np.exp(rng.normal(0, 0.05, batches.size))
    fit = fit_tradeoff(batches, steps)
    assert fit.b_crit == pytest.approx(b_crit, rel=0.25)
    assert fit.b_crit_low < fit.b_crit < fit.b_crit_high
    assert fit.b_crit_low < b_crit < fit.b_crit_high
    # at B_crit both steps and examples are twice their minimum (McCandlish eq. 2.11)
    assert float(fit.steps(fit.b_crit)) == pytest.approx(2 * fit.s_min)


def test_tradeoff_fit_refuses_too_few_batches_and_flat_steps() -> None:
    with pytest.raises(InputError, match="at least 3 batch sizes"):
        fit_tradeoff([8, 16, 16], [100, 60, 61])
    with pytest.raises(InputError, match="do not fall as the batch grows"):
        fit_tradeoff([8, 16, 32], [100, 200, 400])
    with pytest.raises(InputError, match="fall faster than 1/batch"):
        fit_tradeoff([4, 8, 16], [160, 43.6, 18.1])
