"""The Optuna backend: two stages end to end (counts, narrowing, warm starts), failures that
stay data, exact counts with worker processes, interrupted trials retried after a SIGKILL,
and crashed workers found by their heartbeat on RDB storage."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from tiny_study import TINY_BASE

from studies.backends import optuna as optuna_backend
from studies.backends.optuna import (
    fail_interrupted_trials,
    load_stage_reports,
    open_storage,
    run_optuna,
    trial_record,
)
from studies.config import StudyConfig, mask_password
from studies.errors import StudyError
from studies.objective import TrialOutcome, run_trial
from studies.study_file import load_study
from studies.sweep import run_sweep

REPO = Path(__file__).resolve().parents[2]
POSTGRES_URL = os.environ.get("SCALEPLAN_TEST_POSTGRES_URL")
needs_postgres = pytest.mark.skipif(
    not POSTGRES_URL, reason="SCALEPLAN_TEST_POSTGRES_URL not set (no PostgreSQL server)"
)
pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed:UserWarning"),
]

TWO_STAGES: list[dict[str, Any]] = [
    {
        "name": "coarse",
        "sampler": "sobol",
        "trials": 6,
        "budget": {"steps": 20},
        "pruner": {"name": "median", "startup_trials": 2, "min_resource": 5},
    },
    {
        "name": "fine",
        "sampler": "tpe",
        "trials": 4,
        "budget": {"steps": 30},
        "narrow": {"top_k": 3},
    },
]


def write_study(tmp_path: Path, **fields: Any) -> Path:
    """A seconds-long study over a 1-layer byte GPT, MLflow off; `fields` replace entries."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(TINY_BASE))
    study: dict[str, Any] = {
        "name": "tiny",
        "base": "base.yaml",
        "space": {
            "optimizer.lr": {"low": 1e-4, "high": 3e-2, "log": True},
            "optimizer.betas.1": {"low": 0.9, "high": 0.999},
        },
        "stages": TWO_STAGES,
    }
    study.update(fields)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def one_stage(trials: int, steps: int = 20, sampler: str = "random") -> list[dict[str, Any]]:
    return [{"name": "coarse", "sampler": sampler, "trials": trials, "budget": {"steps": steps}}]


def optuna_trials(study: StudyConfig, runs: Path, stage: str) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(study.resolved_storage(runs))
    return optuna.load_study(study_name=f"{study.name}-{stage}", storage=storage).get_trials()


def finished(trials: list[optuna.trial.FrozenTrial]) -> int:
    return sum(trial_record(t, "")["state"] in ("complete", "pruned", "failed") for t in trials)


# ---------------------------------------------------------------------------------------------
# Two stages end to end


def test_two_stages_run_their_counts_and_the_fine_one_is_narrowed(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path))
    runs = tmp_path / "runs"
    summary = run_sweep(study, runs_dir=runs)

    coarse, fine = summary["stages"]
    assert (coarse["n_finished"], fine["n_finished"]) == (6, 4)
    assert summary["n_trials"] == 10 and summary["n_interrupted"] == 0
    assert summary["n_complete"] + summary["n_pruned"] + summary["n_failed"] == 10
    # the fine stage searches inside the range of the coarse top 3, and starts from them
    reports = load_stage_reports("tiny", study.resolved_storage(runs))
    lr_low, lr_high = reports[1].space["optimizer.lr"].bounds
    assert 1e-4 <= lr_low < lr_high <= 3e-2 and (lr_high / lr_low) < 300
    assert any(note.startswith("optimizer.lr: [0.0001, 0.03] log -> ") for note in fine["notes"])
    fine_trials = optuna_trials(study, runs, "fine")
    warm = [t for t in fine_trials if t.user_attrs.get("warm_start")]
    coarse_best = sorted(
        (t for t in optuna_trials(study, runs, "coarse") if t.state == TrialState.COMPLETE),
        key=lambda t: t.value or 0.0,
    )[:3]
    assert [t.params for t in warm] == [t.params for t in coarse_best]
    # coarse values are not carried into the fine study: budgets differ
    assert len(fine_trials) == 4
    # the best comes from the last stage; its config and the study's artifacts are on disk
    assert summary["best_trial"]["stage"] == "fine"
    assert summary["best_value"] == min(t.value for t in fine_trials if t.value is not None)
    best_config = yaml.safe_load(Path(summary["best_config"]).read_text())
    assert best_config["optimizer"]["lr"] == pytest.approx(summary["best_params"]["optimizer.lr"])
    assert best_config["steps"] == 30
    assert {Path(p).name for p in summary["plots"]} >= {"optimization_history.png", "slice.html"}
    assert set(summary["importances"]) == {"optimizer.lr", "optimizer.betas.1"}
    # trial folders: runs/<study>/trials/<stage>-<number>
    assert (runs / "tiny" / "trials" / "fine-3" / "result.json").exists()

    # the same sweep again: everything is there, nothing runs
    again = run_sweep(study, runs_dir=runs)
    assert again["n_trials"] == 10 and again["best_value"] == summary["best_value"]
    assert len(optuna_trials(study, runs, "coarse")) == 6


