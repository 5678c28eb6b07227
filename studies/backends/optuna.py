"""The Optuna backend: stages as Optuna studies in one storage, trials by ask and tell.

Storage (`open_storage`): a path is a journal file (JournalStorage + JournalFileBackend; the
default is ``runs/<study>/optuna.journal``), good for several processes on one machine;
``sqlite:///file.db``; ``postgresql://`` or ``mysql://`` (RDB) for workers on several machines.

Stages: one Optuna study per stage, ``<study>-<stage>``, all in the same storage, because
changing the distributions inside one study degrades TPE and breaks CMA-ES. A stage's space,
narrowing notes and settings are kept in its study's user attrs, so a resumed sweep and every
worker use the same space. Earlier stages' *values* are not carried over: measured at a shorter
budget they would rank below every trial of the new one and mislead the sampler. Instead the
best earlier trials that lie inside the new space are enqueued (``enqueue_trial``) as the new
stage's first trials, and measured again at its budget.

Trials: ``study.ask()``, `studies.space.suggest`, `studies.objective.run_trial` with
``report = trial.report + trial.should_prune``, then ``study.tell`` COMPLETE with the value,
PRUNED, or FAIL; the user attr ``reason`` says why a trial was pruned or failed. Failed trials
(divergence, an exception, out of memory) are data: they count towards the stage's trials.

Counting and resuming: a stage is done when complete + pruned + failed trials reach its
``trials``. A trial whose process died (SIGKILL, a crashed worker, a lost machine) is failed
with reason ``interrupted`` and does not count, so another trial replaces it:

- every trial records its process (user attr ``worker``: host, pid, process start time); a
  RUNNING trial whose process on this machine is gone is failed at once;
- on RDB storage the workers also send heartbeats (``heartbeat_interval``); trials of other
  machines that miss them for `GRACE_PERIOD_S` are failed by `optuna.storages.fail_stale_trials`
  (they have no ``reason``, which reads as interrupted). A journal file is one machine's: a
  RUNNING trial of another host there is waited for;
- ^C fails the running trial as ``interrupted`` before the sweep stops.

An interrupted trial's parameters are enqueued again (user attr ``retry_of``), so the same
command after a SIGKILL keeps the finished trials, runs the interrupted ones again, and ends
with exactly the requested number. A worker that asks one trial too many (two asked at the
same moment for the last slot) fails it at once as ``surplus``, which does not count either.

Workers: ``workers=1`` runs trials in this process; N > 1 starts N processes (multiprocessing,
spawn), each asking until the stage is full; the parent shows progress, then opens the next
stage when the whole stage (other machines' trials included) has finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import multiprocessing
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studies.config import Direction, StageSpec, StudyConfig, mask_password
from studies.errors import StudyError
from studies.objective import TrialOutcome, trial_dir, trial_run_id
from studies.objectives import call_trial
from studies.records import (
    NullView,
    StageCounts,
    StageReport,
    SweepView,
    TrialRecord,
    count_trials,
)
from studies.records import trial_record as make_record
from studies.stage_plan import StagePlan, plan_stage, stage_report

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

    from studies.mlflow_study import StudyTracker

__all__ = [
    "GRACE_PERIOD_S",
    "HEARTBEAT_INTERVAL_S",
    "STAGE_ATTR",
    "check_storage",
    "fail_interrupted_trials",
    "load_stage_reports",
    "open_storage",
    "run_optuna",
    "stage_study_name",
    "study_exists",
    "trial_record",
]

HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 60
STAGE_ATTR = "scaleplan_stage"  # the stage's settings and space, on each stage's Optuna study
OUTCOME_ATTR = (
    "scaleplan_outcome"  # a trial's steps, tokens, FLOPs, seconds, out_dir, run id, budget
)
INTERRUPTED = "interrupted"
SURPLUS = "surplus"
CONNECT_TIMEOUT_S = 5.0
POLL_S = 0.5
NO_WORKER_ATTR_GRACE_S = 60.0  # a RUNNING trial that never said whose it is
# a worker round that finishes no trial and whose processes all fail: something is broken
MAX_BARREN_ROUNDS = 3

TrialFn = Callable[..., TrialOutcome]


# ---------------------------------------------------------------------------------------------
# Storage


def is_rdb(url: str) -> bool:
    """Whether a storage value is a database URL (else: a journal file path)."""
    return "://" in url


def open_storage(url: str) -> BaseStorage:
    """The Optuna storage a study's ``storage`` names; RDB storages send heartbeats."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not is_rdb(url):
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    database = sqlite_file(url)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=_engine_kwargs(url),
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=GRACE_PERIOD_S,
            heartbeat_stale_trial_callback=_retry_stale,
        )


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URL (``sqlite:////abs/path``); None otherwise."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").partition("?")[0]
    return Path(path) if path and path != ":memory:" else None


def _engine_kwargs(url: str) -> dict[str, Any]:
    scheme = url.partition("://")[0].split("+")[0].lower()
    if scheme == "sqlite":
        return {"connect_args": {"timeout": 60}}  # several workers wait for the write lock
    if scheme == "postgresql":
        return {"connect_args": {"connect_timeout": int(CONNECT_TIMEOUT_S)}, "pool_pre_ping": True}
    if scheme == "mysql":
        return {"connect_args": {"connect_timeout": int(CONNECT_TIMEOUT_S)}, "pool_pre_ping": True}
    return {}


def check_storage(url: str) -> None:
    """Open the storage once; StudyError ``storage: URL unreachable (why)`` when it cannot be.

    A database server gets `CONNECT_TIMEOUT_S` to answer (in a thread, so a firewall that drops
    packets does not hang the sweep); a journal file's folder must be creatable.
    """
    shown = mask_password(url)
    if not is_rdb(url):
        path = Path(url)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StudyError(
                f"storage: {shown}: cannot create its folder ({error.strerror})"
            ) from None
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise StudyError(f"storage: {shown} is not readable and writable")
        try:
            open_storage(url)
        except Exception as error:
            raise StudyError(
                f"storage: {shown} is not an Optuna journal ({_reason(error)})"
            ) from None
        return
    problem = _connect_problem(url)
    if problem is not None:
        raise StudyError(f"storage: {shown} unreachable ({problem})")
    try:
        open_storage(url)
    except Exception as error:
        raise StudyError(f"storage: {shown} unusable ({_reason(error)})") from None


def _connect_problem(url: str) -> str | None:
    """None when one connection opens within CONNECT_TIMEOUT_S, else why not."""
    answer: list[str | None] = []

    def connect() -> None:
        try:
            import sqlalchemy

            engine = sqlalchemy.create_engine(
                url, poolclass=sqlalchemy.pool.NullPool, **_engine_kwargs(url)
            )
            try:
                with engine.connect():
                    pass
            finally:
                engine.dispose()
            answer.append(None)
        except ModuleNotFoundError as error:
            answer.append(f"the database driver '{error.name}' is not installed")
        except Exception as error:
            answer.append(_reason(error))

    thread = threading.Thread(target=connect, name="scaleplan-storage-check", daemon=True)
    thread.start()
    thread.join(CONNECT_TIMEOUT_S + 1.0)
    if not answer:
        return f"no answer within {CONNECT_TIMEOUT_S:.0f} s"
    return answer[0]


def stage_study_name(study_name: str, stage: str) -> str:
    return f"{study_name}-{stage}"


def study_exists(study: StudyConfig, runs_dir: str | Path = "runs") -> bool:
    """Whether the storage already holds this study's first stage (a resumed sweep)."""
    url = study.resolved_storage(runs_dir)
    if not is_rdb(url) and not Path(url).exists():
        return False
    storage = open_storage(url)
    try:
        storage.get_study_id_from_name(stage_study_name(study.name, study.stages[0].name))
    except KeyError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Trials as records, counting, interrupted trials


def _state(trial: FrozenTrial) -> tuple[Any, str | None]:
    """(the record's state, its reason): a failed trial without a reason, or one to be run
    again, was interrupted."""
    from optuna.trial import TrialState

    state: Any = {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }.get(trial.state, "failed")
    reason = trial.user_attrs.get("reason")
    if trial.state == TrialState.FAIL and (reason is None or trial.user_attrs.get("retried")):
        return INTERRUPTED, reason or INTERRUPTED
    return state, reason


def trial_record(trial: FrozenTrial, stage: str) -> TrialRecord:
    """An Optuna trial as the backend-independent `studies.records.TrialRecord`."""

    # studies written before the outcome attribute kept each number as its own attribute
    attrs = {**trial.user_attrs, **trial.user_attrs.get(OUTCOME_ATTR, {})}
    state, reason = _state(trial)
    return make_record(
        number=trial.number,
        stage=stage,
        state=state,
        value=trial.value if state == "complete" else None,
        params=trial.params,
        intermediate=sorted(trial.intermediate_values.items()),
        reason=reason,
        budget=attrs.get("budget"),
        steps=attrs.get("steps"),
        tokens=attrs.get("tokens"),
        flops=attrs.get("flops"),
        seconds=attrs.get("seconds"),
        params_count=attrs.get("params_count"),
        out_dir=attrs.get("out_dir"),
        run_id=attrs.get("run_id"),
        started=trial.datetime_start.isoformat() if trial.datetime_start else None,
    )


def _stage_records(ostudy: optuna.Study, stage: str) -> list[TrialRecord]:
    return [trial_record(t, stage) for t in ostudy.get_trials(deepcopy=False)]


def fail_interrupted_trials(ostudy: optuna.Study) -> list[FrozenTrial]:
    """Fail the RUNNING trials whose process is gone (reason ``interrupted``); returns them.

    On RDB storage, Optuna's heartbeat check fails those of other machines too.
    """
    from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ExperimentalWarning)
        fail_stale_trials(ostudy)
    storage = ostudy._storage
    now = dt.datetime.now()
    failed = []
    for trial in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker is not None:
            gone = _process_gone(str(worker))
        else:  # asked, then the process died before saying whose it is
            started = trial.datetime_start or now
            gone = (now - started).total_seconds() > NO_WORKER_ATTR_GRACE_S
        if not gone:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "reason", INTERRUPTED)
            storage.set_trial_user_attr(trial._trial_id, "retried", True)
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # it finished (or another process failed it) in the meantime
        _retry(ostudy, trial)
        failed.append(storage.get_trial(trial._trial_id))
    return failed


