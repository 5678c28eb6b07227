"""Run tracking: every metric to `run_dir/metrics.jsonl`, and to MLflow when MLflow answers.

The JSONL file is the local source of truth (`scaleplan diagnose` reads it): one line per
`log_metrics` call, `{"step": step, **metrics}`, flushed as it is written. JSON has no NaN or
infinity, so a non-finite value is written as `null`; MLflow still receives the float itself.

MLflow is driven through an explicit `MlflowClient` (no fluent global state), so that many
trackers can live in one process, e.g. one per trial of a study. The loop pays for a JSON line
and a list append per step: metrics are buffered and handed to one background thread every
`FLUSH_RECORDS` records or `FLUSH_SECONDS` seconds, and that thread makes every MLflow call after
the run is created, so a slow or dead server never stalls training. `finish` drains the queue
(waiting at most `FINISH_TIMEOUT_S`) and ends the run.

When the server is unreachable or MLflow fails, the run goes on: one warning line on stderr,
MLflow is off for this tracker, and the JSONL file is still written. An http(s) server is probed
first with a 3 s timeout, because MLflow's own client retries with back-off for minutes.

Several processes may share one SQLite store (a local sweep): the first one creates and
migrates it under a file lock (`mlflow.db.lock`), and a call that finds the database locked by
another writer is retried with back-off for about 8 s before it counts as a failure.

`log_params` on a resumed run skips keys the MLflow run already has (MLflow refuses to change a
param); the default store keeps artifacts in `runs/artifacts/` beside `runs/mlflow.db` (MLflow
would otherwise use ./mlruns).

Example:
    >>> tracker = Tracker(Path("runs/demo"), enabled=False)  # doctest: +SKIP
    >>> tracker.log_metrics({"loss": 2.31, "lr": 3e-4}, step=0)  # doctest: +SKIP
    >>> tracker.finish("FINISHED", {"val_loss": 2.05})  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
import queue
import re
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "DEFAULT_TRACKING_URI",
    "METRICS_FILE",
    "TRACKING_FILE",
    "NullTracker",
    "Tracker",
    "artifact_location",
    "ensure_experiment",
    "flatten_params",
    "open_client",
    "plot_run",
    "probe_http",
    "read_metrics",
    "resolve_tracking_uri",
    "retry_locked",
]

METRICS_FILE = "metrics.jsonl"
TRACKING_FILE = "tracking.json"
PLOTS_DIR = "plots"
DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
STATUSES = ("FINISHED", "FAILED", "KILLED")

# MLflow's log_batch limits (mlflow.utils.validation): 1000 metrics, 100 params + tags per call.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
PROBE_TIMEOUT_S = 3.0
LOCKED_RETRY_DELAYS_S = (0.1, 0.2, 0.5, 1.0, 2.0, 4.0)


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """The URI a tracker logs to: the given one, else $MLFLOW_TRACKING_URI, else
    `runs/mlflow.db` under the working directory (made absolute, so a resumed run finds it)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri == DEFAULT_TRACKING_URI:
        uri = "sqlite:///" + str(Path.cwd() / "runs" / "mlflow.db")
    return uri


def flatten_params(params: Mapping[str, object], prefix: str = "") -> dict[str, str]:
    """Nested dicts to dotted keys, values as strings: {"optim": {"lr": 3e-4}} -> optim.lr."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in file order.

    Lines that do not parse are skipped: the last line of a run that is still being written may
    be partial. Non-finite values were written as null and come back as None.
    """
    records: list[dict[str, Any]] = []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # a partial line (UnicodeDecodeError is a ValueError too)
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int | float):
            records.append(record)
    return records


