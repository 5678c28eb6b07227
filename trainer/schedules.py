"""Learning-rate schedules as one pure function of the step, and the LambdaLR that applies it.

Conventions, shared by every schedule:

- `step` s is the 0-based index of the optimiser update that will use the learning rate; a run
  of `total_steps` T updates uses s = 0 .. T-1. `lr_multiplier(config, s, T)` is the factor
  applied to each group's base (peak) learning rate.
- Warm-up of W steps: m(s) = r0 + (1 - r0) * (s + 1) / W for s < W, with r0 =
  `warmup_start_ratio`. The first update is never taken at lr 0, and update W (s = W - 1) is the
  first at the peak.
- After warm-up the schedule runs on k = s - W over the D = T - W remaining steps, starting at 1.
  Decays (cosine, linear, wsd) reach their floor `min_lr_ratio` at k = D, one step past the last
  update, as torch's CosineAnnealingLR with T_max = D does. Steps past T hold the value at k = D.
- one_cycle ramps up by itself (torch's OneCycleLR), so it takes no warm-up.

Example:
    >>> config = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    >>> [round(lr_multiplier(config, s, 110), 3) for s in (0, 9, 10, 60, 110)]
    [0.1, 1.0, 1.0, 0.55, 0.1]
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainer.errors import ConfigError, component_config_error

__all__ = ["ScheduleConfig", "build_scheduler", "lr_multiplier", "warmup_steps"]

ScheduleName = Literal[
    "constant",
    "step",
    "multistep",
    "exponential",
    "cosine",
    "linear",
    "inverse_sqrt",
    "one_cycle",
    "cyclic",
    "sgdr",
    "wsd",
]


class ScheduleConfig(BaseModel):
    """Which learning-rate schedule, its warm-up and its own knobs (unused knobs are ignored)."""

    model_config = ConfigDict(extra="forbid")

    name: ScheduleName = Field("cosine", description="Schedule name.")
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear warm-up length in steps (or use warmup_fraction)."
    )
    warmup_fraction: float | None = Field(
        None, ge=0.0, lt=1.0, description="Linear warm-up length as a fraction of total steps."
    )
    warmup_start_ratio: float = Field(
        0.0, ge=0.0, le=1.0, description="Warm-up starts from this fraction of the peak lr."
    )
    min_lr_ratio: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Floor as a fraction of the peak: end of cosine/linear/sgdr/wsd, cyclic low.",
    )
    step_size: int | None = Field(
        None, ge=1, description="step: steps between drops; cyclic: half-cycle length."
    )
    gamma: float | None = Field(
        None,
        gt=0.0,
        description="step/multistep: factor per drop, at most 1 (default 0.1); exponential: "
        "factor per step (above 1 the lr grows, as in an LR range test).",
    )
    milestones: list[int] = Field(
        default_factory=list, description="multistep: absolute steps at which lr drops by gamma."
    )
    restart_period: int | None = Field(None, ge=1, description="sgdr: first period T_0 in steps.")
    restart_multiplier: float = Field(
        1.0, ge=1.0, description="sgdr: each period is this many times longer (T_mult)."
    )
    decay_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="wsd: fraction of total steps spent decaying at the end."
    )
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = Field(
        "1-sqrt", description="wsd: shape of the final decay."
    )
    inverse_sqrt_timescale: int | None = Field(
        None, ge=1, description="inverse_sqrt: tau in sqrt(tau / (tau + k)); None = warm-up length."
    )
    pct_start: float = Field(
        0.3, gt=0.0, lt=1.0, description="one_cycle: fraction of steps spent ramping up."
    )
    div_factor: float = Field(25.0, ge=1.0, description="one_cycle: peak / starting lr.")
    final_div_factor: float = Field(1e4, ge=1.0, description="one_cycle: starting / final lr.")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise component_config_error(exc, "schedule", type(self)) from None

    @model_validator(mode="after")
    def _check_knobs(self) -> ScheduleConfig:
        # Messages start with the field name: the error formatter prefixes "schedule.".
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            raise ValueError(
                f"warmup_fraction: {self.warmup_fraction!r} is not allowed with warmup_steps="
                f"{self.warmup_steps}; set one of them"
            )
        if self.name == "one_cycle" and (self.warmup_steps or self.warmup_fraction):
            field = "warmup_steps" if self.warmup_steps else "warmup_fraction"
            raise ValueError(
                f"{field}: {getattr(self, field)} is not allowed with one_cycle, which warms up "
                "by itself over pct_start; leave it unset"
            )
        if self.name == "step" and self.step_size is None:
            raise ValueError("step_size: required for 'step' (steps between drops)")
        if self.name == "cyclic" and self.step_size is None:
            raise ValueError("step_size: required for 'cyclic' (half-cycle length in steps)")
        if self.name == "exponential" and self.gamma is None:
            raise ValueError("gamma: required for 'exponential' (factor per step, e.g. 0.999)")
        if self.name in ("step", "multistep") and self.gamma is not None and self.gamma > 1:
            raise ValueError(
                f"gamma: {self.gamma!r} is not allowed for '{self.name}': a drop multiplies the "
                "lr by gamma, so 0 < gamma <= 1"
            )
        if self.name == "multistep" and not self.milestones:
            raise ValueError("milestones: required for 'multistep' (steps at which lr drops)")
        if self.milestones != sorted(set(self.milestones)) or any(m < 1 for m in self.milestones):
            raise ValueError(f"milestones: {self.milestones} must be strictly increasing and >= 1")
        if self.name == "sgdr" and self.restart_period is None:
            raise ValueError("restart_period: required for 'sgdr' (first period in steps)")
        return self


def warmup_steps(config: ScheduleConfig, total_steps: int) -> int:
    """Warm-up length in steps, from `warmup_steps` or `warmup_fraction` of `total_steps`."""
    if config.warmup_fraction is not None:
        return round(config.warmup_fraction * total_steps)
    return config.warmup_steps or 0


def _check_total(config: ScheduleConfig, total_steps: int) -> int:
    """Checks that need the run length; returns the warm-up length."""
    if total_steps < 1:
        raise ConfigError(f"total_steps: {total_steps} is not allowed: must be >= 1")
    warmup = warmup_steps(config, total_steps)
    if warmup >= total_steps:
        field = "warmup_fraction" if config.warmup_fraction is not None else "warmup_steps"
        value = getattr(config, field)
        raise ConfigError(
            f"schedule.{field}: {value} gives {warmup} warm-up steps; must be fewer than "
            f"total_steps ({total_steps})"
        )
    if config.name == "multistep" and config.milestones[-1] >= total_steps:
        raise ConfigError(
            f"schedule.milestones: {config.milestones} must all be below total_steps "
            f"({total_steps})"
        )
    if config.name == "one_cycle" and config.pct_start * total_steps <= 1:
        raise ConfigError(
            f"schedule.pct_start: {config.pct_start} of {total_steps} steps leaves no ramp; "
            "pct_start * total_steps must be > 1"
        )
    if config.name == "wsd" and warmup + _wsd_decay_steps(config, total_steps) > total_steps:
        raise ConfigError(
            f"schedule.decay_fraction: {config.decay_fraction} leaves no room for "
            f"{warmup} warm-up steps in {total_steps}; lower it or the warm-up"
        )
    return warmup


def lr_multiplier(config: ScheduleConfig, step: int, total_steps: int) -> float:
    """Factor applied to the peak learning rate at 0-based `step` of a `total_steps` run.

    See the module docstring for the conventions (warm-up uses s + 1; decays reach the floor
    at k = total_steps - warm-up).
    """
    if step < 0:
        raise ValueError(f"step: {step} is not allowed: steps count from 0")
    warmup = _check_total(config, total_steps)
    if config.name == "one_cycle":
        return _one_cycle(config, step, total_steps)
    if step < warmup:
        # 1. linear warm-up from warmup_start_ratio
        start = config.warmup_start_ratio
        return start + (1.0 - start) * (step + 1) / warmup
    # 2. the schedule itself, on the post-warm-up clock
    decay_steps = total_steps - warmup
    return _after_warmup(config, min(step - warmup, decay_steps), decay_steps, warmup)


def _after_warmup(config: ScheduleConfig, k: int, decay_steps: int, warmup: int) -> float:
    floor = config.min_lr_ratio
    progress = k / decay_steps
    match config.name:
        case "constant":
            return 1.0
        case "step":
            assert config.step_size is not None  # checked by the model validator
            return (config.gamma or 0.1) ** (k // config.step_size)
        case "multistep":
            # Milestones count absolute steps, as in torch's MultiStepLR.
            drops = sum(warmup + k >= milestone for milestone in config.milestones)
            return (config.gamma or 0.1) ** drops
        case "exponential":
            assert config.gamma is not None
            return config.gamma**k
        case "cosine":
            # Loshchilov & Hutter 2017, eq. 5 (one period, no restart)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        case "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        case "inverse_sqrt":
            # Vaswani et al. 2017, eq. 3, normalised to 1 where warm-up ends
            timescale = config.inverse_sqrt_timescale or max(warmup, 1)
            return math.sqrt(timescale / (timescale + k))
        case "cyclic":
            # Smith 2017, sec. 3.1 (triangular policy); starts at the low end
            assert config.step_size is not None
            cycle = math.floor(1 + k / (2 * config.step_size))
            x = abs(k / config.step_size - 2 * cycle + 1)
            return floor + (1.0 - floor) * max(0.0, 1.0 - x)
        case "sgdr":
            return _sgdr(config, k)
        case "wsd":
            return _wsd(config, k, decay_steps, warmup)
    raise AssertionError(f"unhandled schedule {config.name!r}")


def _sgdr(config: ScheduleConfig, k: int) -> float:
    """Cosine with warm restarts: Loshchilov & Hutter 2017, eq. 5."""
    assert config.restart_period is not None
    period = float(config.restart_period)
    since_restart = float(k)
    while since_restart >= period:  # at most log_{T_mult}(k) rounds, or k / T_0 when T_mult = 1
        since_restart -= period
        period *= config.restart_multiplier
    floor = config.min_lr_ratio
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * since_restart / period))


def _wsd(config: ScheduleConfig, k: int, decay_steps: int, warmup: int) -> float:
    """Warmup-stable-decay: Hu et al. 2024 (MiniCPM); 1-sqrt cool-down: Hägele et al. 2024."""
    decay = _wsd_decay_steps(config, decay_steps + warmup)
    stable = decay_steps - decay
    if k < stable:
        return 1.0
    q = (k - stable) / decay  # 0 -> 1 over the cool-down
    shape = {
        "linear": 1.0 - q,
        "cosine": 0.5 * (1.0 + math.cos(math.pi * q)),
        "1-sqrt": 1.0 - math.sqrt(q),
    }[config.decay_shape]
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape


def _wsd_decay_steps(config: ScheduleConfig, total_steps: int) -> int:
    return max(1, round(config.decay_fraction * total_steps))


def _one_cycle(config: ScheduleConfig, step: int, total_steps: int) -> float:
    """Smith & Topin 2018, cosine phases exactly as torch's OneCycleLR (three_phase=False)."""
    start = 1.0 / config.div_factor
    end = start / config.final_div_factor
    peak_step = config.pct_start * total_steps - 1
    step = min(step, total_steps - 1)
    if step <= peak_step:
        pct, low, high = step / peak_step, start, 1.0
    else:
        pct, low, high = (step - peak_step) / (total_steps - 1 - peak_step), 1.0, end
    return high + (low - high) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying `lr_multiplier` to every group's initial lr.

    Every group gets the same multiplier. A group's muP `lr_scale` is not read here: it was
    folded into the group's lr when the groups were built (`trainer.optim.param_groups`), so
    each group follows the schedule at its own scale. Call `scheduler.step()` after each
    `optimizer.step()`; its state round-trips through `state_dict()`.
    """
    _check_total(config, total_steps)
    for group in optimizer.param_groups:
        lr = float(group.get("initial_lr", group["lr"]))
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ConfigError(f"optimizer.lr: {lr!r} is not allowed: must be a number >= 0")

    def multiplier(step: int) -> float:
        return lr_multiplier(config, step, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
