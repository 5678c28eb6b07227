"""What a Ray stage leaves beside its Tune experiment, in the backend-independent shape.

- Tune's results as trial records (`trial_record`): the records `studies.sweep.StageReport`
  holds, whichever backend ran the trials.
- The stage's settings, space, notes and, once it has finished, its trial records in
  ``scaleplan_stage.json`` beside the experiment (`read_meta`, `write_meta`), checked against
  the study file when a stage is restored (`studies.stage_plan.check_resumed`,
  `check_saved_state`).
- Reading a study back from those files alone, without starting Ray (`load_stage_reports`:
  ``scaleplan study show|best|export``).

`studies.backends.ray.runner` runs the stages; neither Ray nor Tune is imported here (pyarrow reads
the files, local or on an object store).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from studies.config import ParamSpec, StudyConfig
from studies.errors import StudyError
from studies.objective import TrialOutcome, trial_dir, trial_run_id
from studies.records import StageReport, TrialRecord
from studies.records import trial_record as make_record
from studies.space import active_params
from studies.stage_plan import stage_report

__all__ = [
    "LOST_ERROR",
    "META_FILE",
    "NUMBER_KEY",
    "TuneTrial",
    "check_saved_state",
    "finite",
    "load_stage_reports",
    "normal_storage",
    "one_line",
    "read_meta",
    "trial_outcome",
    "trial_record",
    "tune_trials",
    "write_meta",
]

NUMBER_KEY = "_scaleplan_number"  # the trial's number in its stage, added to each Tune config
META_FILE = "scaleplan_stage.json"  # a stage's settings, space and notes, in its experiment dir


def normal_storage(storage: str) -> str:
    """A local storage folder as an absolute path; a URI without its trailing slash."""
    if "://" in storage:
        return storage.rstrip("/")
    return str(Path(storage).expanduser().absolute())


# ---------------------------------------------------------------------------------------------
# Results as records


def trial_record(
    result: Any,
    study: StudyConfig,
    stage: str,
    space: Mapping[str, ParamSpec],
    runs_dir: Path,
    tune_trials: Mapping[str, TuneTrial] | None = None,
) -> TrialRecord:
    """A Tune `Result` as the backend-independent record of `studies.sweep.StageReport`.

    Errored (a Ray-level failure): failed, with the error's type and first line; also when
    Tune saved the trial as errored but not its error (a sweep killed in between). Reported an
    outcome: its state. Neither: stopped by the scheduler, so pruned. `tune_trials` (trial path
    -> what Tune saved of it) gives the config of a result that never reported, whose own
    config is empty, and the trial's status. Besides
    the common keys, ``continued_from`` says whose weights a PBT trial took over last
    (``trial 3 at step 40``; None otherwise); its params are its final (perturbed) ones.
    """
    saved = (tune_trials or {}).get(str(getattr(result, "path", "")))
    config = result.config or (saved.config if saved else {})
    number = int(config.get(NUMBER_KEY, -1))
    params = active_params(space, config)
    metrics = result.metrics or {}
    intermediate = _intermediate(result)
    out_dir = str(trial_dir(study, f"{stage}-{number}", runs_dir))
    last_step = intermediate[-1][0] if intermediate else 0
    last_value = intermediate[-1][1] if intermediate else None
    value: float | None = None
    reason: str | None
    if result.error is not None:
        state, reason, steps = "failed", _error_reason(result.error), last_step
    elif saved is not None and saved.status == "ERROR" and "state" not in metrics:
        state, reason, steps = "failed", LOST_ERROR, last_step
    elif "state" in metrics:
        state = str(metrics["state"])
        reason = str(metrics.get("reason") or "") or None
        steps = int(metrics.get("steps") or last_step)
        if state == "complete" and finite(metrics.get("value")):
            value = float(metrics["value"])
        elif state == "complete":
            state, reason = "failed", f"no {study.objective.metric} was reported"
        out_dir = str(metrics.get("out_dir") or out_dir)
    else:
        state, steps = "pruned", last_step
        shown = f" ({study.objective.metric} {last_value:.4g})" if last_value is not None else ""
        reason = f"pruned at step {last_step}{shown}"
    done = "state" in metrics
    return make_record(
        number=number,
        stage=stage,
        state=state,  # type: ignore[arg-type]
        value=value,
        params=params,
        intermediate=intermediate,
        reason=reason,
        budget=_stage_budget(study, stage),
        steps=steps,
        tokens=_int_or_none(metrics.get("tokens")) if done else None,
        flops=_float_or_none(metrics.get("flops")) if done else None,
        seconds=_float_or_none(metrics.get("seconds")) if done else None,
        params_count=_int_or_none(metrics.get("params_count")) if done else None,
        out_dir=out_dir,
        run_id=str(metrics.get("run_id") or "") or trial_run_id(Path(out_dir)),
        continued_from=str(metrics.get("continued_from") or "") or None,
        started=_started(result),
    )


class TuneTrial(NamedTuple):
    """What Tune saved of a trial besides its `Result`."""

    config: dict[str, Any]
    status: str  # Tune's: TERMINATED, ERROR, ...


# the reason of a trial Tune saved as errored without its error (killed before it was written)
LOST_ERROR = "the trial's Ray worker failed; its error was lost when the sweep was stopped"


def tune_trials(grid: Any) -> dict[str, TuneTrial]:
    """Trial path -> the config Tune gave it (a trial whose worker died before its first
    report has no config in its `Result`) and its status (a `Result` has none)."""
    try:
        trials = grid._experiment_analysis.trials
        return {str(t.path): TuneTrial(dict(t.config), str(t.status)) for t in trials}
    except Exception:  # a Ray without that attribute: the results' own configs only
        return {}


def _intermediate(result: Any) -> list[tuple[int, float]]:
    """(step, objective) of every evaluation a trial reported."""
    frame = result.metrics_dataframe
    if frame is None or "step" not in frame or "objective" not in frame:
        return []
    points = []
    for step, value in zip(frame["step"], frame["objective"], strict=True):
        if finite(step) and finite(value):
            points.append((int(step), float(value)))
    return points


def _started(result: Any) -> str | None:
    frame = result.metrics_dataframe
    if frame is None or "timestamp" not in frame or not len(frame):
        return None
    first = frame.iloc[0]
    seconds = float(first["timestamp"]) - float(first.get("time_total_s", 0.0) or 0.0)
    return dt.datetime.fromtimestamp(seconds).isoformat()


def trial_outcome(record: Mapping[str, Any]) -> TrialOutcome:
    return TrialOutcome(
        state=record["state"],
        value=record["value"],
        reason=record["reason"],
        steps=int(record["steps"] or 0),
        intermediate=list(record["intermediate"]),
        run_id=record["run_id"],
        out_dir=record["out_dir"] or "",
        params_count=record["params_count"],
        tokens=record["tokens"],
    )


def _error_reason(error: BaseException) -> str:
    """``Type: first line`` of the error inside Ray's wrapper (RayTaskError, TuneError)."""
    cause = error
    for _ in range(5):
        inner = getattr(cause, "cause", None) or cause.__cause__
        if not isinstance(inner, BaseException) or inner is cause:
            break
        cause = inner
    return one_line(cause)


