"""One trial: a study's config + sampled params -> `trainer.train` -> the objective, as data.

`run_trial` is the one place both backends (Optuna, Ray Tune) turn a parameter set into a
number. It never raises for a trial's own trouble: whatever happens inside becomes a
`TrialOutcome` whose ``state`` is

- ``complete``: the budget ran out (or the base config's early stopping ended it); ``value`` is
  the objective at the end.
- ``pruned``: ``report(step, value)`` returned True at an evaluation before the last one; the
  run stopped there. (The last evaluation is reported too, but a trial that reached the end of
  its budget is complete whatever the pruner says.)
- ``failed``, with a one-line ``reason``:
  ``diverged: non-finite loss at step 37`` (the trainer stopped on a NaN/inf loss or gradient
  norm, or the validation metric itself was not finite), ``out of memory`` (CUDA or host),
  or ``"{Type}: {message}"`` for any other exception.

Divergence is *failed*, not pruned: a pruned trial in Optuna is ranked by its last intermediate
value, and a run that blew up has no trustworthy one. The study records it with its reason and
goes on. Only ``KeyboardInterrupt`` (and other non-``Exception`` signals) escape, so that ^C
still stops the sweep; the backend marks that trial "interrupted" and retries it on resume.

Trial folders are ``<runs_dir>/<study>/trials/<trial_id>`` (the Optuna backend uses
``<stage>-<number>``); a folder left there by an earlier attempt with the same id is replaced.
The MLflow child run is made by the trainer's own tracker, nested under `parent_run_id`, in the
study's experiment (`studies.mlflow_study.study_experiment_name`).

Example:
    >>> outcome = run_trial(study, study.stages[0], {"optimizer.lr": 1e-3}, trial_id="coarse-0")
    ... # doctest: +SKIP
    >>> outcome.state, outcome.value  # doctest: +SKIP
    ('complete', 2.61)
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studies.records import TrialOutcome

if TYPE_CHECKING:
    from studies.config import StageSpec, StudyConfig
    from trainer.loop import RunResult, StepInfo

__all__ = [
    "OUT_OF_MEMORY",
    "PRUNED",
    "Report",
    "TrialOutcome",
    "error_reason",
    "trial_dir",
    "trial_run_id",
    "run_trial",
]

# report(step, value) -> True: prune the trial now
Report = Callable[[int, float], bool]
PRUNED = "pruned"  # the StopTraining reason run_trial's callback raises
OUT_OF_MEMORY = "out of memory"
MAX_REASON_CHARS = 300
_NONFINITE_MESSAGE = re.compile(r"step (\d+): (.+?) is \S+ \(non-finite\)")


def trial_dir(study: StudyConfig, trial_id: str, runs_dir: str | Path | None = None) -> Path:
    """``<runs_dir>/<study name>/trials/<trial_id>``, absolute; runs_dir None: ./runs."""
    return trial_path(study.name, trial_id, runs_dir)


def trial_path(study_name: str, trial_id: str, runs_dir: str | Path | None = None) -> Path:
    """`trial_dir` by the study's name (for a study file that names its own trials' folders,
    e.g. a ladder's cool-down starting from a stable run's checkpoint)."""
    return (
        Path("runs" if runs_dir is None else runs_dir) / study_name / "trials" / trial_id
    ).absolute()


def run_trial(
    study: StudyConfig,
    stage: StageSpec,
    params: dict[str, Any],
    *,
    trial_id: str,
    number: int | None = None,
    report: Report | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    runs_dir: Path | None = None,
    callbacks: Sequence[Callable[[StepInfo], None]] = (),
    resume: bool = False,
    start_from: Path | None = None,
) -> TrialOutcome:
    """Train `study`'s base config with `params` for `stage`'s budget; never raises for the
    trial's own failures (see the module docstring). `report(step, value)` is called at each
    evaluation with the objective; returning True prunes the trial. `number` (the trial's in
    its stage) is part of every trial function's signature; the trainer names trials by
    `trial_id` alone.

    For PBT (`studies.backends.ray.pbt`): `callbacks` run before the reporter at each step;
    `resume` continues this trial's own folder; `start_from` starts from another trial's
    checkpoint under this trial's hyperparameters (``trainer.train(start_from=...)``)."""
    out_dir = trial_dir(study, trial_id, runs_dir)
    metric = study.objective.metric
    intermediate: list[tuple[int, float]] = []
    if start_from is None and stage.start_from is not None:
        start_from = Path(stage.start_from)
    try:
        from studies.trainer_config import trial_config
        from trainer.distributed import barrier, world_from_env
        from trainer.loop import train

        config = _with_study_tracking(study, trial_config(study, params, stage))
        world = world_from_env()  # several under Ray Train: rank 0 owns the folder
        if out_dir.exists() and not resume and world.main:
            shutil.rmtree(out_dir)  # an earlier attempt's: the id is this trial's now
        barrier(world)
        callback = _Reporter(metric, report, intermediate, config.steps)
        result = train(
            config,
            [*callbacks, callback],
            out_dir=out_dir,
            resume=resume,
            start_from=start_from,
            parent_run_id=parent_run_id,
            tags=tags,
        )
    except Exception as error:
        return _failed(out_dir, intermediate, error_reason(error))
    return _outcome(result, metric, intermediate, out_dir)


