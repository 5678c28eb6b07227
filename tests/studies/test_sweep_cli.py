"""`scaleplan sweep` and `scaleplan study show|best|export` as a user runs them: the JSON
summary, the live view and final tables, MLflow runs, a runs table `scaleplan fit` reads, and
one-line errors (exit 2) for bad input before any trial starts."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_study import TINY_BASE

from planner.runs import load_runs
from studies.cli import main
from trainer.config import parse_config

STUDY: dict[str, Any] = {
    "name": "tiny",
    "base": "base.yaml",
    "space": {
        "optimizer.lr": {"low": 1e-4, "high": 3e-2, "log": True},
        "optimizer.weight_decay": {"low": 0.0, "high": 0.2},
    },
    "stages": [
        {
            "name": "coarse",
            "sampler": "sobol",
            "trials": 4,
            "budget": {"steps": 15},
            "pruner": {"name": "median", "startup_trials": 2, "min_resource": 5},
        },
        {"name": "fine", "sampler": "tpe", "trials": 3, "budget": {"steps": 20}, "narrow": {}},
    ],
}


def write_study(folder: Path, **fields: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(yaml.safe_dump(TINY_BASE))
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({**STUDY, **fields}))
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One finished two-stage sweep (JSON summary), shared by the `study` command tests."""
    folder = tmp_path_factory.mktemp("swept")
    path = write_study(folder)
    runs = folder / "runs"
    with pytest.MonkeyPatch.context() as patch, _captured_stdout() as out:
        torch.set_num_threads(1)
        patch.chdir(folder)
        code = main(["sweep", str(path), "--json", "--runs-dir", str(runs)])
    assert code == 0
    return runs, json.loads(out.getvalue())


class _captured_stdout:
    """stdout into a buffer (capsys is function-scoped; the sweep fixture is module-scoped)."""

    def __enter__(self) -> Any:
        import io

        self.saved, self.buffer = sys.stdout, io.StringIO()
        sys.stdout = self.buffer
        return self.buffer

    def __exit__(self, *exc: object) -> None:
        sys.stdout = self.saved


# ---------------------------------------------------------------------------------------------
# scaleplan sweep


def test_json_summary_has_the_documented_fields(swept: tuple[Path, dict[str, Any]]) -> None:
    runs, summary = swept
    for key in ("best_value", "n_trials", "n_complete", "n_pruned", "n_failed"):
        assert isinstance(summary[key], int | float), key
    assert summary["n_trials"] == 7
    assert summary["n_complete"] + summary["n_pruned"] + summary["n_failed"] == 7
    assert set(summary["best_params"]) == {"optimizer.lr", "optimizer.weight_decay"}
    assert summary["mlflow_experiment"] is None and summary["mlflow_parent_run_id"] is None
    assert [(s["name"], s["n_finished"], s["requested"]) for s in summary["stages"]] == [
        ("coarse", 4, 4),
        ("fine", 3, 3),
    ]
    assert summary["storage"] == str((runs / "tiny" / "optuna.journal").absolute())
    assert Path(summary["best_config"]).exists()
    fine = summary["stages"][1]
    assert summary["importances_from"] == {"stage": "fine", "n_complete": fine["n_complete"]}


