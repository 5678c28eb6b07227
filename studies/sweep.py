"""A sweep, whatever the backend: load the study, check everything, run the stages, summarise.

`run_sweep` is what ``scaleplan sweep`` does:

1. `prepare_study`: the study file with ``--set`` overrides and the command's options (backend,
   storage, tracking URI, workers) applied as overrides of the study file, so that a bad value
   is one `StudyError` naming the field.
2. `preflight`, before any trial: the backend exists, the storage opens (a PostgreSQL server
   that does not answer within seconds is ``storage: postgresql://u:***@host/db unreachable
   (...)``), the MLflow tracking URI answers (`studies.mlflow_study.check_tracking_uri`).
3. The backend runs the stages (`studies.optuna_backend.run_optuna`, or
   `studies.ray_backend.run_ray`) and returns one `StageReport` per stage.
4. `summarise`: the best configuration, the top trials, the counts; `StudyTracker.finish` writes
   the best config, importances and plots under ``runs/<study>/`` and ends the MLflow parent.

The backend interface (a Ray backend implements the same)::

    run(study, *, runs_dir, workers, view, tracker, ray_address) -> list[StageReport]

where `view` is a `SweepView` (the live display; `NullView` for ``--json``) and `tracker` a
`StudyTracker` whose ``parent_run_id`` nests the trials' MLflow runs (None: no MLflow).

Counting: a stage is done when its *finished* trials (complete + pruned + failed) reach the
requested number. Failed trials are data and count; trials that were interrupted (their
process died, or ^C) do not: they are marked ``interrupted`` and another trial takes their
place. Values measured at different budgets are not comparable, so the best configuration is
the best complete trial of the last stage that has one, or of any stage trained with the same
budget (`comparable_trials`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from studies.config import ParamSpec, StageSpec, StudyConfig, load_study, mask_password
from studies.errors import StudyError

if TYPE_CHECKING:
    from studies.mlflow_study import StudyTracker

__all__ = [
    "TOP_TRIALS",
    "NullView",
    "StageCounts",
    "StageReport",
    "SweepView",
    "best_trial",
    "comparable_trials",
    "study_ranking",
    "count_trials",
    "prepare_study",
    "preflight",
    "run_sweep",
    "run_sweep_reports",
    "summarise",
    "tracking_enabled",
]

TOP_TRIALS = 5  # rows of the final table
FINISHED_STATES = ("complete", "pruned", "failed")


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

    A trial record is ``{number, stage, state, value, last_value, params, reason, steps,
    tokens, params_count, out_dir, run_id}``; state is complete / pruned / failed /
    interrupted / running / waiting; `value` is the objective of a complete trial, `last_value`
    the last intermediate one (a pruned trial's loss where it stopped).
    """

    name: str
    index: int
    sampler: str
    pruner: str
    budget_steps: int
    space: dict[str, ParamSpec]
    notes: list[str]
    counts: StageCounts
    trials: list[dict[str, Any]] = field(default_factory=list)
    source: Any = None  # the backend's study object (optuna.Study), for plots and importances

    def to_dict(self, direction: str) -> dict[str, Any]:
        best = best_trial(self.trials, direction)
        return {
            "name": self.name,
            "sampler": self.sampler,
            "pruner": self.pruner,
            "budget_steps": self.budget_steps,
            **self.counts.to_dict(),
            "best_params": best["params"] if best else None,
            "space": {name: spec.describe() for name, spec in self.space.items()},
            "notes": self.notes,
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
# Counting and ranking trial records


def count_trials(trials: Sequence[dict[str, Any]], requested: int, direction: str) -> StageCounts:
    counts = StageCounts(requested=requested)
    for trial in trials:
        state = trial["state"]
        if state in ("complete", "pruned", "failed", "running", "interrupted"):
            setattr(counts, state, getattr(counts, state) + 1)
    best = best_trial(trials, direction)
    if best is not None:
        counts.best_value, counts.best_number = best["value"], best["number"]
    return counts


def ranked_trials(trials: Sequence[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
    """Complete trials with a finite value, best first."""
    done = [
        t
        for t in trials
        if t["state"] == "complete" and t["value"] is not None and math.isfinite(t["value"])
    ]
    return sorted(done, key=lambda t: t["value"], reverse=direction == "maximize")


def best_trial(trials: Sequence[dict[str, Any]], direction: str) -> dict[str, Any] | None:
    ranked = ranked_trials(trials, direction)
    return ranked[0] if ranked else None


# ---------------------------------------------------------------------------------------------
# Before any trial


def prepare_study(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    backend: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    workers: int | None = None,
) -> StudyConfig:
    """The study file with ``--set`` overrides, then the command's options on top.

    ``tracking_uri="none"`` turns MLflow off (``overrides.tracking.enabled=false``).
    """
    items = list(overrides)
    if backend is not None:
        items.append(f"backend={backend}")
    if storage is not None:
        items.append(f"storage={_yaml_string(storage)}")
    if tracking_uri is not None:
        if tracking_uri.strip().lower() == "none":
            items.append("overrides.tracking.enabled=false")
        else:
            items.append(f"tracking_uri={_yaml_string(tracking_uri)}")
    if workers is not None:
        items.append(f"workers={workers}")
    return load_study(path, items)


def _yaml_string(text: str) -> str:
    """A value that YAML reads back as this exact string (URLs hold ':' and '#')."""
    import json

    return json.dumps(text)


def tracking_enabled(study: StudyConfig) -> bool:
    """Whether the trials' trainer config logs to MLflow (``tracking.enabled``)."""
    from studies.config import trial_config

    return bool(trial_config(study, {}, study.stages[0].budget).tracking.enabled)


def preflight(study: StudyConfig, runs_dir: Path, ray_address: str | None = None) -> None:
    """Everything that can be checked before a trial starts; raises StudyError naming it."""
    if study.backend == "ray":
        _ray_backend().check_ray_address(ray_address)
    else:
        from studies.optuna_backend import check_storage

        check_storage(study.resolved_storage(runs_dir))
    if tracking_enabled(study):
        from studies.mlflow_study import check_tracking_uri

        check_tracking_uri(study.tracking_uri)


def _ray_backend() -> Any:
    import importlib

    try:
        return importlib.import_module("studies.ray_backend")
    except ImportError as error:  # ModuleNotFoundError, or None in sys.modules
        name = error.name or ""
        if name in ("studies.ray_backend", "ray") or name.startswith("ray."):
            raise StudyError(
                "backend ray: Ray Tune is not installed (pip install 'ray[tune]'); "
                "use backend optuna"
            ) from None
        raise


# ---------------------------------------------------------------------------------------------
# The sweep


def run_sweep(
    study: StudyConfig,
    *,
    runs_dir: str | Path = "runs",
    view: SweepView | None = None,
    study_file: str | Path | None = None,
    ray_address: str | None = None,
    trial_fn: Any = None,
) -> dict[str, Any]:
    """Pre-flight, the backend's stages, the summary; returns the summary (see `summarise`).

    `trial_fn` replaces `studies.objective.run_trial` (benchmarks use a no-op trainable).
    """
    summary, _ = run_sweep_reports(
        study,
        runs_dir=runs_dir,
        view=view,
        study_file=study_file,
        ray_address=ray_address,
        trial_fn=trial_fn,
    )
    return summary


def run_sweep_reports(
    study: StudyConfig,
    *,
    runs_dir: str | Path = "runs",
    view: SweepView | None = None,
    study_file: str | Path | None = None,
    ray_address: str | None = None,
    trial_fn: Any = None,
) -> tuple[dict[str, Any], list[StageReport]]:
    """`run_sweep`, with the stage reports (every trial's record) beside the summary."""
    from studies.mlflow_study import StudyTracker

    runs = Path(runs_dir)
    view = view or NullView()
    started = time.perf_counter()
    preflight(study, runs, ray_address)
    enabled = tracking_enabled(study)
    resume = _has_results(study, runs)
    tracker = StudyTracker(
        study, resume=resume, runs_dir=runs, study_file=study_file, enabled=enabled
    )
    # trials in other processes log to the same (absolute) store; none when MLflow is off
    if tracker.parent_run_id is not None:
        study = study.model_copy(update={"tracking_uri": tracker.tracking_uri})
    elif enabled:
        study = study.model_copy(
            update={"overrides": {**study.overrides, "tracking.enabled": False}}
        )
    try:
        if study.backend == "ray":
            reports = _ray_backend().run_ray(
                study,
                runs_dir=runs,
                workers=study.workers,
                view=view,
                tracker=tracker,
                ray_address=ray_address,
                trial_fn=trial_fn,
            )
        else:
            from studies.optuna_backend import run_optuna

            reports = run_optuna(
                study,
                runs_dir=runs,
                workers=study.workers,
                view=view,
                tracker=tracker,
                trial_fn=trial_fn,
            )
    except KeyboardInterrupt:
        tracker.abort("KILLED", "interrupted")
        raise
    except BaseException as error:
        tracker.abort("FAILED", f"{type(error).__name__}: {error}")
        raise
    summary = summarise(study, reports, tracker, runs)
    summary["wall_seconds"] = time.perf_counter() - started
    return summary, reports


def _has_results(study: StudyConfig, runs_dir: Path) -> bool:
    """Whether the storage already holds this study (then the MLflow parent is resumed too)."""
    if study.backend == "ray":
        return True
    from studies.optuna_backend import study_exists

    return study_exists(study, runs_dir)


def summarise(
    study: StudyConfig,
    reports: Sequence[StageReport],
    tracker: StudyTracker | None,
    runs_dir: Path,
) -> dict[str, Any]:
    """The sweep's summary: best value and params, counts, top trials, stages, artifacts."""
    direction = study.objective.direction or "minimize"
    chosen, ranked = study_ranking(reports, direction)
    best = ranked[0] if ranked else None
    top = ranked[:TOP_TRIALS]
    out_dir = runs_dir / study.name
    artifacts: dict[str, Any] = {"plots": [], "importances": {}, "best_config": None, "notes": []}
    source = chosen or (reports[-1] if reports else None)
    if tracker is not None:
        artifacts = tracker.finish(
            source.source if source is not None else None,
            trials=source.trials if source is not None else [],
            best_config_yaml=_best_config_yaml(study, best, chosen),
            out_dir=out_dir,
        )
    totals = StageCounts(requested=sum(r.counts.requested for r in reports))
    for report in reports:
        for state in ("complete", "pruned", "failed", "running", "interrupted"):
            setattr(totals, state, getattr(totals, state) + getattr(report.counts, state))
    active = tracker is not None and tracker.parent_run_id is not None
    return {
        "study": study.name,
        "backend": study.backend,
        "metric": study.objective.metric,
        "direction": direction,
        "best_value": best["value"] if best else None,
        "best_params": best["params"] if best else None,
        "best_trial": _trial_brief(best),
        "n_trials": totals.finished,
        "n_complete": totals.complete,
        "n_pruned": totals.pruned,
        "n_failed": totals.failed,
        "n_interrupted": totals.interrupted,
        "trial_steps": sum(int(t.get("steps") or 0) for r in reports for t in r.trials),
        "mlflow_experiment": tracker.experiment_name if active and tracker else None,
        "mlflow_parent_run_id": tracker.parent_run_id if active and tracker else None,
        "tracking_uri": tracker.tracking_uri if active and tracker else None,
        "storage": (
            mask_password(study.resolved_storage(runs_dir)) if study.backend == "optuna" else None
        ),
        "study_dir": str(out_dir),
        "best_config": _path_or_none(artifacts.get("best_config")),
        "plots": [str(p) for p in artifacts.get("plots") or []],
        "importances": dict(artifacts.get("importances") or {}),
        # the stage whose complete trials the importances come from, and how many there were
        "importances_from": (
            {"stage": source.name, "n_complete": source.counts.complete}
            if artifacts.get("importances") and source is not None
            else None
        ),
        "top": [
            {**(_trial_brief(t) or {}), "value": t["value"], "params": t["params"]} for t in top
        ],
        "stages": [report.to_dict(direction) for report in reports],
        "failures": {report.name: _failure_reasons(report.trials) for report in reports},
    }


def study_ranking(
    reports: Sequence[StageReport], direction: str
) -> tuple[StageReport | None, list[dict[str, Any]]]:
    """(the last stage with a complete trial, the complete trials of every stage trained with
    its budget, best first): how a study's best and top trials are chosen."""
    chosen = next(
        (r for r in reversed(reports) if best_trial(r.trials, direction) is not None), None
    )
    return chosen, ranked_trials(comparable_trials(reports, chosen), direction)


def comparable_trials(
    reports: Sequence[StageReport], chosen: StageReport | None
) -> list[dict[str, Any]]:
    """The trials of every stage trained with `chosen`'s budget (the last stage with a complete
    trial): their values compare; a shorter stage's do not."""
    if chosen is None:
        return []
    return [t for r in reports if r.budget_steps == chosen.budget_steps for t in r.trials]


def _failure_reasons(trials: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Failed trials by reason, most common first."""
    reasons: dict[str, int] = {}
    for trial in trials:
        if trial["state"] == "failed":
            reason = str(trial.get("reason") or "failed")
            reasons[reason] = reasons.get(reason, 0) + 1
    return dict(sorted(reasons.items(), key=lambda item: -item[1]))


def _trial_brief(trial: dict[str, Any] | None) -> dict[str, Any] | None:
    if trial is None:
        return None
    return {
        "stage": trial["stage"],
        "number": trial["number"],
        "out_dir": trial.get("out_dir"),
        "run_id": trial.get("run_id"),
    }


def _path_or_none(path: Any) -> str | None:
    return None if path is None else str(path)


def _best_config_yaml(
    study: StudyConfig, best: dict[str, Any] | None, stage: StageReport | None
) -> str:
    """The best trial's resolved trainer config, ready for ``scaleplan train``."""
    if best is None or stage is None:
        return ""
    config_path = Path(best.get("out_dir") or "") / "config.yaml"
    try:
        body = config_path.read_text()
    except OSError:
        import yaml

        from studies.config import trial_config

        spec = next(s for s in study.stages if s.name == best["stage"])
        config = trial_config(study, best["params"], spec.budget)
        body = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    header = (
        f"# Best configuration of study '{study.name}': stage {best['stage']}, trial "
        f"{best['number']}, {study.objective.metric} {best['value']:.6g}\n"
        "#   scaleplan train best_config.yaml --out runs/train/best\n"
    )
    return header + body
