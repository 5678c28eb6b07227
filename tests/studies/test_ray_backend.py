"""The Ray Tune backend: schedulers per pruner, trial records, a real two-stage study on a local
Ray (narrowing, pruning, failures as data, MLflow children from Ray workers), resume after kill.

The slow tests start a local Ray with 2 CPUs (about 5 s) and run real trials in its workers.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import yaml

from studies.backends.ray.adapters import make_scheduler
from studies.backends.ray.records import LOST_ERROR, NUMBER_KEY, TuneTrial, trial_record
from studies.backends.ray.runner import check_ray_address, run_ray, trial_resources
from studies.config import PrunerSpec, StudyConfig
from studies.errors import StudyError
from studies.objective import TrialOutcome, run_trial, trial_dir
from studies.study_file import load_study

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def tiny_trainer(cache_dir: Path) -> dict[str, Any]:
    """A byte-level GPT (d_model 16, one layer) on 100 kB of the standard library."""
    return {
        "seed": 0,
        "steps": 10,
        "log_every": 5,
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
    }


def make_study(tmp_path: Path, stages: list[dict[str, Any]], **fields: Any) -> StudyConfig:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_trainer(tmp_path / "cache")))
    study = {
        "name": "raytest",
        "base": "tiny.yaml",
        "space": {
            "optimizer.lr": {"low": 1e-4, "high": 1e-1, "log": True},
            "optimizer.weight_decay": {"low": 0.0, "high": 0.3},
        },
        "stages": stages,
        "backend": "ray",
        "workers": 2,
        "ray": {"num_cpus": 2},
        **fields,
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    return load_study(tmp_path / "study.yaml")


# ---------------------------------------------------------------------------------------------
# Without Ray running


def test_each_pruner_maps_to_a_scheduler_that_never_pauses() -> None:
    from ray.tune.schedulers import (
        AsyncHyperBandScheduler,
        FIFOScheduler,
        MedianStoppingRule,
        TrialScheduler,
    )

    asha = make_scheduler(PrunerSpec(name="asha", reduction_factor=2), 40, 5)
    assert isinstance(asha, AsyncHyperBandScheduler)
    assert (asha._time_attr, asha._max_t, asha._stop_last_trials) == ("step", 40, False)
    assert len(asha._brackets) == 1
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [40, 20, 10, 5]

    # hyperband = ASHA with log_rf(max / min) + 1 brackets (Ray's HyperBand pauses trials)
    hyperband = make_scheduler(
        PrunerSpec(name="hyperband", min_resource=5, reduction_factor=2), 40, 10
    )
    assert isinstance(hyperband, AsyncHyperBandScheduler)
    assert len(hyperband._brackets) == 4

    median = make_scheduler(PrunerSpec(name="median", min_resource=20, startup_trials=3), 40, 5)
    assert isinstance(median, MedianStoppingRule)
    assert (median._grace_period, median._min_samples_required) == (20, 3)
    # too few samples: keep going (Tune's rule would pause, and the trial would start over)
    assert median._on_insufficient_samples(None, None, 30.0) == TrialScheduler.CONTINUE
    median.on_trial_complete(None, "trial", {"objective": 1.0, "steps": 40})  # no step: ignored
    assert not median._results

    assert type(make_scheduler(PrunerSpec(name="none"), 40, 5)) is FIFOScheduler


def test_searcher_numbers_trials_and_tells_optuna_which_were_pruned() -> None:
    """Each config carries its Optuna trial number; a trial the scheduler stopped is PRUNED
    in Optuna, one that reported its outcome COMPLETE (or FAIL, with NaN)."""
    import optuna
    from optuna.trial import TrialState

    from studies.backends.ray.adapters import tune_classes
    from studies.config import ParamSpec
    from studies.space import optuna_define_by_run

    space = {"optimizer.lr": ParamSpec(low=1e-4, high=1e-1, log=True)}
    searcher = tune_classes().NumberedOptunaSearch(
        space=optuna_define_by_run(space),
        metric="objective",
        mode="min",
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    configs = [searcher.suggest(f"t{i}") for i in range(3)]
    assert [config[NUMBER_KEY] for config in configs] == [0, 1, 2]
    assert all(1e-4 <= config["optimizer.lr"] <= 1e-1 for config in configs)
    searcher.on_trial_complete("t0", {"objective": 4.2, "step": 5})  # stopped at step 5
    searcher.on_trial_complete("t1", {"objective": 3.1, "state": "complete", "value": 3.1})
    searcher.on_trial_complete("t2", {"objective": float("nan"), "state": "failed"})
    states = [trial.state for trial in searcher._ot_study.trials]
    assert states == [TrialState.PRUNED, TrialState.COMPLETE, TrialState.FAIL]


def test_resources_per_trial_allow_gpu_fractions(tmp_path: Path) -> None:
    stages = [{"name": "coarse", "sampler": "random", "trials": 2, "budget": 10}]
    assert trial_resources(make_study(tmp_path, stages)) == {"cpu": 1.0}
    study = make_study(tmp_path, stages, ray={"cpus_per_trial": 2, "gpus_per_trial": 0.25})
    assert trial_resources(study) == {"cpu": 2.0, "gpu": 0.25}
    with pytest.raises(StudyError, match=r"ray\.gpus_per_trial: 1\.5 is above 1"):
        load_study(tmp_path / "study.yaml", ["ray.gpus_per_trial=1.5"])
    with pytest.raises(StudyError, match=r"ray\.cpus: unknown field"):
        load_study(tmp_path / "study.yaml", ["ray.cpus=2"])


def fake_result(
    number: int,
    metrics: dict[str, Any],
    steps: list[tuple[int, float]],
    error: BaseException | None = None,
) -> SimpleNamespace:
    frame = pd.DataFrame(
        [{"step": s, "objective": v, "timestamp": 1.0e9 + s, "time_total_s": 0.1} for s, v in steps]
    )
    config = {NUMBER_KEY: number, "optimizer.lr": 1e-3, "optimizer.weight_decay": 0.1}
    return SimpleNamespace(config=config, metrics=metrics, metrics_dataframe=frame, error=error)


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_cluster_address_that_does_not_answer_is_refused_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ray.init would wait minutes for the GCS of an address nothing listens on."""
    from studies.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = _closed_port()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(StudyError, match=rf"^ray_address: {address} unreachable \("):
            check_ray_address(address)
    with pytest.raises(StudyError, match="'cluster' is not host:port, ray://host:port or auto"):
        check_ray_address("cluster")
    # nothing to check: a local Ray, or Ray finds the cluster
    assert [check_ray_address(a) for a in (None, "", "auto", "local")] == [
        None,
        None,
        "auto",
        "local",
    ]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # without --ray-address: Ray's variable
    with pytest.raises(StudyError, match=rf"^ray_address: 127.0.0.1:{port} unreachable \("):
        check_ray_address(None)
    monkeypatch.delenv("RAY_ADDRESS")
    # the sweep stops before anything starts: no MLflow parent, no storage
    monkeypatch.chdir(tmp_path)
    make_study(
        tmp_path, [{"name": "coarse", "sampler": "random", "trials": 2, "budget": {"steps": 5}}]
    )
    study = tmp_path / "study.yaml"
    started = time.perf_counter()
    code = main(["sweep", str(study), "--ray-address", f"127.0.0.1:{port}"])
    assert code == 2 and time.perf_counter() - started < 30
    assert capsys.readouterr().err.strip() == (
        f"scaleplan sweep: error: ray_address: 127.0.0.1:{port} unreachable (Connection refused)"
    )
    assert not (tmp_path / "runs").exists()


