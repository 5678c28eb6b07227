"""The learning rate's horizon law: how the optimal LR moves with the training length.

Bjorck et al. 2024 ("Scaling Optimal LR Across Token Horizons") find the optimal LR falls as a
power of the horizon, ``LR*(D) = B D^-beta``; here with the horizon T in steps at a fixed batch,
``log lr* = a - b log T``, ``b`` measured on the user's own setting. A law is fitted
from the optimal LRs measured at two or more horizons (least squares in log-log; with three or
more, ``b`` has a standard error), or given by the user as ``b``; `shift` then moves an LR tuned
at one horizon to another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from studies.errors import StudyError

__all__ = ["HorizonLaw", "fit_horizon_law"]


@dataclass(frozen=True)
class HorizonLaw:
    """``log lr* = a - b log T`` (T in steps); `b_stderr` is None when it was not measured."""

    a: float
    b: float
    b_stderr: float | None = None
    horizons: tuple[int, ...] = ()

    def lr(self, steps: float) -> float:
        """The law's optimal LR at `steps` (meaningful only for a fitted law)."""
        return math.exp(self.a - self.b * math.log(steps))

    def shift(self, lr: float, from_steps: float, to_steps: float) -> float:
        """`lr`, tuned at `from_steps`, moved along the law to `to_steps`."""
        return lr * (to_steps / from_steps) ** -self.b

    def describe(self) -> str:
        spread = f" ± {self.b_stderr:.2f}" if self.b_stderr is not None else ""
        source = (
            f"fitted at {len(self.horizons)} horizons {','.join(map(str, self.horizons))}"
            if self.horizons
            else "given"
        )
        return f"b = {self.b:.2f}{spread}, {source}"

    def to_dict(self) -> dict[str, object]:
        return {"a": self.a, "b": self.b, "b_stderr": self.b_stderr, "horizons": self.horizons}

    @classmethod
    def from_dict(cls, raw: object) -> HorizonLaw | None:
        """The law `to_dict` wrote; None when `raw` is not one."""
        if not isinstance(raw, dict) or not isinstance(raw.get("b"), int | float):
            return None
        stderr = raw.get("b_stderr")
        return cls(
            a=float(raw.get("a", 0.0)),
            b=float(raw["b"]),
            b_stderr=float(stderr) if isinstance(stderr, int | float) else None,
            horizons=tuple(int(h) for h in raw.get("horizons", ())),
        )


def fit_horizon_law(optima: Sequence[tuple[int, float]]) -> HorizonLaw:
    """The law through (steps, optimal LR) points at two or more different horizons."""
    horizons = sorted({int(steps) for steps, _ in optima})
    if len(horizons) < 2:
        raise StudyError(
            f"horizon law: optimal LRs at {len(horizons)} horizon(s) {horizons}; expected two "
            "or more different step counts to fit log lr* = a - b log T"
        )
    bad = [lr for _, lr in optima if not (math.isfinite(lr) and lr > 0)]
    if bad:
        raise StudyError(f"horizon law: optimal LR {bad[0]}; expected positive numbers")
    xs = [math.log(steps) for steps, _ in optima]
    ys = [math.log(lr) for _, lr in optima]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = mean_y - slope * mean_x
    stderr = None
    if n > 2:
        residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True)) / (
            n - 2
        )
        stderr = math.sqrt(residual / sxx)
    return HorizonLaw(a=intercept, b=-slope, b_stderr=stderr, horizons=tuple(horizons))
