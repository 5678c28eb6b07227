"""What each stage of a study is, decided once for every backend.

`plan_stage` says, for stage `index`:

- its space: the study's (the first stage), the stage before's unchanged (no ``narrow``), or
  narrowed from the stage before's trial records (`studies.stages.narrow_space`, clipped to the
  trainer's hard limits when the objective is the trainer, to the study's declared space when
  it is a callable); then, with ``horizon``, the LR's range moved from the stage before's
  horizon to this one's along the horizon law (`studies.horizon`), given or fitted from the
  optima of all earlier stages;
- the trials it starts from: the best earlier trials that lie inside the new space (warm starts,
  at most the stage's trial count), measured again at this stage's budget;
- its sampler's seed (the stage's own, else the study's + the stage's index) and start-up trials
  (a fine stage is short: TPE and GP take over after half of it, at most 10);
- its pruner's resource: the steps a trial reports up to and its first report's step;
- the settings its storage keeps (`StagePlan.meta`), so that a resumed sweep, every worker and
  ``scaleplan study show`` use the same space; a stage resumed from storage must be the one the
  study file describes now (`check_resumed`).

The backends only translate a plan into their engine's calls.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from studies.config import Direction, ParamSpec, StageSpec, StudyConfig
from studies.errors import StudyError

if TYPE_CHECKING:
    from studies.records import StageReport, TrialRecord

__all__ = [
    "StagePlan",
    "check_resumed",
    "plan_stage",
    "space_from_json",
    "space_to_json",
    "stage_report",
    "startup_trials",
]

MODEL_SAMPLERS = ("tpe", "gp")  # samplers whose start-up count the plan sets
MAX_STARTUP_TRIALS = 10


@dataclass(frozen=True)
class StagePlan:
    """One stage, ready for a backend to run."""

    index: int
    stage: StageSpec
    space: dict[str, ParamSpec]
    warm_starts: list[dict[str, Any]]
    notes: list[str]
    sampler_seed: int
    startup_trials: int | None  # None: the sampler's own default
    budget_steps: int  # the steps a trial reports up to (0: the objective cannot say)
    first_eval_step: int
    meta: dict[str, Any] = field(default_factory=dict)  # what the stage's storage keeps
    resumed: bool = False  # read back from storage (else new: the backend stores `meta`)


def startup_trials(stage: StageSpec) -> int | None:
    """Random trials before TPE or GP take over: half the stage, 1 to 10."""
    if stage.sampler not in MODEL_SAMPLERS:
        return None
    return max(1, min(MAX_STARTUP_TRIALS, stage.trials // 2))


def plan_stage(
    study: StudyConfig,
    index: int,
    earlier: Sequence[StageReport],
    stored: Mapping[str, Any] | None = None,
    *,
    where: str = "",
    fixed_trials: bool = False,
) -> StagePlan:
    """Stage `index` of `study`, after the `earlier` stages' reports (none: the first stage).

    `stored`: the settings the backend's storage already keeps for this stage (a resumed
    sweep), checked against the study file (`where` names the storage in the message;
    `fixed_trials`: the engine cannot change a started stage's trial count)."""
    from studies.objectives import objective_for

    stage = study.stages[index]
    objective = objective_for(study)
    steps, first_eval = objective.stage_steps(study, stage)
    common: dict[str, Any] = {
        "index": index,
        "stage": stage,
        "sampler_seed": study.seed + index if stage.seed is None else stage.seed,
        "startup_trials": startup_trials(stage),
        "budget_steps": steps,
        "first_eval_step": first_eval,
    }
    if stored is not None:
        check_resumed(study, index, stored, steps, where, fixed_trials=fixed_trials)
        return StagePlan(
            space=space_from_json(stored.get("space") or {}) or dict(study.space),
            warm_starts=list(stored.get("warm_starts") or []),
            notes=list(stored.get("notes") or []),
            meta=dict(stored),
            resumed=True,
            **common,
        )
    space, warm, notes = _stage_space(study, index, earlier[-1] if earlier else None)
    if stage.horizon is not None and earlier:
        _move_to_horizon(study, index, earlier, steps, space, warm, notes)
    for key, spec in stage.space.items():
        space[key] = spec
        warm = [w for w in warm if key not in w or spec.contains(w[key])]
        notes.append(f"{key}: this stage's own range {spec.describe()}")
    direction = study.objective.direction or "minimize"
    meta = {
        "index": index,
        "stage": stage.name,
        "study": study.name,
        "sampler": stage.sampler,
        "pruner": stage.pruner.name,
        "trials": stage.trials,
        "budget_steps": steps,
        "budget": stage.budget.as_written(),
        "fidelity": objective.fidelity(study, stage),
        "objective": objective.kind,
        "callable": study.objective.callable,
        "metric": study.objective.metric,
        "direction": direction,
        "space": space_to_json(space),
        "notes": notes,
        "warm_starts": warm,
    }
    return StagePlan(space=space, warm_starts=warm, notes=notes, meta=meta, **common)


def _stage_space(
    study: StudyConfig, index: int, previous: StageReport | None
) -> tuple[dict[str, ParamSpec], list[dict[str, Any]], list[str]]:
    """(space, warm starts, notes) of a stage started now."""
    from studies.config import declared_limits
    from studies.stages import narrow_space
    from studies.trainer_config import space_limits

    stage = study.stages[index]
    if previous is None:
        return dict(study.space), [], []
    if stage.narrow is None:
        return dict(previous.space), [], [f"space of stage {previous.name} kept"]
    scored = [(t["params"], t["value"]) for t in previous.trials]
    direction: Direction = study.objective.direction or "minimize"
    # a trainer field's hard bounds; a callable's domain is the space the study declares
    limits = space_limits(study) if study.is_trainer else declared_limits(study.space)
    space, warm, notes = narrow_space(previous.space, scored, stage.narrow, direction, limits)
    return space, warm[: stage.trials], notes


def _move_to_horizon(
    study: StudyConfig,
    index: int,
    earlier: Sequence[StageReport],
    steps: int,
    space: dict[str, ParamSpec],
    warm: list[dict[str, Any]],
    notes: list[str],
) -> None:
    """Scale the stage's range of ``horizon.key`` (and its warm starts) by (T / T_before)^-b:
    from the stage before's horizon to this stage's, along the horizon law."""
    from studies.horizon import HorizonLaw, fit_horizon_law
    from studies.transfer import optimal_log2_lr

    stage = study.stages[index]
    assert stage.horizon is not None
    key, before = stage.horizon.key, earlier[-1]
    where = f"stages.{stage.name}.horizon"
    if steps <= 0 or before.budget_steps <= 0:
        raise StudyError(f"{where}: the stages' budgets give no step counts to move between")
    if stage.horizon.b is not None:
        law = HorizonLaw(a=0.0, b=stage.horizon.b)
    else:
        sign = -1.0 if study.objective.direction == "maximize" else 1.0
        optima = []
        for report in earlier:
            points = [
                (math.log2(float(t["params"][key])), sign * float(t["value"]))
                for t in report.trials
                if t["state"] == "complete" and t["value"] is not None and key in t["params"]
            ]
            if points:
                optima.append((report.budget_steps, 2.0 ** optimal_log2_lr(points)[0]))
        try:
            law = fit_horizon_law(optima)
        except StudyError as error:
            raise StudyError(f"{where}: {error}; give horizon.b") from None
    factor = law.shift(1.0, before.budget_steps, steps)
    spec = space[key]
    assert spec.low is not None and spec.high is not None
    centre = math.sqrt(spec.low * spec.high)
    space[key] = spec.model_copy(update={"low": spec.low * factor, "high": spec.high * factor})
    for params in warm:
        if key in params:
            params[key] = params[key] * factor
    notes.append(
        f"{key}: centre {centre:.3g} at {before.budget_steps} steps -> {centre * factor:.3g} at "
        f"{steps} steps ({law.describe()})"
    )


def check_resumed(
    study: StudyConfig,
    index: int,
    stored: Mapping[str, Any],
    steps: int,
    where: str,
    *,
    fixed_trials: bool = False,
) -> None:
    """A stage resumed from storage must be the one the study file describes now: the same
    objective, first space, budget, stage overrides (and trial count, where the engine cannot
    change it)."""
    stage = study.stages[index]
    if index == 0 and space_from_json(stored.get("space") or {}) != study.space:
        raise StudyError(
            f"space: differs from the one study '{study.name}' was started with in {where}; "
            "give the study another name or storage"
        )
    if stored.get("callable") != study.objective.callable:
        raise StudyError(
            f"objective.callable: {study.objective.callable or 'none (the trainer)'}, but study "
            f"'{study.name}' was started with {stored.get('callable') or 'the trainer'} in "
            f"{where}; give the study another name or storage"
        )
    fidelity = stored.get("fidelity")
    was_overrides = fidelity.get("overrides", {}) if isinstance(fidelity, dict) else {}
    if study.is_trainer and was_overrides != stage.overrides:
        raise StudyError(
            f"stages.{stage.name}.overrides: {stage.overrides or 'none'}, but the stage was "
            f"started with {was_overrides or 'none'} in {where}; give the study another name "
            "or storage"
        )
    budget = stage.budget.as_written()
    was = stored.get("budget", budget)
    if stored.get("budget_steps") != steps or was != budget:
        raise StudyError(
            f"stages.{stage.name}.budget: {_budget_text(budget, steps)}, but the stage was "
            f"started with {_budget_text(was, stored.get('budget_steps'))} in {where}; give the "
            "study another name or storage"
        )
    if fixed_trials and stored.get("trials") != stage.trials:
        raise StudyError(
            f"stages.{stage.name}.trials: {stage.trials}, but the stage was started with "
            f"{stored.get('trials')} in {where}; give the study another name or storage"
        )


def _budget_text(budget: Any, steps: Any) -> str:
    """``{'tokens': 800000} (390 steps)``; the steps alone when the budget says only that."""
    if budget == {"steps": steps}:
        return f"{steps} steps"
    return f"{budget} ({steps} steps)" if steps else str(budget)


def stage_report(meta: Mapping[str, Any], trials: list[TrialRecord]) -> StageReport:
    """A stage's report from the settings its storage keeps (`StagePlan.meta`) and its trial
    records: how every backend reports a stage it ran or reads back."""
    from studies.records import StageReport, count_trials

    direction = str(meta.get("direction") or "minimize")
    return StageReport(
        name=str(meta.get("stage")),
        index=int(meta.get("index", 0)),
        sampler=str(meta.get("sampler")),
        pruner=str(meta.get("pruner")),
        budget_steps=int(meta.get("budget_steps") or 0),
        space=space_from_json(meta.get("space") or {}),
        notes=list(meta.get("notes") or []),
        counts=count_trials(trials, int(meta.get("trials") or 0), direction),
        trials=trials,
        meta=dict(meta),
    )


def space_to_json(space: Mapping[str, ParamSpec]) -> dict[str, Any]:
    return {n: s.model_dump(mode="json", exclude_defaults=True) for n, s in space.items()}


def space_from_json(raw: Mapping[str, Any]) -> dict[str, ParamSpec]:
    return {name: ParamSpec.model_validate(spec) for name, spec in raw.items()}
