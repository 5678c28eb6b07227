"""Compute-optimal allocation: N and D for a budget, with bands, and inference-aware sizing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import brentq, minimize_scalar

from planner.batch import MeasuredBatch, kaplan_critical_batch, scale_critical_batch
from planner.errors import InputError
from planner.hparams import DEEPSEEK2024, HparamLaw
from planner.laws import FLOPS_PER_PARAM_TOKEN, Form
from planner.published import Law

# Forward pass only: 2 FLOPs per parameter per token (Kaplan et al. 2020, sec. 2.1).
INFERENCE_FLOPS_PER_PARAM_TOKEN = 2.0

FloatArray = NDArray[np.float64]


def positive_values(values: ArrayLike, field: str, what: str) -> FloatArray:
    """Values as a float array, or an InputError naming the field when one is not > 0 and finite."""
    array = np.atleast_1d(np.asarray(values, dtype=float))
    bad = ~np.isfinite(array) | (array <= 0)
    if array.size == 0 or bad.any():
        shown = array[bad][0] if bad.any() else "nothing"
        raise InputError(f"{field}: {shown} is not allowed; expected {what} (positive numbers)")
    return array


def _n_opt(law: Law, params: Mapping[str, float], compute: FloatArray) -> FloatArray:
    if law.allocation is not None:
        return law.allocation.n_opt(compute)
    assert law.surface is not None  # an allocation-only law always has an allocation
    return law.surface.optimal_n(params, compute)


def _optimum(law: Law, params: Mapping[str, float], compute: FloatArray) -> dict[str, FloatArray]:
    n = _n_opt(law, params, compute)
    d = compute / (FLOPS_PER_PARAM_TOKEN * n)
    loss = law.surface.loss(params, n, d) if law.surface else np.full_like(compute, np.nan)
    return {"n_params": n, "n_tokens": d, "tokens_per_param": d / n, "loss": loss}


def compute_optimal(
    law: Law,
    compute_flops: ArrayLike,
    *,
    level: float = 0.8,
    measured_batch: MeasuredBatch | None = None,
    hparams: HparamLaw = DEEPSEEK2024,
) -> list[dict[str, Any]]:
    """Compute-optimal N, D, tokens per parameter and loss for each budget C = 6ND.

    With bootstrap samples on the law, each quantity also gets ``_low``/``_high`` bounds: the
    central ``level`` interval over the samples. Rows also carry the learning rate and batch
    size of the `hparams` law at that compute (DeepSeek LLM's by default; ``batch_tokens``),
    Kaplan's critical batch at the predicted loss (``kaplan_b_crit_tokens``) and, given
    `measured_batch` (a ``scaleplan batch-size`` result), that B_crit carried to the predicted
    loss with Kaplan's exponent (``measured_b_crit_tokens``), which bounds ``batch_tokens``.
    """
    compute = positive_values(compute_flops, "--compute", "training FLOPs such as 1e21")
    best = _optimum(law, law.params, compute)
    bands: dict[str, tuple[FloatArray, FloatArray]] = {}
    samples = law.bootstrap_params()
    if samples:
        stacked = [_optimum(law, params, compute) for params in samples]
        tail = 100 * (1 - level) / 2
        for key in ("n_params", "n_tokens", "tokens_per_param", "loss"):
            values = np.stack([row[key] for row in stacked])
            bands[key] = (
                np.percentile(values, tail, axis=0),
                np.percentile(values, 100 - tail, axis=0),
            )
    learning_rate = hparams.learning_rate(compute)
    batch_tokens = hparams.batch_tokens(compute)
    rows: list[dict[str, Any]] = []
    for i, c in enumerate(compute):
        row: dict[str, Any] = {"law": law.name, "compute_flops": float(c)}
        for key, values in best.items():
            row[key] = _number(values[i])
            if key in bands:
                row[f"{key}_low"] = _number(bands[key][0][i])
                row[f"{key}_high"] = _number(bands[key][1][i])
        row["learning_rate"] = float(learning_rate[i])
        row["batch_tokens"] = float(batch_tokens[i])
        row["hparams"] = hparams.name
        row["batch_from"] = "deepseek" if hparams is DEEPSEEK2024 else hparams.name
        loss = row["loss"]
        row["kaplan_b_crit_tokens"] = None if loss is None else float(kaplan_critical_batch(loss))
        if measured_batch is not None and loss is not None:
            carried = scale_critical_batch(measured_batch.b_crit_tokens, measured_batch.loss, loss)
            row["measured_b_crit_tokens"] = float(carried)
            if carried < row["batch_tokens"]:  # past B_crit a larger batch buys nothing
                row["batch_tokens"] = float(carried)
                row["batch_from"] = "measured"
        rows.append(row)
    return rows


def _number(value: float) -> float | None:
    """JSON-friendly: NaN (no prediction) becomes None."""
    return None if not np.isfinite(value) else float(value)


def _surface(law: Law) -> Form:
    if law.surface is None:
        raise InputError(
            f"--law: '{law.name}' is an allocation rule without a loss surface;"
            " inference-aware sizing needs one (e.g. hoffmann2022, epoch2024 or a fitted law)"
        )
    return law.surface


def _minimise_log_n(objective: Any, low: float, high: float) -> float:
    """Minimise a 1-D function of log N: a coarse grid to bracket, then Brent on the bracket."""
    grid = np.linspace(low, high, 4001)
    values = np.array([objective(x) for x in grid])
    best = int(np.nanargmin(values))
    left, right = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    result = minimize_scalar(
        objective, bounds=(left, right), method="bounded", options={"xatol": 1e-10}
    )
    return float(result.x)


def _costs(n: float, d: float, inference_tokens: float) -> dict[str, float]:
    train = FLOPS_PER_PARAM_TOKEN * n * d
    inference = INFERENCE_FLOPS_PER_PARAM_TOKEN * n * inference_tokens
    return {
        "n_params": n,
        "n_tokens": d,
        "tokens_per_param": d / n,
        "train_flops": train,
        "inference_flops": inference,
        "total_flops": train + inference,
    }


def inference_optimal(law: Law, target_loss: float, inference_tokens: float) -> dict[str, Any]:
    """The cheapest model over its lifetime that reaches ``target_loss``.

    Minimises 6 N D_train + 2 N T subject to L(N, D_train) = target_loss (Sardana et al. 2024,
    "Beyond Chinchilla-Optimal", eq. 2), and compares with the Chinchilla-optimal model for the same
    loss (T = 0), whose inference costs the same T tokens.
    """
    form = _surface(law)
    params = law.params
    floor = form.loss(params, np.inf, np.inf)
    if not np.isfinite(target_loss) or target_loss <= float(floor):
        raise InputError(
            f"--target-loss: {target_loss} is not reachable under '{law.name}';"
            f" expected a loss above its floor {float(floor):.4f}"
        )
    tokens = positive_values(inference_tokens, "--inference-tokens", "tokens served")[0]
    log_n_min = _smallest_log_n(form, params, target_loss)

    def lifetime_flops(log_n: float, served: float) -> float:
        n = np.exp(log_n)
        d = float(form.tokens_for_loss(params, n, target_loss))
        if not np.isfinite(d):
            return np.inf
        return np.log(_costs(n, d, served)["total_flops"])

    low, high = log_n_min + 1e-9, log_n_min + np.log(1e6)
    rows = {}
    for key, served in (("optimal", tokens), ("chinchilla", 0.0)):
        log_n = _minimise_log_n(lambda x, s=served: lifetime_flops(x, s), low, high)
        n = float(np.exp(log_n))
        rows[key] = _costs(n, float(form.tokens_for_loss(params, n, target_loss)), tokens)
    saving = 1.0 - rows["optimal"]["total_flops"] / rows["chinchilla"]["total_flops"]
    return {
        "law": law.name,
        "target_loss": target_loss,
        "inference_tokens": float(tokens),
        **rows["optimal"],
        "chinchilla_optimal": rows["chinchilla"],
        "total_flops_saving": saving,
    }


def _smallest_log_n(form: Form, params: Mapping[str, float], target_loss: float) -> float:
    """log of the smallest N that can reach the target loss with unlimited data."""
    low, high = np.log(1.0), np.log(1e20)
    if not np.isfinite(form.tokens_for_loss(params, np.exp(high), target_loss)):
        raise InputError(f"--target-loss: {target_loss} is not reachable by any model size")
    for _ in range(200):  # bisection: tokens_for_loss is finite exactly above the threshold
        mid = 0.5 * (low + high)
        if np.isfinite(form.tokens_for_loss(params, np.exp(mid), target_loss)):
            high = mid
        else:
            low = mid
    return float(high)


def inference_budget_optimal(
    law: Law, total_flops: float, inference_tokens: float
) -> dict[str, Any]:
    """The lowest loss reachable when training and serving T tokens must fit in ``total_flops``."""
    form = _surface(law)
    params = law.params
    budget = positive_values(total_flops, "--compute", "total FLOPs such as 1e23")[0]
    tokens = positive_values(inference_tokens, "--inference-tokens", "tokens served")[0]
    # N is bounded above by the budget spent on inference alone: 2 N T < C.
    log_n_max = float(np.log(budget / (INFERENCE_FLOPS_PER_PARAM_TOKEN * tokens)))

    def loss_at(log_n: float) -> float:
        n = np.exp(log_n)
        d = (budget - INFERENCE_FLOPS_PER_PARAM_TOKEN * n * tokens) / (FLOPS_PER_PARAM_TOKEN * n)
        return float(form.loss(params, n, d)) if d > 0 else np.inf

    log_n = _minimise_log_n(loss_at, max(log_n_max - np.log(1e8), 0.0), log_n_max - 1e-9)
    n = float(np.exp(log_n))
    d = (budget - INFERENCE_FLOPS_PER_PARAM_TOKEN * n * tokens) / (FLOPS_PER_PARAM_TOKEN * n)
    return {
        "law": law.name,
        "compute_flops": float(budget),
        "inference_tokens": float(tokens),
        **_costs(n, d, tokens),
        "loss": float(form.loss(params, n, d)),
    }


def chinchilla_tokens_for(law: Law, n_params: float) -> float:
    """Tokens that make an N-parameter model compute-optimal under ``law`` (N_opt inverted)."""
    target = np.log(positive_values(n_params, "--params", "a parameter count")[0])

    def gap(log_c: float) -> float:
        return float(np.log(_n_opt(law, law.params, np.array([np.exp(log_c)]))[0]) - target)

    log_c = brentq(gap, np.log(1e3), np.log(1e45), xtol=1e-12)
    return float(np.exp(log_c) / (FLOPS_PER_PARAM_TOKEN * np.exp(target)))


def frontier(
    law: Law, compute_range: Sequence[float] = (1e18, 1e26), points: int = 33, level: float = 0.8
) -> list[dict[str, Any]]:
    """Compute-optimal rows on a log-spaced grid of budgets (for plots and tables)."""
    grid = np.logspace(np.log10(compute_range[0]), np.log10(compute_range[1]), points)
    return compute_optimal(law, grid, level=level)