def test_tune_results_become_trial_records(tmp_path: Path) -> None:
    stages = [{"name": "coarse", "sampler": "random", "trials": 3, "budget": 10}]
    study = make_study(tmp_path, stages)
    runs = tmp_path / "runs"

    def record(result: SimpleNamespace) -> dict[str, Any]:
        return trial_record(result, study, "coarse", study.space, runs)

    # stopped by the scheduler: no outcome was reported
    pruned = record(fake_result(0, {"objective": 4.1, "step": 5}, [(0, 5.5), (5, 4.1)]))
    assert pruned["state"] == "pruned" and pruned["value"] is None
    assert pruned["reason"] == "pruned at step 5 (val_loss 4.1)"
    assert (pruned["steps"], pruned["last_value"]) == (5, 4.1)
    assert pruned["out_dir"] == str(trial_dir(study, "coarse-0", runs))
    assert pruned["params"] == {"optimizer.lr": 1e-3, "optimizer.weight_decay": 0.1}

    # ran to the end and reported its outcome
    final = {"objective": 3.2, "state": "complete", "value": 3.2, "reason": "", "steps": 10}
    complete = record(fake_result(1, final, [(0, 5.5), (5, 4.0), (10, 3.2)]))
    assert (complete["state"], complete["value"], complete["reason"]) == ("complete", 3.2, None)
    assert complete["intermediate"] == [(0, 5.5), (5, 4.0), (10, 3.2)]

    # an error in Ray: the innermost cause, one line
    class RayTaskError(Exception):
        def __init__(self, cause: BaseException) -> None:
            super().__init__("ray::ImplicitFunc.train() failed\ntraceback ...")
            self.cause = cause

    error = RayTaskError(RuntimeError("boom in coarse-2\nmore lines"))
    failed = record(fake_result(2, {"objective": 4.5, "step": 5}, [(0, 5.5), (5, 4.5)], error))
    assert (failed["state"], failed["reason"], failed["steps"]) == (
        "failed",
        "RuntimeError: boom in coarse-2",
        5,
    )

    # Tune saved the trial as errored, but the sweep was killed before its error was written
    lost = fake_result(3, {}, [])
    lost.config, lost.path = {}, "/exp/trial_3"
    saved = {"/exp/trial_3": TuneTrial({NUMBER_KEY: 3, "optimizer.lr": 2e-3}, "ERROR")}
    record_lost = trial_record(lost, study, "coarse", study.space, runs, saved)
    assert (record_lost["number"], record_lost["state"]) == (3, "failed")
    assert record_lost["reason"] == LOST_ERROR
    assert record_lost["params"] == {"optimizer.lr": 2e-3}
    # the same without the saved status: a trial the scheduler stopped before its first report
    saved = {"/exp/trial_3": TuneTrial({NUMBER_KEY: 3, "optimizer.lr": 2e-3}, "TERMINATED")}
    record_stopped = trial_record(lost, study, "coarse", study.space, runs, saved)
    assert (record_stopped["state"], record_stopped["reason"]) == ("pruned", "pruned at step 0")


