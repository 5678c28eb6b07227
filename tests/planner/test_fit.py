"""planner.fit: the Chinchilla/Kaplan parametric fit, its batched optimiser and its bootstrap.

The reference numbers are Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt",
arXiv 2404.10102): their refit of Hoffmann et al.'s Approach 3 on the runs digitised from Fig. 4.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.special

from planner import fit
from planner.errors import InputError
from planner.laws import FORMS, FloatArray

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "scaling"
EPOCH_CSV = DATA_DIR / "chinchilla_epoch_fig4.csv"

# Besiroglu et al. 2024, Table 1 / their notebook's fit (5 outliers excluded).
EPOCH_FIT = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
EPOCH_INTERVALS_95 = {"alpha": (0.32, 0.37), "beta": (0.33, 0.42)}
KAPLAN_LAW = {
    "N_c": 8.8e13,
    "D_c": 5.4e13,
    "alpha_N": 0.076,
    "alpha_D": 0.095,
}  # Kaplan 2020, Table 2


def load_epoch_runs() -> tuple[FloatArray, FloatArray, FloatArray]:
    """N, D, loss of the digitised Chinchilla runs, without the 5 highest losses (as Epoch did)."""
    if not EPOCH_CSV.exists():
        pytest.skip(f"reference data not found: {EPOCH_CSV}")
    pandas = pytest.importorskip("pandas")
    runs = pandas.read_csv(EPOCH_CSV)
    n_params = runs["Model Size"].to_numpy(dtype=float)
    n_tokens = runs["Training FLOP"].to_numpy(dtype=float) / (6.0 * n_params)
    loss = runs["loss"].to_numpy(dtype=float)
    # Their notebook keeps the runs with loss < the 5th highest loss (no ties there: 240 of 245).
    keep = loss < np.sort(loss)[-5]
    return n_params[keep], n_tokens[keep], loss[keep]


@pytest.fixture(scope="module")
def epoch_fit() -> fit.FitResult:
    """The full fit with the defaults: 4500 starts, 1000 bootstrap resamples (a few seconds)."""
    n_params, n_tokens, loss = load_epoch_runs()
    return fit.fit_law(n_params, n_tokens, loss)


def synthetic_runs(
    rng: np.random.Generator, form: str, params: dict[str, float], n_runs: int = 100
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Runs on a realistic grid (N 1e7..1e10, D 1e8..1e12) with 1% multiplicative noise."""
    n_params = np.exp(rng.uniform(np.log(1e7), np.log(1e10), n_runs))
    n_tokens = np.exp(rng.uniform(np.log(1e8), np.log(1e12), n_runs))
    loss = FORMS[form].loss(params, n_params, n_tokens)
    return n_params, n_tokens, loss * np.exp(0.01 * rng.standard_normal(n_runs))


def random_chinchilla(rng: np.random.Generator) -> dict[str, float]:
    return {
        "E": rng.uniform(1.5, 2.0),
        "A": float(np.exp(rng.uniform(np.log(100.0), np.log(1000.0)))),
        "B": float(np.exp(rng.uniform(np.log(300.0), np.log(3000.0)))),
        "alpha": rng.uniform(0.25, 0.45),
        "beta": rng.uniform(0.25, 0.45),
    }


# --- the objective ---------------------------------------------------------------------------


def test_huber_is_quadratic_inside_delta_and_linear_outside() -> None:
    residual = np.array([-0.1, -1e-3, -2e-4, 0.0, 5e-4, 1e-3, 0.3])
    expected = scipy.special.huber(1e-3, residual)
    np.testing.assert_allclose(fit.huber(residual, 1e-3), expected, rtol=1e-15, atol=0)
    assert fit.huber(np.array([0.3]), 1e-3)[0] == pytest.approx(1e-3 * (0.3 - 0.5e-3))


@pytest.mark.parametrize("with_weights", [False, True])
def test_chinchilla_fast_objective_equals_the_generic_one(with_weights: bool) -> None:
    form = FORMS["chinchilla"]
    rng = np.random.default_rng(0)
    raw = form.init_grid()[rng.choice(4500, 300, replace=False)]
    raw[0] = [0.0, 800.0, 0.0, 0.5, 0.5]  # exp(a - e - ...) overflows: the generic path takes over
    n_params, n_tokens, loss = synthetic_runs(rng, "chinchilla", EPOCH_FIT, 50)
    data = (np.log(n_params), np.log(n_tokens), np.log(loss), 1e-3)
    weights = (
        rng.multinomial(50, np.full(50, 0.02), size=300).astype(float) if with_weights else None
    )
    value, grad = fit.objective_and_grad(form, raw, *data, weights)
    generic_value, generic_grad = fit._generic_objective(form, raw, *data, weights)
    assert np.isfinite(value).all() and np.isfinite(grad).all()
    np.testing.assert_allclose(value, generic_value, rtol=1e-12)
    np.testing.assert_allclose(grad, generic_grad, rtol=1e-10, atol=1e-12 * np.abs(grad).max())


