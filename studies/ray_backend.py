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
  `studies.ray_records.load_stage_reports` (``scaleplan study show|best|export``) reads a Ray
  study without Ray.

Population Based Training (``pruner: {name: pbt, interval, quantile, resample_probability,
synchronous}``; Jaderberg et al. 2017): Ray's `PopulationBasedTraining` on the trainer step.
Every ``interval`` steps (at the first evaluation past it; ``min_resource`` steps of burn-in
first) a trial reports its objective with a Tune checkpoint, a copy of the trainer's
exact-resume checkpoint of that step (`trainer.loop.StepInfo.save_checkpoint`); a trial in the
bottom ``quantile`` then continues from the checkpoint of one in the top quantile with
perturbed hyperparameters: ``train(start_from=...)`` restores weights, optimiser moments, step
and curves, while the optimiser's param-group values and the schedule come from the new
config. Only hyperparameters are perturbed (`trainer.checkpoint.is_hyperparameter`: optimizer,
schedule, clip, ...): a searched model or data key stays the donor's, as its weights require.
Numbers are multiplied by 0.8 or 1.2 and kept inside their range, choices move to a
neighbour, and with ``resample_probability`` a value is drawn afresh from the stage's space.
Those choices (and which top trial is the donor) follow the study's seed plus the stage's
index, as the samplers do.
``synchronous`` (the default) decides for the whole population at once, when every trial has
reached the step: losses fall with steps, so trials are compared at equal steps (Ray's
asynchronous mode compares each trial with the others' latest results, and a time-shared
trial that has not saved yet cannot be copied).