def test_failures_are_recorded_and_the_study_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer import loop

    real_train = loop.train
    calls = {"n": 0}

    def flaky_train(config: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("bad batch")
        if calls["n"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        if calls["n"] == 3:  # diverges: a huge learning rate
            config = config.model_copy(
                update={"optimizer": config.optimizer.model_copy(update={"lr": 1e9})}
            )
        return real_train(config, *args, **kwargs)

    monkeypatch.setattr(loop, "train", flaky_train)
    study = load_study(write_study(tmp_path, stages=one_stage(5)))
    summary = run_sweep(study, runs_dir=tmp_path / "runs")
    assert summary["n_trials"] == 5
    assert summary["n_failed"] == 3 and summary["n_complete"] == 2
    assert summary["best_value"] is not None
    reasons = [
        t.user_attrs.get("reason") for t in optuna_trials(study, tmp_path / "runs", "coarse")
    ]
    assert reasons[:2] == ["ValueError: bad batch", "out of memory"]
    assert str(reasons[2]).startswith("diverged: non-finite ")
    assert reasons[3:] == [None, None]
    assert summary["failures"]["coarse"]["out of memory"] == 1


def test_a_trainable_that_raises_fails_only_its_trial(tmp_path: Path) -> None:
    calls = {"n": 0}

    def sometimes_raises(*args: Any, **kwargs: Any) -> TrialOutcome:
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("a bug in the trainable")
        return TrialOutcome("complete", 1.0 + calls["n"], None, steps=1)

    study = load_study(write_study(tmp_path, stages=one_stage(4)))
    reports = run_optuna(study, runs_dir=tmp_path / "runs", trial_fn=sometimes_raises)
    assert reports[0].counts.finished == 4
    assert (reports[0].counts.failed, reports[0].counts.complete) == (2, 2)
    failed = [t for t in reports[0].trials if t["state"] == "failed"]
    assert {t["reason"] for t in failed} == {"RuntimeError: a bug in the trainable"}


def test_pruned_trials_carry_their_reason_and_last_value(tmp_path: Path) -> None:
    stages = [
        {
            "name": "coarse",
            "sampler": "random",
            "trials": 4,
            "budget": {"steps": 20},
            "pruner": {"name": "median", "startup_trials": 1, "min_resource": 5},
        }
    ]
    study = load_study(write_study(tmp_path, stages=stages))
    reports = run_optuna(study, runs_dir=tmp_path / "runs")
    pruned = [t for t in reports[0].trials if t["state"] == "pruned"]
    assert reports[0].counts.finished == 4
    for record in pruned:
        assert str(record["reason"]).startswith("pruned at step ")
        assert record["value"] is None and record["last_value"] is not None
        assert record["steps"] < 20 and record["tokens"] == record["steps"] * 4 * 32


def test_a_changed_space_is_refused_on_resume(tmp_path: Path) -> None:
    path = write_study(tmp_path, stages=one_stage(1))
    run_sweep(load_study(path), runs_dir=tmp_path / "runs")
    changed = load_study(path, ["space.optimizer.lr.high=0.1"])
    with pytest.raises(StudyError, match=r"^space: differs from the one study 'tiny'"):
        run_sweep(changed, runs_dir=tmp_path / "runs")


# ---------------------------------------------------------------------------------------------
# Interrupted trials, exact counts, several workers


def test_a_dead_processes_trial_is_failed_as_interrupted_and_replaced(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path, stages=one_stage(3)))
    runs = tmp_path / "runs"
    run_sweep(study, runs_dir=runs)  # 3 finished trials
    # a trial left RUNNING by a process that is gone (as after kill -9)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    storage = open_storage(study.resolved_storage(runs))
    ostudy = optuna.load_study(study_name="tiny-coarse", storage=storage)
    orphan = ostudy.ask(
        {"optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 3e-2, log=True)}
    )
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{gone.pid}:")

    more = load_study(write_study(tmp_path, stages=one_stage(5)))
    summary = run_sweep(more, runs_dir=runs)
    assert summary["n_trials"] == 5 and summary["n_interrupted"] == 1
    trials = optuna_trials(more, runs, "coarse")
    assert trials[orphan.number].state == TrialState.FAIL
    assert trial_record(trials[orphan.number], "coarse")["state"] == "interrupted"
    assert trials[orphan.number].user_attrs["reason"] == "interrupted"
    assert finished(trials) == 5


def test_ctrl_c_fails_the_running_trial_as_interrupted(tmp_path: Path) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> TrialOutcome:
        raise KeyboardInterrupt

    study = load_study(write_study(tmp_path, stages=one_stage(2)))
    with pytest.raises(KeyboardInterrupt):
        run_optuna(study, runs_dir=tmp_path / "runs", trial_fn=interrupted)
    trial, retry = optuna_trials(study, tmp_path / "runs", "coarse")
    assert trial.state == TrialState.FAIL and trial.user_attrs["reason"] == "interrupted"
    assert retry.state == TrialState.WAITING and retry.user_attrs["retry_of"] == trial.number
    reports = run_optuna(study, runs_dir=tmp_path / "runs", trial_fn=run_trial)
    assert reports[0].counts.finished == 2 and reports[0].counts.interrupted == 1
    assert reports[0].trials[1]["params"] == trial.params  # the interrupted one, again


def test_a_sweep_killed_with_sigkill_resumes_to_the_exact_count(tmp_path: Path) -> None:
    stages = [
        {"name": "coarse", "sampler": "random", "trials": 3, "budget": {"steps": 20}},
        {"name": "fine", "sampler": "random", "trials": 3, "budget": {"steps": 60}},
    ]
    path = write_study(tmp_path, stages=stages)
    command = [sys.executable, "-m", "studies.cli", "sweep", str(path), "--json"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    trials_dir = tmp_path / "runs" / "tiny" / "trials"
    sweep = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    killed_in = None
    while time.monotonic() < deadline and sweep.poll() is None:
        # a fine trial mid-run: its folder has metrics but no result yet
        running = [
            d
            for d in trials_dir.glob("fine-*")
            if (d / "metrics.jsonl").exists() and not (d / "result.json").exists()
        ]
        if running:
            sweep.send_signal(signal.SIGKILL)
            killed_in = running[0].name
            break
        time.sleep(0.02)
    sweep.wait(timeout=30)
    assert killed_in is not None, (sweep.returncode, sweep.stderr.read() if sweep.stderr else "")
    assert sweep.returncode == -signal.SIGKILL
    study = load_study(path)
    runs = tmp_path / "runs"
    coarse_before = [(t.number, t.state, t.value) for t in optuna_trials(study, runs, "coarse")]
    assert [state for _, state, _ in coarse_before] == [TrialState.COMPLETE] * 3
    number = int(killed_in.split("-")[1])
    assert optuna_trials(study, runs, "fine")[number].state == TrialState.RUNNING

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["n_trials"] == 6 and summary["n_interrupted"] == 1
    assert [s["n_finished"] for s in summary["stages"]] == [3, 3]
    # finished trials were kept as they were; the interrupted one was failed and replaced
    assert [(t.number, t.state, t.value) for t in optuna_trials(study, runs, "coarse")] == (
        coarse_before
    )
    fine = optuna_trials(study, runs, "fine")
    assert fine[number].state == TrialState.FAIL
    assert fine[number].user_attrs["reason"] == "interrupted"
    assert finished(fine) == 3 and len(fine) == 4
    # the interrupted parameters ran again
    (retry,) = [t for t in fine if t.user_attrs.get("retry_of") == number]
    assert retry.state == TrialState.COMPLETE and retry.params == fine[number].params


def test_two_workers_on_a_journal_file_run_the_exact_count(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path, stages=one_stage(6, steps=30), workers=2))
    summary = run_sweep(study, runs_dir=tmp_path / "runs")
    assert summary["n_trials"] == 6
    trials = optuna_trials(study, tmp_path / "runs", "coarse")
    assert finished(trials) == 6
    workers = {str(t.user_attrs["worker"]).split(":")[1] for t in trials}
    assert str(os.getpid()) not in workers  # the trials ran in worker processes
    # a surplus ask (two workers racing for the last slot) is the only possible extra trial
    extra = [t for t in trials if trial_record(t, "")["state"] == "interrupted"]
    assert all(t.user_attrs.get("reason") == "surplus" for t in extra)


# ---------------------------------------------------------------------------------------------
# Heartbeats on RDB storage


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=needs_postgres)])
def test_a_crashed_workers_trial_is_failed_by_its_missing_heartbeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    monkeypatch.setattr(optuna_backend, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(optuna_backend, "GRACE_PERIOD_S", 2)
    url = f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite" else str(POSTGRES_URL)
    name = f"heartbeat-{uuid.uuid4().hex[:8]}"
    storage = open_storage(url)
    ostudy = optuna.create_study(study_name=name, storage=storage)
    try:
        # one on another machine that stopped beating, one alive that keeps beating
        space = {"optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
        crashed, alive = ostudy.ask(space), ostudy.ask(space)
        crashed.set_user_attr("worker", "another-host:4242:1")
        alive.set_user_attr("worker", "another-host:4343:1")
        storage.record_heartbeat(crashed._trial_id)  # type: ignore[attr-defined]
        with optuna_backend._heartbeat(ostudy, alive._trial_id):
            time.sleep(3.5)
            fail_interrupted_trials(ostudy)
        trials = ostudy.get_trials()
        assert [t.state for t in trials] == [
            TrialState.FAIL,
            TrialState.RUNNING,
            TrialState.WAITING,
        ]
        record = trial_record(trials[crashed.number], "coarse")
        assert record["state"] == "interrupted" and record["reason"] == "interrupted"
        # its parameters wait to run again
        assert trials[2].user_attrs["retry_of"] == crashed.number
        assert trials[2].system_attrs["fixed_params"] == trials[crashed.number].params
    finally:
        optuna.delete_study(study_name=name, storage=storage)


@needs_postgres
def test_a_sweep_on_postgresql(tmp_path: Path) -> None:
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    study = load_study(write_study(tmp_path, name=name, stages=one_stage(3), storage=POSTGRES_URL))
    try:
        summary = run_sweep(study, runs_dir=tmp_path / "runs")
        assert summary["n_trials"] == 3 and summary["best_value"] is not None
        assert summary["storage"] == mask_password(str(POSTGRES_URL)) != POSTGRES_URL
        assert [r.counts.finished for r in load_stage_reports(name, str(POSTGRES_URL))] == [3]
    finally:
        optuna.delete_study(study_name=f"{name}-coarse", storage=str(POSTGRES_URL))


def test_a_trials_numbers_are_read_from_one_attribute_or_from_the_old_separate_ones() -> None:
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    numbers = {
        "steps": 40,
        "flops": 2.5e9,
        "seconds": 0.7,
        "run_id": "abc",
        "budget": {"steps": 40},
    }
    for attrs in ({optuna_backend.OUTCOME_ATTR: numbers}, numbers):  # now, and before it
        trial = create_trial(
            value=1.5,
            params={"x": 0.1},
            distributions={"x": FloatDistribution(0.0, 1.0)},
            user_attrs=attrs,
        )
        record = trial_record(trial, "coarse")
        assert (record["steps"], record["flops"], record["run_id"]) == (40, 2.5e9, "abc")
        assert record["budget"] == {"steps": 40} and record["state"] == "complete"