@pytest.mark.parametrize("form_name", ["chinchilla", "kaplan"])
def test_objective_gradient_matches_finite_differences(form_name: str) -> None:
    form = FORMS[form_name]
    rng = np.random.default_rng(1)
    true = EPOCH_FIT if form_name == "chinchilla" else KAPLAN_LAW
    n_params, n_tokens, loss = synthetic_runs(rng, form_name, true, 40)
    data = (np.log(n_params), np.log(n_tokens), np.log(loss), 1e-3)
    raw = form.to_raw(true) + 0.05 * rng.standard_normal(len(form.raw_names))
    _, grad = fit.objective_and_grad(form, raw[None, :], *data)
    step = 1e-7
    for i in range(len(raw)):
        shift = np.zeros_like(raw)
        shift[i] = step
        up, _ = fit.objective_and_grad(form, (raw + shift)[None, :], *data)
        down, _ = fit.objective_and_grad(form, (raw - shift)[None, :], *data)
        assert grad[0, i] == pytest.approx((up[0] - down[0]) / (2 * step), rel=1e-5, abs=1e-9)


# --- the batched optimiser -------------------------------------------------------------------


def test_batched_lbfgs_solves_each_problem_with_its_own_data() -> None:
    # Rosenbrock shifted per start: minimum at (c, c^2), different for every start.
    centres = np.linspace(-1.0, 2.0, 7)

    def rosenbrock(x: FloatArray, rows: fit.IntArray) -> tuple[FloatArray, FloatArray]:
        c = centres[rows]
        valley = x[:, 1] - x[:, 0] ** 2
        value = (x[:, 0] - c) ** 2 + 100 * valley**2
        grad = np.stack([2 * (x[:, 0] - c) - 400 * x[:, 0] * valley, 200 * valley], axis=1)
        return value, grad

    x0 = np.column_stack([np.full(7, -1.5), np.full(7, 2.0)])
    x, value, converged = fit.batched_lbfgs(rosenbrock, x0, max_iter=500, tol=1e-14)
    assert converged.all()
    np.testing.assert_allclose(x[:, 0], centres, atol=1e-5)
    np.testing.assert_allclose(x[:, 1], centres**2, atol=1e-5)
    assert np.all(value < 1e-10)

    _, _, stopped_early = fit.batched_lbfgs(rosenbrock, x0, max_iter=3, tol=1e-14)
    assert not stopped_early.any()


def test_vectorised_search_reaches_the_scipy_loop_optimum() -> None:
    """150 of Hoffmann's starts: batched search + polish == best of 150 scipy L-BFGS-B runs."""
    n_params, n_tokens, loss = load_epoch_runs()
    form = FORMS["chinchilla"]
    rng = np.random.default_rng(2)
    starts = form.init_grid()[rng.choice(4500, 150, replace=False)]
    data = (np.log(n_params), np.log(n_tokens), np.log(loss))
    loop_best = min(fit.polish(form, start, *data).fun for start in starts)
    result = fit.fit_law(n_params, n_tokens, loss, bootstrap=0, starts=starts)
    assert result.n_starts == 150
    assert result.objective == pytest.approx(loop_best, rel=1e-9)


# --- the literature: Besiroglu et al. 2024 ---------------------------------------------------


def test_epoch_refit_matches_besiroglu_et_al(epoch_fit: fit.FitResult) -> None:
    params = epoch_fit.params
    assert epoch_fit.converged
    assert epoch_fit.warnings == []
    assert epoch_fit.n_points == 240
    assert epoch_fit.n_starts == 4500
    for name in ("E", "alpha", "beta"):
        assert params[name] == pytest.approx(EPOCH_FIT[name], rel=0.02), name
    for name in ("A", "B"):
        assert params[name] == pytest.approx(EPOCH_FIT[name], rel=0.15), name
    assert epoch_fit.residuals["r2"] > 0.99
    assert epoch_fit.residuals["rmse_log"] < 0.01


