"""Fit a parametric scaling law to training runs: Huber loss on log-loss residuals, multi-start
L-BFGS, bootstrap intervals (Hoffmann et al. 2022, App. D.2; Besiroglu et al. 2024).

The objective for one parameter vector ``raw`` (the form's unconstrained coordinates) is

    sum_i  w_i * Huber_delta(log L_pred(N_i, D_i; raw) - log L_i),        delta = 1e-3,

minimised by L-BFGS from every point of the form's starting grid (4500 points for Chinchilla).
Running 4500 scipy minimisations one after the other takes a minute or two; here all starts move
at once (``batched_lbfgs``: arrays over starts, per-start history, line search and convergence),
then the few best distinct candidates are polished by scipy's L-BFGS-B at tight tolerance.

The bootstrap refits the law on resamples of the runs (multinomial counts used as integer weights
on the points), every resample warm-started from the point estimate, all in one batched run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import OptimizeResult, minimize

from planner.errors import InputError
from planner.laws import ChinchillaForm, FloatArray, Form, get_form

IntArray = NDArray[np.intp]
# fun_and_grad(x, rows): objectives (k,) and gradients (k, P) at x (k, P), iterates of `rows`.
BatchedFunction = Callable[[FloatArray, IntArray], tuple[FloatArray, FloatArray]]

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, App. D.2
# scipy L-BFGS-B settings of the polish step (and of the loop it is benchmarked against). ftol is
# on (f_k - f_k+1) / max(|f_k|, |f_k+1|, 1): the summed Huber is ~1e-3, so it must be far below
# scipy's default 2.2e-9 to pin the optimum to ~1e-12 relative.
POLISH_OPTIONS: dict[str, float | int] = {
    "ftol": 1e-15,
    "gtol": 1e-10,
    "maxiter": 10_000,
    "maxfun": 20_000,
    "maxcor": 10,
}
# The batched stage only has to find the right basin; the polish step pins the optimum down. On
# Epoch's data, 1e-6 leaves ~200 of the 4500 starts within 1e-3 of the best objective.
SEARCH_TOL = 1e-6
SEARCH_MAX_ITER = 300
# The bootstrap has no polish step: its batched runs go to a tight tolerance.
BOOTSTRAP_TOL = 1e-12
BOOTSTRAP_MAX_ITER = 3000  # refits that drift to a bound (E -> 0) crawl
# An optimum with a parameter past these sits on a bound of the plausible region: say so.
MIN_EXPONENT = 0.0
MAX_EXPONENT = 3.0
MIN_COEFFICIENT = 1e-12
MAX_COEFFICIENT = 1e30
MIN_TERM_SHARE = 0.01  # a term below (or changing by less than) 1% of the loss has collapsed
N_POLISH = 5  # best distinct candidates of the batched stage handed to scipy
_CHUNK = 128  # starts evaluated together: keeps the (chunk, M) temporaries in cache


@dataclass(frozen=True)
class FitResult:
    """A fitted law with its uncertainty and diagnostics."""

    form: str
    """Name of the law's form: "chinchilla" or "kaplan"."""
    params: dict[str, float]
    """Natural parameters at the optimum (E, A, B, alpha, beta for Chinchilla)."""
    objective: float
    """Summed Huber loss of the log-loss residuals at the optimum."""
    n_points: int
    """Number of runs fitted."""
    converged: bool
    """Whether the final (polished) optimisation met its convergence test."""
    warnings: list[str]
    """Human sentences: non-convergence, an optimum at a bound, failed bootstrap refits."""
    bootstrap: FloatArray | None
    """(B, P) natural parameters per resample, columns in ``param_names`` order or None."""
    interval_level: float
    """Coverage of ``intervals``, e.g. 0.95."""
    intervals: dict[str, tuple[float, float]]
    """Per parameter, the bootstrap percentile interval at ``interval_level`` (or empty)."""
    residuals: dict[str, float]
    """Statistics of residual = log L_pred - log L_obs: rmse_log, max_abs_log, mean_log, r2."""
    n_starts: int
    """Number of starting points of the multi-start search."""
    seconds: float
    """Wall-clock time of the whole fit, bootstrap included."""

    @property
    def param_names(self) -> tuple[str, ...]:
        return get_form(self.form).param_names


