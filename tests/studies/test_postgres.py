"""Optuna's RDB storage on a real PostgreSQL server: the storage a multi-machine sweep uses.

`.ci/run` starts a throwaway server and sets SCALEPLAN_TEST_POSTGRES_URL
(``postgresql+psycopg://user:password@127.0.0.1:PORT/db``); without it these tests skip.
They use Optuna directly, so they hold whatever backend drives the storage: several workers
share one study, and a worker killed mid-trial has its trial failed by the heartbeat and
retried with the same parameters.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator

import optuna
import pytest
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from studies.errors import StudyError
from studies.mlflow_study import check_tracking_uri

POSTGRES_URL = os.environ.get("SCALEPLAN_TEST_POSTGRES_URL")
pytestmark = [
    pytest.mark.skipif(
        not POSTGRES_URL, reason="SCALEPLAN_TEST_POSTGRES_URL not set (no PostgreSQL server)"
    ),
    # heartbeats and their callbacks are marked experimental in Optuna
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
]
HEARTBEAT_S = 1
GRACE_S = 2


@pytest.fixture
def study_name() -> Iterator[str]:
    """A fresh study name, deleted from the server afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    assert POSTGRES_URL is not None
    storage = RDBStorage(POSTGRES_URL)
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        pass
    finally:
        storage.remove_session()
        storage.engine.dispose()


def heartbeat_storage() -> RDBStorage:
    assert POSTGRES_URL is not None
    return RDBStorage(
        POSTGRES_URL,
        heartbeat_interval=HEARTBEAT_S,
        grace_period=GRACE_S,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
    )


def test_two_workers_share_one_study_through_postgres(study_name: str) -> None:
    """Two storage connections (two workers) ask and tell on one study; each sees all trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    assert POSTGRES_URL is not None
    workers = [
        optuna.create_study(
            study_name=study_name,
            storage=RDBStorage(POSTGRES_URL),
            load_if_exists=True,
            sampler=optuna.samplers.RandomSampler(seed=seed),
        )
        for seed in (0, 1)
    ]
    for _ in range(3):
        for worker in workers:
            trial = worker.ask()
            x = trial.suggest_float("x", -1.0, 1.0)
            trial.report(x * x + 1.0, step=1)
            worker.tell(trial, x * x)
    for worker in workers:
        trials = worker.get_trials(states=(TrialState.COMPLETE,))
        assert [t.number for t in trials] == list(range(6))
        assert worker.best_value == pytest.approx(min(t.params["x"] ** 2 for t in trials))
        first = trials[0]
        assert first.value is not None
        assert first.intermediate_values == {1: pytest.approx(first.value + 1.0)}


def test_killed_worker_trial_is_failed_by_heartbeat_and_retried(study_name: str) -> None:
    """A worker SIGKILLed mid-trial leaves a RUNNING trial; once its heartbeat is older than
    the grace period, fail_stale_trials fails it and the retry callback enqueues the same
    parameters, which the next worker's optimize picks up first."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    worker = textwrap.dedent(
        f"""
        import sys, time
        import optuna
        from optuna.storages import RDBStorage
        storage = RDBStorage(sys.argv[1], heartbeat_interval={HEARTBEAT_S},
                             grace_period={GRACE_S})
        study = optuna.load_study(study_name=sys.argv[2], storage=storage)

        def objective(trial):
            trial.suggest_float("x", -1.0, 1.0)
            # Optuna fails only trials that have a heartbeat row: let the heartbeat
            # thread write its first beats before saying the trial is running.
            time.sleep({3 * HEARTBEAT_S})
            print("running", flush=True)
            time.sleep(120)  # killed long before
            return 0.0

        study.optimize(objective, n_trials=1)
        """
    )
    study = optuna.create_study(study_name=study_name, storage=heartbeat_storage())
    study.enqueue_trial({"x": 0.25})
    assert POSTGRES_URL is not None
    process = subprocess.Popen(
        [sys.executable, "-c", worker, POSTGRES_URL, study_name],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "running"  # the trial is RUNNING now
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # a crash: no tell, no heartbeat any more
        process.wait(30)
    running = study.get_trials(states=(TrialState.RUNNING,))
    assert [t.params for t in running] == [{"x": 0.25}]

    fail_stale_trials(study)  # the heartbeat is still fresh: nothing happens
    assert study.get_trials(states=(TrialState.RUNNING,))
    deadline = time.monotonic() + 20
    while study.get_trials(states=(TrialState.RUNNING,)) and time.monotonic() < deadline:
        time.sleep(0.5)
        fail_stale_trials(study)

    crashed = study.trials[0]
    assert crashed.state == TrialState.FAIL
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].params == {"x": 0.25}
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(waiting[0]) == crashed.number

    # the next worker runs the retry first, with the crashed trial's parameters
    study.optimize(lambda trial: trial.suggest_float("x", -1.0, 1.0) ** 2, n_trials=1)
    retried = study.get_trials(states=(TrialState.COMPLETE,))
    assert [(t.params, t.value) for t in retried] == [({"x": 0.25}, pytest.approx(0.0625))]


def test_tracking_uri_check_connects_to_postgres() -> None:
    """MLflow can track to PostgreSQL too: the pre-flight check opens a connection, and names
    the field (without the password) when nothing answers."""
    assert POSTGRES_URL is not None
    check_tracking_uri(POSTGRES_URL)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    wrong = re.sub(r"@127\.0\.0\.1:\d+/", f"@127.0.0.1:{closed_port}/", POSTGRES_URL)
    start = time.monotonic()
    with pytest.raises(StudyError, match=r"^tracking_uri: \S+ unreachable \(") as error:
        check_tracking_uri(wrong)
    assert time.monotonic() - start < 3.5
    password = re.search(r"://[^:]*:([^@]*)@", POSTGRES_URL)
    assert password is None or password.group(1) not in str(error.value)