# ---------------------------------------------------------------------------------------------
# The stage's settings beside its experiment


def check_saved_state(path: str) -> None:
    """The newest saved experiment and searcher state must load, else Tune's restore would
    fail half-way (and hang); a StudyError says which stage folder to remove instead."""
    import pickle

    fs, root = _filesystem(path)
    import pyarrow.fs

    names = [info.base_name for info in fs.get_file_info(pyarrow.fs.FileSelector(root))]
    for prefix, load in (
        ("experiment_state-", json.loads),
        ("searcher-state-", pickle.loads),
    ):
        found = sorted(n for n in names if n.startswith(prefix))
        if not found:
            continue
        try:
            with fs.open_input_stream(f"{root}/{found[-1]}") as stream:
                load(stream.read())
        except Exception as error:
            raise StudyError(
                f"storage: {path}/{found[-1]} is damaged ({one_line(error)}); delete {path} "
                "to run that stage again"
            ) from None


def _filesystem(path: str) -> tuple[Any, str]:
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(path)
    return fs, str(root)


def read_meta(path: str) -> dict[str, Any] | None:
    fs, root = _filesystem(path)
    try:
        with fs.open_input_stream(f"{root}/{META_FILE}") as stream:
            payload = json.loads(stream.read().decode())
    except (OSError, FileNotFoundError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def write_meta(path: str, meta: Mapping[str, Any]) -> None:
    """Written whole: a temp file renamed (local), or one object (object stores)."""
    text = json.dumps(meta, indent=2, default=_plain) + "\n"
    if "://" not in path:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{META_FILE}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / META_FILE)
        return
    fs, root = _filesystem(path)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{META_FILE}") as stream:
        stream.write(text.encode())