# ---------------------------------------------------------------------------------------------
# On a local Ray


def trial_in_worker(
    study: StudyConfig, stage: Any, params: dict[str, Any], *, trial_id: str, **kwargs: Any
) -> TrialOutcome:
    """run_trial, except that coarse-1 raises past it; notes the process it ran in."""
    runs_dir = kwargs["runs_dir"]
    with open(runs_dir / "pids.txt", "a") as file:
        file.write(f"{trial_id} {os.getpid()}\n")
    if trial_id == "coarse-1":
        raise RuntimeError("boom in coarse-1")
    return run_trial(study, stage, params, trial_id=trial_id, **kwargs)


@pytest.mark.slow
def test_two_stage_study_on_local_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Coarse (Sobol + ASHA) then fine (TPE, narrowed, warm-started) on a local Ray with two
    trials at a time: counts, narrowing, an exception out of a trial is a failed trial,
    pruning, MLflow children nested under the study's parent run from the Ray workers."""
    from mlflow import MlflowClient

    # the Ray workers import this module for `trial_in_worker`
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))

    from studies.mlflow_study import StudyTracker
    from studies.sweep import summarise

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stages = [
        {
            "name": "coarse",
            "sampler": "sobol",
            "trials": 6,
            "budget": {"steps": 10},
            "pruner": {"name": "asha", "min_resource": 5, "reduction_factor": 2},
        },
        {
            "name": "fine",
            "sampler": "tpe",
            "trials": 3,
            "budget": {"steps": 10},
            "narrow": {"top_k": 2},
        },
    ]
    study = make_study(tmp_path, stages, tracking_uri=uri)
    runs = tmp_path / "runs"
    runs.mkdir()
    tracker = StudyTracker(study, runs_dir=runs, resume=False)
    assert tracker.parent_run_id is not None
    reports = run_ray(study, runs_dir=runs, tracker=tracker, trial_fn=trial_in_worker)
    summary = summarise(study, reports, tracker, runs)

    coarse, fine = reports
    assert (coarse.counts.finished, fine.counts.finished) == (6, 3)
    assert [t["number"] for t in coarse.trials] == list(range(6))
    by_number = {t["number"]: t for t in coarse.trials}
    assert by_number[1]["state"] == "failed"
    assert by_number[1]["reason"] == "RuntimeError: boom in coarse-1"
    # ASHA stopped at least one trial at its first rung (step 5): pruned, not failed
    assert coarse.counts.pruned >= 1, coarse.trials
    for trial in coarse.trials:
        if trial["state"] == "pruned":
            assert trial["reason"].startswith("pruned at step") and trial["steps"] <= 10
    complete = [t for t in coarse.trials if t["state"] == "complete"]
    assert complete and all(t["value"] > 0 and t["steps"] == 10 for t in complete)

    # the fine space spans the coarse top 2; their params come back first (warm starts)
    top2 = sorted(complete, key=lambda t: t["value"])[:2]
    low, high = fine.space["optimizer.lr"].bounds
    assert all(low <= t["params"]["optimizer.lr"] <= high for t in top2)
    assert (low, high) != study.space["optimizer.lr"].bounds
    assert fine.notes and fine.notes[0].startswith("optimizer.lr")
    assert fine.trials[0]["params"] == top2[0]["params"]
    assert all(low <= t["params"]["optimizer.lr"] <= high for t in fine.trials)
    # both stages train 10 steps: the best is the best complete trial of either
    every = [t for r in reports for t in r.trials if t["state"] == "complete"]
    assert summary["best_value"] == min(t["value"] for t in every) and summary["n_trials"] == 9

    # every trial ran in a Ray worker, nested under the parent in MLflow with its state
    pids = {line.split()[1] for line in (runs / "pids.txt").read_text().splitlines()}
    assert str(os.getpid()) not in pids
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{tracker.parent_run_id}'"
    )
    seen = {(run.data.tags["stage"], int(run.data.tags["number"])): run for run in children}
    assert len(children) == len(seen) == 9
    for report in reports:
        for trial in report.trials:
            run = seen[(report.name, trial["number"])]
            assert run.data.tags["state"] == trial["state"]
            assert run.data.tags.get("reason") == (trial["reason"] or None)
            if trial["state"] == "complete":
                assert run.info.run_id == trial["run_id"]  # the trainer's own run, in a worker
                assert run.info.status == "FINISHED"
                assert run.data.metrics["objective"] == pytest.approx(trial["value"])
    assert seen[("coarse", 1)].info.status == "FAILED"


