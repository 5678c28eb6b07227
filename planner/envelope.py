"""Approach 1 (Hoffmann et al. 2022, sec. 3.1): the lower envelope of the training curves.

Each run's loss curve, in FLOPs C = 6 N D_t, is interpolated (linear in log C) over its own
range; at each C of a log grid the run with the lowest loss is the compute-optimal one there,
so N_opt(C) and D_opt(C) = C / (6 N_opt) are read off the envelope and fitted as power laws
N_opt = k_N C^a, D_opt = k_D C^b (Hoffmann et al. found a = 0.50, b = 0.50). Intervals come
from resampling the runs with replacement. The grid spans the compute that at least two runs
cover, and only its points whose winner lies strictly inside the sampled sizes are fitted:
where the smallest or largest size wins, the optimum may lie beyond it.

Curves come from a curves table (CSV or Parquet) with a run id, its N and, per point, tokens
and loss (``scaleplan ladder`` writes ``curves.csv``). Points at zero tokens are left out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from planner.errors import InputError
from planner.isoflop import allocation_law
from planner.laws import FLOPS_PER_PARAM_TOKEN
from planner.published import Law
from planner.runs import read_table, select_rows


@dataclass(frozen=True)
class Curves:
    """Training curves: per run its N and arrays of tokens and loss (tokens ascending)."""

    runs: list[str]
    n_params: np.ndarray
    tokens: list[np.ndarray]
    loss: list[np.ndarray]
    source: str


def load_curves(
    path: str | os.PathLike[str],
    *,
    run_col: str = "run",
    params_col: str = "params",
    tokens_col: str = "tokens",
    loss_col: str = "loss",
    where: dict[str, str] | None = None,
) -> Curves:
    """Read a curves table; InputError naming the file and column when one is missing."""
    source = str(path)
    frame = select_rows(read_table(path), where, source)
    for column, option in (
        (run_col, "--run-col"),
        (params_col, "--params-col"),
        (tokens_col, "--tokens-col"),
        (loss_col, "--loss-col"),
    ):
        if column not in frame.columns:
            raise InputError(
                f"{source}: no column '{column}' (columns: {', '.join(map(str, frame.columns))});"
                f" name the right one with {option}"
            )
    frame = frame[pd.to_numeric(frame[tokens_col], errors="coerce") > 0]
    runs, sizes, tokens, losses = [], [], [], []
    for run, group in frame.groupby(run_col, sort=False):
        values = group[[params_col, tokens_col, loss_col]].apply(pd.to_numeric, errors="coerce")
        values = values.dropna().sort_values(tokens_col)
        finite = np.isfinite(values[loss_col].to_numpy()) & (values[loss_col].to_numpy() > 0)
        values = values[finite]
        if len(values) < 2:
            continue  # a curve needs two points to interpolate
        runs.append(str(run))
        sizes.append(float(values[params_col].iloc[0]))
        tokens.append(values[tokens_col].to_numpy(dtype=float))
        losses.append(values[loss_col].to_numpy(dtype=float))
    if len(runs) < 2:
        raise InputError(f"{source}: {len(runs)} curves with 2 or more points; Approach 1 needs 2")
    return Curves(runs, np.array(sizes), tokens, losses, source)


@dataclass(frozen=True)
class EnvelopeResult:
    grid_flops: np.ndarray
    n_opt: np.ndarray  # per grid point: the winning run's N
    loss: np.ndarray  # the envelope's loss there
    winners: list[str]
    n_exponent: float
    n_coefficient: float
    d_exponent: float
    d_coefficient: float
    interval_level: float
    n_exponent_interval: tuple[float, float]
    d_exponent_interval: tuple[float, float]
    warnings: list[str] = field(default_factory=list)

    def to_law(self, name: str, source: str) -> Law:
        """An allocation-only law that ``scaleplan plan --law FILE`` reads."""
        return allocation_law(
            self,
            name,
            f"Approach 1 (Hoffmann et al. 2022, sec. 3.1) fitted by scaleplan to {source}",
            {"approach": "envelope", "grid_points": int(self.grid_flops.size)},
        )


def _envelope(curves: Curves, grid: np.ndarray, pick: np.ndarray) -> tuple[np.ndarray, ...]:
    """(winner index, its N, the loss) at each grid point, among the runs in `pick`."""
    log_grid = np.log(grid)
    table = np.full((pick.size, grid.size), np.inf)
    for row, i in enumerate(pick):
        log_c = np.log(FLOPS_PER_PARAM_TOKEN * curves.n_params[i] * curves.tokens[i])
        inside = (log_grid >= log_c[0]) & (log_grid <= log_c[-1])
        table[row, inside] = np.exp(np.interp(log_grid[inside], log_c, np.log(curves.loss[i])))
    best = np.argmin(table, axis=0)
    loss = table[best, np.arange(grid.size)]
    winner = pick[best]
    return winner, curves.n_params[winner], loss


def _interior(n_opt: np.ndarray, loss: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Grid points whose envelope is a size strictly inside the sampled range: where the
    smallest or largest size wins, the optimum may lie beyond it (a censored point)."""
    return np.isfinite(loss) & (n_opt > sizes.min()) & (n_opt < sizes.max())


