"""A study in MLflow: one parent run, nested child runs with their state, study artifacts.

Against MLflow's real local store (SQLite in tmp_path), and against a real `mlflow server`
on 127.0.0.1 reached over HTTP with a child run made by another process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from studies.config import StudyConfig
from studies.errors import StudyError
from studies.mlflow_study import PARENT_FILE, StudyTracker, check_tracking_uri
from studies.objective import TrialOutcome
from studies.study_file import load_study
from studies.study_plots import PLOT_NAMES, param_importances, study_plots
from studies.trainer_config import trial_config
from trainer.config import load_config
from trainer.tracking import Tracker

REPO = Path(__file__).resolve().parents[2]


def tiny_trainer(cache_dir: Path) -> dict[str, Any]:
    """A 10-step byte-level GPT (d_model 16, one layer) on 100 kB of the standard library."""
    return {
        "seed": 0,
        "steps": 10,
        "log_every": 2,
        "eval_every": 5,
        "eval_batches": 2,
        "checkpoint_every": 0,
        "model": {"kind": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16},
        "data": {
            "block_size": 32,
            "batch_size": 4,
            "max_bytes": 100_000,
            "cache_dir": str(cache_dir),
        },
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1},
        "schedule": {"warmup_steps": 2},
        "tracking": {"experiment": "not-the-study-experiment"},
    }


def make_study(tmp_path: Path, tracking_uri: str) -> StudyConfig:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_trainer(tmp_path / "cache")))
    study = {
        "name": "mlflowtest",
        "base": "tiny.yaml",
        "space": {
            "optimizer.lr": {"low": 1e-4, "high": 1e-2, "log": True},
            "optimizer.weight_decay": {"low": 0.0, "high": 0.3},
        },
        "stages": [{"name": "coarse", "sampler": "sobol", "trials": 3, "budget": {"steps": 10}}],
        "tracking_uri": tracking_uri,
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    return load_study(tmp_path / "study.yaml")


def train_child(study: StudyConfig, params: dict[str, Any], out_dir: Path, parent: str) -> float:
    """A real trainer run nested under `parent`, in this process; its final val loss."""
    from trainer.loop import train

    config = trial_config(study, params, study.stages[0])
    tracking = config.tracking.model_copy(update={"experiment": "scaleplan-mlflowtest"})
    result = train(
        config.model_copy(update={"tracking": tracking}), out_dir=out_dir, parent_run_id=parent
    )
    assert result.final_val_loss is not None
    return result.final_val_loss


def child_run_id(out_dir: Path) -> str:
    return str(json.loads((out_dir / "tracking.json").read_text())["run_id"])


def children(client: Any, parent_run_id: str) -> dict[str, Any]:
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    return {run.data.tags["number"]: run for run in runs}


def artifact_paths(client: Any, run_id: str, path: str | None = None) -> set[str]:
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_local_store_parent_children_and_artifacts(tmp_path: Path) -> None:
    """Parent + complete (real trainer run) / pruned / failed-without-run children: nesting,
    tags, statuses, parent metrics and artifacts; a resumed tracker keeps the parent."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = make_study(tmp_path, uri)
    runs_dir = tmp_path / "runs"
    tracker = StudyTracker(study, runs_dir=runs_dir, study_file=tmp_path / "study.yaml")
    parent = tracker.parent_run_id
    assert parent is not None and tracker.experiment_name == "scaleplan-mlflowtest"
    assert tracker.tracking_uri == uri

    good = {"optimizer.lr": 3e-3, "optimizer.weight_decay": 0.1}
    value = train_child(study, good, runs_dir / "mlflowtest" / "trials" / "coarse-0", parent)
    complete = TrialOutcome(
        "complete",
        value,
        None,
        steps=10,
        intermediate=[(5, value + 0.1), (10, value)],
        run_id=child_run_id(runs_dir / "mlflowtest" / "trials" / "coarse-0"),
    )
    tracker.record_trial(complete, number=0, stage="coarse", params=good)

    # a pruned trial: its trainer run ended normally, then the pruner's verdict is recorded
    pruned_params = {"optimizer.lr": 1e-4, "optimizer.weight_decay": 0.2}
    pruned_tracker = Tracker(
        tmp_path / "pruned",
        tracking_uri=uri,
        experiment=tracker.experiment_name,
        run_name="coarse-1",
        parent_run_id=parent,
    )
    pruned_tracker.log_metrics({"val_loss": 5.4}, step=5)
    pruned_tracker.finish("FINISHED", {})
    pruned = TrialOutcome(
        "pruned", None, "pruned at step 5 (val_loss 5.4)", 5, [(5, 5.4)], pruned_tracker.run_id
    )
    tracker.record_trial(pruned, number=1, stage="coarse", params=pruned_params)

    failed_params = {"optimizer.lr": 9e-3, "optimizer.weight_decay": 0.0}
    failed = TrialOutcome("failed", None, "ValueError: boom\nsecond line", 0)  # no run at all
    tracker.record_trial(failed, number=2, stage="coarse", params=failed_params)

    best_yaml = (runs_dir / "mlflowtest" / "trials" / "coarse-0" / "config.yaml").read_text()
    trials = [
        {"number": 0, "stage": "coarse", "state": "complete", "value": value, "params": good},
        {"number": 1, "stage": "coarse", "state": "pruned", "value": None, "params": pruned_params},
        {"number": 2, "stage": "coarse", "state": "failed", "value": None, "params": failed_params},
    ]
    out = runs_dir / "mlflowtest"
    result = tracker.finish(trials=trials, best_config_yaml=best_yaml, out_dir=out)

    client = MlflowClient(tracking_uri=uri)
    kids = children(client, parent)
    assert set(kids) == {"0", "1", "2"}
    expected = {"0": ("complete", "FINISHED"), "1": ("pruned", "KILLED"), "2": ("failed", "FAILED")}
    for number, (state, status) in expected.items():
        run = kids[number]
        assert (run.data.tags["state"], run.info.status, run.data.tags["stage"]) == (
            state,
            status,
            "coarse",
        )
        assert run.info.experiment_id == client.get_run(parent).info.experiment_id
    assert kids["0"].info.run_id == complete.run_id  # the trainer's own run, tagged in place
    assert kids["0"].data.metrics["objective"] == pytest.approx(value)
    assert "loss" in kids["0"].data.metrics  # per-step metrics from the trainer
    assert kids["0"].data.params["optimizer.lr"] == "0.003"
    assert kids["1"].data.tags["reason"].startswith("pruned at step 5")
    assert kids["2"].data.tags["reason"] == "ValueError: boom"  # one line
    assert kids["2"].data.params == {k: str(v) for k, v in failed_params.items()}

    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.info.run_name == "mlflowtest"
    assert parent_run.data.tags["backend"] == "optuna"
    assert parent_run.data.tags["study_file"] == str(tmp_path / "study.yaml")
    metrics = parent_run.data.metrics
    assert metrics["best_value"] == pytest.approx(value)
    assert (metrics["n_trials"], metrics["n_complete"], metrics["n_pruned"]) == (3, 1, 1)
    assert metrics["n_failed"] == 1 and metrics["trial_objective/coarse"] == pytest.approx(value)

    stored = artifact_paths(client, parent)
    assert {"best_config.yaml", "importances.json", "study.json"} <= stored
    # one complete trial: no importances; parameters: two, so every plot is drawn
    assert result["importances"] == {}
    for name in PLOT_NAMES:
        assert {f"plots/{name}.png", f"plots/{name}.html"} <= stored
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    downloaded = client.download_artifacts(parent, "best_config.yaml", str(tmp_path / "dl"))
    assert load_config(downloaded).optimizer.lr == pytest.approx(3e-3)
    assert result["best_config"] == out / "best_config.yaml"
    assert load_config(result["best_config"]).steps == 10

    # resuming keeps the parent (RUNNING again); resume=False starts a new one
    record = json.loads((runs_dir / "mlflowtest" / PARENT_FILE).read_text())
    assert record["run_id"] == parent
    again = StudyTracker(study, runs_dir=runs_dir)
    assert again.parent_run_id == parent and again.resumed
    assert client.get_run(parent).info.status == "RUNNING"
    fresh = StudyTracker(study, runs_dir=runs_dir, resume=False)
    assert fresh.parent_run_id not in (None, parent)


