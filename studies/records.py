"""The typed trial record and stage report that every backend produces and everything
downstream reads: the summary, ``scaleplan study show|best|export``, the plots and importances,
MLflow, the planner's runs table.

A `TrialRecord` is plain data (a typed dict, JSON-ready): no backend object travels in it, so a
study read back from storage without its engine (a Ray study without Ray) is the same as one
just run. Build one with `trial_record`, which fills every key; the states are

- ``complete``: the budget ran out; ``value`` is the objective at the end.
- ``pruned``: the pruner stopped it; ``last_value`` is its objective where it stopped.
- ``failed``, with a ``reason`` (divergence, an exception, out of memory, not a number).
- ``interrupted``: its process died or ^C; does not count, another trial takes its place.
- ``running`` / ``waiting``: not finished yet (a sweep still running elsewhere).

Counting: a stage is done when its *finished* trials (complete + pruned + failed) reach the
requested number. Values measured at different budgets are not comparable, so the best
configuration is the best complete trial of the last stage that has one, or of any stage trained
with the same budget (`comparable_trials`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict

if TYPE_CHECKING:
    from studies.config import ParamSpec, StageSpec

__all__ = [
    "FINISHED_STATES",
    "NullView",
    "StageCounts",
    "StageReport",
    "SweepView",
    "TrialOutcome",
    "TrialRecord",
    "TrialState",
    "best_trial",
    "comparable_trials",
    "count_trials",
    "ranked_trials",
    "study_ranking",
    "trial_record",
]

TrialState = Literal["complete", "pruned", "failed", "interrupted", "running", "waiting"]
FINISHED_STATES = ("complete", "pruned", "failed")
COUNTED_STATES = ("complete", "pruned", "failed", "running", "interrupted")


@dataclass(frozen=True)
class TrialOutcome:
    """What one trial's objective produced; the backend stores it as a `TrialRecord`."""

    state: Literal["complete", "pruned", "failed"]
    value: float | None  # objective at the end of the budget (None unless complete)
    reason: str | None  # why pruned or failed, one line
    steps: int  # optimiser steps done (a callable: the last step it reported)
    intermediate: list[tuple[int, float]] = field(default_factory=list)  # (step, objective)
    run_id: str | None = None  # the MLflow child run, if any
    out_dir: str = ""
    params_count: int | None = None  # for the runs table export
    tokens: int | None = None
    flops: float | None = None  # training FLOPs the trial spent, when known
    seconds: float | None = None  # wall time of the trial

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrialRecord(TypedDict):
    """One trial, whichever backend ran it and whichever objective it scored."""

    number: int  # the trial's number in its stage
    stage: str
    state: TrialState
    value: float | None  # the objective of a complete trial
    last_value: float | None  # the value, else the last intermediate one (a pruned trial's)
    params: dict[str, Any]  # the searched keys it ran with (active ones only)
    intermediate: list[tuple[int, float]]  # (step, objective) as reported
    reason: str | None  # why pruned, failed or interrupted; one line
    budget: dict[str, Any]  # the stage's budget as written ({steps: 120}, {epochs: 12}, ...)
    steps: int | None  # cost: optimiser steps (or reported steps) done
    tokens: int | None  # cost: tokens (examples for classifiers) trained on
    flops: float | None  # cost: training FLOPs spent
    seconds: float | None  # cost: wall time of the trial
    params_count: int | None  # the model's parameter count (trainer objective)
    out_dir: str | None  # the trial's folder
    run_id: str | None  # its MLflow child run
    continued_from: str | None  # PBT: whose weights it took over last ("trial 3 at step 40")
    started: str | None  # ISO time it started


def trial_record(
    *,
    number: int,
    stage: str,
    state: TrialState,
    value: float | None = None,
    params: Mapping[str, Any] | None = None,
    intermediate: Sequence[tuple[int, float]] = (),
    reason: str | None = None,
    budget: Mapping[str, Any] | None = None,
    steps: int | None = None,
    tokens: int | None = None,
    flops: float | None = None,
    seconds: float | None = None,
    params_count: int | None = None,
    out_dir: str | None = None,
    run_id: str | None = None,
    continued_from: str | None = None,
    started: str | None = None,
) -> TrialRecord:
    """A record with every key; ``last_value`` is the value, else the last intermediate one."""
    points = [(int(step), float(v)) for step, v in intermediate]
    value = value if state == "complete" else None
    last = value if value is not None else (points[-1][1] if points else None)
    return TrialRecord(
        number=int(number),
        stage=stage,
        state=state,
        value=None if value is None else float(value),
        last_value=last,
        params=dict(params or {}),
        intermediate=points,
        reason=reason or None,
        budget=dict(budget or {}),
        steps=None if steps is None else int(steps),
        tokens=None if tokens is None else int(tokens),
        flops=None if flops is None else float(flops),
        seconds=None if seconds is None else float(seconds),
        params_count=None if params_count is None else int(params_count),
        out_dir=out_dir or None,
        run_id=run_id or None,
        continued_from=continued_from or None,
        started=started,
    )


@dataclass
class StageCounts:
    """Where a stage stands: trials by state, and its best complete trial so far."""

    requested: int
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    interrupted: int = 0  # do not count; retried by another trial
    best_value: float | None = None
    best_number: int | None = None

    @property
    def finished(self) -> int:
        """Complete + pruned + failed: what the requested number counts."""
        return self.complete + self.pruned + self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "n_finished": self.finished,
            "n_complete": self.complete,
            "n_pruned": self.pruned,
            "n_failed": self.failed,
            "n_interrupted": self.interrupted,
            "best_value": self.best_value,
            "best_trial": self.best_number,
        }