def _power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    exponent, log_coefficient = np.polyfit(np.log(x), np.log(y), 1)
    return float(exponent), float(np.exp(log_coefficient))


def fit_envelope(
    curves: Curves,
    *,
    grid_points: int = 40,
    bootstrap: int = 1000,
    interval_level: float = 0.95,
    seed: int = 0,
) -> EnvelopeResult:
    """Approach 1 on `curves` (see the module docstring)."""
    spans = [
        (
            np.log(FLOPS_PER_PARAM_TOKEN * n * t[0]),
            np.log(FLOPS_PER_PARAM_TOKEN * n * t[-1]),
        )
        for n, t in zip(curves.n_params, curves.tokens, strict=True)
    ]
    starts, ends = np.sort([s for s, _ in spans]), np.sort([e for _, e in spans])
    low, high = starts[1], ends[-1]  # where two runs have begun, to where the last ends
    if not high > low:
        raise InputError(f"{curves.source}: the curves cover no common range of compute")
    grid = np.exp(np.linspace(low, high, grid_points))
    everyone = np.arange(len(curves.runs))
    sizes = np.unique(curves.n_params)
    if sizes.size < 3:
        raise InputError(
            f"{curves.source}: {sizes.size} model sizes; Approach 1 needs 3 or more (the "
            "smallest and largest only bound the optimum)"
        )
    winner, n_opt, loss = _envelope(curves, grid, everyone)
    inside = _interior(n_opt, loss, sizes)
    if np.unique(n_opt[inside]).size < 2:
        raise InputError(
            f"{curves.source}: the envelope is the smallest or largest size almost everywhere "
            f"({np.unique(n_opt[inside]).size} size inside); the sizes do not bracket the "
            "optimum as compute grows (add sizes around it)"
        )
    dropped = 1.0 - inside.mean()
    grid, winner, n_opt, loss = grid[inside], winner[inside], n_opt[inside], loss[inside]
    d_opt = grid / (FLOPS_PER_PARAM_TOKEN * n_opt)
    a, k_n = _power_law(grid, n_opt)
    b, k_d = _power_law(grid, d_opt)
    rng = np.random.default_rng(seed)
    samples: list[tuple[float, float]] = []
    for _ in range(bootstrap):
        pick = rng.choice(everyone, size=everyone.size, replace=True)
        _, n_b, loss_b = _envelope(curves, grid, pick)
        ok = _interior(n_b, loss_b, np.unique(curves.n_params[pick]))
        if np.unique(n_b[ok]).size < 2:
            continue
        samples.append(
            (
                _power_law(grid[ok], n_b[ok])[0],
                _power_law(grid[ok], grid[ok] / (FLOPS_PER_PARAM_TOKEN * n_b[ok]))[0],
            )
        )
    tail = 100 * (1 - interval_level) / 2

    def interval(values: list[float], point: float) -> tuple[float, float]:
        if len(values) < 2:
            return (point, point)
        return (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))

    warnings = []
    if dropped > 0.5:
        warnings.append(
            f"{dropped:.0%} of the compute range has the smallest or largest size on the "
            "envelope (left out of the fit: the optimum lies beyond the sampled sizes there)"
        )
    return EnvelopeResult(
        grid_flops=grid,
        n_opt=n_opt,
        loss=loss,
        winners=[curves.runs[i] for i in winner],
        n_exponent=a,
        n_coefficient=k_n,
        d_exponent=b,
        d_coefficient=k_d,
        interval_level=interval_level,
        n_exponent_interval=interval([s[0] for s in samples], a),
        d_exponent_interval=interval([s[1] for s in samples], b),
        warnings=warnings,
    )