class _Reporter:
    """The trainer callback: the objective at each evaluation -> `report`; prunes on True."""

    def __init__(
        self, metric: str, report: Report | None, seen: list[tuple[int, float]], last_step: int
    ) -> None:
        self.metric = metric
        self.report = report
        self.seen = seen
        self.last_step = last_step
        self.best: float | None = None

    def __call__(self, info: StepInfo) -> None:
        from trainer.loop import StopTraining

        if info.val_loss is None:  # a logging step without evaluation
            return
        value = _step_objective(self.metric, info, self.best)
        if value is None:
            return
        if not math.isfinite(value):
            name = "val_accuracy" if self.metric == "val_accuracy" else "val_loss"
            raise StopTraining(f"diverged: non-finite {name} at step {info.step}")
        if self.metric == "best_val_loss":
            self.best = value
        self.seen.append((info.step, value))
        prune = self.report is not None and self.report(info.step, value)
        # the last evaluation is reported (the pruners learn from it) but the budget is spent:
        # a trial that got there is complete
        if prune and info.step < self.last_step:
            raise StopTraining(PRUNED)


def _step_objective(metric: str, info: StepInfo, best: float | None) -> float | None:
    if metric == "val_accuracy":
        accuracy = info.metrics.get("val_accuracy")
        return None if accuracy is None else float(accuracy)
    value = float(info.val_loss) if info.val_loss is not None else None
    if metric == "best_val_loss" and value is not None and best is not None:
        return min(best, value) if math.isfinite(value) else value
    return value


def _final_objective(metric: str, result: RunResult) -> float | None:
    if metric == "val_accuracy":
        return result.final_val_accuracy
    if metric == "best_val_loss":
        return result.best_val_loss
    return result.final_val_loss


def _outcome(
    result: RunResult, metric: str, intermediate: list[tuple[int, float]], out_dir: Path
) -> TrialOutcome:
    common: dict[str, Any] = {
        "steps": result.steps,
        "intermediate": intermediate,
        "run_id": trial_run_id(out_dir),
        "out_dir": str(out_dir),
        "params_count": result.n_params,
        "tokens": result.tokens,
        "flops": result.flops,
        "seconds": result.wall_seconds,
    }
    stopped = result.stopped_reason
    if stopped == "nonfinite":
        return TrialOutcome("failed", None, _diverged(result), **common)
    if stopped is not None and stopped.startswith("diverged:"):
        return TrialOutcome("failed", None, stopped, **common)
    if stopped == PRUNED:
        last = f" ({metric} {intermediate[-1][1]:.4g})" if intermediate else ""
        return TrialOutcome("pruned", None, f"pruned at step {result.steps}{last}", **common)
    value = _final_objective(metric, result)
    if value is None:
        return TrialOutcome("failed", None, f"no {metric} was measured", **common)
    if not math.isfinite(value):
        reason = f"diverged: non-finite {metric} at step {result.steps}"
        return TrialOutcome("failed", None, reason, **common)
    return TrialOutcome("complete", float(value), None, **common)


def _diverged(result: RunResult) -> str:
    """``diverged: non-finite loss at step N`` from the trainer's stop message."""
    match = _NONFINITE_MESSAGE.search(result.stop_message or "")
    if match is None:
        return f"diverged: non-finite loss at step {result.steps}"
    return f"diverged: non-finite {match.group(2)} at step {match.group(1)}"


def _failed(out_dir: Path, intermediate: list[tuple[int, float]], reason: str) -> TrialOutcome:
    """A trial that raised: what its folder says about it (it may have none)."""
    from trainer.tracking import read_json_object

    run = read_json_object(out_dir / "run.json") or {}
    steps = intermediate[-1][0] if intermediate else 0
    count = run.get("n_params")
    return TrialOutcome(
        "failed",
        None,
        reason,
        steps=steps,
        intermediate=intermediate,
        run_id=trial_run_id(out_dir),
        out_dir=str(out_dir),
        params_count=int(count) if isinstance(count, int) else None,
        tokens=None,
    )


def error_reason(error: BaseException) -> str:
    """One line: "out of memory", or ``Type: message``."""
    if _is_out_of_memory(error):
        _release_cuda_memory()
        return OUT_OF_MEMORY
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    reason = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _release_cuda_memory() -> None:
    """After an OOM the next trial should start from an empty cache."""
    import torch

    if torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def _with_study_tracking(study: StudyConfig, config: Any) -> Any:
    """The trial logs to the study's experiment, so that MLflow nests it under the parent."""
    if not config.tracking.enabled:
        return config
    from studies.mlflow_study import study_experiment_name

    tracking = config.tracking.model_copy(update={"experiment": study_experiment_name(study)})
    return config.model_copy(update={"tracking": tracking})


def trial_run_id(out_dir: Path) -> str | None:
    """The MLflow run id a trial's trainer recorded in its folder (tracking.json), if any."""
    from trainer.tracking import read_json_object

    record = read_json_object(out_dir / "tracking.json") or {}
    run_id = record.get("run_id")
    return str(run_id) if run_id else None
