"""The Ray Tune backend: each stage is a Tune experiment; Optuna's samplers choose, Tune stops.

The same study file as the Optuna backend, run by Ray Tune on a local Ray (started here, sized
by the study's ``ray`` block) or a cluster (``--ray-address host:6379``):

- Search: `OptunaSearch` with the stage's sampler (`studies.stages.make_sampler`) over the
  stage's space, define-by-run so conditions stay exact, behind a `ConcurrencyLimiter` of
  ``workers`` trials. A stage with ``narrow`` gets its space from the stage before it
  (`studies.stages.narrow_space`), and the best earlier trials inside it run first
  (``points_to_evaluate``). Trials are numbered by their Optuna trial number, so their folders
  are ``runs/<study>/trials/<stage>-<number>`` as with the Optuna backend.
- Stopping: OptunaSearch always uses Optuna's no-op pruner, so a Tune scheduler does it, on
  the trainer step: asha -> `ASHAScheduler`; hyperband -> ASHA with several brackets (the
  asynchronous Hyperband; Ray's `HyperBandScheduler` pauses trials, which a trainable without
  checkpoints cannot resume); median -> `MedianStoppingRule` (never pausing); none -> FIFO;
  pbt -> Population Based Training (below).
- A trial: a function trainable that calls `studies.objective.run_trial`; each evaluation is
  ``tune.report({"objective", "step"})``. A scheduler stops a trial by raising `SystemExit`
  inside that call: the trial's `report` then answers True, the trainer stops cleanly and the
  trial is *pruned*. A trial that finishes reports its outcome once more (state, value,
  reason; no ``step``, so the schedulers ignore it).
- Resources: ``ray.cpus_per_trial`` and ``ray.gpus_per_trial`` (a fraction shares a GPU) via
  `tune.with_resources`. Actors are reused between trials (a new worker process per trial
  costs about 2 s on 2 CPU cores; a reused one about 0.03 s).
- Failures are data: a trial whose run_trial says failed (divergence, an exception, out of
  memory) or that dies in Ray itself (a crashed worker: ``FailureConfig(max_failures=0)``) is
  a failed trial with its reason, and the study goes on.
- Resume: Tune saves the experiment every second, through a filesystem whose files appear
  whole or not at all; the same command after a kill or ^C restores each unfinished stage
  (`Tuner.restore`), keeps its finished and failed trials, runs the ones that were running
  again (their earlier MLflow runs are ended as interrupted) and ends with exactly the
  requested number. A stage's settings are kept beside it (``scaleplan_stage.json``); a
  changed space, budget or trial count is an error, as with the Optuna backend.
- MLflow: the driver's `StudyTracker` parent run; trials in Ray worker processes nest their
  child runs through `parent_run_id` and the study's absolute tracking URI; after each stage
  the driver tags each trial's run with its state, reason and params (`record_trial`).
- Reading back: a finished stage's trial records go into its ``scaleplan_stage.json``, so
  `studies.backends.ray.records.load_stage_reports` (``scaleplan study show|best|export``)
  reads a Ray study without Ray.

On a cluster, every node needs scaleplan installed (and a custom `trial_fn` importable) and
the storage must be shared (NFS, or ``storage: s3://...``); so should ``runs_dir`` (the trial
folders).

Ray is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studies.backends.ray.adapters import LIVE, make_scheduler, storage_filesystem, tune_classes
from studies.backends.ray.pbt import (
    KEEP_PBT_CHECKPOINTS,
    check_pbt,
    run_pbt_trial,
)
from studies.backends.ray.records import (
    NUMBER_KEY,
    check_saved_state,
    final_metrics,
    normal_storage,
    one_line,
    read_meta,
    trial_outcome,
    trial_record,
    tune_trials,
    write_meta,
)
from studies.backends.ray.train import run_train_trial
from studies.backends.ray.trial import TrialContext, TrialFn, end_interrupted_run
from studies.config import RayOptions, StageSpec, StudyConfig
from studies.errors import StudyError
from studies.objective import TrialOutcome
from studies.objectives import call_trial
from studies.records import NullView, StageCounts, StageReport, SweepView, count_trials
from studies.space import active_params
from studies.stage_plan import StagePlan, plan_stage, stage_report

if TYPE_CHECKING:
    from studies.mlflow_study import StudyTracker

__all__ = [
    "check_ray_address",
    "experiment_name",
    "run_ray",
    "trial_resources",
]

# a reused actor waits this long for a stopped trial to finish writing before the next trial
REUSE_WAIT_S = 120
# Tune saves the experiment (trial states, searcher) at most this often: a killed sweep runs
# again only the trials that finished in the last second
SAVE_PERIOD_S = 1


# ---------------------------------------------------------------------------------------------
# Settings


def experiment_name(study: StudyConfig, stage: StageSpec) -> str:
    """``<study>-<stage>``: the Tune experiment's folder under the storage."""
    return f"{study.name}-{stage.name}"