def test_epoch_bootstrap_intervals_match_besiroglu_et_al(epoch_fit: fit.FitResult) -> None:
    assert epoch_fit.bootstrap is not None
    assert epoch_fit.bootstrap.shape == (1000, 5)
    assert epoch_fit.interval_level == 0.95
    for name in epoch_fit.param_names:
        low, high = epoch_fit.intervals[name]
        assert low < epoch_fit.params[name] < high, name
    for name, (low, high) in EPOCH_INTERVALS_95.items():
        assert epoch_fit.intervals[name][0] == pytest.approx(low, abs=0.02), name
        assert epoch_fit.intervals[name][1] == pytest.approx(high, abs=0.02), name
    # Full default fit (4500 starts + 1000 resamples): the budgets are 10 s + 30 s.
    assert epoch_fit.seconds < 40.0


def test_epoch_fit_gives_about_18_tokens_per_parameter_at_chinchilla_compute(
    epoch_fit: fit.FitResult,
) -> None:
    compute_flops = 5.88e23  # Chinchilla's training compute (Hoffmann et al. 2022, Table 3)
    n_opt = float(FORMS["chinchilla"].optimal_n(epoch_fit.params, compute_flops))
    tokens_per_param = compute_flops / (6.0 * n_opt) / n_opt
    assert tokens_per_param == pytest.approx(18.0, abs=1.5)


def test_bootstrap_is_reproducible_and_in_param_name_order() -> None:
    n_params, n_tokens, loss = load_epoch_runs()
    starts = FORMS["chinchilla"].init_grid()[::30]
    first = fit.fit_law(n_params, n_tokens, loss, bootstrap=50, seed=7, starts=starts)
    again = fit.fit_law(n_params, n_tokens, loss, bootstrap=50, seed=7, starts=starts)
    assert first.bootstrap is not None and again.bootstrap is not None
    np.testing.assert_array_equal(first.bootstrap, again.bootstrap)
    assert first.param_names == ("E", "A", "B", "alpha", "beta")
    np.testing.assert_allclose(np.median(first.bootstrap[:, 3]), first.params["alpha"], rtol=0.05)
    assert np.median(first.bootstrap[:, 0]) == pytest.approx(first.params["E"], rel=0.02)


# --- recovery of known laws ------------------------------------------------------------------


@pytest.mark.slow
def test_bootstrap_intervals_cover_the_true_chinchilla_parameters() -> None:
    """20 random known laws, 100 noisy runs each: how often the 95% interval holds the truth.

    Measured over 200 other draws (seeds 1000-1199, 200 resamples, these 300 starts): E 0.965,
    A 0.975, B 0.96, alpha 0.975, beta 0.955, i.e. nominal. These 20 draws: 0.95 to 1.0.
    """
    form = FORMS["chinchilla"]
    starts = form.init_grid()[::15]  # 300 of the 4500 starts: enough for synthetic data
    draws = int(os.environ.get("SCALEPLAN_COVERAGE_DRAWS", "20"))  # BENCHMARKS.md uses 200
    covered = dict.fromkeys(form.param_names, 0)
    for draw in range(draws):
        rng = np.random.default_rng(100 + draw)
        true = random_chinchilla(rng)
        n_params, n_tokens, loss = synthetic_runs(rng, "chinchilla", true)
        result = fit.fit_law(n_params, n_tokens, loss, bootstrap=200, seed=draw, starts=starts)
        assert result.converged
        for name in form.param_names:
            low, high = result.intervals[name]
            covered[name] += low <= true[name] <= high
    coverage = {name: hits / draws for name, hits in covered.items()}
    print(f"95% bootstrap interval coverage over {draws} draws: {coverage}")
    assert coverage["alpha"] >= 0.8
    assert coverage["beta"] >= 0.8
    assert min(coverage.values()) >= 0.75


def test_fit_recovers_a_known_chinchilla_law() -> None:
    rng = np.random.default_rng(3)
    true = random_chinchilla(rng)
    n_params, n_tokens, loss = synthetic_runs(rng, "chinchilla", true)
    starts = FORMS["chinchilla"].init_grid()[::10]
    result = fit.fit_law(n_params, n_tokens, loss, bootstrap=0, starts=starts)
    assert result.converged and result.warnings == []
    for name in ("E", "alpha", "beta"):
        assert result.params[name] == pytest.approx(true[name], rel=0.05), name
    assert result.residuals["rmse_log"] == pytest.approx(0.01, rel=0.3)


