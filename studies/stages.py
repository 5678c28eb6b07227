"""Coarse -> fine: narrow a space around the best trials, carry trials over, build samplers and
pruners.

Changing the distributions inside one Optuna study degrades TPE and breaks CMA-ES, so each stage
is a new study: `narrow_space` derives its space from the earlier stage's trials,
`carry_over_trials` turns the earlier trials that fall inside it into `FrozenTrial`s for
`Study.add_trials`, and the warm starts it returns go to `Study.enqueue_trial`.

Narrowing one numeric parameter (in log space for log parameters):

1. The new range spans the `quantiles` of the top-k trials' values, and always the best value.
2. Too narrow (the top-k agree)? Widen it to `min_width` of the old width, around its centre.
   With ``bracket``, extend each end to the nearest value a worse trial (finished, pruned or
   failed) tried beyond it, or to the old bound if none was.
3. The best within `edge_margin` of an old bound? The optimum may lie past it: the range grows
   `widen` times, the extra past that bound.
4. Clip to the trainer field's hard limits (`studies.trainer_config.space_limits`), never invert.

Optuna is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from studies.config import Direction, Limits, NarrowSpec, ParamSpec, PrunerSpec, condition_order
from studies.errors import StudyError
from studies.space import active_params, optuna_distributions

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "ScoredParams",
    "carry_over_trials",
    "make_pruner",
    "make_sampler",
    "narrow_space",
    "top_trials",
]

SAMPLERS = ("sobol", "random", "tpe", "gp", "cmaes")
PRUNERS = ("asha", "hyperband", "median", "none")
SIGNIFICANT_DIGITS = 3  # new bounds are rounded outward to this many, for readable notes

# (params, value); a failed or pruned trial's value is None (or not finite) and is ignored
ScoredParams = tuple[Mapping[str, Any], float | None]
Space = Mapping[str, ParamSpec]


def top_trials(
    trials: Sequence[ScoredParams], direction: Direction, k: int | None = None
) -> list[tuple[Mapping[str, Any], float]]:
    """Finished trials (finite values), best first; the first `k` when given."""
    finished = [
        (params, float(value)) for params, value in trials if value is not None and _finite(value)
    ]
    finished.sort(key=lambda item: item[1], reverse=direction == "maximize")
    return finished if k is None else finished[:k]


def narrow_space(
    space: Space,
    trials: Sequence[ScoredParams],
    spec: NarrowSpec,
    direction: Direction,
    limits: Mapping[str, Limits] | None = None,
) -> tuple[dict[str, ParamSpec], list[dict[str, Any]], list[str]]:
    """The next stage's space from the earlier stage's (params, value) pairs.

    Returns (new space, warm starts: the top-k's params that lie inside it, notes: one line per
    parameter saying what changed). Failed or pruned trials (value None or not finite) rank
    below every finished one: they count only as values tried, for bracketing. With none
    finished the space is returned unchanged.
    """
    finished = top_trials(trials, direction)
    top = finished[: spec.top_k]
    if not top:
        return dict(space), [], ["no finished trials to narrow from: space unchanged"]
    limits = limits or {}
    best = top[0][0]
    new_space: dict[str, ParamSpec] = {}
    notes: list[str] = []
    for name in condition_order(space):
        old = space[name]
        possible, condition = _surviving_condition(old, new_space)
        if not possible:
            notes.append(f"{name}: dropped; its condition can no longer hold")
            continue
        values = [params[name] for params, _ in top if name in params]
        if not values:
            new_space[name] = old.model_copy(update={"condition": condition})
            notes.append(f"{name}: inactive in the top {len(top)}: {old.describe()} kept")
            continue
        if old.type == "categorical":
            kept = [choice for choice in old.choices or [] if choice in values]
            new = ParamSpec(type="categorical", choices=kept, condition=condition)
            notes.append(f"{name}: {old.describe()} -> {new.describe()}")
        else:
            tried = [params[name] for params, _ in trials if name in params]
            new, note = _narrow_numeric(
                name, old, values, best.get(name), spec, limits.get(name), tried
            )
            new = new.model_copy(update={"condition": condition})
            notes.append(note)
        new_space[name] = new
    ordered = {name: new_space[name] for name in space if name in new_space}
    warm_starts = _warm_starts(top, ordered) if spec.warm_start else []
    return ordered, warm_starts, notes


def _surviving_condition(
    spec: ParamSpec, new_space: Mapping[str, ParamSpec]
) -> tuple[bool, dict[str, list[Any]] | None]:
    """(whether `spec`'s condition can still hold, the condition restricted to the choices the
    new space kept)."""
    if not spec.condition:
        return True, None
    kept: dict[str, list[Any]] = {}
    for target, allowed in spec.condition.items():
        choices = new_space[target].choices or [] if target in new_space else []
        still = [value for value in allowed if value in choices]
        if not still:
            return False, None
        kept[target] = still
    return True, kept


def _narrow_numeric(
    name: str,
    old: ParamSpec,
    values: list[Any],
    best_value: Any,
    spec: NarrowSpec,
    limit: Limits | None,
    tried: Sequence[Any] = (),
) -> tuple[ParamSpec, str]:
    forward, back = (math.log, math.exp) if old.log else (float, float)
    old_low, old_high = (forward(bound) for bound in old.bounds)
    width = old_high - old_low
    points = np.array([forward(value) for value in values], dtype=float)
    # 1. the quantile range of the top-k, the best always inside
    low, high = (float(q) for q in np.quantile(points, spec.quantiles))
    best = forward(best_value) if best_value is not None else None
    if best is not None:
        low, high = min(low, best), max(high, best)
    # 2. not narrower than min_width of the old range, and inside the old range
    if high - low < spec.min_width * width:
        centre, half = (low + high) / 2, spec.min_width * width / 2
        low, high = centre - half, centre + half
        shift = max(old_low - low, 0.0) - max(high - old_high, 0.0)
        low, high = low + shift, high + shift
    # 2b. bracketing: out to the nearest values worse trials tried beyond the range; with
    # none tried beyond an end, nothing says the optimum is not there: the old bound
    if spec.bracket:
        others = [forward(value) for value in tried]
        low = max((p for p in others if p < low), default=min(low, old_low))
        high = min((p for p in others if p > high), default=max(high, old_high))
    # 3. the best at an edge: the optimum may lie past it
    edge = None
    if best is not None and spec.widen > 1.0:
        extra = (spec.widen - 1.0) * (high - low)
        if best >= old_high - spec.edge_margin * width:
            edge, high = "upper", max(high, old_high) + extra
        elif best <= old_low + spec.edge_margin * width:
            edge, low = "lower", min(low, old_low) - extra
    # 4. back to the parameter's units, rounded outward, clipped to the trainer's limits
    new_low, new_high = _round_outward(back(low), back(high), old.type == "int", old.log)
    # exactly the values that were meant to be inside stay inside (log/exp round-trips drift)
    inside = [v for v, point in zip(values, points, strict=True) if low <= point <= high]
    inside += [] if best_value is None else [best_value]
    new_low, new_high = min(new_low, *inside), max(new_high, *inside)
    new_low, new_high, clipped = _clip(new_low, new_high, limit, old.type == "int")
    if not new_low < new_high:
        return old, f"{name}: no valid narrower range: {old.describe()} kept"
    if old.type == "int":
        new = ParamSpec(type="int", low=int(new_low), high=int(new_high), log=old.log)
    else:
        new = ParamSpec(type="float", low=new_low, high=new_high, log=old.log)
    tail = f" (clipped at the limit {clipped:g})" if clipped is not None else ""
    if edge is not None:
        note = f"{name}: best at the {edge} edge, widened to {new.describe()}{tail}"
    else:
        note = f"{name}: {old.describe()} -> {new.describe()}{tail}"
    return new, note


def _round_outward(low: float, high: float, integer: bool, log: bool) -> tuple[float, float]:
    if integer:
        low, high = math.floor(low + 1e-9), math.ceil(high - 1e-9)
        if log:
            low = max(low, 1)
        if low == high:
            high += 1
        return low, high
    return _round_sig(low, math.floor), _round_sig(high, math.ceil)


def _round_sig(value: float, direction: Any) -> float:
    """`value` rounded down (math.floor) or up (math.ceil) to SIGNIFICANT_DIGITS."""
    if value == 0 or not math.isfinite(value):
        return value
    scale = 10.0 ** (math.floor(math.log10(abs(value))) - SIGNIFICANT_DIGITS + 1)
    # a value already round (up to float noise) stays put; the caller re-includes exact values
    nudge = 1e-6 if direction is math.floor else -1e-6
    return float(f"{direction(value / scale + nudge) * scale:.{SIGNIFICANT_DIGITS + 2}g}")


def _clip(
    low: float, high: float, limit: Limits | None, integer: bool
) -> tuple[float, float, float | None]:
    """Clip [low, high] to a trainer field's limits; also says which limit bit, if any."""
    if limit is None:
        return low, high, None
    clipped = None
    if limit.low is not None and (low < limit.low or (limit.low_open and low <= limit.low)):
        low = _inside(limit.low, +1, limit.low_open, integer)
        clipped = limit.low
    if limit.high is not None and (high > limit.high or (limit.high_open and high >= limit.high)):
        high = _inside(limit.high, -1, limit.high_open, integer)
        clipped = limit.high
    return low, high, clipped