def _retry(ostudy: optuna.Study, trial: FrozenTrial) -> None:
    """Run an interrupted trial's parameters again: a WAITING copy the next ask takes."""
    if trial.params:
        ostudy.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number})


def _retry_stale(ostudy: optuna.Study, trial: FrozenTrial) -> None:
    """RDB heartbeat callback: a trial another machine stopped beating for is retried."""
    _retry(ostudy, trial)


def _process_token() -> str:
    """``host:pid:start``: a process, even after its pid is reused."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or ''}"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of stat, after pid and comm


def _process_gone(token: str) -> bool:
    """Whether the process a worker token names has ended; False when it cannot be told
    (another machine: its heartbeats decide)."""
    host, _, rest = token.partition(":")
    pid_text, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    stat_path = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        if stat_path.read_text().rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
            return True  # killed, not yet reaped
    return bool(started) and _start_time(pid) not in (None, started)


# ---------------------------------------------------------------------------------------------
# Stages


@dataclass(frozen=True)
class _Stage:
    """What a worker needs to run trials of one stage (picklable, for spawned workers)."""

    study: StudyConfig
    plan: StagePlan
    storage_url: str
    runs_dir: Path
    parent_run_id: str | None
    trial_fn: TrialFn | None
    worker: int = 0
    n_workers: int = 1

    @property
    def spec(self) -> StageSpec:
        return self.plan.stage

    @property
    def optuna_name(self) -> str:
        return stage_study_name(self.study.name, self.spec.name)


def _sampler(ctx: _Stage) -> optuna.samplers.BaseSampler:
    from studies.stages import make_sampler

    plan = ctx.plan
    seed = plan.sampler_seed
    if plan.stage.sampler != "sobol":  # Sobol workers must share the sequence; others must not
        seed += 7919 * ctx.worker
    return make_sampler(plan.stage.sampler, seed, plan.space, startup_trials=plan.startup_trials)


def _load_stage(ctx: _Stage, storage: BaseStorage) -> optuna.Study:
    import optuna

    ostudy = optuna.load_study(study_name=ctx.optuna_name, storage=storage)
    _configure(ctx, ostudy)
    return ostudy


def _configure(ctx: _Stage, ostudy: optuna.Study) -> None:
    """This process's sampler and pruner for the stage (Optuna keeps neither in storage)."""
    from studies.stages import make_pruner

    ostudy.sampler = _sampler(ctx)
    ostudy.pruner = make_pruner(ctx.spec.pruner, max_resource=ctx.plan.budget_steps or None)