SLEEPY_TRIAL = """
from __future__ import annotations

import os
import time

from studies.objective import TrialOutcome, trial_dir


def sleepy_trial(study, stage, params, *, trial_id, report=None, runs_dir=None, **kwargs):
    import ray

    with open(runs_dir / "started.txt", "a") as file:
        file.write(trial_id + "\\n")
    with open(runs_dir / "gpus.txt", "a") as file:
        file.write(f"{ray.get_gpu_ids()}\\n")
    if trial_id == "coarse-4":
        os._exit(3)  # its Ray worker dies
    time.sleep(0.5)
    value = float(params["optimizer.lr"])
    if report is not None:
        report(10, value)
    out_dir = str(trial_dir(study, trial_id, runs_dir))
    if trial_id == "coarse-5":  # run_trial's own verdict
        reason = "diverged: non-finite loss at step 7"
        return TrialOutcome("failed", None, reason, steps=7, out_dir=out_dir)
    return TrialOutcome("complete", value, None, steps=10, out_dir=out_dir)
"""

SWEEP_SCRIPT = """
import json
import sys
from pathlib import Path

from sleepy import sleepy_trial
from studies.study_file import load_study
from studies.backends.ray.runner import run_ray

study = load_study(sys.argv[1])
reports = run_ray(study, runs_dir=Path(sys.argv[2]), trial_fn=sleepy_trial)
print(json.dumps([[t["number"], t["state"], t["reason"]] for t in reports[0].trials]))
"""


