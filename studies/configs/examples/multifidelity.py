"""Cheap objectives with a fidelity knob, to learn the callable objective from and to test
coarse-to-fine against: each one's cheap setting ranks configurations differently from its
full one, the way short or narrow trials of a model do.

- `branin`: the multi-fidelity Branin of Kandasamy et al. 2017 ("Multi-fidelity Bayesian
  Optimisation with Continuous Approximations", appendix), budget ``{fidelity: z}`` with z in
  (0, 1]: at z = 1 it is Branin, global minimum 0.397887 at (-pi, 12.275), (pi, 2.275) and
  (9.42478, 2.475); lower z moves its coefficients, and so its minimiser, and adds noise.
- `learning_curve`: the final loss of a run of ``budget.steps`` steps at learning rate
  ``params["lr"]``, whose best learning rate falls with the horizon as a power law (as Bjorck
  et al. 2024, "Scaling Optimal LR Across Token Horizons", measure), reported along the way so
  the pruners see a learning curve.

    scaleplan sweep studies/configs/examples/branin.yaml
"""

from __future__ import annotations

import math
import random
from typing import Any

BRANIN_MINIMUM = 0.397887  # Branin's global minimum (Dixon and Szego 1978; Kandasamy et al.)


def branin_value(x1: float, x2: float, z: float = 1.0) -> float:
    """Branin at fidelity z (no noise): Kandasamy et al.'s shifted b, c and t."""
    b = 5.1 / (4 * math.pi**2) - 0.01 * (1 - z)
    c = 5 / math.pi - 0.1 * (1 - z)
    t = 1 / (8 * math.pi) + 0.05 * (1 - z)
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


def branin(params: dict[str, Any], trial: Any) -> float:
    """Branin at ``trial.budget["fidelity"]`` (default 1), with Gaussian noise of sd
    ``2 (1 - z)``, drawn from the trial's seed and number (the same trial draws the same)."""
    z = float(trial.budget.get("fidelity", 1.0))
    if not 0 < z <= 1:
        raise ValueError(f"budget.fidelity: {z} is not in (0, 1]")
    value = branin_value(float(params["x1"]), float(params["x2"]), z)
    noise = random.Random(trial.seed * 100_003 + trial.number).gauss(0.0, 2.0 * (1 - z))
    return value + noise


LR_AT_100_STEPS = 3e-2  # the best learning rate of a 100-step run
LR_HORIZON_EXPONENT = -0.5  # lr*(steps) = LR_AT_100_STEPS * (steps / 100) ** exponent


def best_lr(steps: int) -> float:
    """The learning rate that minimises `learning_curve_value` at this horizon."""
    return LR_AT_100_STEPS * (steps / 100) ** LR_HORIZON_EXPONENT


def learning_curve_value(lr: float, warmup: float, steps: int) -> float:
    """Loss after `steps` steps: 2 + 3 / sqrt(steps), plus a bowl in log lr around the
    horizon's best lr, plus a smaller one in the warmup fraction around 0.1."""
    miss = math.log(lr / best_lr(steps))
    return 2.0 + 3.0 / math.sqrt(steps) + 0.15 * miss**2 + 0.5 * (warmup - 0.1) ** 2


def learning_curve(params: dict[str, Any], trial: Any) -> float:
    """The loss of a run of ``trial.budget["steps"]`` steps, reported every tenth of it."""
    steps = int(trial.budget.get("steps", 100))
    lr, warmup = float(params["lr"]), float(params.get("warmup", 0.1))
    every = max(1, steps // 10)
    final = learning_curve_value(lr, warmup, steps)
    for step in range(every, steps + 1, every):
        # at `step` of a run planned for `steps`: the curve so far, its lr miss already there
        now = final + 3.0 / math.sqrt(step) - 3.0 / math.sqrt(steps)
        if trial.report(step, now):
            return now
    return final