def _inside(bound: float, side: int, is_open: bool, integer: bool) -> float:
    """The closest allowed value to a limit: the limit itself, or just inside an open one."""
    if not is_open:
        return bound
    if integer:
        return bound + side
    return bound + side * 1e-9 * max(1.0, abs(bound))


def _warm_starts(top: Sequence[ScoredParams], space: Space) -> list[dict[str, Any]]:
    """The top trials' params restricted to `space`, those that lie inside it, no repeats."""
    starts: list[dict[str, Any]] = []
    for params, _ in top:
        inside = _inside_space(params, space)
        if inside is not None and inside not in starts:
            starts.append(inside)
    return starts


def _inside_space(params: Mapping[str, Any], space: Space) -> dict[str, Any] | None:
    """`params`' active entries in `space`, or None when one lies outside it."""
    active = active_params(space, params)
    inside = all(space[name].contains(value) for name, value in active.items())
    # a trial that ran with a value of a parameter the space now lacks does not belong
    return active if inside and all(name in space for name in params) else None


def carry_over_trials(
    trials: Sequence[ScoredParams], new_space: Space, *, stage: str | None = None
) -> list[FrozenTrial]:
    """Earlier trials inside `new_space`, as completed `FrozenTrial`s for `Study.add_trials`.

    Each carries ``user_attrs`` ``carried_over: True`` (and ``from_stage``), so that a report can
    leave them out: their values were measured at the earlier stage's budget.
    """
    import optuna

    attrs: dict[str, Any] = {"carried_over": True}
    if stage is not None:
        attrs["from_stage"] = stage
    frozen = []
    for params, value in trials:
        if value is None or not _finite(value):
            continue
        inside = _inside_space(params, new_space)
        if inside is None:
            continue
        frozen.append(
            optuna.trial.create_trial(
                params=inside,
                distributions=optuna_distributions(new_space, inside),
                value=float(value),
                user_attrs=attrs,
            )
        )
    return frozen


