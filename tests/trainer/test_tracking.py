"""Tracker: metrics.jsonl always, MLflow (local SQLite) when it answers, one warning when not."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from trainer.tracking import (
    METRICS_FILE,
    TRACKING_FILE,
    Tracker,
    flatten_params,
    plot_run,
    read_metrics,
    resolve_tracking_uri,
)

mlflow = pytest.importorskip("mlflow")
# MLflow 3.17's SQLAlchemy store trips a deprecation warning of SQLAlchemy 2.1 on first use.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module: creating it runs MLflow's migrations (seconds)."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return f"sqlite:///{db}"


@pytest.fixture(scope="module")
def client(tracking_uri: str) -> Any:
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_jsonl_written_without_mlflow_and_non_finite_is_null(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, enabled=False)
    tracker.log_metrics({"loss": 2.5, "lr": 1e-3}, step=0)
    tracker.log_metrics({"loss": math.nan, "grad_norm": math.inf}, step=1)
    # flushed per line: readable before finish, as `scaleplan diagnose` does on a live run
    assert _lines(tmp_path) == [
        {"step": 0, "loss": 2.5, "lr": 1e-3},
        {"step": 1, "loss": None, "grad_norm": None},
    ]
    tracker.finish("FINISHED", {"val_loss": 2.0})
    assert tracker.run_id is None
    state = json.loads((tmp_path / TRACKING_FILE).read_text())
    assert state["status"] == "FINISHED" and state["summary"] == {"val_loss": 2.0}


def test_params_metrics_and_status_reach_mlflow(
    tmp_path: Path, tracking_uri: str, client: Any
) -> None:
    tracker = Tracker(
        tmp_path / "run", tracking_uri=tracking_uri, run_name="r1", tags={"study": "unit"}
    )
    assert tracker.run_id is not None
    tracker.log_params({"model": {"d_model": 64, "n_layers": 2}, "lr": 3e-4, "tags": ["a"]})
    for step in range(5):
        tracker.log_metrics({"loss": 3.0 - 0.1 * step, "grad_norm/h.0.weight": 0.5}, step)
    tracker.finish("FINISHED", {"val_loss": 2.4, "stopped": "budget"})

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r1" and run.data.tags["study"] == "unit"
    assert run.data.params == {
        "model.d_model": "64",
        "model.n_layers": "2",
        "lr": "0.0003",
        "tags": "['a']",
    }
    history = client.get_metric_history(tracker.run_id, "loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [
        (s, round(3.0 - 0.1 * s, 6)) for s in range(5)
    ]
    assert len(client.get_metric_history(tracker.run_id, "grad_norm/h.0.weight")) == 5
    assert run.data.metrics["summary/val_loss"] == 2.4
    assert run.data.tags["summary/stopped"] == "budget"
    assert len(_lines(tmp_path / "run")) == 5
    recorded = json.loads((tmp_path / "run" / TRACKING_FILE).read_text())
    assert recorded["run_id"] == tracker.run_id and recorded["tracking_uri"] == tracking_uri


def test_child_run_nests_under_parent(tmp_path: Path, tracking_uri: str, client: Any) -> None:
    parent = Tracker(tmp_path / "study", tracking_uri=tracking_uri, run_name="study")
    child = Tracker(tmp_path / "trial0", tracking_uri=tracking_uri, parent_run_id=parent.run_id)
    child.log_metrics({"loss": 1.0}, 0)
    child.finish("FAILED", {})
    parent.finish("KILLED", {})
    child_run = client.get_run(child.run_id)
    assert child_run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert child_run.info.status == "FAILED"
    assert client.get_run(parent.run_id).info.status == "KILLED"


def test_more_than_1000_metrics_are_sent_in_chunks(
    tmp_path: Path, tracking_uri: str, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = Tracker(tmp_path, tracking_uri=tracking_uri)
    sizes: list[int] = []
    original = tracker._client.log_batch

    def spy(run_id: str, metrics: Any = (), **kwargs: Any) -> Any:
        sizes.append(len(metrics))
        return original(run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(tracker._client, "log_batch", spy)
    tracker.log_metrics({f"m{i}": float(i) for i in range(1500)}, step=0)
    tracker.log_metrics({f"m{i}": float(i) for i in range(1500)}, step=1)
    tracker.finish("FINISHED", {})
    assert sum(sizes) == 3000 and max(sizes) <= 1000
    assert len(client.get_metric_history(tracker.run_id, "m1499")) == 2


def test_unreachable_server_warns_once_and_keeps_jsonl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start = time.perf_counter()
    tracker = Tracker(tmp_path, tracking_uri="http://127.0.0.1:9")  # port 9: discard, closed
    tracker.log_params({"lr": 1e-3})
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
    tracker.log_artifact(tmp_path / METRICS_FILE)
    tracker.finish("FINISHED", {})
    assert time.perf_counter() - start < 5.0
    assert tracker.run_id is None
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1
    assert warnings[0].startswith("tracking: http://127.0.0.1:9 unreachable (")
    assert warnings[0].endswith(f"metrics go to {tmp_path / METRICS_FILE} only")
    assert [r["step"] for r in _lines(tmp_path)] == [0, 1, 2]


def test_mlflow_error_mid_run_warns_once_and_run_goes_on(
    tmp_path: Path, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    tracker = Tracker(tmp_path, tracking_uri=tracking_uri)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise mlflow.exceptions.MlflowException("disk I/O error\nsecond line")

    tracker._client.log_batch = broken
    tracker.FLUSH_RECORDS = 1  # every record goes to the (broken) client at once
    for step in range(4):
        tracker.log_metrics({"loss": 1.0}, step)
    tracker.finish("FINISHED", {})
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "failed (MlflowException: disk I/O error)" in warnings[0]
    assert len(_lines(tmp_path)) == 4


def test_locked_sqlite_is_retried(
    tmp_path: Path, tracking_uri: str, client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    tracker = Tracker(tmp_path, tracking_uri=tracking_uri)
    original = tracker._client.log_batch
    failures = [mlflow.exceptions.MlflowException("(sqlite3.OperationalError) database is locked")]

    def locked_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return original(*args, **kwargs)

    tracker._client.log_batch = locked_once
    tracker.log_metrics({"loss": 1.0}, 0)
    tracker.finish("FINISHED", {})
    assert capsys.readouterr().err == ""
    assert len(client.get_metric_history(tracker.run_id, "loss")) == 1


def test_resume_truncates_jsonl_and_reuses_the_run(
    tmp_path: Path, tracking_uri: str, client: Any
) -> None:
    first = Tracker(tmp_path, tracking_uri=tracking_uri)
    for step in range(10):
        first.log_metrics({"loss": 10.0 - step}, step)
    first.finish("FAILED", {})
    with (tmp_path / METRICS_FILE).open("a") as file:
        file.write('{"step": 10, "lo')  # the crash cut the last line

    resumed = Tracker(tmp_path, tracking_uri=tracking_uri, resume_step=5)
    assert resumed.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    assert [r["step"] for r in _lines(tmp_path)] == [0, 1, 2, 3, 4, 5]
    resumed.log_params({"lr": 1.0})
    resumed.log_metrics({"loss": 4.5}, 6)
    resumed.finish("FINISHED", {})
    assert [r["step"] for r in _lines(tmp_path)] == [0, 1, 2, 3, 4, 5, 6]
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_fresh_run_in_a_used_folder_starts_over(tmp_path: Path, tracking_uri: str) -> None:
    first = Tracker(tmp_path, tracking_uri=tracking_uri)
    first.log_metrics({"loss": 1.0}, 0)
    first.finish("FINISHED", {})
    second = Tracker(tmp_path, tracking_uri=tracking_uri)
    second.finish("FINISHED", {})
    assert second.run_id != first.run_id
    assert _lines(tmp_path) == []


def test_default_uri_is_runs_mlflow_db_with_artifacts_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    # The artifact rule without paying for a second database: the experiment's location.
    from trainer.tracking import _artifact_location

    assert _artifact_location(resolve_tracking_uri(None)) == str(tmp_path / "runs" / "artifacts")


def test_artifacts_land_beside_the_database(tmp_path: Path, tracking_uri: str, client: Any) -> None:
    tracker = Tracker(tmp_path / "run", tracking_uri=tracking_uri, experiment="artifacts")
    for step in range(20):
        tracker.log_metrics({"loss": 3.0 / (step + 1), "grad_norm": 1.0 + step}, step)
        if step % 5 == 4:
            tracker.log_metrics({"val_loss": 3.2 / (step + 1)}, step)
    plots = plot_run(tmp_path / "run")
    assert [p.name for p in plots] == ["loss.png", "grad_norm.png"]
    assert all(p.stat().st_size > 5_000 for p in plots)
    for plot in plots:
        tracker.log_artifact(plot)
    tracker.finish("FINISHED", {})
    assert tracker.run_id is not None
    names = sorted(a.path for a in client.list_artifacts(tracker.run_id))
    assert names == ["grad_norm.png", "loss.png"]
    db_dir = Path(tracking_uri.removeprefix("sqlite:///")).parent
    assert (db_dir / "artifacts" / tracker.run_id / "artifacts" / "loss.png").exists()


def test_plot_run_skips_missing_metrics(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text('{"step": 0, "tokens_per_s": 5.0}\n')
    assert plot_run(tmp_path) == []


def test_read_metrics_tolerates_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 0, "loss": 2.0}\n{"step": 1, "loss": null}\n{"step": 2, "lo')
    assert read_metrics(path) == [{"step": 0, "loss": 2.0}, {"step": 1, "loss": None}]


def test_flatten_params_uses_dotted_keys() -> None:
    assert flatten_params({"optim": {"name": "adamw", "betas": (0.9, 0.95)}, "seed": 0}) == {
        "optim.name": "adamw",
        "optim.betas": "(0.9, 0.95)",
        "seed": "0",
    }


def test_bad_status_is_refused(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, enabled=False)
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        tracker.finish("DONE", {})
