"""A sweep, whatever the backend: load the study, check everything, run the stages, summarise.

`run_sweep` is what ``scaleplan sweep`` does:

1. `prepare_study`: the study file with ``--set`` overrides and the command's options (backend,
   storage, tracking URI, workers) applied as overrides of the study file, so that a bad value
   is one `StudyError` naming the field.
2. `preflight`, before any trial: the backend exists, the storage opens (a PostgreSQL server
   that does not answer within seconds is ``storage: postgresql://u:***@host/db unreachable
   (...)``), the MLflow tracking URI answers (`studies.mlflow_study.check_tracking_uri`).
3. The backend (`studies.backends.get_backend`) runs the stages and returns one `StageReport`
   per stage, with every trial as a `studies.records.TrialRecord`.
4. `summarise`: the best configuration, the top trials, the counts; `StudyTracker.finish` writes
   the best config, importances and plots under ``runs/<study>/`` and ends the MLflow parent.

Counting: see `studies.records`. The objective is the trainer or a user's callable
(`studies.objectives`); nothing here knows which, nor which backend runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studies.config import StudyConfig, mask_password
from studies.records import (
    NullView,
    StageCounts,
    StageReport,
    SweepView,
    best_trial,
    comparable_trials,
    count_trials,
    study_ranking,
)
from studies.study_file import load_study

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
    "run_study",
    "run_sweep",
    "run_sweep_reports",
    "summarise",
    "tracking_enabled",
]

TOP_TRIALS = 5  # rows of the final table


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

    ``tracking_uri="none"`` turns MLflow off (``mlflow=false``).
    """
    items = list(overrides)
    if backend is not None:
        items.append(f"backend={backend}")
    if storage is not None:
        items.append(f"storage={_yaml_string(storage)}")
    if tracking_uri is not None:
        if tracking_uri.strip().lower() == "none":
            items.append("mlflow=false")
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
    """Whether the study logs to MLflow: ``mlflow``, and for the trainer objective its trials'
    config too (``tracking.enabled``)."""
    if not study.mlflow or not study.is_trainer:
        return study.mlflow
    from studies.trainer_config import trial_config

    return bool(trial_config(study, {}, study.stages[0]).tracking.enabled)


def preflight(study: StudyConfig, runs_dir: Path, ray_address: str | None = None) -> None:
    """Everything that can be checked before a trial starts; raises StudyError naming it."""
    from studies.backends import get_backend
    from studies.objectives import objective_for

    objective_for(study).check(study)  # first: it writes nothing
    get_backend(study.backend).preflight(study, runs_dir, ray_address)
    if tracking_enabled(study):
        from studies.mlflow_study import check_tracking_uri

        check_tracking_uri(study.tracking_uri)


# ---------------------------------------------------------------------------------------------
# The sweep