def _open_stage(
    study: StudyConfig,
    index: int,
    url: str,
    storage: BaseStorage,
    earlier: list[StageReport],
    direction: Direction,
) -> tuple[optuna.Study, StagePlan]:
    """The stage's Optuna study and plan: created with its (narrowed) space and warm starts
    the first time, loaded as it is afterwards."""
    import optuna

    ostudy = optuna.create_study(
        study_name=stage_study_name(study.name, study.stages[index].name),
        storage=storage,
        direction=direction,
        load_if_exists=True,
    )
    stored = ostudy.user_attrs.get(STAGE_ATTR)
    plan = plan_stage(study, index, earlier, stored, where=mask_password(url))
    if not plan.resumed:
        ostudy.set_user_attr(STAGE_ATTR, plan.meta)
        for params in plan.warm_starts:
            ostudy.enqueue_trial(params, user_attrs={"warm_start": True}, skip_if_exists=True)
    return ostudy, plan


def _stage_report(ostudy: optuna.Study, ctx: _Stage) -> StageReport:
    return stage_report(ctx.plan.meta, _stage_records(ostudy, ctx.plan.stage.name))


# ---------------------------------------------------------------------------------------------
# The sweep


def run_optuna(
    study: StudyConfig,
    *,
    runs_dir: str | Path = "runs",
    workers: int | None = None,
    view: SweepView | None = None,
    tracker: StudyTracker | None = None,
    trial_fn: TrialFn | None = None,
) -> list[StageReport]:
    """Run every stage of `study` on its Optuna storage (resuming what is there already).

    `workers` processes run trials at once (None: the study's ``workers``; 1: in this
    process). `trial_fn` replaces the study's objective (`studies.objectives.run_objective`,
    same signature).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    view = view or NullView()
    runs = Path(runs_dir)
    url = study.resolved_storage(runs)
    storage = open_storage(url)
    direction: Direction = study.objective.direction or "minimize"
    parent_run_id = tracker.parent_run_id if tracker is not None else None
    n_workers = workers or study.workers
    reports: list[StageReport] = []
    for index, stage in enumerate(study.stages):
        ostudy, plan = _open_stage(study, index, url, storage, reports, direction)
        ctx = _Stage(study, plan, url, runs, parent_run_id, trial_fn)
        _configure(ctx, ostudy)
        view.stage_started(stage, index, plan.space, plan.notes)
        _run_stage(ctx, ostudy, n_workers, view, tracker)
        report = _stage_report(ostudy, ctx)
        view.stage_finished(report)
        reports.append(report)
    return reports


def _run_stage(
    ctx: _Stage,
    ostudy: optuna.Study,
    n_workers: int,
    view: SweepView,
    tracker: StudyTracker | None,
) -> None:
    """Until the stage's finished trials reach its count and none is running anywhere."""
    target = ctx.spec.trials
    barren = 0
    while True:
        _record_interrupted(ctx, fail_interrupted_trials(ostudy), tracker)
        counts = _counts(ostudy, ctx)
        view.progress(ctx.spec.name, counts)
        if counts.finished >= target and counts.running == 0:
            return
        if counts.finished + counts.running >= target:
            time.sleep(POLL_S)  # the last trials run elsewhere: wait for them
            continue
        before = counts.finished
        if n_workers <= 1:
            _work(ctx, ostudy, tracker, lambda c: view.progress(ctx.spec.name, c))
        else:
            _spawn_workers(ctx, ostudy, n_workers, view)
        if _counts(ostudy, ctx).finished == before:
            barren += 1
            if barren >= MAX_BARREN_ROUNDS:
                raise RuntimeError(
                    f"stage {ctx.spec.name}: {MAX_BARREN_ROUNDS} rounds of workers finished no "
                    "trial; see the errors above"
                )
        else:
            barren = 0


