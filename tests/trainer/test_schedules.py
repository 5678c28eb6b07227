"""LR schedules: closed forms, warm-up, restarts, one-cycle, LambdaLR wiring, state, errors."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.optim import HybridOptimizer, OptimizerConfig, build_optimizer
from trainer.schedules import ScheduleConfig, build_scheduler, lr_multiplier

pi, cos, sqrt = math.pi, math.cos, math.sqrt

COSINE = {"name": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1}
SGDR = {"name": "sgdr", "restart_period": 10, "restart_multiplier": 2}

# (config fields, total steps, step, expected multiplier from the schedule's own formula)
CLOSED_FORMS: list[tuple[dict[str, Any], int, int, float]] = [
    # warm-up: r0 + (1 - r0) * (s + 1) / W, then the schedule
    ({"name": "constant", "warmup_steps": 10}, 100, 0, 0.1),
    ({"name": "constant", "warmup_steps": 10}, 100, 4, 0.5),
    ({"name": "constant", "warmup_steps": 10}, 100, 9, 1.0),
    ({"name": "constant", "warmup_steps": 10}, 100, 99, 1.0),
    ({"name": "constant", "warmup_steps": 4, "warmup_start_ratio": 0.2}, 100, 0, 0.4),
    ({"name": "constant", "warmup_fraction": 0.1}, 200, 9, 0.5),
    # step: gamma ** floor(k / step_size), k counted after warm-up
    ({"name": "step", "step_size": 10, "gamma": 0.5}, 100, 9, 1.0),
    ({"name": "step", "step_size": 10, "gamma": 0.5}, 100, 10, 0.5),
    ({"name": "step", "step_size": 10, "gamma": 0.5}, 100, 25, 0.25),
    ({"name": "step", "step_size": 10, "gamma": 0.5, "warmup_steps": 5}, 100, 15, 0.5),
    # multistep: gamma ** (milestones passed), absolute steps as torch's MultiStepLR
    ({"name": "multistep", "milestones": [30, 60]}, 100, 29, 1.0),
    ({"name": "multistep", "milestones": [30, 60]}, 100, 30, 0.1),
    ({"name": "multistep", "milestones": [30, 60], "gamma": 0.5}, 100, 99, 0.25),
    # exponential: gamma ** k
    ({"name": "exponential", "gamma": 0.99, "warmup_steps": 10}, 100, 10, 1.0),
    ({"name": "exponential", "gamma": 0.99, "warmup_steps": 10}, 100, 20, 0.99**10),
    # cosine to a floor m: m + (1 - m) (1 + cos(pi k / D)) / 2, D = T - W
    (COSINE, 110, 10, 1.0),
    (COSINE, 110, 35, 0.1 + 0.45 * (1 + cos(pi / 4))),
    (COSINE, 110, 60, 0.55),
    (COSINE, 110, 109, 0.1 + 0.45 * (1 + cos(0.99 * pi))),
    (COSINE, 110, 500, 0.1),
    # linear to a floor: m + (1 - m) (1 - k / D)
    ({"name": "linear"}, 100, 0, 1.0),
    ({"name": "linear"}, 100, 25, 0.75),
    ({"name": "linear", "min_lr_ratio": 0.2}, 100, 50, 0.6),
    ({"name": "linear"}, 100, 99, 0.01),
    # inverse_sqrt: sqrt(tau / (tau + k)), tau = W by default
    ({"name": "inverse_sqrt", "warmup_steps": 16}, 200, 16, 1.0),
    ({"name": "inverse_sqrt", "warmup_steps": 16}, 200, 32, sqrt(0.5)),
    ({"name": "inverse_sqrt", "warmup_steps": 16}, 200, 64, 0.5),
    ({"name": "inverse_sqrt", "inverse_sqrt_timescale": 4}, 200, 12, 0.5),
    # cyclic (triangular): low m at k = 0, 2c, 4c...; peak at c, 3c...
    ({"name": "cyclic", "step_size": 5, "min_lr_ratio": 0.2}, 100, 0, 0.2),
    ({"name": "cyclic", "step_size": 5, "min_lr_ratio": 0.2}, 100, 5, 1.0),
    ({"name": "cyclic", "step_size": 5, "min_lr_ratio": 0.2}, 100, 7, 0.2 + 0.8 * 0.6),
    ({"name": "cyclic", "step_size": 5, "min_lr_ratio": 0.2}, 100, 10, 0.2),
    # sgdr: (1 + cos(pi T_cur / T_i)) / 2 with T_i = 10, 20, 40 (restarts at 10, 30, 70)
    (SGDR, 100, 5, 0.5),
    (SGDR, 100, 10, 1.0),
    (SGDR, 100, 20, 0.5),
    (SGDR, 100, 50, 0.5),
    ({"name": "sgdr", "restart_period": 10, "min_lr_ratio": 0.5}, 100, 25, 0.75),
    # wsd, T = 100, W = 10, decay over the last 20 steps (q = (s - 80) / 20)
    ({"name": "wsd", "warmup_steps": 10, "decay_shape": "linear"}, 100, 79, 1.0),
    ({"name": "wsd", "warmup_steps": 10, "decay_shape": "linear"}, 100, 85, 0.75),
    (
        {"name": "wsd", "warmup_steps": 10, "decay_shape": "cosine"},
        100,
        85,
        0.5 * (1 + cos(pi / 4)),
    ),
    ({"name": "wsd", "warmup_steps": 10, "decay_shape": "1-sqrt"}, 100, 85, 0.5),
    ({"name": "wsd", "warmup_steps": 10, "decay_shape": "1-sqrt"}, 100, 99, 1 - sqrt(0.95)),
    (
        {"name": "wsd", "decay_fraction": 0.5, "min_lr_ratio": 0.1, "decay_shape": "linear"},
        100,
        75,
        0.55,
    ),
]


@pytest.mark.parametrize(("fields", "total", "step", "expected"), CLOSED_FORMS)
def test_schedule_matches_its_closed_form(
    fields: dict[str, Any], total: int, step: int, expected: float
) -> None:
    assert lr_multiplier(ScheduleConfig(**fields), step, total) == pytest.approx(
        expected, abs=1e-12
    )


def multipliers(config: ScheduleConfig, total: int) -> list[float]:
    return [lr_multiplier(config, step, total) for step in range(total)]


MONOTONE_AFTER_WARMUP = [
    {"name": "step", "step_size": 7},
    {"name": "multistep", "milestones": [20, 50]},
    {"name": "exponential", "gamma": 0.97},
    {"name": "cosine", "min_lr_ratio": 0.1},
    {"name": "linear"},
    {"name": "inverse_sqrt"},
    {"name": "wsd", "decay_shape": "linear"},
    {"name": "wsd", "decay_shape": "cosine"},
    {"name": "wsd", "decay_shape": "1-sqrt"},
]


@pytest.mark.parametrize("fields", MONOTONE_AFTER_WARMUP, ids=lambda f: f"{f['name']}")
def test_warmup_rises_linearly_then_decays_monotonically(fields: dict[str, Any]) -> None:
    values = multipliers(ScheduleConfig(warmup_steps=8, **fields), 100)
    warmup, rest = values[:8], values[8:]
    assert warmup == pytest.approx([(s + 1) / 8 for s in range(8)])
    assert rest[0] == 1.0
    assert all(b <= a for a, b in zip(rest, rest[1:], strict=False))
    assert rest[-1] < rest[0]


def test_cosine_equals_torch_cosine_annealing() -> None:
    config = ScheduleConfig(name="cosine", min_lr_ratio=0.1)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=50, eta_min=0.1)
    for step in range(50):
        assert lr_multiplier(config, step, 50) == pytest.approx(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()


def test_sgdr_restarts_where_the_periods_end_and_matches_torch() -> None:
    config = ScheduleConfig(name="sgdr", restart_period=10, restart_multiplier=2)
    values = multipliers(config, 150)
    rises = [step for step in range(1, 150) if values[step] > values[step - 1]]
    assert rises == [10, 30, 70]  # T_0 = 10, then periods of 20 and 40
    assert all(values[step] == 1.0 for step in [0, *rises])

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=10, T_mult=2)
    for value in values:
        assert value == pytest.approx(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()


def test_one_cycle_peaks_at_pct_start_and_matches_torch() -> None:
    config = ScheduleConfig(name="one_cycle", pct_start=0.25, div_factor=25, final_div_factor=1e4)
    values = multipliers(config, 80)
    assert values[0] == pytest.approx(1 / 25)
    assert max(values) == values[19] == 1.0  # peak at pct_start * T - 1
    assert values[-1] == pytest.approx(1 / 25 / 1e4)

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1.0, total_steps=80, pct_start=0.25, div_factor=25, final_div_factor=1e4
    )
    for value in values:
        assert value == pytest.approx(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()


def test_scheduler_multiplies_every_groups_lr_and_keeps_lr_scale() -> None:
    # The muP hook: lr_scale is folded into each group's lr once; the schedule scales all alike.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    optimizer = build_optimizer(
        model,
        OptimizerConfig(name="sgd", lr=0.1),
        lr_scale=lambda name, _: 0.5 if name.startswith("1.") else 1.0,
    )
    config = ScheduleConfig(name="cosine", warmup_steps=3)
    scheduler = build_scheduler(optimizer, config, total_steps=20)
    for step in range(20):
        factor = lr_multiplier(config, step, 20)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(0.1 * group["lr_scale"] * factor)
        optimizer.step()
        scheduler.step()


def test_scheduler_drives_both_halves_of_muon() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = build_optimizer(model, OptimizerConfig(name="muon", lr=0.02, muon_adamw_lr=0.001))
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="linear"), total_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert isinstance(optimizer, HybridOptimizer)
    muon, adamw = optimizer.optimizers
    assert muon.param_groups[0]["lr"] == pytest.approx(0.02 * 0.5)
    assert adamw.param_groups[0]["lr"] == pytest.approx(0.001 * 0.5)


def test_scheduler_state_round_trips() -> None:
    def fresh() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        schedule = ScheduleConfig(name="wsd", warmup_steps=5, decay_fraction=0.3)
        return optimizer, build_scheduler(optimizer, schedule, total_steps=40)

    optimizer, scheduler = fresh()
    for _ in range(17):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_optimizer, resumed = fresh()
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    for _ in range(23):
        assert resumed.get_last_lr() == scheduler.get_last_lr()
        for opt, sched in ((optimizer, scheduler), (resumed_optimizer, resumed)):
            opt.step()
            sched.step()


@pytest.mark.parametrize(
    ("fields", "total", "message"),
    [
        ({"name": "cosinee"}, 10, "schedule.name: 'cosinee' is not one of: constant, step,"),
        ({"min_lr_ratio": 1.5}, 10, "schedule.min_lr_ratio: 1.5 is not allowed"),
        ({"min_lr_ratio": -0.1}, 10, "schedule.min_lr_ratio: -0.1 is not allowed"),
        ({"warmup_steps": 20}, 10, "schedule.warmup_steps: 20 gives 20 warm-up steps"),
        ({"warmup_fraction": 1.0}, 10, "schedule.warmup_fraction: 1.0 is not allowed"),
        ({"warmup_steps": 5, "warmup_fraction": 0.1}, 10, "schedule.warmup_fraction: 0.1 is not"),
        ({"name": "one_cycle", "warmup_steps": 5}, 10, "schedule.warmup_steps: 5 is not allowed"),
        ({"name": "step"}, 10, "schedule.step_size: required for 'step'"),
        ({"name": "exponential"}, 10, "schedule.gamma: required for 'exponential'"),
        ({"name": "multistep", "milestones": [5, 3]}, 10, "schedule.milestones: [5, 3] must be"),
        ({"name": "multistep", "milestones": [5, 12]}, 10, "schedule.milestones: [5, 12] must all"),
        ({"name": "sgdr"}, 10, "schedule.restart_period: required for 'sgdr'"),
        ({"name": "wsd", "warmup_steps": 9}, 10, "schedule.decay_fraction: 0.2 leaves no room"),
        ({"decay_shape": "sqrt"}, 10, "schedule.decay_shape: 'sqrt' is not one of: linear, cosine"),
        ({"warmup": 5}, 10, "schedule.warmup: unknown field; allowed: name, warmup_steps,"),
        ({}, 0, "total_steps: 0 is not allowed"),
    ],
)
def test_invalid_schedules_are_one_line_config_errors(
    fields: dict[str, Any], total: int, message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        build_scheduler(
            torch.optim.SGD([nn.Parameter(torch.zeros(1))]), ScheduleConfig(**fields), total
        )
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_non_finite_base_lr_is_a_config_error() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=math.inf)
    with pytest.raises(ConfigError, match="optimizer.lr: inf is not allowed"):
        build_scheduler(optimizer, ScheduleConfig(), total_steps=10)
