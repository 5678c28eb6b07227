"""Compute-optimal learning rate and batch size as power laws in training compute.

The form of DeepSeek-AI 2024 (DeepSeek LLM, arXiv:2401.02954, eq. 1): eta_opt = a_eta C^b_eta
and B_opt = a_B C^b_B (B in tokens). `DEEPSEEK2024` is their fit (AdamW, multi-step LR);
`fit_hparam_law` fits the same form to your own tuned optima (the best LR and batch of a study
at each of several budgets), least squares in log-log with bootstrap intervals over the
budgets, and writes the same JSON a published one is read from (``plan --hparams FILE``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from planner.errors import InputError

HPARAMS_CITATION = "DeepSeek-AI 2024, DeepSeek LLM, arXiv:2401.02954, eq. 1 (AdamW, multi-step LR)"


class PowerLaw(BaseModel):
    """y = coefficient * C^exponent, with an interval on the exponent when fitted."""

    model_config = ConfigDict(extra="forbid")

    coefficient: float = Field(gt=0)
    exponent: float
    exponent_interval: tuple[float, float] | None = None

    def __call__(self, compute_flops: ArrayLike) -> NDArray[np.float64]:
        return np.asarray(self.coefficient * np.asarray(compute_flops, float) ** self.exponent)


class HparamLaw(BaseModel):
    """Peak learning rate and batch size (tokens) as power laws in compute (FLOPs)."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field("hparams", pattern="^hparams$", description="Marks a hyperparameter law.")
    name: str
    citation: str
    learning_rate: PowerLaw
    batch_tokens: PowerLaw
    compute_range: tuple[float, float] | None = Field(
        None, description="The budgets it was fitted on (extrapolate with care)."
    )
    interval_level: float | None = None
    n_points: int | None = None


DEEPSEEK2024 = HparamLaw(
    name="deepseek2024",
    citation=HPARAMS_CITATION,
    learning_rate=PowerLaw(coefficient=0.3118, exponent=-0.1250),
    batch_tokens=PowerLaw(coefficient=0.2920, exponent=0.3271),
)
PUBLISHED_HPARAMS = {law.name: law for law in (DEEPSEEK2024,)}


def optimal_learning_rate(compute_flops: ArrayLike) -> NDArray[np.float64]:
    """Peak LR for AdamW pre-training at compute C: 0.3118 C^-0.1250 (DeepSeek LLM, eq. 1)."""
    return DEEPSEEK2024.learning_rate(compute_flops)


def optimal_batch_tokens(compute_flops: ArrayLike) -> NDArray[np.float64]:
    """Batch size in tokens at compute C: 0.2920 C^0.3271 (DeepSeek LLM, eq. 1)."""
    return DEEPSEEK2024.batch_tokens(compute_flops)


def _log_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    exponent, log_coefficient = np.polyfit(np.log(x), np.log(y), 1)
    return float(exponent), float(np.exp(log_coefficient))


def fit_hparam_law(
    compute_flops: ArrayLike,
    learning_rate: ArrayLike,
    batch_tokens: ArrayLike,
    *,
    name: str = "fitted",
    source: str = "your runs",
    bootstrap: int = 1000,
    interval_level: float = 0.95,
    seed: int = 0,
) -> HparamLaw:
    """DeepSeek's form fitted to tuned optima, one (C, eta, B) per budget; at least 3
    distinct budgets (a line through 2 points has no interval)."""
    c, lr, batch = (
        np.asarray(v, dtype=float) for v in (compute_flops, learning_rate, batch_tokens)
    )
    if not (c.shape == lr.shape == batch.shape) or c.ndim != 1:
        raise InputError("compute, lr and batch: expected one value of each per budget")
    for label, values in (("compute", c), ("lr", lr), ("batch", batch)):
        bad = ~np.isfinite(values) | (values <= 0)
        if bad.any():
            raise InputError(f"{label}: {values[bad][0]} is not a positive finite number")
    if np.unique(c).size < 3:
        raise InputError(
            f"compute: {np.unique(c).size} distinct budgets; a hyperparameter law needs 3 or more"
        )
    lr_exp, lr_coef = _log_fit(c, lr)
    b_exp, b_coef = _log_fit(c, batch)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        pick = rng.integers(0, c.size, c.size)
        if np.unique(c[pick]).size < 2:
            continue
        samples.append((_log_fit(c[pick], lr[pick])[0], _log_fit(c[pick], batch[pick])[0]))
    tail = 100 * (1 - interval_level) / 2

    def interval(index: int, point: float) -> tuple[float, float]:
        if len(samples) < 2:
            return (point, point)
        values = [s[index] for s in samples]
        return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))

    return HparamLaw(
        name=name,
        citation=f"DeepSeek LLM's form (arXiv:2401.02954, eq. 1) fitted by scaleplan to {source}",
        learning_rate=PowerLaw(
            coefficient=lr_coef, exponent=lr_exp, exponent_interval=interval(0, lr_exp)
        ),
        batch_tokens=PowerLaw(
            coefficient=b_coef, exponent=b_exp, exponent_interval=interval(1, b_exp)
        ),
        compute_range=(float(c.min()), float(c.max())),
        interval_level=interval_level if bootstrap else None,
        n_points=int(c.size),
    )


def save_hparam_law(law: HparamLaw, path: str | os.PathLike[str]) -> Path:
    import tempfile

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        file.write(law.model_dump_json(indent=2) + "\n")
    os.replace(tmp, target)
    return target


def load_hparam_law(name_or_path: str) -> HparamLaw:
    """A published hyperparameter law by name, or a law file `fit --approach hparams` wrote."""
    if name_or_path in PUBLISHED_HPARAMS:
        return PUBLISHED_HPARAMS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise InputError(
            f"--hparams: '{name_or_path}' is neither a published hyperparameter law "
            f"({', '.join(PUBLISHED_HPARAMS)}) nor a file"
        )
    try:
        raw: Any = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"--hparams: '{path}' is not a readable JSON law file ({error})") from None
    if not isinstance(raw, dict) or raw.get("kind") != "hparams":
        raise InputError(
            f"--hparams: '{path}' is not a hyperparameter law (a loss law goes to --law; "
            "`scaleplan fit --approach hparams` writes these)"
        )
    try:
        return HparamLaw.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InputError(f"--hparams: '{path}': {where}: {first['msg']}") from None
