"""What a trial optimises: one `Objective` interface, two kinds, so that the backends never know
which one they run.

- `TrainerObjective` (``objective: {metric: val_loss}`` with a ``base`` trainer config, the
  default): the base config + the stage's overrides + the trial's params + the stage's budget
  -> `trainer.train` -> the metric (`studies.objective.run_trial`).
- `CallableObjective` (``objective: {callable: "package.module:function", direction: ...}``,
  no ``base``): ``function(params, trial) -> float`` with any search-space keys. `trial` is a
  `TrialHandle`: ``trial.budget`` (the stage's budget mapping as written, e.g. ``{steps: 120}``
  or ``{epochs: 12}``), ``trial.stage``, ``trial.number``, ``trial.seed``, ``trial.out_dir``
  and ``trial.report(step, value) -> bool`` (True: the pruner stopped the trial; return now).
  A module beside the study file imports without being installed. An exception, NaN or a
  value that is not a number is a failed trial with that reason; only ``KeyboardInterrupt``
  escapes (the backend marks the trial interrupted and runs it again on resume).

Both run through `run_objective`, the backends' default ``trial_fn`` (a module-level function,
so that it pickles by reference into Optuna's spawned workers and Ray's).

Example (a callable objective from Python)::

    >>> def quadratic(params, trial):
    ...     return (params["x"] - 0.3) ** 2
    >>> objective = CallableObjective.from_function(quadratic)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from studies.errors import StudyError
from studies.objective import Report, TrialOutcome, error_reason, trial_dir

if TYPE_CHECKING:
    from studies.config import StageSpec, StudyConfig

__all__ = [
    "CallableObjective",
    "call_trial",
    "Objective",
    "TrainerObjective",
    "TrialHandle",
    "callable_name",
    "import_callable",
    "is_registered",
    "objective_for",
    "run_objective",
    "stage_steps",
]


class Objective(Protocol):
    """What the backends and the stage planner ask of an objective."""

    kind: str  # "trainer" or "callable"

    def check(self, study: StudyConfig) -> None:
        """Pre-flight: raise StudyError naming the field when a trial could not run."""

    def stage_steps(self, study: StudyConfig, stage: StageSpec) -> tuple[int, int]:
        """(the steps a trial of `stage` reports up to, its first report's step): the
        pruners' resource; (0, 0) when the objective cannot say."""

    def fidelity(self, study: StudyConfig, stage: StageSpec) -> dict[str, Any]:
        """What a trial of `stage` trains: stages of equal fidelity have comparable values."""

    def run(
        self,
        study: StudyConfig,
        stage: StageSpec,
        params: dict[str, Any],
        *,
        trial_id: str,
        number: int,
        report: Report | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        runs_dir: Path | None = None,
        **trainer_options: Any,
    ) -> TrialOutcome:
        """One trial; never raises for the trial's own failures (see `studies.objective`)."""


class TrainerObjective:
    """`trainer.train` on the study's base config; the metric at the end of the budget."""

    kind = "trainer"

    def check(self, study: StudyConfig) -> None:
        """Nothing more: `studies.study_file.load_study` checked every trainer key and value."""

    def stage_steps(self, study: StudyConfig, stage: StageSpec) -> tuple[int, int]:
        from studies.trainer_config import budget_steps, trial_config

        config = trial_config(study, {}, stage)
        steps = budget_steps(config, stage.budget)
        first_eval = config.eval_every if config.eval_every and config.eval_every > 0 else steps
        return steps, min(first_eval, steps)

    def fidelity(self, study: StudyConfig, stage: StageSpec) -> dict[str, Any]:
        """The steps a trial trains, and the trainer settings the stage changes (a proxy)."""
        steps = {"steps": self.stage_steps(study, stage)[0]}
        return {**steps, "overrides": dict(stage.overrides)} if stage.overrides else steps

    def run(
        self,
        study: StudyConfig,
        stage: StageSpec,
        params: dict[str, Any],
        *,
        trial_id: str,
        number: int,
        report: Report | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        runs_dir: Path | None = None,
        **trainer_options: Any,
    ) -> TrialOutcome:
        from studies.objective import run_trial

        return run_trial(
            study,
            stage,
            params,
            trial_id=trial_id,
            report=report,
            parent_run_id=parent_run_id,
            tags=tags,
            runs_dir=runs_dir,
            **trainer_options,
        )


@dataclass
class TrialHandle:
    """What a callable objective gets beside its params."""

    budget: dict[str, Any]  # the stage's budget as written in the study file
    stage: str
    number: int
    seed: int  # the study's seed + the stage's index: the same trial draws the same noise
    out_dir: Path  # the trial's own folder (created), for whatever it wants to keep
    _report: Report | None = None
    intermediate: list[tuple[int, float]] = field(default_factory=list)
    pruned: bool = False

    def report(self, step: int, value: float) -> bool:
        """Report the objective at `step`; True: the pruner stopped the trial (return now).
        A value that is not a finite number is not reported (the trial will fail on it)."""
        try:
            number = float(value)
        except (TypeError, ValueError):
            return self.pruned
        if not math.isfinite(number):
            return self.pruned
        self.intermediate.append((int(step), number))
        if self._report is not None and not self.pruned:
            self.pruned = bool(self._report(int(step), number))
        return self.pruned


class CallableObjective:
    """A user's ``function(params, trial) -> float``, named ``"package.module:function"``."""

    kind = "callable"

    def __init__(self, name: str, search_path: Path | None = None) -> None:
        self.name = name
        self.search_path = search_path  # the study file's folder: modules beside it import

    def load(self) -> Callable[..., Any]:
        return import_callable(self.name, self.search_path)

    def check(self, study: StudyConfig) -> None:
        self.load()
        from studies.backends import backend_info

        in_process = backend_info(study.backend).in_process and study.workers == 1
        if is_registered(self.name) and not in_process:
            raise StudyError(
                f"objective.callable: {self.name} is defined where other processes cannot "
                f"import it (a lambda, or in __main__), but backend {study.backend} with "
                f"{study.workers} worker(s) runs trials in other processes; define it in a "
                "module"
            )

    def stage_steps(self, study: StudyConfig, stage: StageSpec) -> tuple[int, int]:
        steps = stage.budget.as_written().get("steps")
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
            return steps, 1
        return 0, 0

    def fidelity(self, study: StudyConfig, stage: StageSpec) -> dict[str, Any]:
        return stage.budget.as_written()

    def run(
        self,
        study: StudyConfig,
        stage: StageSpec,
        params: dict[str, Any],
        *,
        trial_id: str,
        number: int,
        report: Report | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        runs_dir: Path | None = None,
        **trainer_options: Any,
    ) -> TrialOutcome:
        out_dir = trial_dir(study, trial_id, runs_dir)
        index = next(i for i, s in enumerate(study.stages) if s.name == stage.name)
        handle = TrialHandle(
            budget=stage.budget.as_written(),
            stage=stage.name,
            number=number,
            seed=study.seed + index,
            out_dir=out_dir,
            _report=report,
        )
        started = time.perf_counter()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            value = self.load()(dict(params), handle)
        except StudyError as error:
            return self._outcome(handle, started, "failed", None, str(error))
        except Exception as error:
            return self._outcome(handle, started, "failed", None, error_reason(error))
        if handle.pruned:
            last = f" (objective {handle.intermediate[-1][1]:.4g})" if handle.intermediate else ""
            step = handle.intermediate[-1][0] if handle.intermediate else 0
            return self._outcome(handle, started, "pruned", None, f"pruned at step {step}{last}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            reason = f"returned {_short(value)}, not a number"
            return self._outcome(handle, started, "failed", None, reason)
        if not math.isfinite(float(value)):
            return self._outcome(handle, started, "failed", None, f"returned {float(value)}")
        return self._outcome(handle, started, "complete", float(value), None)

    @staticmethod
    def _outcome(
        handle: TrialHandle, started: float, state: Any, value: float | None, reason: str | None
    ) -> TrialOutcome:
        steps = handle.intermediate[-1][0] if handle.intermediate else 0
        return TrialOutcome(
            state,
            value,
            reason,
            steps=steps,
            intermediate=list(handle.intermediate),
            out_dir=str(handle.out_dir),
            seconds=time.perf_counter() - started,
        )


# functions handed over from Python (`studies.run_study`) that no other process can import by
# name (a lambda, a function of __main__ or inside another): this process runs them
_REGISTERED: dict[str, Callable[..., Any]] = {}


def callable_name(function: Callable[..., Any]) -> str:
    """The ``module:qualname`` a function is found by: its import path when another process
    can import it there, else a name this process keeps it under (`is_registered`)."""
    module = getattr(function, "__module__", None) or "__main__"
    qualname = getattr(function, "__qualname__", None) or repr(function)
    name = f"{module}:{qualname}"
    importable = module != "__main__" and "<" not in qualname
    if importable:
        try:
            importable = import_callable(name) is function
        except StudyError:
            importable = False
    if not importable:
        _REGISTERED[name] = function
    return name


def is_registered(name: str) -> bool:
    """Whether `name` is a function only this process has (see `callable_name`)."""
    return name in _REGISTERED


def import_callable(name: str, search_path: Path | None = None) -> Callable[..., Any]:
    """``"package.module:function"`` (or ``package.module.function``) -> the function; a
    module in `search_path` imports without being installed. StudyError names the field."""
    field = "objective.callable"
    if name in _REGISTERED:
        return _REGISTERED[name]
    module_name, sep, attribute = name.partition(":")
    if not sep:
        module_name, _, attribute = name.rpartition(".")
    if not module_name or not attribute:
        raise StudyError(f"{field}: '{name}' is not of the form 'package.module:function'")
    if search_path is not None and str(search_path) not in sys.path:
        sys.path.insert(0, str(search_path))
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise StudyError(f"{field}: cannot import '{name}' ({error_reason(error)})") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise StudyError(
                f"{field}: cannot import '{name}' (module {module_name} has no {part})"
            )
        target = getattr(target, part)
    if not callable(target):
        raise StudyError(f"{field}: '{name}' is not callable (it is {_short(target)})")
    return target


def objective_for(study: StudyConfig) -> Objective:
    """The study's objective: its callable, else the trainer."""
    spec = study.objective
    if spec.callable is not None:
        return CallableObjective(spec.callable, study.search_path)
    return TrainerObjective()


def stage_steps(study: StudyConfig, stage: StageSpec) -> tuple[int, int]:
    """(steps a trial of `stage` reports up to, its first report's step) under the study's
    objective; (0, 0) when it cannot say (a callable whose budget has no steps)."""
    return objective_for(study).stage_steps(study, stage)


def run_objective(
    study: StudyConfig,
    stage: StageSpec,
    params: dict[str, Any],
    *,
    trial_id: str,
    number: int | None = None,
    **options: Any,
) -> TrialOutcome:
    """The backends' default trial function: the study's objective, whichever kind."""
    if number is None:
        number = int(trial_id.rpartition("-")[2] or 0)
    return objective_for(study).run(
        study, stage, params, trial_id=trial_id, number=number, **options
    )


def call_trial(
    trial_fn: Callable[..., TrialOutcome] | None,
    study: StudyConfig,
    stage: StageSpec,
    params: dict[str, Any],
    *,
    number: int,
    report: Report | None,
    parent_run_id: str | None,
    runs_dir: Path | None,
    tags: Mapping[str, str] | None = None,
) -> TrialOutcome:
    """How every backend runs one trial: its id (``<stage>-<number>``, the folder's name), its
    MLflow tags, `trial_fn` (None: the study's objective) and its wall time."""
    started = time.perf_counter()
    outcome = (trial_fn or run_objective)(
        study,
        stage,
        params,
        trial_id=f"{stage.name}-{number}",
        number=number,
        report=report,
        parent_run_id=parent_run_id,
        tags={
            "study": study.name,
            "stage": stage.name,
            "number": str(number),
            "scaleplan.kind": "trial",
            **(tags or {}),
        },
        runs_dir=runs_dir,
    )
    if outcome.seconds is None:
        outcome = dataclasses.replace(outcome, seconds=time.perf_counter() - started)
    return outcome


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
