"""The critical batch size: McCandlish et al.'s steps/examples trade-off, and Kaplan's B_crit(L).

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", arXiv:1812.06162, eq. 2.11):
training to a fixed loss at batch B takes S steps and E = B·S examples with

    (S / S_min − 1) (E / E_min − 1) = 1,   i.e.   S = S_min + E_min / B,

and the critical batch B_crit = E_min / S_min is where both cost twice their minimum. The second
form is linear in 1/B, so the fit is a weighted least-squares line (relative errors: S spans
orders of magnitude), with a bootstrap over the measured batch sizes for the interval.

Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", arXiv:2001.08361, eq. 5.1):
B_crit(L) ≈ B* / L^(1/α_B) with B* ≈ 2·10^8 tokens and α_B ≈ 0.21, L in nats per token (their
WebText2 models); it does not depend on model size except through the loss.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

from planner.errors import InputError

__all__ = [
    "KAPLAN_ALPHA_B",
    "KAPLAN_B_STAR",
    "KAPLAN_BCRIT_CITATION",
    "MeasuredBatch",
    "TradeoffFit",
    "fit_tradeoff",
    "kaplan_critical_batch",
    "load_measured_batch",
    "scale_critical_batch",
]

KAPLAN_B_STAR = 2e8  # tokens
KAPLAN_ALPHA_B = 0.21
KAPLAN_BCRIT_CITATION = (
    "Kaplan et al. 2020, Scaling Laws for Neural Language Models, arXiv:2001.08361, eq. 5.1"
)
MCCANDLISH_CITATION = (
    "McCandlish et al. 2018, An Empirical Model of Large-Batch Training, arXiv:1812.06162, eq. 2.11"
)


def kaplan_critical_batch(loss: ArrayLike) -> NDArray[np.float64]:
    """B_crit in tokens at loss L (nats/token): B* / L^(1/α_B) (Kaplan et al. 2020, eq. 5.1)."""
    loss = np.asarray(loss, dtype=float)
    if np.any(~np.isfinite(loss) | (loss <= 0)):
        raise InputError(f"loss: {loss.tolist()}; Kaplan's B_crit(L) needs losses above 0 nats")
    return np.asarray(KAPLAN_B_STAR / loss ** (1.0 / KAPLAN_ALPHA_B))


def scale_critical_batch(
    b_crit: float, measured_loss: float, loss: ArrayLike
) -> NDArray[np.float64]:
    """A measured B_crit carried to other losses with Kaplan's exponent:
    B_crit(L) = b_crit · (measured_loss / L)^(1/α_B)."""
    loss = np.asarray(loss, dtype=float)
    return np.asarray(b_crit * (measured_loss / loss) ** (1.0 / KAPLAN_ALPHA_B))


@dataclass(frozen=True)
class MeasuredBatch:
    """A critical batch measured on one's own model: B_crit in tokens at a validation loss."""

    b_crit_tokens: float
    loss: float
    source: str


def load_measured_batch(path: Path) -> MeasuredBatch:
    """The ``b_crit_tokens`` and ``target_loss`` of a ``scaleplan batch-size`` result file."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"--batch-from: {path}: no such file") from None
    except (OSError, ValueError) as error:
        raise InputError(f"--batch-from: {path}: not a JSON file ({error})") from None
    values = []
    for key in ("b_crit_tokens", "target_loss"):
        value = payload.get(key) if isinstance(payload, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise InputError(
                f"--batch-from: {path}: {key} is {value!r}; expected the positive number a "
                "`scaleplan batch-size` result holds"
            )
        values.append(float(value))
    return MeasuredBatch(values[0], values[1], str(path))


@dataclass(frozen=True)
class TradeoffFit:
    """S = s_min + e_min / B fitted to (B, S) pairs; B_crit = e_min / s_min."""

    s_min: float
    e_min: float
    b_crit: float
    b_crit_low: float
    b_crit_high: float
    level: float
    n_batches: int

    def steps(self, batch: ArrayLike) -> NDArray[np.float64]:
        """The fitted steps to the target at batch B."""
        return np.asarray(self.s_min + self.e_min / np.asarray(batch, dtype=float))

    def to_dict(self) -> dict[str, float]:
        return {
            "b_crit": self.b_crit,
            "b_crit_low": self.b_crit_low,
            "b_crit_high": self.b_crit_high,
            "s_min": self.s_min,
            "e_min": self.e_min,
            "level": self.level,
        }


def fit_tradeoff(
    batches: Sequence[float],
    steps: Sequence[float],
    *,
    level: float = 0.8,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> TradeoffFit:
    """McCandlish's trade-off through measured (batch, steps-to-target) pairs.

    >>> fit = fit_tradeoff([8, 16, 32, 64, 128], [1100, 600, 350, 225, 162.5])
    >>> round(fit.s_min), round(fit.e_min), round(fit.b_crit)
    (100, 8000, 80)
    """
    b = np.asarray(batches, dtype=float)
    s = np.asarray(steps, dtype=float)
    if b.shape != s.shape or b.ndim != 1:
        raise InputError(f"batches / steps: {b.shape} / {s.shape}; expected two equal-length lists")
    if len(np.unique(b)) < 3:
        raise InputError(
            f"batches: {sorted(set(b.tolist()))}; the trade-off fit needs at least 3 batch sizes"
        )
    if np.any(~np.isfinite(b) | (b <= 0)) or np.any(~np.isfinite(s) | (s <= 0)):
        raise InputError("batches / steps: every batch size and step count must be above 0")
    s_min, e_min = _line(b, s)
    shown = ", ".join(f"{x:.4g}" for x in s)
    if not e_min > 0:
        raise InputError(
            f"steps: {shown} at batches {', '.join(f'{x:g}' for x in b)} do not fall as the "
            f"batch grows (fitted E_min {e_min:.3g}); no critical batch to read"
        )
    if not s_min > 0:
        raise InputError(
            f"steps: {shown} at batches {', '.join(f'{x:g}' for x in b)} fall faster than "
            f"1/batch (fitted S_min {s_min:.3g}): the small batches took more examples than the "
            "large ones, which the trade-off does not allow; their learning rate is likely off "
            "(tune it per batch) or the target sits where only the last steps reach it"
        )
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_bootstrap):
        pick = rng.integers(len(b), size=len(b))
        if len(np.unique(b[pick])) < 2:
            continue
        sb, eb = _line(b[pick], s[pick])
        # a resample whose line does not fall gives an unbounded B_crit: count it at the edge
        samples.append(eb / sb if sb > 0 and eb > 0 else math.inf if sb <= 0 else 0.0)
    tail = (1 - level) / 2
    # no interpolation between order statistics: an unbounded resample stays unbounded
    low, high = np.quantile(np.asarray(samples), [tail, 1 - tail], method="inverted_cdf")
    return TradeoffFit(
        s_min=float(s_min),
        e_min=float(e_min),
        b_crit=float(e_min / s_min),
        b_crit_low=float(low),
        b_crit_high=float(high),
        level=level,
        n_batches=len(np.unique(b)),
    )


def _line(b: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """(S_min, E_min) minimising sum(((S - S_min - E_min / B) / S)^2)."""
    design = np.stack([np.ones_like(b), 1.0 / b], axis=1) / s[:, None]
    (s_min, e_min), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
    return float(s_min), float(e_min)
