"""One search space, translated for real: Optuna trials respect bounds, log scale and conditions;
Ray Tune domains have the right bounds and types (no Ray cluster is started)."""

from __future__ import annotations

import math
import pickle
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from studies.config import ParamSpec
from studies.space import (
    active_params,
    optuna_define_by_run,
    optuna_distributions,
    ray_search_space,
    suggest,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "optimizer.lr": ParamSpec(low=1e-5, high=1e-1, log=True),
    "optimizer.weight_decay": ParamSpec(low=0.0, high=0.3),
    "model.n_layer": ParamSpec(type="int", low=1, high=8),
    "data.batch_size": ParamSpec(type="int", low=4, high=64, log=True),
    "optimizer.name": ParamSpec(choices=["adamw", "momentum"]),
    # listed before the parameter it depends on: suggestion order follows the condition
    "optimizer.momentum": ParamSpec(
        low=0.5,
        high=0.99,
        condition={"schedule.name": ["wsd", "cosine"], "optimizer.name": "momentum"},
    ),
    "schedule.name": ParamSpec(choices=["cosine", "wsd", "linear"]),
}


def check_params(params: dict[str, Any]) -> None:
    for name, value in params.items():
        spec = SPACE[name]
        assert spec.contains(value), (name, value)
        if spec.type == "int":
            assert isinstance(value, int)
    momentum_active = params["optimizer.name"] == "momentum" and params["schedule.name"] in (
        "wsd",
        "cosine",
    )
    assert ("optimizer.momentum" in params) == momentum_active


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_optuna_trials_respect_bounds_log_and_conditions(sampler: str) -> None:
    chosen = (
        optuna.samplers.TPESampler(seed=0, n_startup_trials=5)
        if sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=0)
    )
    study = optuna.create_study(sampler=chosen)

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, SPACE)
        assert params == trial.params
        return (math.log10(params["optimizer.lr"]) + 2.5) ** 2 + params["optimizer.weight_decay"]

    study.optimize(objective, n_trials=20)
    assert len(study.trials) == 20
    for trial in study.trials:
        check_params(trial.params)
        assert trial.distributions["optimizer.lr"] == FloatDistribution(1e-5, 1e-1, log=True)
        assert trial.distributions["data.batch_size"] == IntDistribution(4, 64, log=True)
    names = {trial.params["optimizer.name"] for trial in study.trials}
    assert names == {"adamw", "momentum"}
    assert any("optimizer.momentum" in t.params for t in study.trials)


def test_log_scale_spreads_samples_over_decades() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    space = {"optimizer.lr": SPACE["optimizer.lr"]}
    study.optimize(lambda trial: suggest(trial, space)["optimizer.lr"], n_trials=60)
    decades = [math.log10(t.params["optimizer.lr"]) for t in study.trials]
    # uniform in log10 over [-5, -1]: about a quarter of the samples below 1e-4
    assert sum(d < -4 for d in decades) >= 8
    assert -3.6 < sum(decades) / len(decades) < -2.4


def test_distributions_match_the_specs() -> None:
    distributions = optuna_distributions(SPACE)
    assert distributions["optimizer.lr"] == FloatDistribution(1e-5, 1e-1, log=True)
    assert distributions["optimizer.weight_decay"] == FloatDistribution(0.0, 0.3)
    assert distributions["model.n_layer"] == IntDistribution(1, 8)
    assert distributions["optimizer.name"] == CategoricalDistribution(["adamw", "momentum"])
    assert list(distributions) == list(SPACE)
    only = optuna_distributions(SPACE, {"optimizer.lr": 1e-3, "optimizer.name": "adamw"})
    assert list(only) == ["optimizer.lr", "optimizer.name"]


def test_distributions_build_trials_a_study_accepts() -> None:
    params = {"optimizer.lr": 1e-3, "optimizer.name": "adamw", "schedule.name": "wsd"}
    frozen = optuna.trial.create_trial(
        params=params, distributions=optuna_distributions(SPACE, params), value=1.0
    )
    study = optuna.create_study()
    study.add_trials([frozen])
    assert study.best_params == params


def test_ray_domains_have_the_right_types_and_bounds() -> None:
    from ray.tune.search.sample import Categorical, Float, Function, Integer

    domains = ray_search_space(SPACE)
    lr = domains["optimizer.lr"]
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1e-5, 1e-1)
    assert type(lr.get_sampler()).__name__ == "_LogUniform"
    wd = domains["optimizer.weight_decay"]
    assert isinstance(wd, Float) and (wd.lower, wd.upper) == (0.0, 0.3)
    assert type(wd.get_sampler()).__name__ == "_Uniform"
    layers = domains["model.n_layer"]
    assert isinstance(layers, Integer) and (layers.lower, layers.upper) == (1, 9)  # upper exclusive
    batch = domains["data.batch_size"]
    assert isinstance(batch, Integer) and (batch.lower, batch.upper) == (4, 65)
    assert type(batch.get_sampler()).__name__ == "_LogUniform"
    name = domains["optimizer.name"]
    assert isinstance(name, Categorical) and name.categories == ["adamw", "momentum"]
    assert isinstance(domains["optimizer.momentum"], Function)


def test_ray_variants_respect_conditions() -> None:
    from ray.tune.search.variant_generator import generate_variants

    domains = ray_search_space(SPACE)
    seen_active = 0
    for _ in range(30):
        for _resolved, config in generate_variants(domains):
            params = active_params(SPACE, config)
            check_params(params)
            momentum = config["optimizer.momentum"]
            if "optimizer.momentum" in params:
                seen_active += 1
                assert 0.5 <= momentum <= 0.99
            else:
                assert momentum is None
    assert seen_active > 0


def test_define_by_run_drives_ray_optuna_search() -> None:
    from ray.tune.search.optuna import OptunaSearch

    define_by_run = optuna_define_by_run(SPACE)
    pickle.loads(pickle.dumps(define_by_run))  # Tune checkpoints its searcher
    searcher = OptunaSearch(space=define_by_run, metric="loss", mode="min", seed=0)
    for i in range(8):
        config = searcher.suggest(f"trial-{i}")
        assert isinstance(config, dict)
        check_params(config)
        searcher.on_trial_complete(f"trial-{i}", {"loss": float(i)})


def test_active_params_drops_inactive_and_unknown_entries() -> None:
    config = {
        "optimizer.lr": 1e-3,
        "optimizer.name": "adamw",
        "schedule.name": "wsd",
        "optimizer.momentum": None,
        "other": 1,
    }
    assert active_params(SPACE, config) == {
        "optimizer.lr": 1e-3,
        "optimizer.name": "adamw",
        "schedule.name": "wsd",
    }
