"""Comparison files (`studies.compare`): one study per arm with the same budget, the best of each
side by side, the ready-made comparisons load, and bad comparison files are one line, exit 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_study import TINY_BASE

from studies.cli import main
from studies.compare import is_comparison, load_comparison
from studies.errors import StudyError
from studies.sweep import comparable_trials

CONFIGS = Path(__file__).resolve().parents[2] / "studies" / "configs"

STUDY: dict[str, Any] = {
    "name": "lr",
    "base": "base.yaml",
    "space": {"optimizer.lr": {"low": 1e-4, "high": 3e-2, "log": True}},
    "stages": [
        {"name": "coarse", "sampler": "sobol", "trials": 3, "budget": {"steps": 12}},
        {
            "name": "fine",
            "sampler": "tpe",
            "trials": 2,
            "budget": {"steps": 12},
            "narrow": {"top_k": 2, "warm_start": False},
        },
    ],
}
ARMS: dict[str, Any] = {
    "adamw": {"overrides.optimizer.name": "adamw"},
    "lion": {
        "overrides.optimizer.name": "lion",
        "overrides.optimizer.betas": None,
        "space.optimizer.lr": {"low": 1e-5, "high": 3e-3, "log": True},
    },
}


def write_comparison(folder: Path, **fields: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.yaml").write_text(yaml.safe_dump(TINY_BASE))
    (folder / "lr.yaml").write_text(yaml.safe_dump(STUDY))
    raw = {"name": "opt", "study": "lr.yaml", "arms": ARMS, **fields}
    path = folder / "compare.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")
def test_each_arm_runs_the_study_and_the_best_of_each_is_compared(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    shared = {
        "overrides.tracking.enabled": True,
        "overrides.tracking.experiment": "opt-cmp",
        "overrides.seed": 3,
    }
    path = write_comparison(tmp_path, shared=shared)
    runs = tmp_path / "runs"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["sweep", str(path), "--json", "--runs-dir", str(runs), "--tracking-uri", tracking])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert [row["study"] for row in summary["arms"]] in (
        ["opt-adamw", "opt-lion"],
        ["opt-lion", "opt-adamw"],
    )
    values = [row["best_value"] for row in summary["arms"]]
    assert values == sorted(values) and summary["winner"] == summary["arms"][0]["arm"]
    for row in summary["arms"]:
        # same stages for every arm: the same number of trials and of trial-steps
        assert row["n_trials"] == 5 and row["trial_steps"] == 5 * 12
    # the best of an arm is its best trial of any stage with the final budget (both: 12 steps)
    from studies.backends.optuna import load_stage_reports

    for row in summary["arms"]:
        reports = load_stage_reports(row["study"], str(runs / row["study"] / "optuna.journal"))
        done = [t["value"] for t in comparable_trials(reports, reports[-1])]
        assert len(done) == 5 and row["best_value"] == min(v for v in done if v is not None)
        # `study best` and `study show` pick the same trial as the sweep
        capsys.readouterr()
        assert main(["study", "best", row["study"], "--runs-dir", str(runs), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["best_value"] == row["best_value"]
        assert main(["study", "show", row["study"], "--runs-dir", str(runs), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["best_value"] == row["best_value"]
        space = reports[0].space["optimizer.lr"]
        assert (space.low, space.high) == ((1e-5, 3e-3) if row["arm"] == "lion" else (1e-4, 3e-2))
    with open(summary["table"]) as stream:
        table = list(csv.DictReader(stream))
    assert [r["arm"] for r in table] == [r["arm"] for r in summary["arms"]]
    assert float(table[0]["best_value"]) == summary["arms"][0]["best_value"]
    assert Path(summary["plot"]).stat().st_size > 10_000
    # one MLflow parent run per arm, in the shared experiment, each with its 5 child runs
    import mlflow

    client = mlflow.MlflowClient(tracking)
    experiment = client.get_experiment_by_name("opt-cmp")
    assert experiment is not None and summary["mlflow_experiment"] == "opt-cmp"
    runs_found = client.search_runs([experiment.experiment_id], max_results=100)
    parents = {r.info.run_id for r in runs_found if "mlflow.parentRunId" not in r.data.tags}
    assert parents == {row["mlflow_parent_run_id"] for row in summary["arms"]}
    assert len(runs_found) == 2 + 10


def test_arms_subset_and_the_table_print(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    path = write_comparison(tmp_path, arms={**ARMS, "sgd": {"overrides.optimizer.name": "sgd"}})
    args = ["sweep", str(path), "--tracking-uri", "none", "--runs-dir", str(tmp_path / "runs")]
    assert main([*args, "--arms", "lion", "sgd", "--set", "stages.coarse.trials=2"]) == 0
    out = capsys.readouterr().out
    assert "Comparison opt: best val_loss of each arm, same budget" in out
    assert "lion" in out and "sgd" in out and "adamw" not in out
    assert "optimizer.lr" in out and "trial-steps" in out
    assert not (tmp_path / "runs" / "opt-adamw").exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"arms": {"only": {}}}, "arms: Dictionary should have at least 2 items"),
        (
            {"arms": {**ARMS, "bad": {"stages.coarse.trials": 9}}},
            "arms.bad.stages.coarse.trials: a comparison may not change stages",
        ),
        (
            {"arms": {**ARMS, "bad": {"space.optimizer.nope": 1}}},
            "arms.bad: --set space.optimizer.nope: no parameter 'optimizer'",
        ),
        (
            {"arms": {**ARMS, "bad": {"overrides.optimizer.name": "adamx"}}},
            "arms.bad: overrides: with base base.yaml: optimizer.name: 'adamx'",
        ),
        ({"study": "missing.yaml"}, "study: missing.yaml not found"),
        ({"shared": {"name": "x"}}, "shared.name: a comparison may not change name"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_bad_comparison_files_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict[str, Any], message: str
) -> None:
    path = write_comparison(tmp_path, **fields)
    assert main(["sweep", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_unknown_arm_and_arms_on_a_plain_study(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_comparison(tmp_path)
    assert main(["sweep", str(path), "--arms", "adam"]) == 2
    assert "--arms: no arm 'adam'; arms: adamw, lion" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "lr.yaml"), "--arms", "adamw"]) == 2
    assert "is a study, not a comparison" in capsys.readouterr().err
    assert main(["sweep", str(path), "--set", "arms.adamw.seed=1"]) == 2
    assert "error: --set arms.adamw.seed: --set applies to every arm's study; " in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("name", ["optimizers", "schedules", "digits-optimizers"])
def test_ready_made_comparisons_load(name: str) -> None:
    path = CONFIGS / f"{name}.yaml"
    assert is_comparison(path)
    config, studies = load_comparison(path)
    assert len(studies) >= 2 and config.name == name
    stages = {json.dumps([s.model_dump(mode="json") for s in st.stages]) for st in studies.values()}
    assert len(stages) == 1  # the same budget for every arm
    assert len({st.name for st in studies.values()}) == len(studies)
    with pytest.raises(StudyError, match="no arm"):
        load_comparison(path, arms=["nope"])


@pytest.mark.parametrize("name", ["gpt-lr", "digits-lr"])
def test_the_studies_they_run_are_plain_studies(name: str) -> None:
    path = CONFIGS / f"{name}.yaml"
    assert not is_comparison(path)


def test_study_ranking_counts_every_stage_trained_with_the_final_budget() -> None:
    from studies.sweep import StageCounts, StageReport, study_ranking

    def report(name: str, steps: int, values: list[float]) -> StageReport:
        trials = [
            {"number": i, "stage": name, "state": "complete", "value": v, "params": {}}
            for i, v in enumerate(values)
        ]
        return StageReport(name, 0, "sobol", "none", steps, {}, [], StageCounts(3), trials)

    same = [report("coarse", 200, [2.5, 2.1]), report("fine", 200, [2.3])]
    chosen, ranked = study_ranking(same, "minimize")
    assert chosen is same[1] and [t["value"] for t in ranked] == [2.1, 2.3, 2.5]
    shorter = [report("coarse", 120, [2.5, 2.1]), report("fine", 300, [2.3])]
    _, ranked = study_ranking(shorter, "minimize")
    assert [t["value"] for t in ranked] == [2.3]  # a 120-step value does not compare


def test_top_trials_from_several_stages_are_labelled_with_their_stage() -> None:
    from studies.commands.output import trial_labels

    one = [{"stage": "fine", "number": 3}, {"stage": "fine", "number": 0}]
    assert trial_labels(one) == ("stage fine", ["3", "0"])
    mixed = [{"stage": "fine", "number": 3}, {"stage": "coarse", "number": 3}]
    assert trial_labels(mixed) == ("stages fine, coarse", ["fine-3", "coarse-3"])
