"""Coarse -> fine: narrowing keeps the optimum and shrinks the range, widens past an edge the best
sits at, never inverts; earlier trials carry over into a new study; the sampler and pruner
factories build what each stage names and reject anything else."""

from __future__ import annotations

import math
import random
import warnings
from typing import Any

import optuna
import pytest

from studies.config import Limits, NarrowSpec, ParamSpec, PrunerSpec
from studies.errors import StudyError
from studies.space import suggest
from studies.stages import (
    carry_over_trials,
    make_pruner,
    make_sampler,
    narrow_space,
    top_trials,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

LR = ParamSpec(low=1e-5, high=1e-1, log=True)
BEST_LR = 3e-3


def lr_trials(
    n: int = 40, seed: int = 0, optimum: float = BEST_LR
) -> list[tuple[dict[str, Any], float]]:
    """Log-uniform learning rates scored by their squared distance (in decades) to `optimum`."""
    rng = random.Random(seed)
    trials = []
    for _ in range(n):
        lr = math.exp(rng.uniform(math.log(1e-5), math.log(1e-1)))
        trials.append(({"optimizer.lr": lr}, (math.log10(lr) - math.log10(optimum)) ** 2))
    return trials


def log_width(spec: ParamSpec) -> float:
    low, high = spec.bounds
    return math.log(high) - math.log(low)


# ---------------------------------------------------------------------------------------------
# narrow_space


def test_narrowed_range_contains_the_optimum_and_is_narrower() -> None:
    space = {"optimizer.lr": LR}
    new, warm, notes = narrow_space(space, lr_trials(), NarrowSpec(top_k=5), "minimize")
    lr = new["optimizer.lr"]
    assert lr.log and lr.low is not None and lr.high is not None
    assert lr.low < BEST_LR < lr.high
    assert log_width(lr) < log_width(LR) / 2
    assert notes == [f"optimizer.lr: [1e-05, 0.1] log -> {lr.describe()}"]
    assert 1 <= len(warm) <= 5 and all(lr.contains(start["optimizer.lr"]) for start in warm)


def test_bracket_reaches_out_to_the_nearest_worse_trials() -> None:
    # the top 3 sit below the optimum (the coarse ranking was biased); the worse neighbour
    # that was tried above them must bound the new range, not the top 3 themselves
    lrs = [1e-4, 1e-3, 1.5e-3, 2e-3, 7e-3, 3e-2]
    values = [3.0, 2.5, 2.45, 2.4, 2.6, 3.5]
    trials = [({"optimizer.lr": lr}, v) for lr, v in zip(lrs, values, strict=True)]
    space = {"optimizer.lr": LR}
    plain, _, _ = narrow_space(space, trials, NarrowSpec(top_k=3, widen=1.0), "minimize")
    spec = NarrowSpec(top_k=3, widen=1.0, bracket=True)
    bracketed, _, notes = narrow_space(space, trials, spec, "minimize")
    assert plain["optimizer.lr"].bounds[1] < 3e-3  # the top-3 span (at least min_width wide)
    assert bracketed["optimizer.lr"].bounds == (1e-4, 7e-3)
    assert notes == ["optimizer.lr: [1e-05, 0.1] log -> [0.0001, 0.007] log"]


def test_bracket_counts_pruned_and_failed_trials_as_tried() -> None:
    # early stopping leaves few finished trials besides the top-k: the pruned and failed ones
    # (no value) were tried and lost, so they bound the range as worse finished ones do
    lrs = [1e-4, 1e-3, 2e-3, 7e-3, 3e-2]
    values = [None, 2.5, 2.4, None, float("nan")]
    trials = [({"optimizer.lr": lr}, v) for lr, v in zip(lrs, values, strict=True)]
    spec = NarrowSpec(top_k=2, widen=1.0, bracket=True)
    new, warm, _ = narrow_space({"optimizer.lr": LR}, trials, spec, "minimize")
    assert new["optimizer.lr"].bounds == (1e-4, 7e-3)
    assert warm == [{"optimizer.lr": 2e-3}, {"optimizer.lr": 1e-3}]  # finished ones only


def test_bracket_keeps_the_old_bound_where_nothing_was_tried_past_the_top_k() -> None:
    # the highest value tried is in the top 2 (but not the best, so no edge widening): no
    # trial says the range above it is worse, so the new range keeps the old upper bound
    lrs = [1e-4, 1e-3, 2e-3, 7e-3]
    values = [3.0, 2.6, 2.4, 2.5]
    trials = [({"optimizer.lr": lr}, v) for lr, v in zip(lrs, values, strict=True)]
    spec = NarrowSpec(top_k=2, widen=2.0, bracket=True)
    new, _, notes = narrow_space({"optimizer.lr": LR}, trials, spec, "minimize")
    assert new["optimizer.lr"].bounds == (1e-3, LR.bounds[1])
    assert notes == ["optimizer.lr: [1e-05, 0.1] log -> [0.001, 0.1] log"]
    plain, _, _ = narrow_space({"optimizer.lr": LR}, trials, NarrowSpec(top_k=2), "minimize")
    assert plain["optimizer.lr"].bounds[1] < 0.02  # without bracketing: the top-2 span


def test_best_at_the_upper_edge_widens_past_it() -> None:
    space = {"optimizer.lr": LR}
    trials = lr_trials(optimum=1.0)  # the further up the better: the best sits at the old high
    new, _, notes = narrow_space(space, trials, NarrowSpec(top_k=4, widen=2.0), "minimize")
    lr = new["optimizer.lr"]
    assert lr.high is not None and lr.high > LR.bounds[1]
    assert notes[0].startswith("optimizer.lr: best at the upper edge, widened to [")
    # twice as wide as the top-4 span, the extra past the old bound
    no_widening, _, _ = narrow_space(space, trials, NarrowSpec(top_k=4, widen=1.0), "minimize")
    assert log_width(lr) == pytest.approx(2 * log_width(no_widening["optimizer.lr"]), rel=0.02)


def test_best_at_the_lower_edge_is_clipped_at_the_trainer_limit() -> None:
    space = {"optimizer.weight_decay": ParamSpec(low=0.0, high=0.3)}
    rng = random.Random(3)
    trials = []
    for _ in range(30):
        value = rng.uniform(0.0, 0.3)
        trials.append(({"optimizer.weight_decay": value}, value))
    limits = {"optimizer.weight_decay": Limits(low=0.0)}
    new, _, notes = narrow_space(space, trials, NarrowSpec(top_k=3), "minimize", limits)
    wd = new["optimizer.weight_decay"]
    assert wd.low == 0.0 and wd.high is not None and 0.0 < wd.high < 0.3
    assert notes[0].startswith("optimizer.weight_decay: best at the lower edge, widened to [0,")
    assert notes[0].endswith("(clipped at the limit 0)")


def test_open_limit_is_never_reached() -> None:
    space = {"optimizer.betas.1": ParamSpec(low=0.9, high=0.999)}
    trials = [({"optimizer.betas.1": b}, -b) for b in (0.9, 0.95, 0.99, 0.998, 0.999)]
    limits = {"optimizer.betas.1": Limits(low=0.0, high=1.0, high_open=True)}
    new, _, notes = narrow_space(space, trials, NarrowSpec(top_k=3, widen=3.0), "minimize", limits)
    beta2 = new["optimizer.betas.1"]
    assert beta2.high is not None and 0.999 < beta2.high < 1.0
    assert "best at the upper edge" in notes[0]


def test_maximize_takes_the_largest_values() -> None:
    trials = [
        ({"optimizer.lr": lr}, -v) for (params, v) in lr_trials() for lr in [params["optimizer.lr"]]
    ]
    new, _, _ = narrow_space({"optimizer.lr": LR}, trials, NarrowSpec(top_k=5), "maximize")
    lr = new["optimizer.lr"]
    assert lr.low is not None and lr.high is not None and lr.low < BEST_LR < lr.high


def test_equal_top_k_expands_around_the_value() -> None:
    space = {"optimizer.lr": LR, "model.n_layer": ParamSpec(type="int", low=1, high=12)}
    trials = [({"optimizer.lr": 1e-3, "model.n_layer": 4}, 1.0 + i) for i in range(5)]
    new, warm, _ = narrow_space(space, trials, NarrowSpec(top_k=5, min_width=0.1), "minimize")
    lr, layers = new["optimizer.lr"], new["model.n_layer"]
    assert lr.low is not None and lr.high is not None and lr.low < 1e-3 < lr.high
    assert log_width(lr) == pytest.approx(0.1 * log_width(LR), rel=0.05)
    assert layers.type == "int" and isinstance(layers.low, int) and isinstance(layers.high, int)
    assert layers.low <= 4 <= layers.high and layers.low < layers.high
    assert warm == [{"optimizer.lr": 1e-3, "model.n_layer": 4}]  # repeats removed


def test_narrowing_never_inverts_and_keeps_the_best() -> None:
    rng = random.Random(7)
    for case in range(60):
        space = {
            "a": ParamSpec(low=rng.uniform(1e-6, 1e-3), high=rng.uniform(1e-2, 10.0), log=True),
            "b": ParamSpec(low=rng.uniform(-5, 0), high=rng.uniform(0.1, 5)),
            "c": ParamSpec(
                type="int", low=rng.randint(1, 3), high=rng.randint(4, 64), log=rng.random() < 0.5
            ),
        }
        trials = []
        for _ in range(rng.randint(1, 25)):
            params = {
                name: (
                    rng.randint(int(spec.bounds[0]), int(spec.bounds[1]))
                    if spec.type == "int"
                    else rng.uniform(*spec.bounds)
                )
                for name, spec in space.items()
            }
            trials.append((params, rng.random()))
        spec = NarrowSpec(
            top_k=rng.randint(1, 8),
            quantiles=sorted((rng.random(), rng.random())) if rng.random() < 0.5 else (0.0, 1.0),
            widen=rng.choice([1.0, 1.5, 3.0]),
        )
        if spec.quantiles[0] == spec.quantiles[1]:
            continue
        new, warm, notes = narrow_space(space, trials, spec, "minimize")
        best = top_trials(trials, "minimize", 1)[0][0]
        for name, param in new.items():
            low, high = param.bounds
            assert low < high, (case, name, param)
            assert param.contains(best[name]), (case, name, param, best[name])
        assert len(notes) == 3
        assert warm and warm[0] == best


def test_categorical_keeps_the_choices_of_the_top_k_and_drops_dead_conditions() -> None:
    space = {
        "optimizer.name": ParamSpec(choices=["adamw", "momentum", "lion"]),
        "optimizer.momentum": ParamSpec(
            low=0.8, high=0.99, condition={"optimizer.name": "momentum"}
        ),
        "optimizer.lr": LR,
    }
    trials = [
        ({"optimizer.name": "lion", "optimizer.lr": 1e-4}, 0.5),
        ({"optimizer.name": "adamw", "optimizer.lr": 1e-3}, 0.7),
        ({"optimizer.name": "momentum", "optimizer.momentum": 0.9, "optimizer.lr": 1e-2}, 2.0),
    ]
    new, warm, notes = narrow_space(space, trials, NarrowSpec(top_k=2), "minimize")
    assert new["optimizer.name"].choices == ["adamw", "lion"]  # file order kept
    assert "optimizer.momentum" not in new
    assert "optimizer.momentum: dropped; its condition can no longer hold" in notes
    assert warm == [trials[0][0], trials[1][0]]
    # with the conditional choice in the top-k, the condition and its range survive
    new, _, _ = narrow_space(space, trials, NarrowSpec(top_k=3), "minimize")
    assert new["optimizer.momentum"].condition == {"optimizer.name": ["momentum"]}
    assert new["optimizer.name"].choices == ["adamw", "momentum", "lion"]


def test_failed_trials_are_ignored_and_none_finished_keeps_the_space() -> None:
    space = {"optimizer.lr": LR}
    failed: list[tuple[dict[str, Any], float | None]] = [
        ({"optimizer.lr": 1e-4}, float("nan")),
        ({"optimizer.lr": 1e-2}, None),
    ]
    new, warm, notes = narrow_space(space, failed, NarrowSpec(), "minimize")
    assert new == space and warm == [] and "space unchanged" in notes[0]
    new, _, _ = narrow_space(
        space, [*failed, ({"optimizer.lr": 3e-3}, 1.0)], NarrowSpec(), "minimize"
    )
    assert new["optimizer.lr"].contains(3e-3) and not new["optimizer.lr"].contains(1e-4)


def test_warm_start_off_gives_no_warm_starts() -> None:
    _, warm, _ = narrow_space(
        {"optimizer.lr": LR}, lr_trials(), NarrowSpec(warm_start=False), "minimize"
    )
    assert warm == []


# ---------------------------------------------------------------------------------------------
# carry_over_trials and the staged pattern


def test_carry_over_keeps_exactly_the_trials_inside_the_new_space() -> None:
    trials = lr_trials(n=50)
    new_space = {"optimizer.lr": ParamSpec(low=1e-3, high=1e-2, log=True)}
    inside = [params for params, _ in trials if 1e-3 <= params["optimizer.lr"] <= 1e-2]
    frozen = carry_over_trials(
        [*trials, ({"optimizer.lr": 5e-3}, float("nan"))], new_space, stage="coarse"
    )
    assert len(frozen) == len(inside) > 0
    assert all(t.user_attrs == {"carried_over": True, "from_stage": "coarse"} for t in frozen)
    study = optuna.create_study()
    study.add_trials(frozen)
    assert len(study.trials) == len(inside)


def test_carry_over_with_conditions_and_narrowed_choices() -> None:
    space = {
        "optimizer.name": ParamSpec(choices=["adamw", "momentum"]),
        "optimizer.momentum": ParamSpec(
            low=0.8, high=0.99, condition={"optimizer.name": "momentum"}
        ),
    }
    trials: list[tuple[dict[str, Any], float]] = [
        ({"optimizer.name": "momentum", "optimizer.momentum": 0.9}, 1.0),
        ({"optimizer.name": "momentum", "optimizer.momentum": 0.81}, 1.0),  # outside [0.85, 0.95]
        ({"optimizer.name": "adamw"}, 2.0),
    ]
    narrowed = {
        "optimizer.name": ParamSpec(choices=["adamw", "momentum"]),
        "optimizer.momentum": ParamSpec(
            low=0.85, high=0.95, condition={"optimizer.name": "momentum"}
        ),
    }
    frozen = carry_over_trials(trials, narrowed)
    assert [t.params for t in frozen] == [trials[0][0], trials[2][0]]
    assert set(frozen[1].distributions) == {"optimizer.name"}
    only_adamw = {"optimizer.name": ParamSpec(choices=["adamw"])}
    assert [t.params for t in carry_over_trials(trials, only_adamw)] == [
        {"optimizer.name": "adamw"}
    ]
    assert carry_over_trials(trials, space)[0].params == trials[0][0]


def test_coarse_then_fine_in_a_new_study_improves_on_the_coarse_best() -> None:
    space = {"optimizer.lr": LR, "optimizer.weight_decay": ParamSpec(low=0.0, high=0.3)}

    def loss(params: dict[str, Any]) -> float:
        return (math.log10(params["optimizer.lr"]) - math.log10(BEST_LR)) ** 2 + (
            params["optimizer.weight_decay"] - 0.1
        ) ** 2

    coarse = optuna.create_study(sampler=make_sampler("sobol", 0, space))
    coarse.optimize(lambda trial: loss(suggest(trial, space)), n_trials=16)
    trials = [(t.params, t.value) for t in coarse.trials]
    assert trials and all(v is not None for _, v in trials)
    new_space, warm, _ = narrow_space(space, trials, NarrowSpec(top_k=4), "minimize")
    fine = optuna.create_study(sampler=make_sampler("tpe", 1, new_space, startup_trials=4))
    fine.add_trials(carry_over_trials(trials, new_space, stage="coarse"))
    for params in warm:
        fine.enqueue_trial(params)
    fine.optimize(lambda trial: loss(suggest(trial, new_space)), n_trials=12)
    new_trials = [t for t in fine.trials if "carried_over" not in t.user_attrs]
    assert len(new_trials) == 12
    assert [t.params for t in new_trials[: len(warm)]] == warm  # warm starts run first
    assert all(new_space["optimizer.lr"].contains(t.params["optimizer.lr"]) for t in new_trials)
    assert min(t.value for t in new_trials if t.value is not None) <= coarse.best_value


# ---------------------------------------------------------------------------------------------
# Samplers and pruners


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("sobol", optuna.samplers.QMCSampler),
        ("random", optuna.samplers.RandomSampler),
        ("tpe", optuna.samplers.TPESampler),
        ("gp", optuna.samplers.GPSampler),
        ("cmaes", optuna.samplers.CmaEsSampler),
    ],
)
def test_make_sampler_builds_each_name_without_experimental_warnings(name: str, cls: type) -> None:
    conditional = {
        "optimizer.name": ParamSpec(choices=["adamw", "momentum"]),
        "optimizer.momentum": ParamSpec(
            low=0.8, high=0.99, condition={"optimizer.name": "momentum"}
        ),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error", optuna.exceptions.ExperimentalWarning)
        sampler = make_sampler(name, seed=0, space=conditional)
    assert isinstance(sampler, cls)


@pytest.mark.parametrize("name", ["sobol", "random", "tpe", "gp", "cmaes"])
def test_samplers_run_a_few_trials_reproducibly(name: str) -> None:
    space = {"optimizer.lr": LR, "model.n_layer": ParamSpec(type="int", low=1, high=6)}

    def run() -> list[dict[str, Any]]:
        study = optuna.create_study(
            sampler=make_sampler(name, seed=3, space=space, startup_trials=2)
        )
        study.optimize(lambda t: math.log10(suggest(t, space)["optimizer.lr"]) ** 2, n_trials=4)
        return [t.params for t in study.trials]

    first = run()
    assert first == run()
    assert all(LR.contains(p["optimizer.lr"]) and 1 <= p["model.n_layer"] <= 6 for p in first)


def test_unknown_sampler_lists_the_valid_ones() -> None:
    with pytest.raises(
        StudyError, match=r"^sampler: 'bohb' is not one of: sobol, random, tpe, gp, cmaes$"
    ):
        make_sampler("bohb", seed=0)


def test_make_pruner_builds_each_name_with_its_knobs() -> None:
    asha = make_pruner(PrunerSpec(name="asha", min_resource=50, reduction_factor=3))
    assert isinstance(asha, optuna.pruners.SuccessiveHalvingPruner)
    assert (asha._min_resource, asha._reduction_factor) == (50, 3)
    hyperband = make_pruner(PrunerSpec(name="hyperband", min_resource=10), max_resource=400)
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    assert (hyperband._min_resource, hyperband._max_resource) == (10, 400)
    median = make_pruner(PrunerSpec(name="median", min_resource=100, startup_trials=3))
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert (median._n_startup_trials, median._n_warmup_steps) == (3, 100)
    assert isinstance(make_pruner("none"), optuna.pruners.NopPruner)
    assert isinstance(make_pruner("asha"), optuna.pruners.SuccessiveHalvingPruner)


def test_unknown_pruner_lists_the_valid_ones() -> None:
    with pytest.raises(
        StudyError, match=r"^pruner: 'wilcoxon' is not one of: asha, hyperband, median, none$"
    ):
        make_pruner("wilcoxon")
