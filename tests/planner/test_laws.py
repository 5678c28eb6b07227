"""The law forms: analytic gradients, closed-form optima and their inverses."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from planner.errors import InputError
from planner.laws import FORMS, get_form

CASES = {
    "chinchilla": {"E": 1.8, "A": 480.0, "B": 2100.0, "alpha": 0.35, "beta": 0.37},
    "kaplan": {"N_c": 6.4e13, "D_c": 1.8e13, "alpha_N": 0.076, "alpha_D": 0.095},
}


@pytest.mark.parametrize("name", sorted(FORMS))
def test_gradient_matches_finite_differences(name: str) -> None:
    form = FORMS[name]
    rng = np.random.default_rng(0)
    log_n = np.log(rng.uniform(1e7, 1e10, 40))
    log_d = np.log(rng.uniform(1e9, 1e12, 40))
    raw = form.to_raw(CASES[name])[None, :]
    value, grad = form.value_and_grad(raw, log_n, log_d)
    step = 1e-6
    for i in range(raw.shape[1]):
        shift = np.zeros_like(raw)
        shift[0, i] = step
        numeric = form.log_loss(raw + shift, log_n, log_d) - form.log_loss(
            raw - shift, log_n, log_d
        )
        np.testing.assert_allclose(grad[..., i], numeric / (2 * step), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(
        np.exp(value[0]), form.loss(CASES[name], np.exp(log_n), np.exp(log_d)), rtol=1e-12
    )


@pytest.mark.parametrize("name", sorted(FORMS))
def test_raw_round_trip(name: str) -> None:
    form = FORMS[name]
    back = form.to_params(form.to_raw(CASES[name]))
    for key, value in CASES[name].items():
        assert back[key] == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("name", sorted(FORMS))
@pytest.mark.parametrize("compute", [1e19, 1e22, 1e25])
def test_closed_form_optimum_minimises_loss_along_isoflop(name: str, compute: float) -> None:
    form, params = FORMS[name], CASES[name]

    def loss_at(log_n: float) -> float:
        n = np.exp(log_n)
        return float(form.loss(params, n, compute / (6 * n)))

    numeric = minimize_scalar(
        loss_at, bounds=(np.log(1e3), np.log(1e16)), method="bounded", options={"xatol": 1e-10}
    )
    assert float(form.optimal_n(params, compute)) == pytest.approx(np.exp(numeric.x), rel=1e-4)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_tokens_for_loss_inverts_the_law(name: str) -> None:
    form, params = FORMS[name], CASES[name]
    n = np.array([1e8, 1e9, 1e10])
    d = np.array([1e10, 5e10, 1e12])
    target = form.loss(params, n, d)
    for i in range(3):
        assert float(form.tokens_for_loss(params, n[i], float(target[i]))) == pytest.approx(
            d[i], rel=1e-9
        )
    # Below the floor the model size cannot reach the loss with any data.
    assert np.isnan(form.tokens_for_loss(params, 1e6, 1.0))


def test_chinchilla_init_grid_is_hoffmanns_4500_starts() -> None:
    grid = FORMS["chinchilla"].init_grid()
    assert grid.shape == (4500, 5)
    assert sorted(set(grid[:, 3])) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert sorted(set(grid[:, 1])) == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]


def test_unknown_form_lists_the_known_ones() -> None:
    with pytest.raises(InputError, match="chinchilla, kaplan"):
        get_form("hoffmann")
