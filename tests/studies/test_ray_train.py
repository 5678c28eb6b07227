"""Trials of several workers: a Ray Train TorchTrainer per trial inside the Tune experiment."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from studies.backends.ray.runner import run_ray, trial_resources, worker_resources
from studies.errors import StudyError
from studies.mlflow_study import StudyTracker
from studies.study_file import load_study
from studies.sweep import summarise
from trainer.config import load_config
from trainer.loop import train

pytestmark = pytest.mark.slow


def make_study(tmp_path: Path, ray: dict, trials: int = 3) -> Path:
    base = {
        "steps": 20,
        "log_every": 5,
        "eval_every": 5,
        "eval_batches": 2,
        "checkpoint_every": 0,
        "model": {"kind": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16},
        "data": {"block_size": 32, "batch_size": 4, "max_bytes": 100_000},
        "optimizer": {"name": "adamw", "lr": 3e-3},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(base))
    study = {
        "name": "raytrain",
        "base": "tiny.yaml",
        "space": {"optimizer.lr": {"low": 1e-5, "high": 1e-1, "log": True}},
        "stages": [
            {
                "name": "only",
                "sampler": "sobol",
                "trials": trials,
                "budget": {"steps": 20},
                "pruner": {"name": "asha", "min_resource": 5, "reduction_factor": 2},
            }
        ],
        "backend": "ray",
        "workers": 1,
        "ray": {"num_cpus": 2, **ray},
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    return tmp_path / "study.yaml"


def test_each_trial_trains_on_two_ray_train_workers(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    study = load_study(make_study(tmp_path, {"workers_per_trial": 2, "cpus_per_worker": 1}))
    assert trial_resources(study) == {"cpu": 0.01}  # the trial drives; its workers train
    assert worker_resources(study) == {"cpu": 2.0, "gpu": 0.0}
    runs = tmp_path / "runs"
    tracker = StudyTracker(study, runs_dir=runs, resume=False)
    (report,) = run_ray(study, runs_dir=runs, tracker=tracker)
    summary = summarise(study, [report], tracker, runs)
    assert summary["n_trials"] == 3
    assert report.counts.finished == 3
    states = [t["state"] for t in report.trials]
    assert states[:2] == ["complete", "complete"], report.trials  # the first two set the rung
    assert states[2] == "pruned", report.trials  # lr 1.6e-5 is far behind at step 5: ASHA stops it
    assert report.trials[2]["reason"].startswith("pruned at step 5")
    complete = [t for t in report.trials if t["state"] == "complete"]
    assert all(math.isfinite(t["value"]) and t["steps"] == 20 for t in complete)

    # one MLflow child run per trial, written by rank 0 of its two workers
    client = MlflowClient(tracking_uri=study.tracking_uri)
    parent = client.get_run(tracker.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{tracker.parent_run_id}'"
    )
    assert len(children) == 3
    assert {run.data.tags["ray_train_workers"] for run in children} == {"2"}
    assert {run.info.run_id for run in children} == {t["run_id"] for t in report.trials}
    by_number = sorted(children, key=lambda run: int(run.data.tags["number"]))
    assert [run.data.tags["state"] for run in by_number] == states

    # the two workers trained what one process trains: the same objective
    trial = report.trials[0]
    config = load_config(Path(trial["out_dir"]) / "config.yaml", ["tracking.enabled=false"])
    alone = train(config, out_dir=tmp_path / "alone")
    assert alone.final_val_loss == pytest.approx(trial["value"], rel=1e-3)


def test_more_workers_than_the_local_ray_has_is_refused(tmp_path: Path) -> None:
    study = load_study(make_study(tmp_path, {"workers_per_trial": 3, "cpus_per_worker": 1}))
    says = r"^ray\.workers_per_trial: 3 workers x 1 CPUs = 3 per trial, but the local Ray has 2"
    with pytest.raises(StudyError, match=says):
        run_ray(study, runs_dir=tmp_path / "runs")


def test_pbt_over_several_workers_is_refused_before_ray_starts(tmp_path: Path) -> None:
    path = make_study(tmp_path, {"workers_per_trial": 2})
    study = load_study(path, ["stages.only.pruner.name=pbt", "stages.only.budget.steps=10"])
    says = r"pbt with ray\.workers_per_trial 2 is not supported \(a paused"
    with pytest.raises(StudyError, match=says):
        run_ray(study, runs_dir=tmp_path / "runs")