def terminated_trials(experiment: Path) -> int:
    """TERMINATED trials in the newest saved state of a Tune experiment."""
    states = sorted(glob.glob(str(experiment / "experiment_state-*.json")))
    if not states:
        return 0
    try:
        saved = json.loads(Path(states[-1]).read_text())
    except (OSError, ValueError):
        return 0
    return sum('"status": "TERMINATED"' in trial[0] for trial in saved["trial_data"])


def descendants(pid: int) -> list[int]:
    """The processes started under `pid` (Ray's), to end them by id after a SIGKILL."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_same_command_after_kill_resumes_the_stage(tmp_path: Path) -> None:
    """SIGKILL the sweep after two trials finished: the same command keeps them, runs the
    rest, and the stage ends with exactly the requested number. A trial whose Ray worker
    died and one that run_trial says failed are failed trials; the stage goes on. Half a GPU
    per trial: two trials share one (Ray is told of one GPU; no CUDA is needed for that)."""
    stages = [{"name": "coarse", "sampler": "sobol", "trials": 6, "budget": 10}]
    ray_options = {"num_cpus": 2, "num_gpus": 1, "gpus_per_trial": 0.5}
    make_study(tmp_path, stages, overrides={"tracking.enabled": False}, ray=ray_options)
    (tmp_path / "sleepy.py").write_text(textwrap.dedent(SLEEPY_TRIAL))
    (tmp_path / "sweep.py").write_text(textwrap.dedent(SWEEP_SCRIPT))
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    command = [sys.executable, str(tmp_path / "sweep.py"), str(tmp_path / "study.yaml"), str(runs)]
    experiment = runs / "raytest" / "ray" / "raytest-coarse"

    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    ray_processes: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while terminated_trials(experiment) < 2:
            assert first.poll() is None, "the sweep ended before it was killed"
            assert time.monotonic() < deadline, "no trials finished in time"
            ray_processes = descendants(first.pid) or ray_processes
            time.sleep(0.1)
        ray_processes = descendants(first.pid) or ray_processes
        kept = terminated_trials(experiment)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        _end(ray_processes)
    started_before = (runs / "started.txt").read_text().split()

    second = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150
    )
    assert second.returncode == 0, second.stderr[-2000:]
    trials = json.loads(second.stdout.strip().splitlines()[-1])
    assert [number for number, _, _ in trials] == list(range(6))
    states = {number: (state, reason) for number, state, reason in trials}
    # failed; its error is lost when the kill came after Tune saved it errored, before its error
    assert states.pop(4) in {
        ("failed", "ActorDiedError: The actor died unexpectedly before finishing this task."),
        ("failed", LOST_ERROR),
    }
    assert states.pop(5) == ("failed", "diverged: non-finite loss at step 7")
    assert {state for state, _ in states.values()} == {"complete"}
    started = (runs / "started.txt").read_text().split()
    assert set(started) == {f"coarse-{n}" for n in range(6)}
    assert set((runs / "gpus.txt").read_text().split("\n")) == {"[0]", ""}
    # the trials saved as finished before the kill did not run again
    rerun = started[len(started_before) :]
    assert len(rerun) <= 6 - kept
    assert len(set(rerun)) == len(rerun)


def _end(pids: list[int]) -> None:
    """End the killed sweep's Ray processes (they outlive a SIGKILLed driver)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