- PBT takes no search algorithm: Ray 2.60 refuses one (`PopulationBasedTraining.on_trial_add`
  raises for a `SearchGenerator`; ray-project/ray#14176), since both would set the configs.
  So the initial population is drawn up front by the stage's sampler through the same
  `NumberedOptunaSearch` (warm starts first) and handed to Tune's `BasicVariantGenerator`;
  later configs are PBT's.
- The whole population is created at once (``workers`` does not cap it); Ray's resources
  decide how many run at a time, and PBT time-shares the rest (a paused trial resumes from its
  own checkpoint, in its own folder and MLflow run).
- A trial keeps its number (and folder) when it takes over another's weights; its record,
  final report and MLflow run say ``continued_from: trial D at step S``. Its folder then
  holds a new trainer run that starts at step S with the donor's curves; the earlier run's
  MLflow run is tagged ``state: exploited``.
- No decision at the last evaluation: a trial that reached its budget is complete, not a
  copy of another's final weights. PBT stops no trial: its trials are complete or failed.

On a cluster, every node needs scaleplan installed (and a custom `trial_fn` importable) and
the storage must be shared (NFS, or ``storage: s3://...``); so should ``runs_dir`` (the trial
folders).

Ray is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import socket
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from studies.config import (
    ParamSpec,
    PrunerSpec,
    RayOptions,
    StageSpec,
    StudyConfig,
    budget_steps,
    trial_config,
)
from studies.errors import StudyError
from studies.objective import TrialOutcome, trial_dir, trial_run_id
from studies.ray_records import (
    NUMBER_KEY,
    check_meta,
    check_saved_state,
    finite,
    normal_storage,
    one_line,
    read_meta,
    space_from_json,
    space_to_json,
    trial_outcome,
    trial_record,
    tune_trials,
    write_meta,
)
from studies.space import active_params
from studies.sweep import NullView, StageCounts, StageReport, SweepView, count_trials

if TYPE_CHECKING:
    from studies.mlflow_study import StudyTracker
    from trainer.loop import StepInfo

__all__ = [
    "CHECKPOINT_META",
    "experiment_name",
    "make_scheduler",
    "pbt_mutations",
    "run_ray",
    "trial_resources",
]

# a reused actor waits this long for a stopped trial to finish writing before the next trial
REUSE_WAIT_S = 120
# Tune saves the experiment (trial states, searcher) at most this often: a killed sweep runs
# again only the trials that finished in the last second
SAVE_PERIOD_S = 1
INTERRUPTED = "interrupted"
EXPLOITED = "exploited"  # a PBT trial's earlier run, replaced by one from another's checkpoint
CHECKPOINT_META = "scaleplan_checkpoint.json"  # in a PBT Tune checkpoint: whose, which step
# Tune checkpoints kept per PBT trial: a donor's newest must outlive the trials copying it
KEEP_PBT_CHECKPOINTS = 4

TrialFn = Callable[..., TrialOutcome]


# ---------------------------------------------------------------------------------------------
# Settings


def experiment_name(study: StudyConfig, stage: StageSpec) -> str:
    """``<study>-<stage>``: the Tune experiment's folder under the storage."""
    return f"{study.name}-{stage.name}"


def trial_resources(study: StudyConfig) -> dict[str, float]:
    """What each trial reserves: ``{"cpu": c, "gpu": g}`` (gpu left out when 0)."""
    options = study.ray or RayOptions()
    resources = {"cpu": float(options.cpus_per_trial)}
    if options.gpus_per_trial > 0:
        resources["gpu"] = float(options.gpus_per_trial)
    return resources


def make_scheduler(
    pruner: PrunerSpec,
    max_steps: int,
    first_eval_step: int,
    space: Mapping[str, ParamSpec] | None = None,
    seed: int = 0,
) -> Any:
    """The Tune scheduler for a stage's pruner; time is the trainer step (``step``).

    asha: `ASHAScheduler` (grace period: ``min_resource``, else the first evaluation step);
    hyperband: ASHA with the brackets Hyperband would use, log_rf(max / min) + 1; median:
    `MedianStoppingRule` (warm-up: ``min_resource``; ``startup_trials`` trials must reach a
    step before one is stopped there); none: FIFO. None of them stops a trial that reached
    the end of its budget, and none pauses one. pbt: `PopulationBasedTraining` over the
    hyperparameters of `space` (`pbt_mutations`), deciding every ``interval`` steps (None:
    every evaluation) after ``min_resource`` steps; it pauses trials, which resume from
    their checkpoints; its random choices (donors, perturbations, resampling) follow `seed`.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if pruner.name == "pbt":
        return _tune_classes().NumberedPBT(
            space=dict(space or {}),
            seed=seed,
            time_attr="step",
            perturbation_interval=pruner.interval or first_eval_step,
            burn_in_period=pruner.min_resource or 0,
            hyperparam_mutations=pbt_mutations(space or {}),
            quantile_fraction=pruner.quantile,
            resample_probability=pruner.resample_probability,
            synch=pruner.synchronous,
            log_config=False,  # the records say who continued from whom
            require_attrs=False,  # a trial's final report has no step
        )
    grace = min(max(1, pruner.min_resource or first_eval_step), max_steps)
    if pruner.name in ("asha", "hyperband"):
        brackets = 1
        if pruner.name == "hyperband":
            ratio = max_steps / grace
            brackets = int(math.floor(math.log(ratio, pruner.reduction_factor) + 1e-9)) + 1
        return ASHAScheduler(
            time_attr="step",
            max_t=max_steps,
            grace_period=grace,
            reduction_factor=pruner.reduction_factor,
            brackets=max(1, brackets),
            stop_last_trials=False,
        )
    if pruner.name == "median":
        return _tune_classes().MedianRule(
            time_attr="step",
            grace_period=pruner.min_resource or 0,
            min_samples_required=max(1, pruner.startup_trials),
            hard_stop=True,
        )
    return FIFOScheduler()


def pbt_mutations(space: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """What PBT perturbs: the hyperparameters of `space` (`trainer.checkpoint.is_hyperparameter`;
    another key, e.g. a model size, must stay the donor's for its weights to fit), as Tune
    domains (numbers) or lists of choices (categorical: PBT moves a value to a neighbour)."""
    from studies.space import ray_search_space
    from trainer.checkpoint import is_hyperparameter

    mutations: dict[str, Any] = {}
    for name, spec in space.items():
        if not is_hyperparameter(name):
            continue
        if spec.type == "categorical":
            mutations[name] = list(spec.choices or [])
        else:  # conditions do not matter here: an inactive value is never used
            plain = spec.model_copy(update={"condition": None})
            mutations[name] = ray_search_space({name: plain})[name]
    return mutations


@functools.cache
def _tune_classes() -> SimpleNamespace:
    """Ray subclasses, defined on first use so that importing this module skips Ray."""
    import numpy as np
    from ray.tune import Callback
    from ray.tune.schedulers import (
        MedianStoppingRule,
        PopulationBasedTraining,
        TrialScheduler,
    )
    from ray.tune.search.optuna import OptunaSearch

    class NumberedOptunaSearch(OptunaSearch):
        """OptunaSearch that adds each trial's Optuna number to its config (NUMBER_KEY), and
        tells Optuna each trial's state as the Optuna backend would: a trial the scheduler
        stopped is PRUNED (OptunaSearch says COMPLETE, with the value where it stopped, as if
        at the full budget), a failed one FAIL (OptunaSearch leaves it RUNNING)."""

        def suggest(self, trial_id: str) -> dict[str, Any] | None:
            config = super().suggest(trial_id)
            if isinstance(config, dict):
                config[NUMBER_KEY] = int(self._ot_trials[trial_id].number)
            return config

        def on_trial_complete(
            self, trial_id: str, result: dict | None = None, error: bool = False
        ) -> None:
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                super().on_trial_complete(trial_id, result, error)
                return
            from optuna.trial import TrialState

            result = result or {}
            value = result.get("value")
            if "state" not in result and not error:  # the scheduler stopped it
                state, value = TrialState.PRUNED, None
            elif result.get("state") == "complete" and not error and finite(value):
                state = TrialState.COMPLETE
            elif result.get("state") == "pruned" and not error:
                state, value = TrialState.PRUNED, None
            else:  # failed in run_trial, or in Ray
                state, value = TrialState.FAIL, None
            study: Any = self._ot_study
            with contextlib.suppress(Exception):  # as OptunaSearch does: never stop the study
                study.tell(self._ot_trials[trial_id], value, state=state)
            self._completed_trials.add(trial_id)

    class MedianRule(MedianStoppingRule):
        """MedianStoppingRule that never pauses (a function trainable without checkpoints
        would start over) and ignores results without a step (a trial's final outcome)."""

        def _on_insufficient_samples(self, tune_controller: Any, trial: Any, time: float) -> str:
            return str(TrialScheduler.CONTINUE)

        def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
            if self._time_attr in result and self._metric in result:
                super().on_trial_complete(tune_controller, trial, result)

    class NumberedPBT(PopulationBasedTraining):
        """PopulationBasedTraining whose exploiting trial keeps its own number (so its
        folder, MLflow tags and record), whose perturbed numbers stay inside the space
        (Tune multiplies them by 0.8 or 1.2, past the bounds if it must), and whose random
        choices follow `seed`: Tune draws donors and perturbations from the `random` module
        and resamples from NumPy's global generator, so those are swapped for this
        scheduler's own state while it decides. With ``synch`` (trials decided in score
        order) a seeded study's PBT then repeats, as the trainer is deterministic."""

        def __init__(self, *, space: dict[str, ParamSpec], seed: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._scaleplan_space = space
            self._scaleplan_random = (
                random.Random(seed).getstate(),
                np.random.RandomState(seed).get_state(),
            )

        def _checkpoint_or_exploit(self, *args: Any, **kwargs: Any) -> Any:
            outer = random.getstate(), np.random.get_state()
            random.setstate(self._scaleplan_random[0])
            np.random.set_state(self._scaleplan_random[1])
            try:
                return super()._checkpoint_or_exploit(*args, **kwargs)
            finally:
                self._scaleplan_random = random.getstate(), np.random.get_state()
                random.setstate(outer[0])
                np.random.set_state(outer[1])

        def _get_new_config(self, trial: Any, trial_to_clone: Any) -> tuple[dict, dict]:
            config, operations = super()._get_new_config(trial, trial_to_clone)
            config[NUMBER_KEY] = trial.config[NUMBER_KEY]
            for name, spec in self._scaleplan_space.items():
                value: Any = config.get(name)
                if spec.type != "categorical" and finite(value):
                    low, high = spec.bounds
                    config[name] = type(value)(min(max(value, low), high))
            return config, operations

    class Progress(Callback):
        """Shows a stage's counts as trials start and end (through `_LIVE`, by key: a restored
        experiment's callback is unpickled, and must reach this process's view)."""

        def __init__(self, key: str) -> None:
            self.key = key

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._show(trials)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._show(trials)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._show(trials)

        def _show(self, trials: list) -> None:
            show = _LIVE.get(self.key)
            if show is not None:
                show(trials)

    classes = SimpleNamespace(
        NumberedOptunaSearch=NumberedOptunaSearch,
        NumberedPBT=NumberedPBT,
        MedianRule=MedianRule,
        TuneProgress=Progress,
        AtomicLocalHandler=_atomic_local_handler(),
    )
    for name, cls in vars(classes).items():
        # pickled by reference (module attribute, through `__getattr__`), not by value
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = __name__
    return classes


def __getattr__(name: str) -> Any:
    """The Ray subclasses as module attributes, so that pickles name them (a Tune experiment
    saves its searcher, scheduler and callbacks; workers get the storage filesystem)."""
    if name in _RAY_CLASSES:
        return getattr(_tune_classes(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_RAY_CLASSES = (
    "NumberedOptunaSearch",
    "NumberedPBT",
    "MedianRule",
    "TuneProgress",
    "AtomicLocalHandler",
)


def _atomic_local_handler() -> type:
    """A pyarrow filesystem handler: the local filesystem, except that a file written appears
    whole or not at all (a temp file beside it, renamed on close).

    Tune copies its experiment state into the storage folder again and again; a sweep killed
    in the middle of a copy left an empty searcher state there, and the restore then hung.
    Object stores (s3://, gs://) write whole objects already.
    """
    import uuid

    import pyarrow
    import pyarrow.fs

    class AtomicFile:
        """What `open_output_stream` writes through: a temp file renamed over `path` on close."""

        def __init__(self, path: str) -> None:
            head, tail = os.path.split(path)
            self.path = path
            self.tmp = os.path.join(head, f".{tail}.{uuid.uuid4().hex[:8]}.tmp")
            self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed (and renamed) in close()
            self.closed = False

        def write(self, data: Any) -> int:
            return self.file.write(data)

        def flush(self) -> None:
            self.file.flush()

        def writable(self) -> bool:
            return True

        def readable(self) -> bool:
            return False

        def seekable(self) -> bool:
            return False

        def tell(self) -> int:
            return self.file.tell()

        def close(self) -> None:
            if self.closed:
                return
            self.closed = True
            self.file.close()
            os.replace(self.tmp, self.path)

    class AtomicLocalHandler(pyarrow.fs.FileSystemHandler):
        def __init__(self) -> None:
            self.local = pyarrow.fs.LocalFileSystem()

        def __eq__(self, other: object) -> bool:
            return type(other) is type(self)

        def __ne__(self, other: object) -> bool:
            return not self == other

        def __hash__(self) -> int:
            return hash(type(self).__name__)

        def get_type_name(self) -> str:
            return "scaleplan-atomic-local"

        def normalize_path(self, path: str) -> str:
            return str(self.local.normalize_path(path))

        def get_file_info(self, paths: list[str]) -> Any:
            return self.local.get_file_info(paths)

        def get_file_info_selector(self, selector: Any) -> Any:
            return self.local.get_file_info(selector)

        def create_dir(self, path: str, recursive: bool) -> None:
            self.local.create_dir(path, recursive=recursive)

        def delete_dir(self, path: str) -> None:
            self.local.delete_dir(path)

        def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
            self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

        def delete_root_dir_contents(self) -> None:
            raise OSError("scaleplan: refusing to delete the contents of /")

        def delete_file(self, path: str) -> None:
            self.local.delete_file(path)

        def move(self, src: str, dest: str) -> None:
            self.local.move(src, dest)

        def copy_file(self, src: str, dest: str) -> None:
            with self.local.open_input_stream(src) as source:
                stream = self.open_output_stream(dest, None)
                try:
                    while chunk := source.read(1 << 20):
                        stream.write(chunk)
                finally:
                    stream.close()

        def open_input_stream(self, path: str) -> Any:
            return self.local.open_input_stream(path)

        def open_input_file(self, path: str) -> Any:
            return self.local.open_input_file(path)

        def open_output_stream(self, path: str, metadata: Any) -> Any:
            return pyarrow.PythonFile(AtomicFile(path), mode="w")

        def open_append_stream(self, path: str, metadata: Any) -> Any:
            return self.local.open_append_stream(path, metadata=metadata)

    return AtomicLocalHandler


def _storage_filesystem(storage: str) -> Any:
    """The filesystem Tune writes the storage through: atomic writes for a local folder; None
    (Tune's own) for a URI."""
    if "://" in storage:
        return None
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(_tune_classes().AtomicLocalHandler())


# experiment key -> the function that shows its live trials (this process's view)
_LIVE: dict[str, Callable[[list[Any]], None]] = {}


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclass(frozen=True)
class _TrialContext:
    """What a trial needs in a Ray worker (picklable; handed over by `tune.with_parameters`)."""

    study: StudyConfig
    index: int
    space: dict[str, ParamSpec]
    runs_dir: Path
    parent_run_id: str | None
    trial_fn: TrialFn | None
    cwd: str

    @property
    def stage(self) -> StageSpec:
        return self.study.stages[self.index]


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
        _check_pbt(study, index, trial_fn)
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
        previous: StageReport | None = None
        for index in range(len(study.stages)):
            report = _run_stage(
                study,
                index,
                previous,
                storage=storage,
                runs_dir=runs,
                workers=workers or study.workers,
                view=view,
                tracker=tracker,
                trial_fn=trial_fn,
            )
            reports.append(report)
            previous = report
        return reports
    finally:
        optuna.logging.set_verbosity(previous_level)
        if started:
            import ray

            ray.shutdown()


def _storage(study: StudyConfig, runs_dir: Path) -> str:
    """The study's Tune storage: a URI, or an absolute folder (default runs/<study>/ray)."""
    return normal_storage(study.resolved_storage(runs_dir))


def _check_pbt(study: StudyConfig, index: int, trial_fn: TrialFn | None) -> None:
    """A pbt stage must be able to decide: evaluations within the budget, an interval below
    it, hyperparameters to perturb, and the trainer's own checkpoints (no custom trial_fn)."""
    stage = study.stages[index]
    if stage.pruner.name != "pbt":
        return
    field = f"stages.{stage.name}.pruner"
    steps, first_eval = _stage_steps(study, stage)
    if trial_fn is not None:
        raise StudyError(
            f"{field}.name: pbt continues trials from the trainer's checkpoints; it cannot "
            "run a custom trial_fn"
        )
    if first_eval >= steps:
        raise StudyError(
            f"{field}.name: pbt decides at evaluations, but the trials evaluate only at the end "
            f"of their {steps} steps; set overrides.eval_every below {steps}"
        )
    interval = stage.pruner.interval or first_eval
    if interval >= steps:
        raise StudyError(
            f"{field}.interval: {interval} steps is not below the budget of {steps} steps; "
            "PBT would never exploit. Lower it"
        )
    if not pbt_mutations(study.space):
        from trainer.checkpoint import HYPERPARAMETER_FIELDS

        raise StudyError(
            f"{field}.name: pbt perturbs hyperparameters ({', '.join(HYPERPARAMETER_FIELDS)} "
            f"keys) and the space has none: {', '.join(study.space)}"
        )


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
        kwargs.update(num_cpus=options.num_cpus, num_gpus=options.num_gpus)
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


def _stage_steps(study: StudyConfig, stage: StageSpec) -> tuple[int, int]:
    """(steps of the stage's budget, the first evaluation step) under the base config."""
    config = trial_config(study, {}, stage.budget)
    steps = budget_steps(config, stage.budget)
    first_eval = config.eval_every if config.eval_every and config.eval_every > 0 else steps
    return steps, min(first_eval, steps)


def _run_stage(
    study: StudyConfig,
    index: int,
    previous: StageReport | None,
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
    steps, first_eval = _stage_steps(study, stage)
    meta = read_meta(path)
    if meta is not None:
        check_meta(study, index, meta, steps, path)
        space = space_from_json(meta["space"])
        notes = list(meta.get("notes") or [])
        warm: list[dict[str, Any]] = list(meta.get("warm_starts") or [])
    else:
        space, warm, notes = _stage_space(study, index, previous, direction)
        meta = {
            "index": index,
            "stage": stage.name,
            "study": study.name,
            "sampler": stage.sampler,
            "pruner": stage.pruner.name,
            "trials": stage.trials,
            "budget_steps": steps,
            "metric": study.objective.metric,
            "direction": direction,
            "space": space_to_json(space),
            "notes": notes,
            "warm_starts": warm,
            "recorded": False,
        }
        write_meta(path, meta)
    view.stage_started(stage, index, space, notes)

    ctx = _TrialContext(
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
    _LIVE[name] = lambda trials: view.progress(
        stage.name, _live_counts(trials, stage.trials, direction)
    )
    try:
        with _quiet_tune():
            filesystem = _storage_filesystem(storage)
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
                tuner = _new_tuner(study, index, space, warm, trainable, storage, workers)
                grid = tuner.fit()
    finally:
        _LIVE.pop(name, None)
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
    report = StageReport(
        name=stage.name,
        index=index,
        sampler=stage.sampler,
        pruner=stage.pruner.name,
        budget_steps=steps,
        space=space,
        notes=notes,
        counts=count_trials(trials, stage.trials, direction),
        trials=trials,
        source=None,
    )
    view.stage_finished(report)
    return report


def _stage_space(
    study: StudyConfig, index: int, previous: StageReport | None, direction: str
) -> tuple[dict[str, ParamSpec], list[dict[str, Any]], list[str]]:
    """(space, warm starts, notes) of a stage started now."""
    from studies.config import space_limits
    from studies.stages import narrow_space

    stage = study.stages[index]
    if previous is None:
        return dict(study.space), [], []
    if stage.narrow is None:
        return dict(previous.space), [], [f"space of stage {previous.name} kept"]
    scored = [(t["params"], t["value"]) for t in previous.trials]
    space, warm, notes = narrow_space(
        previous.space,
        scored,
        stage.narrow,
        "maximize" if direction == "maximize" else "minimize",
        space_limits(study),
    )
    return space, warm[: stage.trials], notes


def _new_tuner(
    study: StudyConfig,
    index: int,
    space: dict[str, ParamSpec],
    warm: list[dict[str, Any]],
    trainable: Any,
    storage: str,
    workers: int,
) -> Any:
    from ray import tune
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    from studies.space import optuna_define_by_run
    from studies.stages import make_sampler

    stage = study.stages[index]
    steps, first_eval = _stage_steps(study, stage)
    mode = "max" if study.objective.direction == "maximize" else "min"
    startup = max(1, min(10, stage.trials // 2)) if stage.sampler in ("tpe", "gp") else None
    sampler = make_sampler(stage.sampler, study.seed + index, space, startup_trials=startup)
    searcher = _tune_classes().NumberedOptunaSearch(
        space=optuna_define_by_run(space),
        metric="objective",
        mode=mode,
        sampler=sampler,
        points_to_evaluate=warm or None,
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
            scheduler=make_scheduler(stage.pruner, steps, first_eval, space, study.seed + index),
            metric="objective",
            mode=mode,
            num_samples=stage.trials,
            reuse_actors=True,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            storage_path=storage,
            storage_filesystem=_storage_filesystem(storage),
            name=name,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
            checkpoint_config=checkpoints,
            callbacks=[_tune_classes().TuneProgress(name)],
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


def _trial_main(config: dict[str, Any], ctx: _TrialContext) -> None:
    """The function trainable: run_trial with a `report` that Tune's scheduler can stop (or,
    for pbt, `_run_pbt_trial`)."""
    from ray import tune

    # a reused actor gives a stopped trial this long to end its run before the next trial
    os.environ["TUNE_FUNCTION_THREAD_TIMEOUT_S"] = str(REUSE_WAIT_S)
    if ctx.cwd and os.path.isdir(ctx.cwd):  # Tune moved us to its trial folder
        os.chdir(ctx.cwd)
    stage = ctx.stage
    number = int(config[NUMBER_KEY])
    params = active_params(ctx.space, config)
    trial_id = f"{stage.name}-{number}"
    tags = {
        "study": ctx.study.name,
        "stage": stage.name,
        "number": str(number),
        "scaleplan.kind": "trial",
        "backend": "ray",
    }
    continued_from: dict[str, int] | None = None
    if stage.pruner.name == "pbt":
        outcome, stopped, continued_from = _run_pbt_trial(ctx, number, params, trial_id, tags)
    else:
        _end_interrupted_run(ctx, trial_id, number)
        outcome, stopped = _run_stoppable_trial(ctx, params, trial_id, tags)
    if stopped:
        # end the thread as Tune expects of a stopped trial; returning would make Tune's
        # wrapper wait for a reply that never comes, and a reused actor would not be freed
        raise SystemExit(0)
    tune.report(_final_metrics(outcome, continued_from))


def _run_stoppable_trial(
    ctx: _TrialContext, params: dict[str, Any], trial_id: str, tags: dict[str, str]
) -> tuple[TrialOutcome, bool]:
    """run_trial (or the custom trial_fn) with a `report` that Tune's scheduler can stop;
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

    if ctx.trial_fn is None:
        from studies.objective import run_trial

        trial_fn: TrialFn = run_trial
    else:
        trial_fn = ctx.trial_fn
    outcome = trial_fn(
        ctx.study,
        ctx.stage,
        params,
        trial_id=trial_id,
        report=report,
        parent_run_id=ctx.parent_run_id,
        tags=tags,
        runs_dir=ctx.runs_dir,
    )
    return outcome, stopped


def _final_metrics(
    outcome: TrialOutcome, continued_from: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """The last report of a trial that ran to its end: its outcome. The objective is NaN
    unless complete (OptunaSearch then records the trial as failed); no ``step``."""
    value = outcome.value if outcome.state == "complete" else None
    return {
        "objective": float(value) if value is not None else math.nan,
        "state": outcome.state,
        "value": value,
        "reason": outcome.reason or "",
        "steps": int(outcome.steps),
        "tokens": outcome.tokens,
        "params_count": outcome.params_count,
        "out_dir": outcome.out_dir,
        "run_id": outcome.run_id or "",
        "continued_from": _continued_text(continued_from),
    }


def _end_interrupted_run(
    ctx: _TrialContext,
    trial_id: str,
    number: int,
    state: str = INTERRUPTED,
    reason: str = INTERRUPTED,
) -> None:
    """A trial run again after a kill: its earlier attempt's MLflow run (never recorded by
    the driver: no ``state`` tag) is ended KILLED with state and reason "interrupted"
    (run_trial then replaces the trial's folder). A PBT trial that takes over another's
    weights ends its earlier run the same way, as "exploited"."""
    if ctx.parent_run_id is None:
        return
    run_id = trial_run_id(trial_dir(ctx.study, trial_id, ctx.runs_dir))
    if run_id is None:
        return
    try:
        from trainer.tracking import open_client, resolve_tracking_uri, retry_locked

        client = open_client(resolve_tracking_uri(ctx.study.tracking_uri))
        run = retry_locked(client.get_run, run_id)
        if "state" in run.data.tags:  # the driver recorded it: not this study's attempt
            return
        for key, value in (
            ("state", state),
            ("reason", reason),
            ("stage", ctx.stage.name),
            ("number", str(number)),
        ):
            retry_locked(client.set_tag, run_id, key, value)
        retry_locked(client.set_terminated, run_id, "KILLED")
    except Exception:  # MLflow trouble never stops a trial
        return


# ---------------------------------------------------------------------------------------------
# One PBT trial, in a Ray worker


@dataclass(frozen=True)
class _PbtStart:
    """Where a PBT trial (re)starts: nothing (a fresh run), its own checkpoint (it was paused),
    or a donor's (it took over the donor's weights at ``step``)."""

    checkpoint: Path | None = None
    own: bool = False
    step: int = 0
    continued_from: dict[str, int] | None = None  # the last takeover in this trial's weights


def _run_pbt_trial(
    ctx: _TrialContext, number: int, params: dict[str, Any], trial_id: str, tags: dict[str, str]
) -> tuple[TrialOutcome, bool, dict[str, int] | None]:
    """A PBT trial: `studies.objective.run_trial`, started from Tune's checkpoint when there
    is one (``start_from``: this config's hyperparameters on the checkpoint's state), handing
    Tune a checkpoint with each decision, and keeping the last evaluation to itself (no exploit
    at the end of the budget). Returns (outcome, stopped by Tune: paused or exploited, the
    takeover its weights come from)."""
    import shutil
    import tempfile

    from ray import tune

    from studies.objective import run_trial
    from trainer.tracking import METRICS_FILE

    study, stage = ctx.study, ctx.stage
    out_dir = trial_dir(study, trial_id, ctx.runs_dir)
    last_step = trial_config(study, params, stage.budget).steps
    stopped = False
    with tempfile.TemporaryDirectory(prefix="scaleplan-pbt-") as scratch:
        try:
            start = _pbt_start(tune.get_checkpoint(), Path(scratch), number)
        except Exception as error:
            return TrialOutcome("failed", None, one_line(error), 0, []), False, None
        _, first_eval = _stage_steps(study, stage)
        checkpoints = _TuneCheckpoints(
            Path(scratch),
            {"study": study.name, "stage": stage.name, "number": number},
            start,
            interval=stage.pruner.interval or first_eval,
            burn_in=stage.pruner.min_resource or 0,
            last_step=last_step,
        )

        def report(step: int, value: float) -> bool:
            nonlocal stopped
            if stopped or step >= last_step:  # the budget is spent: no decision
                return stopped
            folder = checkpoints.take(step)
            try:
                checkpoint = tune.Checkpoint.from_directory(folder) if folder else None
                tune.report({"objective": float(value), "step": int(step)}, checkpoint=checkpoint)
            except SystemExit:  # PBT paused this trial, or gave it another's weights
                stopped = True
            finally:
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
            return stopped

        resume = start.own and (out_dir / METRICS_FILE).exists()
        run_tags = dict(tags)
        if not resume:
            if start.continued_from is not None and not start.own:
                text = _continued_text(start.continued_from)
                why = f"replaced: the trial continued from {text} in a new run"
                _end_interrupted_run(ctx, trial_id, number, EXPLOITED, why)
                run_tags["continued_from"] = text
            else:
                _end_interrupted_run(ctx, trial_id, number)
        outcome = run_trial(
            study,
            stage,
            params,
            trial_id=trial_id,
            report=report,
            parent_run_id=ctx.parent_run_id,
            tags=run_tags,
            runs_dir=ctx.runs_dir,
            callbacks=[checkpoints],
            resume=resume,
            start_from=start.checkpoint,
        )
    return outcome, stopped, start.continued_from


def _pbt_start(checkpoint: Any, scratch: Path, number: int) -> _PbtStart:
    """The trainer checkpoint inside Tune's (downloaded under `scratch`), and whose it is."""
    if checkpoint is None:
        return _PbtStart()
    folder = Path(checkpoint.to_directory(str(scratch / "start")))
    meta = json.loads((folder / CHECKPOINT_META).read_text())
    files = sorted(folder.glob("step_*.pt"))
    if not files:
        raise FileNotFoundError(f"no trainer checkpoint in {checkpoint.path}")
    step = int(meta["step"])
    if int(meta["number"]) == number:
        own_from = meta.get("continued_from")
        return _PbtStart(files[-1], True, step, dict(own_from) if own_from else None)
    return _PbtStart(files[-1], False, step, {"number": int(meta["number"]), "step": step})


class _TuneCheckpoints:
    """Trainer callback of a PBT trial, before run_trial's reporter: at each evaluation where
    PBT will decide (its own rule: past ``burn_in``, ``interval`` steps after the last
    decision; never the last step) the checkpoint of this very step goes into a Tune
    checkpoint folder for the report that follows, so that a trial that copies this one, or
    this one after a pause, starts exactly here."""

    def __init__(
        self,
        scratch: Path,
        meta: dict[str, Any],
        start: _PbtStart,
        *,
        interval: int,
        burn_in: int,
        last_step: int,
    ) -> None:
        self.scratch = scratch
        self.meta = {**meta, "continued_from": start.continued_from}
        self.last_decision = start.step  # PBT counts from the step a trial starts at
        self.interval, self.burn_in, self.last_step = interval, burn_in, last_step
        self.pending: tuple[int, Path] | None = None

    def __call__(self, info: StepInfo) -> None:
        self.pending = None
        save = info.save_checkpoint
        due = (
            info.val_loss is not None
            and self.burn_in <= info.step < self.last_step
            and info.step - self.last_decision >= self.interval
        )
        if save is None or not due:
            return
        self.last_decision = info.step
        folder = self.scratch / f"tune-{info.step}"
        folder.mkdir(parents=True, exist_ok=True)
        trainer_checkpoint = save()
        try:  # the trainer keeps only its newest checkpoints: a link, else a copy
            os.link(trainer_checkpoint, folder / trainer_checkpoint.name)
        except OSError:
            import shutil

            shutil.copy2(trainer_checkpoint, folder / trainer_checkpoint.name)
        (folder / CHECKPOINT_META).write_text(json.dumps({**self.meta, "step": info.step}))
        self.pending = (info.step, folder)

    def take(self, step: int) -> Path | None:
        """The Tune checkpoint folder written for `step`, if one was due."""
        pending, self.pending = self.pending, None
        return pending[1] if pending is not None and pending[0] == step else None


def _continued_text(continued_from: Mapping[str, int] | None) -> str:
    """``trial 3 at step 40``: whose weights a PBT trial took over, and when ("" if none)."""
    if not continued_from:
        return ""
    return f"trial {continued_from['number']} at step {continued_from['step']}"