def huber(residual: ArrayLike, delta: float) -> FloatArray:
    """Huber's loss: r^2/2 for |r| <= delta, delta (|r| - delta/2) beyond (Huber 1964)."""
    r = np.asarray(residual, dtype=float)
    abs_r = np.abs(r)
    return np.asarray(np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta)))


def objective_and_grad(
    form: Form,
    raw: FloatArray,
    log_n: FloatArray,
    log_d: FloatArray,
    log_loss: FloatArray,
    delta: float,
    weights: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Summed (weighted) Huber loss of log-loss residuals (S,) and its gradient (S, P).

    ``raw`` is (S, P); ``weights`` is None (all ones), (M,) shared, or (S, M) one row per candidate.
    """
    raw = np.atleast_2d(np.asarray(raw, dtype=float))
    kernel = _chinchilla_objective if type(form) is ChinchillaForm else _generic_objective
    n_candidates = raw.shape[0]
    value = np.empty(n_candidates)
    grad = np.empty((n_candidates, raw.shape[1]))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        for lo in range(0, n_candidates, _CHUNK):
            hi = min(lo + _CHUNK, n_candidates)
            chunk_weights = weights if weights is None or weights.ndim == 1 else weights[lo:hi]
            value[lo:hi], grad[lo:hi] = kernel(
                form, raw[lo:hi], log_n, log_d, log_loss, delta, chunk_weights
            )
    return value, grad


def _generic_objective(
    form: Form,
    raw: FloatArray,
    log_n: FloatArray,
    log_d: FloatArray,
    log_loss: FloatArray,
    delta: float,
    weights: FloatArray | None,
) -> tuple[FloatArray, FloatArray]:
    """Any form, through its ``value_and_grad``: chain rule through the Huber loss."""
    log_pred, dlog_pred = form.value_and_grad(raw, log_n, log_d)
    residual = log_pred - log_loss
    slope = np.clip(residual, -delta, delta)  # d Huber / d residual
    loss = huber(residual, delta)
    if weights is not None:
        loss = loss * weights
        slope = slope * weights
    return loss.sum(axis=1), np.matmul(slope[:, None, :], dlog_pred)[:, 0, :]


def _chinchilla_objective(
    form: Form,
    raw: FloatArray,
    log_n: FloatArray,
    log_d: FloatArray,
    log_loss: FloatArray,
    delta: float,
    weights: FloatArray | None,
) -> tuple[FloatArray, FloatArray]:
    """The same as ``_generic_objective`` for Chinchilla, without the (S, M, P) Jacobian: 7x faster.

    log L = e + log(1 + exp(a - e - alpha log N) + exp(b - e - beta log D)), the log-sum-exp of
    Hoffmann et al. 2022, App. D.2, shifted by e; the gradient of the sum over runs reduces to sums
    and two mat-vecs. Rows whose shifted terms overflow are recomputed by the generic path.
    """
    e, a, b, alpha, beta = (raw[:, i] for i in range(5))
    exp_n = np.multiply.outer(-alpha, log_n)
    exp_n += (a - e)[:, None]
    np.exp(exp_n, out=exp_n)  # A N^-alpha / E
    exp_d = np.multiply.outer(-beta, log_d)
    exp_d += (b - e)[:, None]
    np.exp(exp_d, out=exp_d)  # B D^-beta / E
    total = exp_n + exp_d
    total += 1.0  # L / E
    residual = np.log(total)
    residual += e[:, None]
    residual -= log_loss
    slope = np.minimum(np.maximum(residual, -delta), delta)  # d Huber / d residual
    # Huber(r) = slope * (r - slope / 2) in both regimes.
    loss = residual
    loss -= 0.5 * slope
    loss *= slope
    if weights is not None:
        loss *= weights
        slope *= weights
    value = loss.sum(axis=1)
    slope /= total  # d objective / d e-term, per run
    exp_n *= slope  # d objective / d N-term, per run
    exp_d *= slope  # d objective / d D-term, per run
    grad = np.empty_like(raw)
    grad[:, 0] = slope.sum(axis=1)
    grad[:, 1] = exp_n.sum(axis=1)
    grad[:, 2] = exp_d.sum(axis=1)
    grad[:, 3] = -(exp_n @ log_n)
    grad[:, 4] = -(exp_d @ log_d)
    overflow = ~(np.isfinite(value) & np.isfinite(grad).all(axis=1))
    if overflow.any():
        rows_weights = weights if weights is None or weights.ndim == 1 else weights[overflow]
        value[overflow], grad[overflow] = _generic_objective(
            form, raw[overflow], log_n, log_d, log_loss, delta, rows_weights
        )
    return value, grad


def batched_lbfgs(
    fun_and_grad: BatchedFunction,
    x0: FloatArray,
    *,
    max_iter: int,
    tol: float,
    history: int = 10,
    max_step: float = 10.0,
) -> tuple[FloatArray, FloatArray, NDArray[np.bool_]]:
    """Minimise S independent problems at once with L-BFGS (Nocedal & Wright 2006, Alg. 7.4/7.5).

    ``fun_and_grad(x, rows)`` returns the objectives (k,) and gradients (k, P) at ``x`` (k, P), the
    iterates of starts ``rows`` (indices into ``x0``; a per-start objective, e.g. bootstrap
    weights, selects its data with them). Each start keeps its own history, backtracking Armijo line
    search and convergence test; converged starts stop costing anything. A start has converged when
    one step lowers its objective by at most ``tol`` relative, its gradient is exactly zero, or no
    step along steepest descent lowers it at all (a minimum to rounding). ``history`` is the number
    of (s, y) pairs kept; ``max_step`` caps a step's largest coordinate change.

    Returns the final iterates (S, P), objectives (S,) and a converged mask (S,); a start that hits
    ``max_iter``, or whose objective is or becomes non-finite along every trial step, is not.
    """
    x = np.array(x0, dtype=float)
    n_starts, n_coords = x.shape
    all_rows = np.arange(n_starts)
    f, g = fun_and_grad(x, all_rows)
    f, g = f.copy(), g.copy()
    done = ~(np.isfinite(f) & np.isfinite(g).all(axis=1))
    converged = np.zeros(n_starts, dtype=bool)
    zero_grad = ~done & ~np.any(g, axis=1)
    converged |= zero_grad
    done |= zero_grad
    steps = np.zeros((n_starts, history, n_coords))  # s_k = x_k+1 - x_k, oldest first
    grad_changes = np.zeros((n_starts, history, n_coords))  # y_k = g_k+1 - g_k
    inv_curvature = np.zeros((n_starts, history))  # rho_k = 1 / (y_k . s_k); 0 = empty slot

    for _ in range(max_iter):
        rows = np.flatnonzero(~done)
        if rows.size == 0:
            break
        x_a, f_a, g_a = x[rows], f[rows], g[rows]
        s_a, y_a, rho_a = steps[rows], grad_changes[rows], inv_curvature[rows]
        direction = -_two_loop(g_a, s_a, y_a, rho_a)
        slope = np.einsum("kp,kp->k", direction, g_a)
        # 1. Not a descent direction (stale history): forget it, take steepest descent.
        uphill = ~(slope < 0)
        if uphill.any():
            direction[uphill] = -g_a[uphill]
            slope[uphill] = -np.einsum("kp,kp->k", g_a[uphill], g_a[uphill])
            rho_a[uphill] = 0.0
            s_a[uphill] = 0.0
            y_a[uphill] = 0.0
        # 2. First step of a fresh history: length min(1, 1/|g|), as in L-BFGS-B; else 1.
        fresh = rho_a[:, -1] == 0
        step = np.ones(rows.size)
        with np.errstate(divide="ignore"):
            step[fresh] = np.minimum(1.0, 1.0 / np.linalg.norm(g_a[fresh], axis=1))
        largest = np.abs(direction).max(axis=1)
        step = np.minimum(step, max_step / np.maximum(largest, 1e-300))
        # 3. Backtracking line search.
        x_new, f_new, g_new, accepted, flat = _backtrack(
            fun_and_grad, rows, x_a, f_a, direction, slope, step
        )
        # 4. A failed line search with history: retry from steepest descent. Without: stop; if f
        # stayed finite, no step down to 1e-12 of the first lowered it: a minimum to rounding.
        failed = ~accepted
        retry = failed & ~fresh
        rho_a[retry], s_a[retry], y_a[retry] = 0.0, 0.0, 0.0
        done[rows[failed & fresh]] = True
        converged[rows[failed & fresh & flat]] = True
        # 5. Update the history where the curvature condition y.s > 0 holds.
        s_new = x_new - x_a
        y_new = g_new - g_a
        curvature = np.einsum("kp,kp->k", s_new, y_new)
        update = accepted & (
            curvature > np.maximum(1e-12 * np.einsum("kp,kp->k", y_new, y_new), 1e-300)
        )
        s_a[update] = np.roll(s_a[update], -1, axis=1)
        y_a[update] = np.roll(y_a[update], -1, axis=1)
        rho_a[update] = np.roll(rho_a[update], -1, axis=1)
        s_a[update, -1] = s_new[update]
        y_a[update, -1] = y_new[update]
        rho_a[update, -1] = 1.0 / curvature[update]
        steps[rows], grad_changes[rows], inv_curvature[rows] = s_a, y_a, rho_a
        # 6. Move, then test convergence on the relative decrease.
        moved = rows[accepted]
        decrease = f_a[accepted] - f_new[accepted]
        scale = np.maximum(np.abs(f_a[accepted]), np.abs(f_new[accepted]))
        x[moved], f[moved], g[moved] = x_new[accepted], f_new[accepted], g_new[accepted]
        stop = (decrease <= tol * scale) | ~np.any(g_new[accepted], axis=1)
        converged[moved[stop]] = True
        done[moved[stop]] = True
    return x, f, converged


def _two_loop(
    grad: FloatArray, steps: FloatArray, grad_changes: FloatArray, rho: FloatArray
) -> FloatArray:
    """H_k grad by the L-BFGS two-loop recursion, per row; empty history slots hold zeros."""
    q = grad.copy()
    history = rho.shape[1]
    alphas = np.zeros_like(rho)
    for j in range(history - 1, -1, -1):
        alphas[:, j] = rho[:, j] * np.einsum("kp,kp->k", steps[:, j], q)
        q -= alphas[:, j, None] * grad_changes[:, j]
    # Initial Hessian scaling s.y / y.y of the newest pair (Nocedal & Wright 2006, eq. 7.20).
    y_last = grad_changes[:, -1]
    yy = np.einsum("kp,kp->k", y_last, y_last)
    has_pair = rho[:, -1] != 0
    gamma = np.ones(len(grad))
    gamma[has_pair] = 1.0 / (rho[has_pair, -1] * yy[has_pair])
    r = gamma[:, None] * q
    for j in range(history):
        beta = rho[:, j] * np.einsum("kp,kp->k", grad_changes[:, j], r)
        r += (alphas[:, j] - beta)[:, None] * steps[:, j]
    return r


def _backtrack(
    fun_and_grad: BatchedFunction,
    rows: IntArray,
    x: FloatArray,
    f: FloatArray,
    direction: FloatArray,
    slope: FloatArray,
    step: FloatArray,
    *,
    armijo: float = 1e-4,
    max_tries: int = 40,
) -> tuple[FloatArray, FloatArray, FloatArray, NDArray[np.bool_], NDArray[np.bool_]]:
    """Per-row backtracking until f(x + t d) <= f(x) + c t g.d (Armijo), with a safeguarded
    quadratic interpolation for the next t (Nocedal & Wright 2006, sec. 3.5).

    Returns the new points, objectives, gradients, the accepted mask and, for the rows that found
    no step, whether their last trial was finite (f is flat to rounding there, not overflowing).
    """
    x_new, f_new, g_new = x.copy(), f.copy(), np.zeros_like(x)
    accepted = np.zeros(len(x), dtype=bool)
    flat = np.zeros(len(x), dtype=bool)
    step = step.copy()
    pending = np.arange(len(x))
    for _ in range(max_tries):
        trial = x[pending] + step[pending, None] * direction[pending]
        f_trial, g_trial = fun_and_grad(trial, rows[pending])
        ok = (
            np.isfinite(f_trial)
            & (f_trial <= f[pending] + armijo * step[pending] * slope[pending])
            & np.isfinite(g_trial).all(axis=1)
        )
        good = pending[ok]
        x_new[good], f_new[good], g_new[good] = trial[ok], f_trial[ok], g_trial[ok]
        accepted[good] = True
        pending, f_bad = pending[~ok], f_trial[~ok]
        flat[pending] = np.isfinite(f_bad)
        if pending.size == 0:
            break
        t, d0 = step[pending], slope[pending]
        curvature = 2.0 * (f_bad - f[pending] - d0 * t)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_quad = -d0 * t * t / curvature
        t_quad = np.where(np.isfinite(t_quad) & (curvature > 0), t_quad, 0.1 * t)
        step[pending] = np.clip(t_quad, 0.1 * t, 0.5 * t)
    return x_new, f_new, g_new, accepted, flat


def polish(
    form: Form,
    x0: ArrayLike,
    log_n: FloatArray,
    log_d: FloatArray,
    log_loss: FloatArray,
    delta: float = HUBER_DELTA,
) -> OptimizeResult:
    """One scipy L-BFGS-B run from ``x0`` with the analytic gradient and ``POLISH_OPTIONS``."""

    def fun(raw: FloatArray) -> tuple[float, FloatArray]:
        value, grad = objective_and_grad(form, raw[None, :], log_n, log_d, log_loss, delta)
        return float(value[0]), grad[0]

    x_start = np.asarray(x0, dtype=float)
    return minimize(fun, x_start, jac=True, method="L-BFGS-B", options=POLISH_OPTIONS)


def fit_law(
    n_params: ArrayLike,
    n_tokens: ArrayLike,
    loss: ArrayLike,
    form: str = "chinchilla",
    *,
    delta: float = HUBER_DELTA,
    bootstrap: int = 1000,
    interval_level: float = 0.95,
    seed: int = 0,
    starts: ArrayLike | None = None,
) -> FitResult:
    """Fit a law's form to runs of ``n_params`` parameters trained on ``n_tokens`` tokens.

    Hoffmann et al. 2022, App. D.2: minimise the summed Huber loss (``delta``) of the residuals
    log L_pred - log L by L-BFGS from every start of ``form``'s grid (or ``starts``, raw
    coordinates (K, P)); keep the best. Then ``bootstrap`` refits on resampled runs give percentile
    intervals at ``interval_level`` (Besiroglu et al. 2024); 0 skips them.

    >>> result = fit_law(n, d, loss, bootstrap=200)   # doctest: +SKIP
    >>> result.params["alpha"], result.intervals["alpha"]   # doctest: +SKIP
    """
    started = time.perf_counter()
    law_form = get_form(form, where="form")
    n_arr, d_arr, loss_arr = _check_runs(n_params, n_tokens, loss, len(law_form.param_names))
    if not (np.isfinite(delta) and delta > 0):
        raise InputError(f"delta={delta}: the Huber threshold must be a positive number")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int | np.integer) or bootstrap < 0:
        raise InputError(f"bootstrap={bootstrap!r}: expected a whole number of resamples >= 0")
    if not 0.0 < interval_level < 1.0:
        raise InputError(f"interval_level={interval_level}: expected a level between 0 and 1")
    start_grid = _check_starts(law_form, starts)
    log_n, log_d, log_loss = np.log(n_arr), np.log(d_arr), np.log(loss_arr)

    # 1. Every start at once, to a loose tolerance: enough to find the best basins.
    def search_objective(raw: FloatArray, rows: IntArray) -> tuple[FloatArray, FloatArray]:
        return objective_and_grad(law_form, raw, log_n, log_d, log_loss, delta)

    x, f, _ = batched_lbfgs(search_objective, start_grid, max_iter=SEARCH_MAX_ITER, tol=SEARCH_TOL)
    # 2. Polish the best distinct candidates with scipy at tight tolerance; keep the best.
    polished = [polish(law_form, x[i], log_n, log_d, log_loss, delta) for i in _distinct_best(x, f)]
    if not polished:
        raise InputError(
            f"no starting point gives a finite objective for form '{law_form.name}' on this data"
        )
    best = min(polished, key=lambda result: result.fun)
    raw_best = np.asarray(best.x, dtype=float)
    with np.errstate(over="ignore"):
        params = {name: float(value) for name, value in law_form.to_params(raw_best).items()}
    gradient_scale = len(loss_arr) * delta  # |gradient| <= M delta |d log L / d raw|
    converged = bool(best.success) or float(np.max(np.abs(best.jac))) <= 1e-6 * gradient_scale

    warnings: list[str] = []
    if not converged:
        warnings.append(
            f"the fit did not converge ({best.message}): the parameters may be off the optimum"
        )
    warnings += _bound_warnings(law_form, raw_best, log_n, log_d)

    # 3. Bootstrap: resampled runs as multinomial counts, warm-started at the optimum.
    samples: FloatArray | None = None
    intervals: dict[str, tuple[float, float]] = {}
    if bootstrap > 0:
        samples, n_failed, n_on_bound = _bootstrap(
            law_form, raw_best, log_n, log_d, log_loss, delta, bootstrap, seed
        )
        if n_failed:
            warnings.append(
                f"{n_failed} of {bootstrap} bootstrap refits did not converge; the intervals"
                " include their last iterates"
            )
        if n_on_bound:
            warnings.append(
                f"{n_on_bound} of {bootstrap} bootstrap refits sit on a bound (a non-positive or"
                " absurd parameter, or a collapsed term): the data barely determines the law"
            )
        tail = 50.0 * (1.0 - interval_level)
        for column, name in enumerate(law_form.param_names):
            low, high = np.nanpercentile(samples[:, column], [tail, 100.0 - tail])
            intervals[name] = (float(low), float(high))

    residual = law_form.log_loss(raw_best[None, :], log_n, log_d)[0] - log_loss
    spread = float(np.sum((log_loss - log_loss.mean()) ** 2))
    residuals = {
        "rmse_log": float(np.sqrt(np.mean(residual**2))),
        "max_abs_log": float(np.max(np.abs(residual))),
        "mean_log": float(np.mean(residual)),
        "r2": 1.0 - float(np.sum(residual**2)) / spread if spread > 0 else float("nan"),
    }
    return FitResult(
        form=law_form.name,
        params=params,
        objective=float(best.fun),
        n_points=len(loss_arr),
        converged=converged,
        warnings=warnings,
        bootstrap=samples,
        interval_level=float(interval_level),
        intervals=intervals,
        residuals=residuals,
        n_starts=len(start_grid),
        seconds=time.perf_counter() - started,
    )


def _check_runs(
    n_params: ArrayLike, n_tokens: ArrayLike, loss: ArrayLike, n_coefficients: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """1-D, equally long, positive and finite arrays, at least as many runs as parameters."""
    arrays = {"n_params": n_params, "n_tokens": n_tokens, "loss": loss}
    checked: list[FloatArray] = []
    for name, values in arrays.items():
        try:
            array = np.asarray(values, dtype=float)
        except (TypeError, ValueError):
            raise InputError(f"{name}: expected numbers, got {type(values).__name__}") from None
        if array.ndim != 1:
            raise InputError(f"{name}: expected a 1-D array of runs, got shape {array.shape}")
        bad = np.flatnonzero(~(np.isfinite(array) & (array > 0)))
        if bad.size:
            row = int(bad[0])
            raise InputError(
                f"{name}[{row}] = {array[row]}: every value must be a positive finite number"
                f" ({bad.size} bad value{'s' if bad.size > 1 else ''})"
            )
        checked.append(array)
    lengths = [len(array) for array in checked]
    if len(set(lengths)) > 1:
        raise InputError(
            "n_params, n_tokens and loss must have one value per run; got lengths"
            f" {', '.join(map(str, lengths))}"
        )
    if lengths[0] < n_coefficients:
        raise InputError(
            f"{lengths[0]} runs cannot determine {n_coefficients} parameters: need at least"
            f" {n_coefficients} runs (and many more for a trustworthy fit)"
        )
    # both forms have a term in N and one in D: one value of either leaves its term a constant
    for (name, what), array in zip(
        (("n_params", "model sizes"), ("n_tokens", "token budgets")), checked[:2], strict=True
    ):
        if np.unique(array).size == 1:
            raise InputError(
                f"{name}: every run has {array[0]:.6g}; a law in N and D needs runs at 3 or"
                f" more {what} to determine its exponent"
            )
    return checked[0], checked[1], checked[2]


def _check_starts(form: Form, starts: ArrayLike | None) -> FloatArray:
    if starts is None:
        return form.init_grid()
    grid = np.asarray(starts, dtype=float)
    width = len(form.raw_names)
    if grid.ndim != 2 or grid.shape[1] != width or len(grid) == 0 or not np.isfinite(grid).all():
        raise InputError(
            f"starts: expected a finite (K, {width}) array of raw coordinates"
            f" ({', '.join(form.raw_names)}), got shape {grid.shape}"
        )
    return grid


def _distinct_best(x: FloatArray, f: FloatArray, count: int = N_POLISH) -> list[int]:
    """Indices of the ``count`` lowest finite objectives whose points differ by > 0.01 (raw)."""
    chosen: list[int] = []
    for i in np.argsort(np.where(np.isfinite(f), f, np.inf)):
        if not np.isfinite(f[i]) or len(chosen) == count:
            break
        if all(np.max(np.abs(x[i] - x[j])) > 1e-2 for j in chosen):
            chosen.append(int(i))
    return chosen


def _bootstrap(
    form: Form,
    raw_best: FloatArray,
    log_n: FloatArray,
    log_d: FloatArray,
    log_loss: FloatArray,
    delta: float,
    n_resamples: int,
    seed: int,
) -> tuple[FloatArray, int, int]:
    """Natural parameters (B, P) refitted on B resamples of the runs; how many did not converge
    and how many sit on a bound.

    A resample draws M runs with replacement: multinomial counts, used as integer weights.
    """
    n_runs = len(log_loss)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_runs, np.full(n_runs, 1.0 / n_runs), size=n_resamples)
    weights = counts.astype(float)

    def resample_objective(raw: FloatArray, rows: IntArray) -> tuple[FloatArray, FloatArray]:
        return objective_and_grad(form, raw, log_n, log_d, log_loss, delta, weights[rows])

    x0 = np.repeat(raw_best[None, :], n_resamples, axis=0)
    x, _, converged = batched_lbfgs(
        resample_objective, x0, max_iter=BOOTSTRAP_MAX_ITER, tol=BOOTSTRAP_TOL
    )
    with np.errstate(over="ignore"):
        samples = np.array([list(form.to_params(row).values()) for row in x])
    on_bound = sum(bool(_bound_warnings(form, row, log_n, log_d)) for row in x)
    return samples, int(np.count_nonzero(~converged)), on_bound


def _bound_warnings(form: Form, raw: FloatArray, log_n: FloatArray, log_d: FloatArray) -> list[str]:
    """Sentences for an optimum on a bound: a non-positive or absurd exponent, a collapsed term."""
    with np.errstate(over="ignore"):
        params = form.to_params(raw)
    warnings: list[str] = []
    exponents = [name for name in form.param_names if name.startswith(("alpha", "beta"))]
    for name in exponents:
        value = params[name]
        if value <= MIN_EXPONENT:
            warnings.append(
                f"{name} = {value:.3g} is not positive: the optimum sits on a bound (the loss does"
                " not fall with this variable in the data); the fit cannot be trusted"
            )
        elif value > MAX_EXPONENT:
            warnings.append(
                f"{name} = {value:.3g} is implausibly large (> {MAX_EXPONENT:g}): the optimum sits"
                " on a bound; the fit cannot be trusted"
            )
    for name in form.param_names:
        if name not in exponents and not MIN_COEFFICIENT <= params[name] <= MAX_COEFFICIENT:
            warnings.append(
                f"{name} = {params[name]:.3g} is outside [{MIN_COEFFICIENT:g},"
                f" {MAX_COEFFICIENT:g}]: the optimum sits on a bound; the fit cannot be trusted"
            )
    terms = _loss_terms(form, params, log_n, log_d)
    total = sum(terms.values())
    with np.errstate(invalid="ignore"):
        for term, values in terms.items():
            if term == "E":  # constant over the runs: it can only collapse to ~0
                share = float(np.max(values / total))
                if share < MIN_TERM_SHARE:
                    warnings.append(
                        f"E = {params['E']:.3g} is below {MIN_TERM_SHARE:.0%} of the predicted loss"
                        " at every run: it collapsed to ~0 (the optimum sits on a bound)"
                    )
                continue
            change = float((np.max(values) - np.min(values)) / np.mean(total))
            if change < MIN_TERM_SHARE:
                warnings.append(
                    f"the term {term} changes by {change:.2%} of the predicted loss across the"
                    " runs: its exponent is at the bound 0 or the term collapsed, so the data"
                    " does not determine its parameters"
                )
    return warnings


def _loss_terms(
    form: Form, params: dict[str, float], log_n: FloatArray, log_d: FloatArray
) -> dict[str, FloatArray]:
    """The additive terms of the loss (Chinchilla) or of its inner sum (Kaplan) at each run."""
    with np.errstate(over="ignore", invalid="ignore"):
        if form.name == "chinchilla":
            return {
                "A/N^alpha": params["A"] * np.exp(-params["alpha"] * log_n),
                "B/D^beta": params["B"] * np.exp(-params["beta"] * log_d),
                "E": np.full_like(log_n, params["E"]),
            }
        if form.name == "kaplan":
            ratio = params["alpha_N"] / params["alpha_D"]
            return {
                "(N_c/N)^(alpha_N/alpha_D)": np.exp(ratio * (np.log(params["N_c"]) - log_n)),
                "D_c/D": np.exp(np.log(params["D_c"]) - log_d),
            }
    return {}