def test_plots_and_importances_from_an_optuna_study(tmp_path: Path) -> None:
    """The Optuna path: a real study's trials -> 4 PNG + 4 HTML, fANOVA importances that
    rank the parameter the objective depends on first."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(
        lambda t: (t.suggest_float("x", -2, 2) ** 2) + 0.01 * t.suggest_float("y", 0, 1),
        n_trials=20,
    )
    written = study_plots(study, tmp_path)
    assert sorted(p.name for p in written) == sorted(
        f"{name}.{ext}" for name in PLOT_NAMES for ext in ("png", "html")
    )
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written if p.suffix == ".png")
    assert "plotly" in (tmp_path / "contour.html").read_text()[:100_000]
    assert not list(tmp_path.glob(".*"))  # no temp files left behind
    importances = param_importances(study)
    assert list(importances)[0] == "x" and sum(importances.values()) == pytest.approx(1.0)


def test_contour_needs_two_parameters_and_no_stale_plot_is_left(tmp_path: Path) -> None:
    def trials(*names: str) -> list[dict[str, Any]]:
        return [
            {"number": i, "state": "complete", "value": float(i), "params": dict.fromkeys(names, i)}
            for i in range(3)
        ]

    assert len(study_plots(trials("x", "y"), tmp_path, notes=[])) == 8
    notes: list[str] = []
    one = trials("x")
    written = study_plots(one, tmp_path, notes=notes)
    assert len(written) == 6 and not list(tmp_path.glob("contour.*"))
    assert notes == ["plots: contour skipped (needs >= 2 parameters, got 1)"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_mlflow_server_over_http(tmp_path: Path) -> None:
    """A real `mlflow server` on 127.0.0.1: the parent from this process, a child trained by
    another process with only the parent's id and the URI, artifacts uploaded over HTTP."""
    from mlflow import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    # no job runner: the server would start helper processes of its own
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_SERVER_JOB_ENABLE_PERIODIC_TASKS": "false",
    }
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"),
            *("--port", str(port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"),
            *("--artifacts-destination", str(tmp_path / "server-artifacts")),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    output = (tmp_path / "server.log").read_text()[-2000:]
                    pytest.fail(f"mlflow server did not start: {output}")
                time.sleep(0.25)
        check_tracking_uri(uri)

        study = make_study(tmp_path, uri)
        tracker = StudyTracker(study, runs_dir=tmp_path / "runs")
        assert tracker.parent_run_id is not None
        params = {"optimizer.lr": 2e-3, "optimizer.weight_decay": 0.05}
        config = trial_config(study, params, study.stages[0])
        tracking = config.tracking.model_copy(update={"experiment": tracker.experiment_name})
        config_file = tmp_path / "trial.yaml"
        config_file.write_text(
            yaml.safe_dump(config.model_copy(update={"tracking": tracking}).model_dump(mode="json"))
        )
        trial_out = tmp_path / "runs" / "mlflowtest" / "trials" / "coarse-0"
        worker = textwrap.dedent(
            """
            import sys
            from trainer.config import load_config
            from trainer.loop import train
            result = train(load_config(sys.argv[1]), out_dir=sys.argv[2], parent_run_id=sys.argv[3])
            print(result.final_val_loss)
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", worker, str(config_file), str(trial_out), tracker.parent_run_id],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        value = float(done.stdout.strip().splitlines()[-1])
        outcome = TrialOutcome("complete", value, None, 10, run_id=child_run_id(trial_out))
        tracker.record_trial(outcome, number=0, stage="coarse", params=params)
        trials = [
            {"number": 0, "stage": "coarse", "state": "complete", "value": value, "params": params}
        ]
        tracker.finish(
            trials=trials,
            best_config_yaml=config_file.read_text(),
            out_dir=tmp_path / "runs" / "mlflowtest",
        )

        client = MlflowClient(tracking_uri=uri)
        kids = children(client, tracker.parent_run_id)
        assert list(kids) == ["0"] and kids["0"].info.status == "FINISHED"
        assert kids["0"].data.tags["state"] == "complete"
        assert kids["0"].data.metrics["objective"] == pytest.approx(value)
        parent = client.get_run(tracker.parent_run_id)
        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["best_value"] == pytest.approx(value)
        stored = artifact_paths(client, tracker.parent_run_id)
        assert {"best_config.yaml", "plots/optimization_history.html"} <= stored
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_unreachable_tracking_uri_is_one_error_line_within_seconds(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(StudyError) as error:
        check_tracking_uri(uri)
    assert time.monotonic() - start < 3.5
    message = str(error.value)
    assert message.startswith(f"tracking_uri: {uri} unreachable (") and "\n" not in message

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StudyError, match="is not a folder"):
        check_tracking_uri(f"sqlite:///{blocker / 'sub' / 'mlflow.db'}")
    check_tracking_uri(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")  # creatable: fine


def test_unreachable_server_mid_sweep_warns_once_and_the_study_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    study = make_study(tmp_path, uri)
    tracker = StudyTracker(study, runs_dir=tmp_path / "runs")
    assert tracker.parent_run_id is None
    tracker.record_trial(TrialOutcome("failed", None, "x", 0), number=0, stage="coarse", params={})
    trials = [{"number": 0, "state": "complete", "value": 1.0, "params": {"optimizer.lr": 1e-3}}]
    result = tracker.finish(trials=trials, best_config_yaml="", out_dir=tmp_path / "out")
    assert result["parent_run_id"] is None and result["best_config"] is None
    assert (tmp_path / "out" / "importances.json").exists()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "tracking:" in line]
    assert len(warnings) == 1 and "unreachable" in warnings[0]