def make_sampler(
    name: str, seed: int, space: Space | None = None, *, startup_trials: int | None = None
) -> optuna.samplers.BaseSampler:
    """An Optuna sampler by stage sampler name, seeded.

    sobol: scrambled Sobol (QMCSampler); random; tpe: multivariate TPE (grouped when the space
    has conditions); gp: Gaussian process (torch); cmaes: CMA-ES (the `cmaes` package;
    categorical parameters fall back to random sampling). `startup_trials`: random trials
    before the model takes over (tpe, gp, cmaes); None: Optuna's default.
    """
    import optuna
    from optuna.exceptions import ExperimentalWarning

    conditional = any(spec.condition for spec in (space or {}).values())
    categorical = any(spec.type == "categorical" for spec in (space or {}).values())

    def startup(default: int) -> int:
        return default if startup_trials is None else startup_trials

    # QMCSampler and TPE's `group` are marked experimental; both are what we mean to use
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ExperimentalWarning)
        if name == "sobol":
            return optuna.samplers.QMCSampler(
                qmc_type="sobol",
                scramble=True,
                seed=seed,
                independent_sampler=optuna.samplers.RandomSampler(seed=seed),
                warn_independent_sampling=not conditional,
            )
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "tpe":
            return optuna.samplers.TPESampler(
                multivariate=True, group=conditional, seed=seed, n_startup_trials=startup(10)
            )
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup(10))
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(
                seed=seed,
                warn_independent_sampling=not (conditional or categorical),
                n_startup_trials=startup(1),
            )
    raise StudyError(f"sampler: '{name}' is not one of: {', '.join(SAMPLERS)}")


def make_pruner(
    spec: PrunerSpec | str, max_resource: int | None = None
) -> optuna.pruners.BasePruner:
    """An Optuna pruner from a stage's pruner spec (or a bare name, with default knobs).

    Resources are the steps a trial reports its validation metric at. asha: asynchronous
    successive halving; hyperband (up to `max_resource`, the stage's steps; None: inferred);
    median: stop below the median of earlier trials at the same step; none. pbt is Ray's
    (`studies.backends.ray.pbt`): Optuna has no Population Based Training.
    """
    import optuna

    if (spec if isinstance(spec, str) else spec.name) == "pbt":
        raise StudyError(f"pruner: pbt needs backend: ray; Optuna's are {', '.join(PRUNERS)}")
    if isinstance(spec, str):
        if spec not in PRUNERS:
            raise StudyError(f"pruner: '{spec}' is not one of: {', '.join(PRUNERS)}")
        spec = PrunerSpec.model_validate({"name": spec})
    if spec.name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=spec.min_resource or "auto", reduction_factor=spec.reduction_factor
        )
    if spec.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=spec.min_resource or 1,
            max_resource=max_resource or "auto",
            reduction_factor=spec.reduction_factor,
        )
    if spec.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec.startup_trials, n_warmup_steps=spec.min_resource or 0
        )
    if spec.name == "none":
        return optuna.pruners.NopPruner()
    raise StudyError(f"pruner: '{spec.name}' is not one of: {', '.join(PRUNERS)}")


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))