def test_fit_recovers_a_known_kaplan_law() -> None:
    rng = np.random.default_rng(4)
    n_params, n_tokens, loss = synthetic_runs(rng, "kaplan", KAPLAN_LAW)
    result = fit.fit_law(n_params, n_tokens, loss, form="kaplan", bootstrap=100)
    assert result.form == "kaplan" and result.converged and result.warnings == []
    assert result.n_starts == len(FORMS["kaplan"].init_grid())
    for name in ("alpha_N", "alpha_D"):
        assert result.params[name] == pytest.approx(KAPLAN_LAW[name], rel=0.05), name
        low, high = result.intervals[name]
        assert low <= KAPLAN_LAW[name] <= high, name
    # N_c and D_c are loosely determined on this grid; the law they make is not.
    fitted = FORMS["kaplan"].loss(result.params, n_params, n_tokens)
    true_loss = FORMS["kaplan"].loss(KAPLAN_LAW, n_params, n_tokens)
    np.testing.assert_allclose(fitted, true_loss, rtol=0.02)  # 1% noise per run


# --- warnings --------------------------------------------------------------------------------


def test_an_optimum_on_a_bound_is_reported() -> None:
    """Loss that does not depend on N: A/N^alpha flattens to a constant (alpha -> 0)."""
    rng = np.random.default_rng(5)
    n_params = np.exp(rng.uniform(np.log(1e7), np.log(1e10), 100))
    n_tokens = np.exp(rng.uniform(np.log(1e8), np.log(1e12), 100))
    loss = (1.8 + 2000.0 / n_tokens**0.35) * np.exp(0.01 * rng.standard_normal(100))
    result = fit.fit_law(n_params, n_tokens, loss, bootstrap=0)
    assert any("alpha" in warning and "bound" in warning for warning in result.warnings)


def test_non_convergence_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(6)
    n_params, n_tokens, loss = synthetic_runs(rng, "chinchilla", EPOCH_FIT)
    monkeypatch.setitem(fit.POLISH_OPTIONS, "maxiter", 1)
    monkeypatch.setattr(fit, "SEARCH_MAX_ITER", 2)
    starts = FORMS["chinchilla"].init_grid()[::50]
    result = fit.fit_law(n_params, n_tokens, loss, bootstrap=0, starts=starts)
    assert not result.converged
    assert any("did not converge" in warning for warning in result.warnings)


# --- user mistakes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("column", "row", "value"),
    [
        ("n_params", 3, 0.0),
        ("n_params", 0, -1e9),
        ("n_tokens", 7, np.nan),
        ("n_tokens", 2, np.inf),
        ("loss", 5, 0.0),
        ("loss", 9, np.nan),
    ],
)
def test_bad_values_name_the_array_and_the_row(column: str, row: int, value: float) -> None:
    runs = {
        "n_params": np.logspace(7, 10, 12),
        "n_tokens": np.logspace(9, 12, 12),
        "loss": np.linspace(3.0, 2.0, 12),
    }
    runs[column][row] = value
    with pytest.raises(InputError, match=rf"^{column}\[{row}\] = .*positive finite number"):
        fit.fit_law(runs["n_params"], runs["n_tokens"], runs["loss"], bootstrap=0)


def test_fewer_runs_than_parameters_is_an_input_error() -> None:
    with pytest.raises(InputError, match="4 runs cannot determine 5 parameters"):
        fit.fit_law([1e8, 1e9, 1e10, 2e10], [1e9, 1e10, 1e11, 1e12], [3.0, 2.8, 2.5, 2.2])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_tokens": np.logspace(9, 12, 11)}, "one value per run"),
        ({"loss": np.ones((3, 4))}, "1-D array"),
        ({"n_params": np.full(12, 1.2e5)}, "n_params: every run has 120000; .* model sizes"),
        ({"n_tokens": np.full(12, 2e9)}, "n_tokens: every run has 2e.09; .* token budgets"),
        ({"form": "gpt"}, "form: 'gpt' is not one of"),
        ({"interval_level": 95}, "interval_level=95"),
        ({"bootstrap": -1}, "bootstrap=-1"),
        ({"delta": 0.0}, "delta=0.0"),
        ({"starts": np.zeros((3, 4))}, r"starts: expected a finite \(K, 5\) array"),
    ],
)
def test_other_user_mistakes_are_input_errors(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "n_params": np.logspace(7, 10, 12),
        "n_tokens": np.logspace(9, 12, 12),
        "loss": np.linspace(3.0, 2.0, 12),
        "bootstrap": 0,
    }
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        fit.fit_law(**args)  # type: ignore[arg-type]