def test_from_python_the_same_sweep_as_the_cli(
    tmp_path: Path, swept: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from studies import StudyError, prepare_study, run_sweep

    _, cli_summary = swept
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    study = prepare_study(write_study(tmp_path), ["stages.fine.trials=2"], tracking_uri="none")
    summary = run_sweep(study, runs_dir=tmp_path / "runs")
    assert summary["n_trials"] == 6 and summary["stages"][1]["requested"] == 2
    # the coarse stage is the CLI's, trial for trial: same file, same seed
    assert summary["stages"][0]["best_value"] == cli_summary["stages"][0]["best_value"]
    with pytest.raises(StudyError, match="stages.fine.trials"):
        prepare_study(write_study(tmp_path), ["stages.fine.trials=0"])


def test_live_view_and_final_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_study(tmp_path, stages=STUDY["stages"][:1])
    code = main(["sweep", str(path), "--runs-dir", str(tmp_path / "runs")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # the live view (stderr): the stage, its trials done by state, the best so far
    assert "stage 1/1 coarse: 4 trials, sampler sobol, pruner median" in captured.err
    assert "4/4" in captured.err and "complete " in captured.err and "best " in captured.err
    # the summary (stdout): stages, best configurations, importances, where things are
    for text in ("Best configurations (stage coarse, val_loss)", "Parameter importances"):
        assert text in captured.out
    assert f"best config: {tmp_path / 'runs' / 'tiny' / 'best_config.yaml'}" in captured.out
    assert f"plots: {tmp_path / 'runs' / 'tiny' / 'plots'}/" in captured.out
    assert "MLflow: off" in captured.out
    assert captured.out.rstrip().endswith("storage: runs/tiny/optuna.journal")  # under the cwd
    # 2 parameters, at most 4 complete trials: fewer than 5 a parameter
    assert re.search(
        r"importances: from the [2-4] complete trials of stage coarse \(too few to act on",
        captured.out,
    )


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")
def test_trials_land_in_mlflow_under_one_parent_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    path = write_study(tmp_path, stages=[{**STUDY["stages"][0], "trials": 2, "pruner": "none"}])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(
        ["sweep", str(path), "--json", "--runs-dir", str(tmp_path / "runs"), "--tracking-uri", uri]
        + ["--set", "overrides.tracking.enabled=true"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["mlflow_experiment"] == "scaleplan-tiny"
    parent = summary["mlflow_parent_run_id"]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("scaleplan-tiny")
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(run.data.tags["number"] for run in children) == ["0", "1"]
    assert {run.data.tags["state"] for run in children} == {"complete"}


# ---------------------------------------------------------------------------------------------
# scaleplan study show | best | export


def test_study_show(swept: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    runs, summary = swept
    assert main(["study", "show", "tiny", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "Study tiny (val_loss, minimize)" in out and "Best trials (stage fine)" in out
    assert "coarse" in out and "4/4" in out and "3/3" in out
    assert main(["study", "show", "tiny", "--runs-dir", str(runs), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["best_value"] == summary["best_value"]
    assert [s["n_finished"] for s in shown["stages"]] == [4, 3]


def test_study_best_is_a_trainer_config(
    swept: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    runs, summary = swept
    assert main(["study", "best", "tiny", "--runs-dir", str(runs)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# Best trial of study 'tiny': stage fine")
    config = parse_config(yaml.safe_load(text))
    assert config.optimizer.lr == pytest.approx(summary["best_params"]["optimizer.lr"])
    assert main(["study", "best", "tiny", "--runs-dir", str(runs), "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["best_value"] == summary["best_value"] and best["config"]["steps"] == 20


def test_study_export_is_a_runs_table(
    swept: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pandas as pd

    runs, summary = swept
    out = tmp_path / "runs.csv"
    assert main(["study", "export", "tiny", "--runs-dir", str(runs), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table.columns[:3]) == ["params", "tokens", "loss"]
    assert {"stage", "number", "state", "optimizer.lr", "optimizer.weight_decay"} <= set(table)
    measured = summary["n_complete"] + summary["n_pruned"]
    assert len(table) == measured
    runs_table = load_runs(out)  # what `scaleplan fit` reads
    assert len(runs_table) == measured
    complete = table[table["state"] == "complete"]
    assert set(complete["tokens"]) <= {15 * 4 * 32, 20 * 4 * 32}
    # every trial with --all, to standard output
    assert main(["study", "export", "tiny", "--runs-dir", str(runs), "--all"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + summary["n_trials"]


def test_study_command_on_a_missing_study(
    swept: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    runs, _ = swept
    storage = str(runs / "tiny" / "optuna.journal")
    assert main(["study", "show", "nope", "--storage", storage]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scaleplan study: error: study: no study 'nope' in ")
    assert err.endswith("studies there: tiny")


def test_study_command_never_creates_a_storage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for storage in (f"sqlite:///{tmp_path}/nope.db", str(tmp_path / "nope.journal")):
        assert main(["study", "best", "nope", "--storage", storage]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"scaleplan study: error: study: no storage at {storage}; run `scaleplan sweep` first"
        )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the field, exit 2, before any trial


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--set", "space.optimizer.lr.low=0.1"], "space.optimizer.lr"),
        (
            ["--set", "stages.coarse.sampler=annealing"],
            "stages.coarse.sampler: 'annealing' is not one",
        ),
        (["--workers", "0"], "workers: "),
        (["--set", "seed=-3"], "seed: input should be greater than or equal to 0 (got -3)"),
        (
            ["--storage", "postgresql://u:p@127.0.0.1:1/db"],
            "storage: postgresql://u:***@127.0.0.1:1/db unreachable (",
        ),
        (
            ["--tracking-uri", "http://127.0.0.1:1", "--set", "overrides.tracking.enabled=true"],
            "tracking_uri: http://127.0.0.1:1 unreachable (",
        ),
        (
            ["--storage", "redis://u:secret@localhost/0"],
            "storage: 'redis://u:***@localhost/0' has scheme",
        ),
    ],
    ids=[
        "inverted-range",
        "unknown-sampler",
        "no-workers",
        "negative-seed",
        "unreachable-postgres",
        "unreachable-tracking",
        "unknown-storage",
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_any_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], expected: str
) -> None:
    path = write_study(tmp_path)
    code = main(["sweep", str(path), "--runs-dir", str(tmp_path / "runs"), *options])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("scaleplan sweep: error: ") and expected in err, err
    assert not (tmp_path / "runs" / "tiny" / "trials").exists()


def test_ray_backend_missing_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "studies.backends.ray", None)
    code = main(["sweep", str(write_study(tmp_path)), "--backend", "ray"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "scaleplan sweep: error: backend ray: Ray Tune is not installed (pip install 'ray[tune]'); "
        "use backend optuna"
    )


def test_a_sweep_where_every_trial_diverges_ends_with_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = {"optimizer.lr": {"low": 1e8, "high": 1e9, "log": True}}
    path = write_study(tmp_path, space=space, stages=STUDY["stages"][:1])
    code = main(["sweep", str(path), "--json", "--runs-dir", str(tmp_path / "runs")])
    captured = capsys.readouterr()
    assert code == 1
    summary = json.loads(captured.out)
    assert summary["n_trials"] == 4 and summary["n_failed"] == 4
    assert summary["best_value"] is None and summary["best_params"] is None
    assert "no trial completed; failed 4: diverged: non-finite " in captured.err