def _counts(ostudy: optuna.Study, ctx: _Stage) -> StageCounts:
    # only what counting needs: this runs twice a trial, over every trial of the stage
    states = [
        {"state": _state(t)[0], "value": t.value, "number": t.number}
        for t in ostudy.get_trials(deepcopy=False)
    ]
    return count_trials(states, ctx.spec.trials, ctx.study.objective.direction or "minimize")


def _record_interrupted(
    ctx: _Stage, trials: list[FrozenTrial], tracker: StudyTracker | None
) -> None:
    """Interrupted trials' MLflow runs are ended as failed, reason "interrupted"."""
    if tracker is None or not trials:
        return
    for trial in trials:
        trial_id = f"{ctx.spec.name}-{trial.number}"
        out_dir = trial_dir(ctx.study, trial_id, ctx.runs_dir)
        run_id = trial_run_id(out_dir)
        outcome = TrialOutcome(
            "failed",
            None,
            INTERRUPTED,
            steps=max(trial.intermediate_values, default=0),
            intermediate=sorted(trial.intermediate_values.items()),
            run_id=run_id,
            out_dir=str(out_dir),
        )
        tracker.record_trial(outcome, number=trial.number, stage=ctx.spec.name, params=trial.params)


def _work(
    ctx: _Stage,
    ostudy: optuna.Study,
    tracker: StudyTracker | None,
    on_trial: Callable[[StageCounts], None] | None = None,
) -> None:
    """Ask, run, tell until the stage has its trials (counting those running elsewhere)."""
    from optuna.trial import TrialState

    from studies.space import suggest

    space = ctx.plan.space
    token = _process_token()
    target = ctx.spec.trials
    while True:
        counts = _counts(ostudy, ctx)
        if counts.finished + counts.running >= target:
            return
        with warnings.catch_warnings():
            # ask/tell with heartbeats is what we mean: the beats come from _heartbeat
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            trial = ostudy.ask()
        trial.set_user_attr("worker", token)
        if _is_surplus(ostudy, trial.number, target):
            trial.set_user_attr("reason", SURPLUS)
            trial.set_user_attr("retried", True)
            ostudy.tell(trial, state=TrialState.FAIL)
            return
        try:
            with _heartbeat(ostudy, trial._trial_id):
                params = suggest(trial, space)
                outcome = _run_one(ctx, trial, params)
        except KeyboardInterrupt:
            trial.set_user_attr("reason", INTERRUPTED)
            trial.set_user_attr("retried", True)
            ostudy.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            _retry(ostudy, ostudy._storage.get_trial(trial._trial_id))
            raise
        except Exception as error:  # the sampler or suggest failed: this trial, not the study
            params = dict(trial.params)
            outcome = TrialOutcome(
                "failed",
                None,
                f"{type(error).__name__}: {error}".splitlines()[0],
                steps=0,
                out_dir=str(trial_dir(ctx.study, f"{ctx.spec.name}-{trial.number}", ctx.runs_dir)),
            )
        _tell(ctx, ostudy, trial, outcome)
        if tracker is not None:
            tracker.record_trial(outcome, number=trial.number, stage=ctx.spec.name, params=params)
        if on_trial is not None:
            on_trial(_counts(ostudy, ctx))


