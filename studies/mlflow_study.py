"""A study in MLflow: one parent run per study, one child run per trial, study artifacts.

The parent run lives in the study's experiment (``scaleplan-<study name>``, or the
``tracking.experiment`` the study's overrides set), is named after the study and tagged with
its backend and file. Its id is kept in ``runs/<study>/mlflow_parent.json``: a resumed sweep,
another ``--workers`` process or a Ray driver restarted on the same study picks the same parent
up again (under a file lock, so processes starting together share one). The child runs are
made where the trials run, by the trainer's own `Tracker` with ``parent_run_id`` (tag
``mlflow.parentRunId``): a Ray worker or a worker process needs only `parent_run_id`,
`tracking_uri` and `experiment_name`, which the trials' TrainConfig.tracking must carry.

`record_trial` completes a trial's child run: tags ``state`` (complete / pruned / failed),
``reason``, ``stage``, ``number``, the searched params, the metric ``objective``, and the run
status FINISHED / KILLED (pruned) / FAILED. A trial that died before the trainer made a run
gets a minimal child run holding its params and the reason. `finish` writes the study's
artifacts (best config as a trainer YAML, importances, plots), logs them on the parent with
the best value and the trial counts, and ends the parent.

MLflow trouble never stops a sweep: when the store cannot be reached or a call fails, one
warning line goes to stderr and the study goes on without MLflow. The CLI calls
`check_tracking_uri` first, so that a wrong URI is one error line before any trial starts.

Example:
    >>> tracker = StudyTracker(study)  # doctest: +SKIP
    >>> train(config, out_dir=..., parent_run_id=tracker.parent_run_id)  # doctest: +SKIP
    >>> tracker.record_trial(outcome, number=0, stage="coarse", params={"optimizer.lr": 1e-3})
    ... # doctest: +SKIP
    >>> tracker.finish(trials=records, best_config_yaml=text, out_dir=Path("runs/q"))
    ... # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studies.config import mask_password
from studies.errors import StudyError
from studies.study_plots import atomic_path, param_importances, study_from_trials, study_plots
from trainer.tracking import (
    artifact_location,
    ensure_experiment,
    open_client,
    probe_http,
    resolve_tracking_uri,
    retry_locked,
)

if TYPE_CHECKING:
    import optuna

    from studies.config import ParamSpec, StudyConfig
    from studies.records import TrialOutcome

__all__ = [
    "PARENT_FILE",
    "StudyTracker",
    "check_tracking_uri",
    "study_experiment_name",
]

PARENT_FILE = "mlflow_parent.json"
CHECK_TIMEOUT_S = 3.0
# a trial's state -> its run's status (interrupted: ^C stopped it; it is retried on resume)
RUN_STATUS = {
    "complete": "FINISHED",
    "pruned": "KILLED",
    "failed": "FAILED",
    "interrupted": "KILLED",
}
MAX_TAG_CHARS = 5000
MAX_PARAM_CHARS = 6000
MAX_PARAMS_PER_BATCH = 100


def study_experiment_name(study: StudyConfig) -> str:
    """The MLflow experiment of a study's runs: the ``tracking.experiment`` its overrides set,
    else ``scaleplan-<study name>``. Trials must log to the same one for the UI to nest them."""
    overrides = study.overrides
    tracking = overrides.get("tracking")
    if isinstance(overrides.get("tracking.experiment"), str):
        return str(overrides["tracking.experiment"])
    if isinstance(tracking, Mapping) and isinstance(tracking.get("experiment"), str):
        return str(tracking["experiment"])
    return f"scaleplan-{study.name}"


def check_tracking_uri(uri: str | None) -> None:
    """Raise `StudyError` ``tracking_uri: <uri> unreachable (<reason>)`` when the MLflow store
    cannot be used; answers within about 3 s.

    http(s): the server must answer on ``/health``; sqlite / file: the folder must exist or be
    creatable, and be writable; another database: a connection must open. None: the default
    resolution ($MLFLOW_TRACKING_URI, else runs/mlflow.db).
    """
    resolved = resolve_tracking_uri(uri)
    problem = _tracking_problem(resolved)
    if problem is not None:
        raise StudyError(f"tracking_uri: {mask_password(resolved)} unreachable ({problem})")


class StudyTracker:
    """One MLflow parent run per study; completes the child run of each trial.

    Args:
        study: the study.
        tracking_uri: overrides the study's ``tracking_uri``; None: the study's, else
            $MLFLOW_TRACKING_URI, else runs/mlflow.db (made absolute: pass `tracking_uri` on to
            every trial, wherever it runs).
        resume: reuse the parent run recorded in ``runs/<study>/mlflow_parent.json`` (status set
            to RUNNING again); False: start a new parent and record it there.
        runs_dir: the folder holding ``<study>/mlflow_parent.json``.
        study_file: the study file, for the parent's ``study_file`` tag.
        enabled: False: no MLflow at all (the trainer config says ``tracking.enabled: false``).
    """

    def __init__(
        self,
        study: StudyConfig,
        *,
        tracking_uri: str | None = None,
        resume: bool = True,
        runs_dir: str | Path = "runs",
        study_file: str | Path | None = None,
        enabled: bool = True,
    ) -> None:
        self.study = study
        self.tracking_uri = _absolute(resolve_tracking_uri(tracking_uri or study.tracking_uri))
        self.experiment_name = study_experiment_name(study)
        self.parent_run_id: str | None = None
        self.resumed = False
        self._parent_file = Path(runs_dir).absolute() / study.name / PARENT_FILE
        self._client: Any = None
        self._experiment_id: str | None = None
        self._failed = False
        if not enabled:
            return
        try:
            self._start(resume, study_file)
        except Exception as error:  # MLflow raises many types; the sweep goes on without it
            self._disable(_reason(error))

    @property
    def active(self) -> bool:
        """Whether MLflow is on for this study (a parent run exists and nothing failed)."""
        return self.parent_run_id is not None and not self._failed

    # --- per trial ----------------------------------------------------------------------------

    def record_trial(
        self, outcome: TrialOutcome, *, number: int, stage: str, params: dict[str, Any]
    ) -> None:
        """Tag and end a trial's child run (`outcome.run_id`, or a minimal one made here when
        the trial died before the trainer created a run); log the objective on the parent."""
        if not self.active:
            return
        try:
            self._record(outcome, number, stage, params)
        except Exception as error:
            self._disable(_reason(error))

    # --- end of the study ---------------------------------------------------------------------

    def finish(
        self,
        *,
        trials: Sequence[Mapping[str, Any]],
        space: Mapping[str, ParamSpec] | None = None,
        best_config_yaml: str,
        out_dir: Path,
        status: str = "FINISHED",
        costs: Mapping[str, Mapping[str, float | None]] | None = None,
    ) -> dict[str, Any]:
        """Write the study's artifacts under `out_dir`, log them on the parent, end the parent.

        Files: ``best_config.yaml`` (ready for ``scaleplan train``; not written when
        `best_config_yaml` is empty), ``importances.json`` (fANOVA), ``plots/<name>.png`` and
        ``plots/<name>.html``, all from the `trials` records (`studies.records.TrialRecord`) of
        one stage, over that stage's `space` (None: the study's). `costs`: stage name ->
        ``{"flops", "flops_per_trial", "seconds"}``, logged on the parent as
        ``cost/<stage>/<key>`` with the study's totals as ``cost/flops`` and ``cost/seconds``.

        Returns ``{"plots": [paths], "importances": {...}, "best_config": path | None,
        "notes": [...], "parent_run_id": ..., "experiment": ...}``.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        direction = self.study.objective.direction or "minimize"
        notes: list[str] = []
        try:
            source = study_from_trials(
                trials,
                direction=direction,
                space=self.study.space if space is None else space,
                study_name=self.study.name,
            )
        except (ValueError, TypeError) as error:  # odd records: no plots, still an end
            notes.append(f"plots: none drawn ({_reason(error)})")
            source = study_from_trials([], direction=direction, study_name=self.study.name)
        plots = study_plots(source, out / "plots", notes=notes)
        importances = param_importances(source)
        importances_path = out / "importances.json"
        with atomic_path(importances_path) as tmp:
            tmp.write_text(json.dumps(importances, indent=2) + "\n")
        best_config: Path | None = None
        if best_config_yaml.strip():
            best_config = out / "best_config.yaml"
            with atomic_path(best_config) as tmp:
                tmp.write_text(best_config_yaml)

        if self.active:
            try:
                self._log_study(
                    source, importances, [importances_path, best_config], plots, costs or {}
                )
                retry_locked(self._client.set_terminated, self.parent_run_id, status)
            except Exception as error:
                self._disable(_reason(error))
        return {
            "plots": plots,
            "importances": importances,
            "best_config": best_config,
            "notes": notes,
            "parent_run_id": self.parent_run_id,
            "experiment": self.experiment_name,
        }

    def abort(self, status: str = "FAILED", reason: str | None = None) -> None:
        """End the parent run without artifacts (the sweep stopped: FAILED, or KILLED on ^C)."""
        if not self.active:
            return
        try:
            if reason:
                retry_locked(self._client.set_tag, self.parent_run_id, "reason", _one_line(reason))
            retry_locked(self._client.set_terminated, self.parent_run_id, status)
        except Exception as error:
            self._disable(_reason(error))

    # --- MLflow ---------------------------------------------------------------------------

    def _start(self, resume: bool, study_file: str | Path | None) -> None:
        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            # our own short probe: MLflow's HTTP client retries with back-off for minutes
            problem = probe_http(uri)
            if problem is not None:
                self._disable(problem)
                return
        client = open_client(uri)
        self._experiment_id = ensure_experiment(
            client, self.experiment_name, artifact_location(uri)
        )
        self._client = client
        with _file_lock(self._parent_file):
            run_id = self._reuse_parent() if resume else None
            if run_id is None:
                run = retry_locked(
                    client.create_run,
                    self._experiment_id,
                    run_name=self.study.name,
                    tags=self._parent_tags(study_file),
                )
                run_id = run.info.run_id
            else:
                self.resumed = True
                retry_locked(client.update_run, run_id, status="RUNNING")
            record = {
                "run_id": run_id,
                "tracking_uri": uri,
                "experiment": self.experiment_name,
            }
            with atomic_path(self._parent_file) as tmp:
                tmp.write_text(json.dumps(record, indent=2) + "\n")
        self.parent_run_id = run_id
        self._log_study_file()

    def _reuse_parent(self) -> str | None:
        """The recorded parent's id when it is in this store and experiment and not deleted."""
        try:
            record = json.loads(self._parent_file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or not record.get("run_id"):
            return None
        if (record.get("tracking_uri"), record.get("experiment")) != (
            self.tracking_uri,
            self.experiment_name,
        ):
            return None
        try:
            run = retry_locked(self._client.get_run, str(record["run_id"]))
        except Exception:  # deleted for good, or another store: start a new parent
            return None
        if run.info.lifecycle_stage != "active" or run.info.experiment_id != self._experiment_id:
            return None
        return str(record["run_id"])

    def _parent_tags(self, study_file: str | Path | None) -> dict[str, str]:
        study = self.study
        tags = {
            "scaleplan.kind": "study",
            "study": study.name,
            "backend": study.backend,
            "objective": study.objective.metric,
            "direction": str(study.objective.direction),
            "stages": ", ".join(stage.name for stage in study.stages),
            "base": str(study.base),
        }
        if study_file is not None:
            tags["study_file"] = str(Path(study_file).absolute())
        for name, spec in study.space.items():
            tags[f"space.{name}"] = spec.describe()
        return {key: value[:MAX_TAG_CHARS] for key, value in tags.items()}

    def _log_study_file(self) -> None:
        """The study as validated, as `study.json` on the parent (replaced on resume);
        passwords in its URLs are masked."""
        study = self.study.model_dump(mode="json")
        for key in ("storage", "tracking_uri"):
            if isinstance(study.get(key), str):
                study[key] = mask_password(study[key])
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "study.json"
            path.write_text(json.dumps(study, indent=2) + "\n")
            retry_locked(self._client.log_artifact, self.parent_run_id, str(path))

    def _record(
        self, outcome: TrialOutcome, number: int, stage: str, params: Mapping[str, Any]
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self._client
        state = str(outcome.state)
        status = RUN_STATUS.get(state, "FAILED")
        tags = {"state": state, "stage": stage, "number": str(number), "study": self.study.name}
        if outcome.reason:
            tags["reason"] = _one_line(str(outcome.reason), MAX_TAG_CHARS)
        run = None
        if outcome.run_id is not None:
            with contextlib.suppress(Exception):  # not in this store: make a minimal run
                run = retry_locked(client.get_run, outcome.run_id)
        now = int(time.time() * 1000)
        metrics: list[Any] = []
        if run is None:
            run_name = Path(outcome.out_dir).name if outcome.out_dir else f"trial-{number:04d}"
            created = retry_locked(
                client.create_run,
                self._experiment_id,
                run_name=run_name,
                tags={"mlflow.parentRunId": str(self.parent_run_id)},
            )
            run_id, existing = created.info.run_id, set()
            metrics += [  # no trainer run logged the curve: keep what the trial reported
                Metric("objective", float(v), now, int(s))
                for s, v in outcome.intermediate or []
                if _finite(v)
            ]
        else:
            run_id, existing = run.info.run_id, set(run.data.params)
            if "mlflow.parentRunId" not in run.data.tags:
                tags["mlflow.parentRunId"] = str(self.parent_run_id)
        raw_value = outcome.value
        value = float(raw_value) if raw_value is not None and _finite(raw_value) else None
        if value is not None:
            metrics.append(Metric("objective", value, now, int(outcome.steps or 0)))
        # MLflow refuses to change a param: the trainer already logged the config's keys
        new_params = [
            Param(key, str(value)[:MAX_PARAM_CHARS])
            for key, value in params.items()
            if key not in existing
        ]
        for start in range(0, len(new_params), MAX_PARAMS_PER_BATCH):
            chunk = new_params[start : start + MAX_PARAMS_PER_BATCH]
            retry_locked(client.log_batch, run_id, params=chunk)
        retry_locked(
            client.log_batch,
            run_id,
            metrics=metrics,
            tags=[RunTag(key, value) for key, value in tags.items()],
        )
        retry_locked(client.set_terminated, run_id, status)
        if state == "complete" and value is not None:
            # on the parent, the objective against the trial number (numbers restart with
            # each stage's study): the MLflow UI's own history plot, one curve per stage
            retry_locked(
                client.log_metric,
                self.parent_run_id,
                f"trial_objective/{stage}",
                value,
                step=number,
            )

    def _log_study(
        self,
        source: optuna.Study,
        importances: Mapping[str, float],
        files: Sequence[Path | None],
        plots: Sequence[Path],
        costs: Mapping[str, Mapping[str, float | None]],
    ) -> None:
        from mlflow.entities import Metric, RunTag
        from optuna.trial import TrialState

        client, run_id = self._client, self.parent_run_id
        trials = source.get_trials(deepcopy=False)
        counts = {
            "n_trials": len(trials),
            "n_complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "n_failed": sum(t.state == TrialState.FAIL for t in trials),
        }
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, 0) for key, value in counts.items()]
        metrics += [Metric(f"importance/{k}", float(v), now, 0) for k, v in importances.items()]
        totals: dict[str, float] = {}
        for stage, cost in costs.items():
            for key, value in cost.items():
                if value is not None and _finite(value):
                    metrics.append(Metric(f"cost/{stage}/{key}", float(value), now, 0))
                    if key in ("flops", "seconds"):
                        totals[key] = totals.get(key, 0.0) + float(value)
        metrics += [Metric(f"cost/{key}", value, now, 0) for key, value in totals.items()]
        tags: list[Any] = []
        if counts["n_complete"]:
            best = source.best_trial
            if best.value is not None and _finite(best.value):
                metrics.append(Metric("best_value", float(best.value), now, 0))
            metrics.append(Metric("best_trial", float(best.number), now, 0))
            tags += [
                RunTag(f"best.{key}", str(value)[:MAX_TAG_CHARS])
                for key, value in best.params.items()
            ]
        retry_locked(client.log_batch, run_id, metrics=metrics, tags=tags)
        for path in files:
            if path is not None:
                retry_locked(client.log_artifact, run_id, str(path))
        for path in plots:
            retry_locked(client.log_artifact, run_id, str(path), "plots")

    def _disable(self, reason: str) -> None:
        """MLflow off for this study; the one warning line."""
        if self._failed:
            return
        self._failed = True
        print(
            f"tracking: {mask_password(self.tracking_uri)} unreachable or failing ({reason}); "
            "the study goes on without MLflow",
            file=sys.stderr,
            flush=True,
        )


