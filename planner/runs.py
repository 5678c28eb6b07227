"""Runs tables: load training runs (N, D, loss) from CSV or Parquet and validate them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from planner.errors import InputError
from planner.laws import FLOPS_PER_PARAM_TOKEN


@dataclass(frozen=True)
class Runs:
    """Validated training runs: parameters N, tokens D and final loss per run."""

    n_params: np.ndarray
    n_tokens: np.ndarray
    loss: np.ndarray
    budget_flops: np.ndarray | None  # the IsoFLOP budget a run belongs to, when the table has one
    source: str

    def __len__(self) -> int:
        return int(self.n_params.size)

    @property
    def compute_flops(self) -> np.ndarray:
        return FLOPS_PER_PARAM_TOKEN * self.n_params * self.n_tokens


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A CSV or Parquet file as a DataFrame, or an InputError naming the file."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: no such file; expected a CSV or Parquet runs table")
    try:
        if file.suffix.lower() in {".parquet", ".pq"}:
            return pd.read_parquet(file)
        return pd.read_csv(file)
    except Exception as err:  # pandas raises many types for unreadable files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{file}: not a readable CSV or Parquet table ({reason})") from None


def select_rows(frame: pd.DataFrame, where: dict[str, str] | None, source: str) -> pd.DataFrame:
    """The rows whose columns equal `where`'s values (compared as text), or an InputError
    naming the missing column or the value no row has."""
    for column, value in (where or {}).items():
        if column not in frame.columns:
            raise InputError(
                f"--where: {source} has no column '{column}'"
                f" (columns: {', '.join(map(str, frame.columns))})"
            )
        frame = frame[frame[column].astype(str) == value].reset_index(drop=True)
        if frame.empty:
            raise InputError(f"--where: no row of {source} has {column} = {value!r}")
    return frame


def numeric_column(frame: pd.DataFrame, name: str, source: str, option: str) -> np.ndarray:
    """Column `name` as positive finite floats, or an InputError naming the file, the row and
    the option that picks another column."""
    if name not in frame.columns:
        raise InputError(
            f"{source}: no column '{name}' (columns: {', '.join(map(str, frame.columns))});"
            f" name the right one with {option}"
        )
    values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{source}: column '{name}', row {row + 1} (line {row + 2}):"
            f" {frame[name].iloc[row]!r} is not a positive finite number"
        )
    return values


def load_runs(
    path: str | os.PathLike[str],
    *,
    params_col: str = "params",
    tokens_col: str = "tokens",
    loss_col: str = "loss",
    flops_col: str = "flops",
    budget_col: str = "budget",
    min_rows: int = 1,
    where: dict[str, str] | None = None,
) -> Runs:
    """Load a runs table. ``flops`` may stand in for ``tokens`` (D = C / 6N).

    ``where`` keeps only the rows whose columns equal the given values (compared as text), e.g.
    ``{"condition": "raw_loss"}`` for a table that holds several experiments.
    """
    source = str(path)
    frame = select_rows(read_table(path), where, source)
    n = numeric_column(frame, params_col, source, "--params-col")
    if tokens_col in frame.columns:
        d = numeric_column(frame, tokens_col, source, "--tokens-col")
    elif flops_col in frame.columns:
        d = numeric_column(frame, flops_col, source, "--flops-col") / (FLOPS_PER_PARAM_TOKEN * n)
    else:
        raise InputError(
            f"{source}: neither a tokens column '{tokens_col}' nor a FLOPs column '{flops_col}'"
            f" (columns: {', '.join(map(str, frame.columns))});"
            " name one with --tokens-col or --flops-col"
        )
    loss = numeric_column(frame, loss_col, source, "--loss-col")
    budget = None
    if budget_col in frame:
        budget = numeric_column(frame, budget_col, source, "--budget-col")
    if len(frame) < min_rows:
        raise InputError(f"{source}: {len(frame)} runs; this fit needs at least {min_rows}")
    return Runs(n_params=n, n_tokens=d, loss=loss, budget_flops=budget, source=source)
