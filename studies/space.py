"""One search space (`dict[str, ParamSpec]`) translated to Optuna and to Ray Tune.

- Optuna, define-by-run: `suggest(trial, space)` asks the trial for each active parameter, in
  condition order; `optuna_distributions(space)` gives the distributions that
  `optuna.trial.create_trial` and `Study.add_trials` need.
- Ray Tune: `ray_search_space(space)` gives Tune domains (for Tune's own search algorithms);
  `optuna_define_by_run(space)` gives the define-by-run callable `OptunaSearch(space=...)` takes,
  which keeps conditions exact.

A conditional parameter whose condition does not hold is left out of an Optuna trial's params;
in a Tune config it is None, and `active_params` drops it.

Optuna and Ray are imported inside the functions, so importing this module is cheap.

>>> from studies.config import ParamSpec
>>> space = {"optimizer.lr": ParamSpec(low=1e-4, high=1e-2, log=True)}
>>> optuna_distributions(space)["optimizer.lr"]
FloatDistribution(high=0.01, log=True, low=0.0001, step=None)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from studies.config import ParamSpec, condition_order

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

__all__ = [
    "DefineByRun",
    "active_params",
    "optuna_define_by_run",
    "optuna_distribution",
    "optuna_distributions",
    "ray_search_space",
    "suggest",
]

Space = Mapping[str, ParamSpec]


def suggest(trial: optuna.trial.BaseTrial, space: Space) -> dict[str, Any]:
    """Suggest every active parameter of `space` on an Optuna trial; returns the params."""
    params: dict[str, Any] = {}
    for name in condition_order(space):
        spec = space[name]
        if not spec.is_active(params):
            continue
        if spec.type == "categorical":
            params[name] = trial.suggest_categorical(name, spec.choices or [])
        elif spec.type == "int":
            low, high = spec.bounds
            params[name] = trial.suggest_int(name, int(low), int(high), log=spec.log)
        else:
            low, high = spec.bounds
            params[name] = trial.suggest_float(name, low, high, log=spec.log)
    return params


def optuna_distribution(spec: ParamSpec) -> BaseDistribution:
    """One parameter as an Optuna distribution."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if spec.type == "categorical":
        return CategoricalDistribution(spec.choices or [])
    low, high = spec.bounds
    if spec.type == "int":
        return IntDistribution(int(low), int(high), log=spec.log)
    return FloatDistribution(low, high, log=spec.log)


def optuna_distributions(
    space: Space, params: Mapping[str, Any] | None = None
) -> dict[str, BaseDistribution]:
    """Name -> Optuna distribution; with `params`, only the names in it (Optuna's create_trial
    wants exactly the distributions of the params a trial has)."""
    names = [name for name in space if params is None or name in params]
    return {name: optuna_distribution(space[name]) for name in names}


def active_params(space: Space, config: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a sampled config that are parameters of `space` and active."""
    params: dict[str, Any] = {}
    for name in condition_order(space):
        if name in config and space[name].is_active(params):
            params[name] = config[name]
    return params


class DefineByRun:
    """A define-by-run space for Ray's `OptunaSearch(space=DefineByRun(space), ...)`.

    A class rather than a closure so that Tune can pickle the searcher with it.
    """

    def __init__(self, space: Space) -> None:
        self.space = dict(space)

    def __call__(self, trial: optuna.trial.Trial) -> None:
        suggest(trial, self.space)


def optuna_define_by_run(space: Space) -> DefineByRun:
    """The callable `OptunaSearch(space=...)` accepts: it suggests the space on each trial,
    conditions included, and returns no constants."""
    return DefineByRun(space)


def ray_search_space(space: Space) -> dict[str, Any]:
    """Ray Tune domains for a flat ``param_space`` (keys are the dotted trainer keys).

    float: uniform / loguniform; int: randint / lograndint (Tune's upper bound is exclusive, so
    high + 1); categorical: choice. A conditional parameter becomes a `tune.sample_from` that
    samples its domain when the condition holds and gives None otherwise.
    """
    from ray import tune

    domains: dict[str, Any] = {}
    for name, spec in space.items():
        if spec.type == "categorical":
            domain: Any = tune.choice(list(spec.choices or []))
        elif spec.type == "int":
            low, high = (int(bound) for bound in spec.bounds)
            domain = tune.lograndint(low, high + 1) if spec.log else tune.randint(low, high + 1)
        else:
            low_f, high_f = spec.bounds
            domain = tune.loguniform(low_f, high_f) if spec.log else tune.uniform(low_f, high_f)
        domains[name] = domain if not spec.condition else tune.sample_from(_When(spec, domain))
    return domains


class _When:
    """Tune `sample_from` function: sample `domain` if `spec`'s condition holds, else None."""

    def __init__(self, spec: ParamSpec, domain: Any) -> None:
        self.condition = dict(spec.condition or {})
        self.domain = domain

    def __call__(self, config: Mapping[str, Any]) -> Any:
        from ray.tune.search.sample import Domain
        from ray.tune.search.variant_generator import RecursiveDependencyError

        for name, allowed in self.condition.items():
            value = config[name]
            if isinstance(value, Domain):  # not sampled yet: Tune retries after the others
                raise RecursiveDependencyError(f"'{name}' is not resolved yet")
            if value not in allowed:
                return None
        return self.domain.sample()