# --- checks ------------------------------------------------------------------------------------


def _tracking_problem(uri: str) -> str | None:
    """None when the store can be used, else why not (one line)."""
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower() if sep else "file"
    if scheme in ("http", "https"):
        return probe_http(uri)
    if scheme == "sqlite":
        # sqlite:///relative/path, sqlite:////absolute/path (the trainer's reading too)
        path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""
        if not path or path.endswith(":memory:"):
            return None
        return _folder_problem(Path(path).parent)
    if scheme == "file":
        return _folder_problem(Path(rest if sep else uri))
    if scheme.split("+")[0] in ("postgresql", "mysql", "mssql", "oracle"):
        return _database_problem(uri)
    return None  # databricks and other managed stores: MLflow's own errors tell


def _folder_problem(folder: Path) -> str | None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _database_problem(uri: str) -> str | None:
    """Open one connection in a daemon thread and wait at most CHECK_TIMEOUT_S for it."""
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            import sqlalchemy

            engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
            try:
                with engine.connect():
                    pass
            finally:
                engine.dispose()
            outcome.append(None)
        except Exception as error:
            outcome.append(_reason(error))

    thread = threading.Thread(target=connect, name="scaleplan-tracking-check", daemon=True)
    thread.start()
    thread.join(CHECK_TIMEOUT_S)
    if not outcome:
        return f"no answer within {CHECK_TIMEOUT_S:.0f} s"
    return outcome[0]


# --- small helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock beside `path`: processes starting a study together share one parent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; start the first worker alone there
        yield
        return
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _absolute(uri: str) -> str:
    """A relative SQLite path made absolute: trials in other working folders (Ray) find it."""
    if uri.startswith("sqlite:///") and not uri.endswith(":memory:"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_absolute():
            return "sqlite:///" + str(path.absolute())
    return uri


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _reason(error: BaseException) -> str:
    return _one_line(f"{type(error).__name__}: {error}", 200)


def _one_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no message"
    return line if len(line) <= limit else line[: limit - 3] + "..."