def run_study(
    objective: Callable[..., Any] | str,
    space: Mapping[str, Any],
    stages: Sequence[Mapping[str, Any]],
    *,
    name: str = "study",
    direction: str = "minimize",
    backend: str = "optuna",
    runs_dir: str | Path = "runs",
    view: SweepView | None = None,
    ray_address: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A study of a callable objective from Python: ``objective(params, trial) -> float``
    over `space` (name -> ``{low, high, log}`` or ``{choices}``, as in a study file), in
    `stages` (mappings as in a study file); returns the summary ``scaleplan sweep --json``
    prints. Other study fields (``storage``, ``tracking_uri``, ``workers``, ``seed``,
    ``mlflow``, ``ray``) go in `fields`. A function that other processes cannot import (a
    lambda, one defined in __main__) runs with backend optuna and one worker only.

        >>> summary = run_study(quadratic, {"x": {"low": -1.0, "high": 1.0}},
        ...                     [{"name": "all", "sampler": "tpe", "trials": 20,
        ...                       "budget": {"steps": 1}}])  # doctest: +SKIP
    """
    from studies.config import validate_study
    from studies.objectives import callable_name

    target = objective if isinstance(objective, str) else callable_name(objective)
    raw = {
        "name": name,
        "objective": {"callable": target, "direction": direction},
        "space": dict(space),
        "stages": [dict(stage) for stage in stages],
        "backend": backend,
        **fields,
    }
    study = validate_study(raw)
    return run_sweep(study, runs_dir=runs_dir, view=view, ray_address=ray_address)


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
    from studies.backends import get_backend
    from studies.lr_find import resolve_around
    from studies.mlflow_study import StudyTracker

    runs = Path(runs_dir)
    view = view or NullView()
    started = time.perf_counter()
    study = resolve_around(study, runs)  # an LR range centred on the range test, if asked for
    preflight(study, runs, ray_address)
    backend = get_backend(study.backend)
    enabled = tracking_enabled(study)
    resume = backend.study_exists(study, runs)
    tracker = StudyTracker(
        study, resume=resume, runs_dir=runs, study_file=study_file, enabled=enabled
    )
    # trials in other processes log to the same (absolute) store; none when MLflow is off
    if tracker.parent_run_id is not None:
        study = study.model_copy(update={"tracking_uri": tracker.tracking_uri})
    elif enabled:
        study = study.model_copy(update={"mlflow": False})
    try:
        reports = backend.run(
            study,
            runs_dir=runs,
            view=view,
            tracker=tracker,
            ray_address=ray_address,
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
            trials=source.trials if source is not None else [],
            space=source.space if source is not None else study.space,
            best_config_yaml=_best_config_yaml(study, best, chosen),
            out_dir=out_dir,
            costs={
                r.name: {
                    "flops": r.cost["flops"],
                    "flops_per_trial": r.cost_per_trial["flops"],
                    "seconds": r.cost["seconds"],
                }
                for r in reports
            },
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
        # what the study spent: training FLOPs (None: no trial said) and trial wall time
        "flops": _total(report.cost["flops"] for report in reports),
        "trial_seconds": _total(report.cost["seconds"] for report in reports),
        "mlflow_experiment": tracker.experiment_name if active and tracker else None,
        "mlflow_parent_run_id": tracker.parent_run_id if active and tracker else None,
        "tracking_uri": tracker.tracking_uri if active and tracker else None,
        "storage": mask_password(study.resolved_storage(runs_dir)),
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


def _total(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _failure_reasons(trials: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Failed trials by reason, most common first."""
    reasons: dict[str, int] = {}
    for trial in trials:
        if trial["state"] == "failed":
            reason = str(trial.get("reason") or "failed")
            reasons[reason] = reasons.get(reason, 0) + 1
    return dict(sorted(reasons.items(), key=lambda item: -item[1]))


def _trial_brief(trial: Mapping[str, Any] | None) -> dict[str, Any] | None:
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
    study: StudyConfig, best: Mapping[str, Any] | None, stage: StageReport | None
) -> str:
    """The best trial's configuration: the resolved trainer config, ready for ``scaleplan
    train``; for a callable objective, its params and budget."""
    import yaml

    if best is None or stage is None:
        return ""
    title = (
        f"# Best configuration of study '{study.name}': stage {best['stage']}, trial "
        f"{best['number']}, {study.objective.metric} {best['value']:.6g}\n"
    )
    if not study.is_trainer:
        body = {
            "objective": study.objective.callable,
            "stage": best["stage"],
            "budget": best.get("budget") or stage.budget,
            "params": dict(best["params"]),
        }
        return title + yaml.safe_dump(body, sort_keys=False)
    config_path = Path(best["out_dir"]) / "config.yaml" if best.get("out_dir") else None
    try:
        if config_path is None:
            raise FileNotFoundError("the trial has no folder")
        text = config_path.read_text()
    except OSError:
        from studies.trainer_config import trial_config

        spec = next(s for s in study.stages if s.name == best["stage"])
        config = trial_config(study, best["params"], spec)
        text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    return title + "#   scaleplan train best_config.yaml --out runs/train/best\n" + text