# ---------------------------------------------------------------------------------------------
# Reading a study back (scaleplan study show | best | export)


def load_stage_reports(name: str, storage: str) -> list[StageReport]:
    """The stages of study `name` in a Ray storage (a folder or URI; the default is
    runs/<name>/ray), in order, from the ``scaleplan_stage.json`` beside each experiment; no
    Ray is started. A stage that has not finished (its sweep is running, or was stopped) has
    no trial records yet: it comes back with none. Each report's `meta` is that file."""
    import pyarrow.fs

    storage = normal_storage(storage)
    fs, root = _filesystem(storage)
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
        raise StudyError(f"study: no Ray storage at {storage}; run `scaleplan sweep` first")
    metas = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root)):
        if info.type == pyarrow.fs.FileType.Directory:
            meta = read_meta(f"{storage}/{info.base_name}")
            if meta is not None and "study" in meta:
                metas.append(meta)
    found = sorted((m for m in metas if m["study"] == name), key=lambda m: int(m.get("index", 0)))
    if not found:
        names = sorted({str(m["study"]) for m in metas})
        known = f"; studies there: {', '.join(names)}" if names else ""
        raise StudyError(f"study: no study '{name}' in {storage}{known}")
    reports = []
    for meta in found:
        trials = [_record_from_json(record) for record in meta.get("trial_records") or []]
        reports.append(stage_report(meta, trials))
    return reports


def _record_from_json(record: Mapping[str, Any]) -> TrialRecord:
    """A trial record as `trial_record` made it (JSON turned its (step, value) pairs into
    lists); keys an older file lacks get their defaults."""
    known = {key: record[key] for key in TrialRecord.__annotations__ if key in record}
    known.pop("last_value", None)
    return make_record(**known)


# ---------------------------------------------------------------------------------------------
# Small helpers


def finite(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return False
    return math.isfinite(value)


def _plain(value: Any) -> Any:
    """JSON for what `json` does not know (a NumPy number in a config)."""
    return value.item() if hasattr(value, "item") else str(value)


def _stage_budget(study: StudyConfig, stage: str) -> dict[str, Any] | None:
    spec = next((s for s in study.stages if s.name == stage), None)
    return spec.budget.as_written() if spec is not None else None


def _int_or_none(value: Any) -> int | None:
    return int(value) if finite(value) else None


def _float_or_none(value: Any) -> float | None:
    return float(value) if finite(value) else None


def one_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip()
    first = text.splitlines()[0].strip() if text else ""
    line = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def continued_text(continued_from: Mapping[str, int] | None) -> str:
    """``trial 3 at step 40``: whose weights a PBT trial took over, and when ("" if none)."""
    if not continued_from:
        return ""
    return f"trial {continued_from['number']} at step {continued_from['step']}"


def final_metrics(
    outcome: TrialOutcome, continued_from: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """The last report of a trial that ran to its end: its outcome. The objective is NaN
    unless complete (OptunaSearch then records the trial as failed); no ``step``."""
    value = outcome.value if outcome.state == "complete" else None
    return {
        "objective": float(value) if value is not None else math.nan,
        "state": outcome.state,
        "value": value,
        "reason": outcome.reason or "",
        "steps": int(outcome.steps),
        "tokens": outcome.tokens,
        "flops": outcome.flops,
        "seconds": outcome.seconds,
        "params_count": outcome.params_count,
        "out_dir": outcome.out_dir,
        "run_id": outcome.run_id or "",
        "continued_from": continued_text(continued_from),
    }