class Tracker:
    """Logs one training run to `run_dir/metrics.jsonl` and, when enabled, to an MLflow run.

    Args:
        run_dir: folder of the run; created if missing.
        enabled: False: JSONL only, MLflow is not even imported.
        tracking_uri: MLflow tracking URI; None: $MLFLOW_TRACKING_URI or `runs/mlflow.db`
            (SQLite) under the working directory, whose artifacts go to `runs/artifacts/`.
        experiment: MLflow experiment name, created when missing.
        run_name: MLflow run name.
        parent_run_id: nest this run under that one (tag `mlflow.parentRunId`).
        tags: MLflow tags of the run.
        resume_step: resuming from a checkpoint at this step: metrics.jsonl keeps only the
            records with step <= resume_step, and the MLflow run recorded in
            `run_dir/tracking.json` is reused (MLflow cannot delete metric points, so its history
            may hold two points for the steps after resume_step). None: a fresh run, and
            metrics.jsonl starts empty.
    """

    FLUSH_RECORDS = 100
    FLUSH_SECONDS = 10.0
    FINISH_TIMEOUT_S = 60.0

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool = True,
        tracking_uri: str | None = None,
        experiment: str = "scaleplan",
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.tracking_uri = resolve_tracking_uri(tracking_uri) if enabled else None
        self.experiment = experiment
        self.run_id: str | None = None
        self._resumed = False
        self._params_logged: set[str] | None = None  # known once the first params are sent
        self._client: Any = None
        self._failed = False
        self._finished = False
        self._pending: list[tuple[int, int, dict[str, float]]] = []
        self._last_flush = time.monotonic()
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

        if resume_step is not None and self.metrics_path.exists():
            _truncate_metrics(self.metrics_path, resume_step)
        self._file = self.metrics_path.open("a" if resume_step is not None else "w")
        if resume_step is None:  # a fresh run forgets any earlier run recorded in this folder
            _write_json_atomic(
                self.run_dir / TRACKING_FILE,
                {"run_id": None, "tracking_uri": self.tracking_uri, "experiment": experiment},
            )

        if self.tracking_uri is not None:
            try:
                self._start(run_name, parent_run_id, tags or {}, resume_step is not None)
            except Exception as err:  # MLflow raises many types; the run goes on without it
                self._disable(_reason(err), unreachable=_is_connection_error(err))
            if self.run_id is not None:
                self._thread = threading.Thread(
                    target=self._work, name="scaleplan-tracking", daemon=True
                )
                self._thread.start()

    # --- public API (the loop's contract) -------------------------------------------------

    def log_params(self, params: dict[str, object]) -> None:
        """Flattened dotted keys, values as strings, in batches of at most 100.

        On resume, keys the MLflow run already holds are skipped (MLflow refuses to change a
        param's value)."""
        if not self._on():
            return
        flat = {
            _mlflow_key(key): value[:MAX_PARAM_VALUE_CHARS]
            for key, value in flatten_params(params).items()
        }
        self._submit(lambda: self._send_params(flat))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Append `{"step": step, **metrics}` to metrics.jsonl (non-finite as null) and buffer
        the values for MLflow."""
        values = {key: float(value) for key, value in metrics.items() if key != "step"}
        record: dict[str, object] = {"step": int(step)}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if not self._on():
            return
        self._pending.append((int(step), int(time.time() * 1000), values))
        if (
            len(self._pending) >= self.FLUSH_RECORDS
            or time.monotonic() - self._last_flush >= self.FLUSH_SECONDS
        ):
            self._flush()

    def log_artifact(self, path: Path) -> None:
        """Copy a file (or folder) into the MLflow run's artifact store."""
        if not self._on():
            return
        local = str(Path(path).resolve())
        self._submit(lambda: _retry_locked(self._client.log_artifact, self.run_id, local))

    def finish(self, status: str, summary: dict[str, object]) -> None:
        """End the run: flush metrics, log the summary, set the MLflow status, close the file.

        Numeric summary values become metrics `summary/<key>`, others tags `summary/<key>`;
        `run_dir/tracking.json` records the status and the summary. A second call does nothing.
        """
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        if self._finished:
            return
        self._finished = True
        if self._on():
            self._flush()
            self._submit(lambda: self._send_summary(summary, status))
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(self.FINISH_TIMEOUT_S)
            if self._thread.is_alive():
                self._disable(
                    f"no answer within {self.FINISH_TIMEOUT_S:.0f} s at finish", unreachable=True
                )
        self._file.close()
        state = read_json_object(self.run_dir / TRACKING_FILE) or {
            "run_id": None,
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
        }
        state.update(status=status, summary=summary)
        _write_json_atomic(self.run_dir / TRACKING_FILE, state)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        self.finish(status, {})

    # --- MLflow ---------------------------------------------------------------------------

    def _start(
        self, run_name: str | None, parent_run_id: str | None, tags: dict[str, str], resume: bool
    ) -> None:
        uri = self.tracking_uri
        assert uri is not None
        if uri.startswith(("http://", "https://")):
            # Our own short probe: MLflow's HTTP client retries with back-off for minutes.
            problem = _probe_http(uri)
            if problem is not None:
                self._disable(problem, unreachable=True)
                return

        client = _open_client(uri)
        experiment_id = _experiment_id(client, self.experiment, _artifact_location(uri))
        previous = read_json_object(self.run_dir / TRACKING_FILE) if resume else None
        if previous and previous.get("run_id") and previous.get("tracking_uri") == uri:
            with contextlib.suppress(Exception):  # deleted run or other store: start a new one
                _retry_locked(client.update_run, previous["run_id"], status="RUNNING")
                self.run_id = str(previous["run_id"])
                self._resumed = True
        if self.run_id is None:
            run_tags = {_mlflow_key(k): str(v)[:MAX_TAG_VALUE_CHARS] for k, v in tags.items()}
            if parent_run_id is not None:
                run_tags["mlflow.parentRunId"] = parent_run_id
            run = _retry_locked(client.create_run, experiment_id, run_name=run_name, tags=run_tags)
            self.run_id = run.info.run_id
        self._client = client
        _write_json_atomic(
            self.run_dir / TRACKING_FILE,
            {"run_id": self.run_id, "tracking_uri": uri, "experiment": self.experiment},
        )

    def _on(self) -> bool:
        return self.run_id is not None and not self._failed

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        if batch:
            self._submit(lambda: self._send_metrics(batch))

    def _submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def _work(self) -> None:
        """The background thread: runs MLflow calls in order until the None sentinel."""
        while (job := self._jobs.get()) is not None:
            if self._failed:
                continue  # drain: MLflow is off for this tracker
            try:
                job()
            except Exception as err:
                self._disable(_reason(err), unreachable=_is_connection_error(err))

    def _send_metrics(self, batch: list[tuple[int, int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(_mlflow_key(key), value, timestamp, step)
            for step, timestamp, values in batch
            for key, value in values.items()
        ]
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            _retry_locked(self._client.log_batch, self.run_id, metrics=chunk)

    def _send_params(self, flat: dict[str, str]) -> None:
        from mlflow.entities import Param

        if self._params_logged is None:
            run = _retry_locked(self._client.get_run, self.run_id) if self._resumed else None
            self._params_logged = set(run.data.params) if run is not None else set()
        # MLflow refuses to change a param: the first value logged for a key stays
        params = [Param(k, v) for k, v in flat.items() if k not in self._params_logged]
        for chunk in _chunks(params, MAX_PARAMS_PER_BATCH):
            _retry_locked(self._client.log_batch, self.run_id, params=chunk)
            self._params_logged.update(param.key for param in chunk)

    def _send_summary(self, summary: dict[str, object], status: str) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics, tags = [], []
        for key, value in summary.items():
            name = _mlflow_key(f"summary/{key}")
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                metrics.append(Metric(name, float(value), now, 0))
            else:
                tags.append(RunTag(name, str(value)[:MAX_TAG_VALUE_CHARS]))
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            _retry_locked(self._client.log_batch, self.run_id, metrics=chunk)
        for chunk in _chunks(tags, MAX_PARAMS_PER_BATCH):
            _retry_locked(self._client.log_batch, self.run_id, tags=chunk)
        _retry_locked(self._client.set_terminated, self.run_id, status)

    def _disable(self, reason: str, *, unreachable: bool) -> None:
        """MLflow off for this tracker; the one warning line."""
        if self._failed:
            return
        self._failed = True
        what = "unreachable" if unreachable else "failed"
        print(
            f"tracking: {self.tracking_uri} {what} ({reason}); metrics go to"
            f" {self.metrics_path} only",
            file=sys.stderr,
            flush=True,
        )


def _open_client(uri: str) -> Any:
    """An MlflowClient. A new SQLite store is created and migrated by the first client, and
    MLflow's migrations race when several trials start at once: the first process creates it
    under an exclusive file lock beside the database while the others wait."""
    from mlflow import MlflowClient

    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return MlflowClient(tracking_uri=uri)
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; start the first trial alone there
        return MlflowClient(tracking_uri=uri)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not db.exists() or db.stat().st_size == 0:
                client = MlflowClient(tracking_uri=uri)
                client.search_experiments(max_results=1)  # the store exists and is migrated
                return client
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return MlflowClient(tracking_uri=uri)


def _retry_locked(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """One MLflow call, retried while SQLite is locked by another writer (a local sweep runs
    several trials against one runs/mlflow.db); each call is one transaction, so a retry never
    logs twice."""
    for delay in LOCKED_RETRY_DELAYS_S:
        try:
            return method(*args, **kwargs)
        except Exception as err:
            if "database is locked" not in str(err):
                raise
            time.sleep(delay)
    return method(*args, **kwargs)


def _experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    experiment = _retry_locked(client.get_experiment_by_name, name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(
            _retry_locked(client.create_experiment, name, artifact_location=artifact_location)
        )
    except Exception:
        # Another process created it in the meantime (SQLite: UNIQUE constraint failed).
        experiment = _retry_locked(client.get_experiment_by_name, name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def _artifact_location(uri: str) -> str | None:
    """With a SQLite store MLflow would put artifacts in ./mlruns; keep them beside the DB."""
    if uri.startswith("sqlite:///") and not uri.endswith(":memory:"):
        return str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts")
    return None


def _probe_http(uri: str) -> str | None:
    """None when the server answers (any HTTP status), else why not."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None  # it answered; a real error will surface from MLflow's own calls
    except urllib.error.URLError as err:
        return _one_line(str(err.reason))
    except (OSError, ValueError) as err:
        return _reason(err)


# The same helpers under public names, for studies.mlflow_study (a study's parent run lives in
# the store its trials log to, and must be opened and probed the same way).
open_client = _open_client
ensure_experiment = _experiment_id
artifact_location = _artifact_location
probe_http = _probe_http
retry_locked = _retry_locked


def _is_connection_error(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, ConnectionError | TimeoutError) or any(
        marker in text for marker in ("Connection refused", "Max retries exceeded", "timed out")
    )


def _reason(err: BaseException) -> str:
    return _one_line(f"{type(err).__name__}: {err}")


def _one_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no message"
    return line if len(line) <= limit else line[: limit - 3] + "..."


_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


@functools.lru_cache(maxsize=8192)
def _mlflow_key(key: str) -> str:
    """A metric/param/tag name MLflow accepts: other characters become '_', and no path
    segment is empty, '.' or '..' (MLflow refuses names that normalise to another path)."""
    parts = [part for part in _BAD_KEY_CHARS.sub("_", key).split("/") if part not in ("", ".")]
    return "/".join("__" if part == ".." else part for part in parts) or "_"


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _truncate_metrics(path: Path, resume_step: int) -> None:
    """Keep the records with step <= resume_step (temp file + rename)."""
    kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
    text = "".join(json.dumps(record) + "\n" for record in kept)
    write_text_atomic(path, text)


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON file holding an object, or None when it is missing, unreadable or not an object."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(json_safe(payload), indent=2, default=str) + "\n")


def json_safe(value: Any) -> Any:
    """JSON-safe: non-finite floats to None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- plots ----------------------------------------------------------------------------------


def plot_run(run_dir: Path) -> list[Path]:
    """PNGs of a run from its metrics.jsonl, in `run_dir/plots/`: `loss.png` (train loss and
    validation loss vs step) and `grad_norm.png` (pre-clip global gradient norm vs step, log
    scale, clipped steps marked). A plot whose metrics are absent is not drawn.

    Returns the files written."""
    from matplotlib.figure import Figure

    records = read_metrics(Path(run_dir) / METRICS_FILE)
    out_dir = Path(run_dir) / PLOTS_DIR
    written: list[Path] = []

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    loss, val_loss, grad_norm = series("loss"), series("val_loss"), series("grad_norm")
    if loss[0] or val_loss[0]:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.add_subplot()
        if loss[0]:
            ax.plot(*loss, lw=0.8, alpha=0.8, label="train loss")
        if val_loss[0]:
            ax.plot(*val_loss, "o-", ms=3, label="validation loss")
        ax.set(xlabel="step", ylabel="loss", title="Loss")
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(save_png(fig, out_dir / "loss.png"))
    if grad_norm[0]:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.add_subplot()
        ax.plot(*grad_norm, lw=0.8, label="global grad norm (pre-clip)")
        clipped = {r["step"] for r in records if r.get("clipped")}
        marked = [(s, v) for s, v in zip(*grad_norm, strict=True) if s in clipped]
        if marked:
            ax.plot(*zip(*marked, strict=True), "r.", ms=4, label="clipped")
        if any(v > 0 for v in grad_norm[1]):
            ax.set_yscale("log")
        ax.set(xlabel="step", ylabel="grad norm", title="Gradient norm")
        ax.legend()
        ax.grid(alpha=0.3, which="both")
        written.append(save_png(fig, out_dir / "grad_norm.png"))
    return written


def save_png(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


class NullTracker(Tracker):
    """The tracker of a rank other than 0 in a distributed run: rank 0 writes metrics.jsonl
    and the MLflow run for all; the others log nothing."""

    def __init__(self) -> None:  # no folder, no file, no MLflow
        self.run_id = None

    def log_params(self, params: dict[str, object]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def finish(self, status: str, summary: dict[str, object]) -> None:
        pass