@dataclass
class StageReport:
    """One stage after it ran: its space, what narrowing said, its counts and trial records.

    `meta` is the stage's settings as its storage keeps them (metric, direction, sampler, budget,
    ...): what a study read back without its study file knows about itself.
    """

    name: str
    index: int
    sampler: str
    pruner: str
    budget_steps: int
    space: dict[str, ParamSpec]
    notes: list[str]
    counts: StageCounts
    trials: list[TrialRecord] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def direction(self) -> str:
        return str(self.meta.get("direction") or "minimize")

    @property
    def metric(self) -> str:
        return str(self.meta.get("metric") or "val_loss")

    @property
    def budget(self) -> dict[str, Any]:
        """The stage's budget as written in the study file (``{steps: 120}``, ...)."""
        budget = self.meta.get("budget")
        return dict(budget) if isinstance(budget, dict) else {"steps": self.budget_steps}

    @property
    def fidelity(self) -> Any:
        """What a trial of this stage trains: trials of stages with equal fidelity compare (set
        by `studies.stage_plan`; read-back stages without it: their steps)."""
        return self.meta.get("fidelity", {"steps": self.budget_steps})

    @property
    def cost(self) -> dict[str, float | None]:
        """What the stage's trials spent, summed: steps, tokens, FLOPs, seconds (None: no
        trial said)."""
        totals: dict[str, float | None] = {}
        for key in ("steps", "tokens", "flops", "seconds"):
            values = [t.get(key) for t in self.trials]
            known = [float(v) for v in values if isinstance(v, int | float)]
            totals[key] = sum(known) if known else None
        return totals

    @property
    def cost_per_trial(self) -> dict[str, float | None]:
        """FLOPs and seconds of the average trial that said (None: none did)."""
        means: dict[str, float | None] = {}
        for key in ("flops", "seconds"):
            known = [float(v) for t in self.trials if isinstance(v := t.get(key), int | float)]
            means[key] = sum(known) / len(known) if known else None
        return means

    @property
    def overrides(self) -> dict[str, Any]:
        """The trainer settings this stage's trials change (a proxy stage); {}: none."""
        fidelity = self.fidelity
        found = fidelity.get("overrides") if isinstance(fidelity, dict) else None
        return dict(found) if isinstance(found, dict) else {}

    def to_dict(self, direction: str) -> dict[str, Any]:
        best = best_trial(self.trials, direction)
        return {
            "name": self.name,
            "sampler": self.sampler,
            "pruner": self.pruner,
            "budget_steps": self.budget_steps,
            "budget": self.budget,
            **self.counts.to_dict(),
            "best_params": best["params"] if best else None,
            "space": {name: spec.describe() for name, spec in self.space.items()},
            "notes": self.notes,
            "overrides": dict(self.overrides),
            "cost": self.cost,
            "cost_per_trial": self.cost_per_trial,
        }


class SweepView(Protocol):
    """The live display of a sweep (stderr); the backends call it as the stages run."""

    def stage_started(
        self, stage: StageSpec, index: int, space: dict[str, ParamSpec], notes: list[str]
    ) -> None: ...

    def progress(self, stage: str, counts: StageCounts) -> None: ...

    def stage_finished(self, report: StageReport) -> None: ...

    def message(self, text: str) -> None: ...


class NullView:
    """No display (``--json``, tests, benchmarks)."""

    def stage_started(
        self, stage: StageSpec, index: int, space: dict[str, ParamSpec], notes: list[str]
    ) -> None:
        pass

    def progress(self, stage: str, counts: StageCounts) -> None:
        pass

    def stage_finished(self, report: StageReport) -> None:
        pass

    def message(self, text: str) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Counting and ranking


def count_trials(
    trials: Sequence[Mapping[str, Any]], requested: int, direction: str
) -> StageCounts:
    counts = StageCounts(requested=requested)
    for trial in trials:
        state = trial["state"]
        if state in COUNTED_STATES:
            setattr(counts, state, getattr(counts, state) + 1)
    best = best_trial(trials, direction)
    if best is not None:
        counts.best_value, counts.best_number = best["value"], best["number"]
    return counts


def ranked_trials(trials: Sequence[Any], direction: str) -> list[Any]:
    """Complete trials with a finite value, best first."""
    done = [
        t
        for t in trials
        if t["state"] == "complete" and t["value"] is not None and math.isfinite(t["value"])
    ]
    return sorted(done, key=lambda t: t["value"], reverse=direction == "maximize")


def best_trial(trials: Sequence[Any], direction: str) -> Any:
    ranked = ranked_trials(trials, direction)
    return ranked[0] if ranked else None


def study_ranking(
    reports: Sequence[StageReport], direction: str
) -> tuple[StageReport | None, list[TrialRecord]]:
    """(the stage the study's best comes from, the complete trials of every stage trained like
    it, best first): how a study's best and top trials are chosen.

    That stage is the last one with a complete trial among those that train the last stage's
    model (its stage overrides): a shorter stage of the target may stand in when the last stage
    has no complete trial, a proxy stage (other overrides) never does."""
    target = reports[-1].overrides if reports else None
    chosen = next(
        (
            r
            for r in reversed(reports)
            if r.overrides == target and best_trial(r.trials, direction) is not None
        ),
        None,
    )
    return chosen, ranked_trials(comparable_trials(reports, chosen), direction)


def comparable_trials(
    reports: Sequence[StageReport], chosen: StageReport | None
) -> list[TrialRecord]:
    """The trials of every stage trained like `chosen`: the same budget and the same stage
    overrides, so their values compare; a shorter or a proxy stage's do not."""
    if chosen is None:
        return []
    return [t for r in reports if r.fidelity == chosen.fidelity for t in r.trials]