def _run_one(ctx: _Stage, trial: optuna.Trial, params: dict[str, Any]) -> TrialOutcome:
    def report(step: int, value: float) -> bool:
        trial.report(value, step)
        return trial.should_prune()

    return call_trial(
        ctx.trial_fn,
        ctx.study,
        ctx.spec,
        params,
        number=trial.number,
        report=report,
        parent_run_id=ctx.parent_run_id,
        runs_dir=ctx.runs_dir,
    )


def _tell(ctx: _Stage, ostudy: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome) -> None:
    from optuna.trial import TrialState

    # one attribute for the outcome's numbers: each set_user_attr is a storage write
    result = {
        "steps": outcome.steps,
        "tokens": outcome.tokens,
        "flops": outcome.flops,
        "seconds": outcome.seconds,
        "params_count": outcome.params_count,
        "out_dir": outcome.out_dir,
        "run_id": outcome.run_id,
        "budget": ctx.spec.budget.as_written(),
    }
    trial.set_user_attr(OUTCOME_ATTR, {k: v for k, v in result.items() if v is not None})
    if outcome.reason is not None:
        trial.set_user_attr("reason", outcome.reason)
    if outcome.state == "complete" and outcome.value is not None and math.isfinite(outcome.value):
        ostudy.tell(trial, outcome.value)
    elif outcome.state == "pruned":
        ostudy.tell(trial, state=TrialState.PRUNED)
    else:
        if outcome.reason is None:
            trial.set_user_attr("reason", "failed")
        ostudy.tell(trial, state=TrialState.FAIL)