def trial_resources(study: StudyConfig) -> dict[str, float]:
    """What each trial reserves: ``{"cpu": c, "gpu": g}`` (gpu left out when 0). A trial of
    several Ray Train workers reserves nothing itself (its function only drives the
    TorchTrainer); its workers reserve theirs (`worker_resources`)."""
    options = study.ray or RayOptions()
    if options.workers_per_trial > 1:
        return {"cpu": DRIVER_CPU}
    resources = {"cpu": float(options.cpus_per_trial)}
    if options.gpus_per_trial > 0:
        resources["gpu"] = float(options.gpus_per_trial)
    return resources


# what the Tune function of a Ray Train trial reserves (Ray refuses nothing): it only waits for
# its workers. A local Ray gets one logical CPU more for these.
DRIVER_CPU = 0.01


def worker_resources(study: StudyConfig) -> dict[str, float]:
    """What all of one trial's Ray Train workers reserve together (``{"cpu", "gpu"}``)."""
    options = study.ray or RayOptions()
    workers = options.workers_per_trial
    return {"cpu": workers * options.cpus_per_worker, "gpu": workers * options.gpus_per_worker}


# ---------------------------------------------------------------------------------------------
# The sweep


# ---------------------------------------------------------------------------------------------
# The sweep


def run_ray(
    study: StudyConfig,
    *,
    runs_dir: str | Path = "runs",
    workers: int | None = None,
    view: SweepView | None = None,
    tracker: StudyTracker | None = None,
    ray_address: str | None = None,
    trial_fn: TrialFn | None = None,
) -> list[StageReport]:
    """Run every stage of `study` as a Ray Tune experiment (restoring unfinished ones).

    `workers` trials run at once (None: the study's ``workers``), each reserving the study's
    ``ray`` resources. `ray_address` connects to a running cluster; None starts a local Ray
    (``ray.num_cpus`` / ``ray.num_gpus``) and shuts it down at the end. `trial_fn` replaces
    `studies.objective.run_trial` (same signature; it must be importable by the workers).
    """
    import optuna

    view = view or NullView()
    runs = Path(runs_dir).absolute()
    storage = _storage(study, runs)
    for index in range(len(study.stages)):
        check_pbt(study, index, trial_fn)
    started = _start_ray(study, ray_address)
    previous_level = optuna.logging.get_verbosity()
    # a failed trial reaches Optuna as NaN: it records FAIL, and says so at WARNING level
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        if ray_address and "://" not in storage:
            view.message(
                f"storage {storage} is a local folder: on a cluster of several machines use "
                "shared storage (NFS, or s3:// / gs://)"
            )
        reports: list[StageReport] = []
        for index in range(len(study.stages)):
            report = _run_stage(
                study,
                index,
                list(reports),
                storage=storage,
                runs_dir=runs,
                workers=workers or study.workers,
                view=view,
                tracker=tracker,
                trial_fn=trial_fn,
            )
            reports.append(report)
        return reports
    finally:
        optuna.logging.set_verbosity(previous_level)
        if started:
            import ray

            ray.shutdown()