def _is_surplus(ostudy: optuna.Study, number: int, target: int) -> bool:
    """Whether `target` counting or running trials came before this one (another worker
    asked for the same last slot)."""
    ahead = 0
    for record in _stage_records(ostudy, ""):
        if record["number"] < number and record["state"] in (
            "complete",
            "pruned",
            "failed",
            "running",
        ):
            ahead += 1
    return ahead >= target


@contextlib.contextmanager
def _heartbeat(ostudy: optuna.Study, trial_id: int) -> Iterator[None]:
    """Heartbeats for a running trial on storages that have them (RDB)."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    storage = ostudy._storage
    if not isinstance(storage, BaseHeartbeat) or not is_heartbeat_enabled(storage):
        yield
        return
    stop = threading.Event()
    interval = storage.get_heartbeat_interval() or HEARTBEAT_INTERVAL_S

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is not the trial's failure
                storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="scaleplan-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5.0)


# ---------------------------------------------------------------------------------------------
# Worker processes


def _spawn_workers(ctx: _Stage, ostudy: optuna.Study, n_workers: int, view: SweepView) -> None:
    """N processes work on the stage; this one shows progress until they are done."""
    spawn = multiprocessing.get_context("spawn")
    processes = [
        spawn.Process(
            target=_worker_main,
            args=(_with_worker(ctx, worker, n_workers),),
            name=f"scaleplan-worker-{worker}",
            daemon=False,
        )
        for worker in range(n_workers)
    ]
    for process in processes:
        process.start()
    try:
        while any(process.is_alive() for process in processes):
            view.progress(ctx.spec.name, _counts(ostudy, ctx))
            for process in processes:
                process.join(timeout=POLL_S / n_workers)
    except KeyboardInterrupt:
        # the workers got the same ^C: they fail their trials as interrupted and stop
        for process in processes:
            process.join(timeout=10)
        raise
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
    failed = [p.exitcode for p in processes if p.exitcode not in (0, None)]
    if failed:
        view.message(f"stage {ctx.spec.name}: {len(failed)} worker(s) exited with {failed}")


def _with_worker(ctx: _Stage, worker: int, n_workers: int) -> _Stage:
    return dataclasses.replace(ctx, worker=worker, n_workers=n_workers)


def _worker_main(ctx: _Stage) -> None:
    """A worker process: its own storage connection, sampler and MLflow client."""
    import optuna

    _die_with_parent()
    _share_cores(ctx.n_workers)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(ctx.storage_url)
    ostudy = _load_stage(ctx, storage)
    tracker = None
    if ctx.parent_run_id is not None:
        from studies.mlflow_study import StudyTracker

        tracker = StudyTracker(ctx.study, resume=True, runs_dir=ctx.runs_dir)
    with contextlib.suppress(KeyboardInterrupt):  # the trial is already failed as interrupted
        _work(ctx, ostudy, tracker)


def _share_cores(n_workers: int) -> None:
    """N workers on one machine split its cores (unless OMP_NUM_THREADS says otherwise)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, n_workers)))