def _storage(study: StudyConfig, runs_dir: Path) -> str:
    """The study's Tune storage: a URI, or an absolute folder (default runs/<study>/ray)."""
    return normal_storage(study.resolved_storage(runs_dir))


CONNECT_TIMEOUT_S = 5.0  # a cluster's address gets this long to accept a connection


def check_ray_address(ray_address: str | None) -> str | None:
    """The cluster to connect to (`ray_address`, else $RAY_ADDRESS; None: a local Ray), which
    must answer before anything starts: `ray.init` on an address that does not waits minutes
    for its GCS. ``host:port`` or ``ray://host:port``; ``auto``/``local`` are Ray's to resolve."""
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if not address or address in ("auto", "local"):
        return address
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise StudyError(f"ray_address: '{address}' is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise StudyError(f"ray_address: {address} unreachable ({reason})") from None
    return address


def _start_ray(study: StudyConfig, ray_address: str | None) -> bool:
    """Connect to `ray_address`, or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    options = study.ray or RayOptions()
    address = check_ray_address(ray_address)
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
    }
    if address:
        kwargs["address"] = address
    else:
        num_cpus = options.num_cpus
        if options.workers_per_trial > 1:  # one logical CPU more, for the trial drivers
            num_cpus = (num_cpus or os.cpu_count() or 1) + 1
        kwargs.update(num_cpus=num_cpus, num_gpus=options.num_gpus)
    try:
        ray.init(**kwargs)
    except Exception as error:
        where = f"ray_address: {address}" if address else "ray: the local Ray"
        raise StudyError(f"{where} could not be started or reached ({one_line(error)})") from None
    try:
        _check_resources(study, ray.cluster_resources(), local=not address)
    except BaseException:
        ray.shutdown()
        raise
    return True


def _check_resources(study: StudyConfig, available: Mapping[str, float], local: bool) -> None:
    """A trial that asks for more than the whole (local) Ray has would wait forever."""
    if not local:  # a cluster may add nodes on demand
        return
    options = study.ray or RayOptions()
    if options.workers_per_trial > 1:
        for key, wanted in worker_resources(study).items():
            have = float(available.get(key.upper(), 0.0)) - (key == "cpu")  # the drivers' CPU
            if wanted > have:
                raise StudyError(
                    f"ray.workers_per_trial: {options.workers_per_trial} workers x "
                    f"{wanted / options.workers_per_trial:g} {key.upper()}s = {wanted:g} per "
                    f"trial, but the local Ray has {have:g}; lower it or raise ray.num_{key}s"
                )
        return
    for key, field in (("cpu", "cpus_per_trial"), ("gpu", "gpus_per_trial")):
        wanted = trial_resources(study).get(key, 0.0)
        have = float(available.get(key.upper(), 0.0))
        if wanted > have:
            raise StudyError(
                f"ray.{field}: {wanted:g} per trial, but the local Ray has {have:g}; lower it "
                f"or raise ray.num_{key}s"
            )


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune as a part of the sweep: its progress tables and error logs off (the view and the
    records say it all); the experiment saved every `SAVE_PERIOD_S`; ^C a KeyboardInterrupt,
    as everywhere else (Tune's own handler would end the running trials as if they had
    finished, and the sweep would go on to the next stage)."""
    settings = {
        "RAY_AIR_NEW_OUTPUT": "0",
        "TUNE_GLOBAL_CHECKPOINT_S": str(SAVE_PERIOD_S),
        "TUNE_DISABLE_SIGINT_HANDLER": "1",
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    loggers = [logging.getLogger(name) for name in ("ray.tune", "ray.train", "ray.air")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            # Optuna's first Sobol or TPE suggestion can take a second: not a user mistake
            warnings.filterwarnings("ignore", message="Define-by-run function passed")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------------------------------------
# One stage


def _run_stage(
    study: StudyConfig,
    index: int,
    earlier: list[StageReport],
    *,
    storage: str,
    runs_dir: Path,
    workers: int,
    view: SweepView,
    tracker: StudyTracker | None,
    trial_fn: TrialFn | None,
) -> StageReport:
    from ray import tune

    stage = study.stages[index]
    name = experiment_name(study, stage)
    path = f"{storage}/{name}"
    direction = study.objective.direction or "minimize"
    stored = read_meta(path)
    if stored is not None:
        stored.pop("trial_records", None)  # written again below, once the stage has finished
    plan = plan_stage(study, index, earlier, stored, where=path, fixed_trials=True)
    meta = plan.meta
    if not plan.resumed:
        meta = {**meta, "recorded": False}
        write_meta(path, meta)
    space = plan.space
    view.stage_started(stage, index, space, plan.notes)

    ctx = TrialContext(
        study=study,
        index=index,
        space=space,
        runs_dir=runs_dir,
        parent_run_id=tracker.parent_run_id if tracker is not None else None,
        trial_fn=trial_fn,
        cwd=os.getcwd(),
    )
    trainable = tune.with_resources(
        tune.with_parameters(_trial_main, ctx=ctx), trial_resources(study)
    )
    LIVE[name] = lambda trials: view.progress(
        stage.name, _live_counts(trials, stage.trials, direction)
    )
    try:
        with _quiet_tune():
            filesystem = storage_filesystem(storage)
            if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
                check_saved_state(path)
                tuner = tune.Tuner.restore(
                    path,
                    trainable,
                    resume_errored=False,
                    restart_errored=False,
                    storage_filesystem=filesystem,
                )
                # finished trials stay; the unfinished run again (a finished stage: no-op)
                grid = tuner.fit()
            else:
                tuner = _new_tuner(study, plan, trainable, storage, workers)
                grid = tuner.fit()
    finally:
        LIVE.pop(name, None)
    if _finished(grid) < stage.trials:
        # Tune stops early only when interrupted (^C): the stage resumes on the next run
        raise KeyboardInterrupt(
            f"stage {stage.name}: {_finished(grid)} of {stage.trials} trials finished"
        )
    saved = tune_trials(grid)
    trials = sorted(
        (
            trial_record(grid[i], study, stage.name, space, runs_dir, saved)
            for i in range(len(grid))
        ),
        key=lambda record: int(record["number"]),
    )
    if tracker is not None and not meta.get("recorded"):
        for record in trials:
            tracker.record_trial(
                trial_outcome(record),
                number=record["number"],
                stage=stage.name,
                params=record["params"],
            )
        meta = {**meta, "recorded": True}
    write_meta(path, {**meta, "trial_records": trials})  # for `scaleplan study`
    report = stage_report(meta, trials)
    view.stage_finished(report)
    return report


def _new_tuner(
    study: StudyConfig, plan: StagePlan, trainable: Any, storage: str, workers: int
) -> Any:
    from ray import tune
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from studies.space import optuna_define_by_run
    from studies.stages import make_sampler

    stage, space = plan.stage, plan.space
    mode = "max" if study.objective.direction == "maximize" else "min"
    sampler = make_sampler(
        stage.sampler, plan.sampler_seed, space, startup_trials=plan.startup_trials
    )
    searcher = tune_classes().NumberedOptunaSearch(
        space=optuna_define_by_run(space),
        metric="objective",
        mode=mode,
        sampler=sampler,
        points_to_evaluate=plan.warm_starts or None,
    )
    name = experiment_name(study, stage)
    search_alg: Any = ConcurrencyLimiter(searcher, max_concurrent=workers)
    param_space: dict[str, Any] | None = None
    checkpoints = None
    if stage.pruner.name == "pbt":
        # PBT refuses a search algorithm: the sampler draws the whole population up front
        population = [searcher.suggest(f"population-{i}") for i in range(stage.trials)]
        search_alg = BasicVariantGenerator(points_to_evaluate=population)
        # Tune sets a preset point's values only on keys its param_space has
        param_space = {key: None for config in population for key in config}
        checkpoints = tune.CheckpointConfig(num_to_keep=KEEP_PBT_CHECKPOINTS)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=make_scheduler(
                stage.pruner, plan.budget_steps, plan.first_eval_step, space, plan.sampler_seed
            ),
            metric="objective",
            mode=mode,
            num_samples=stage.trials,
            # a reused actor gives a stopped trial REUSE_WAIT_S to end (a Ray Train trial's
            # workers to prune it); a new one would kill it at once
            reuse_actors=True,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            storage_path=storage,
            storage_filesystem=storage_filesystem(storage),
            name=name,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
            checkpoint_config=checkpoints,
            callbacks=[tune_classes().TuneProgress(name)],
        ),
    )


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _finished(grid: Any) -> int:
    """Trials of a result grid that ended (terminated or errored)."""
    return int(grid.num_terminated) + int(grid.num_errors)


def _live_counts(trials: Sequence[Any], requested: int, direction: str) -> StageCounts:
    """Counts from Tune's live trial objects (for the progress view)."""
    records = []
    for trial in trials:
        last = trial.last_result or {}
        if trial.status == "TERMINATED":
            state = str(last["state"]) if "state" in last else "pruned"
        elif trial.status == "ERROR":
            state = "failed"
        elif trial.status == "RUNNING":
            state = "running"
        else:
            continue
        records.append(
            {
                "number": int(trial.config.get(NUMBER_KEY, -1)),
                "state": state,
                "value": last.get("value") if state == "complete" else None,
            }
        )
    return count_trials(records, requested, direction)


# ---------------------------------------------------------------------------------------------
# One trial, in a Ray worker


def _trial_main(config: dict[str, Any], ctx: TrialContext) -> None:
    """The function trainable: run_trial with a `report` that Tune's scheduler can stop (or,
    for pbt, `run_pbt_trial`)."""
    from ray import tune

    # a reused actor gives a stopped trial this long to end its run before the next trial
    os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = str(REUSE_WAIT_S)
    if ctx.cwd and os.path.isdir(ctx.cwd):  # Tune moved us to its trial folder
        os.chdir(ctx.cwd)
    stage = ctx.stage
    number = int(config[NUMBER_KEY])
    params = active_params(ctx.space, config)
    trial_id = f"{stage.name}-{number}"
    continued_from: dict[str, int] | None = None
    if stage.pruner.name == "pbt":
        tags = {
            "study": ctx.study.name,
            "stage": stage.name,
            "number": str(number),
            "scaleplan.kind": "trial",
            "backend": "ray",
        }
        outcome, stopped, continued_from = run_pbt_trial(ctx, number, params, trial_id, tags)
    elif ctx.study.ray is not None and ctx.study.ray.workers_per_trial > 1:
        end_interrupted_run(ctx, trial_id, number)
        final, stopped = run_train_trial(ctx, params, number)
        if stopped:
            raise SystemExit(0)  # as below
        tune.report(final or {})
        return
    else:
        end_interrupted_run(ctx, trial_id, number)
        outcome, stopped = _run_stoppable_trial(ctx, params, number)
    if stopped:
        # end the thread as Tune expects of a stopped trial; returning would make Tune's
        # wrapper wait for a reply that never comes, and a reused actor would not be freed
        raise SystemExit(0)
    tune.report(final_metrics(outcome, continued_from))


def _run_stoppable_trial(
    ctx: TrialContext, params: dict[str, Any], number: int
) -> tuple[TrialOutcome, bool]:
    """The study's objective (or the custom trial_fn) with a `report` that Tune's scheduler
    can stop;
    returns (outcome, stopped by the scheduler)."""
    from ray import tune

    stopped = False

    def report(step: int, value: float) -> bool:
        nonlocal stopped
        if not stopped:
            try:
                tune.report({"objective": float(value), "step": int(step)})
            except SystemExit:  # the scheduler stops this trial: prune it
                stopped = True
        return stopped

    outcome = call_trial(
        ctx.trial_fn,
        ctx.study,
        ctx.stage,
        params,
        number=number,
        report=report,
        parent_run_id=ctx.parent_run_id,
        runs_dir=ctx.runs_dir,
        tags={"backend": "ray"},
    )
    return outcome, stopped