def _die_with_parent() -> None:
    """Linux: this worker gets SIGKILL when the sweep process dies (kill -9 included)."""
    import signal

    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


# ---------------------------------------------------------------------------------------------
# Reading a study back (scaleplan study show | best | export)


def load_stage_reports(name: str, storage_url: str) -> list[StageReport]:
    """The stages of study `name` in a storage, in order, without the study file."""
    import optuna

    # reading never creates a storage: a missing journal or SQLite file is the user's mistake
    path = Path(storage_url) if not is_rdb(storage_url) else sqlite_file(storage_url)
    if path is not None and not path.exists():
        raise StudyError(f"study: no storage at {storage_url}; run `scaleplan sweep` first")
    storage = open_storage(storage_url)
    found: list[tuple[int, optuna.Study, dict[str, Any]]] = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        meta = summary.user_attrs.get(STAGE_ATTR)
        if not isinstance(meta, dict) or meta.get("study") != name:
            continue
        ostudy = optuna.load_study(study_name=summary.study_name, storage=storage)
        found.append((int(meta.get("index", 0)), ostudy, meta))
    if not found:
        names = sorted(
            {
                str(s.user_attrs[STAGE_ATTR].get("study"))
                for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
                if isinstance(s.user_attrs.get(STAGE_ATTR), dict)
            }
        )
        known = f"; studies there: {', '.join(names)}" if names else ""
        raise StudyError(f"study: no study '{name}' in {mask_password(storage_url)}{known}")
    reports = []
    for _, ostudy, meta in sorted(found, key=lambda item: item[0]):
        reports.append(stage_report(meta, _stage_records(ostudy, str(meta.get("stage")))))
    return reports


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    line = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."


class OptunaBackend:
    """The `studies.backends.Backend` on Optuna."""

    name = "optuna"

    def preflight(self, study: StudyConfig, runs_dir: Path, ray_address: str | None) -> None:
        check_storage(study.resolved_storage(runs_dir))

    def study_exists(self, study: StudyConfig, runs_dir: Path) -> bool:
        return study_exists(study, runs_dir)

    def run(
        self,
        study: StudyConfig,
        *,
        runs_dir: Path,
        view: SweepView,
        tracker: StudyTracker | None,
        ray_address: str | None,
        trial_fn: TrialFn | None,
    ) -> list[StageReport]:
        return run_optuna(study, runs_dir=runs_dir, view=view, tracker=tracker, trial_fn=trial_fn)

    def load_reports(self, name: str, storage: str) -> list[StageReport]:
        return load_stage_reports(name, storage)


BACKEND = OptunaBackend()
