"""Ray Tune adapters: the search algorithm, the schedulers and the storage filesystem a stage
runs with, as subclasses of Tune's own.

- `NumberedOptunaSearch`: OptunaSearch that numbers trials by their Optuna number and tells
  Optuna each trial's state as the Optuna backend would (pruned, failed).
- `make_scheduler`: a stage's pruner as a Tune scheduler on the trainer step (ASHA; the
  asynchronous Hyperband as ASHA with brackets; a median rule that never pauses; FIFO; PBT).
- `AtomicLocalHandler`: the local filesystem, except that a file appears whole or not at all.

The subclasses are defined on first use (`tune_classes`), so that importing this module skips
Ray, and reached as module attributes (`__getattr__`) so that Tune's pickles name them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from studies.backends.ray.pbt import pbt_mutations
from studies.backends.ray.records import (
    NUMBER_KEY,
    finite,
)
from studies.config import ParamSpec, PrunerSpec

if TYPE_CHECKING:
    pass

__all__ = ["make_scheduler"]

# ASHA's last rung when the objective cannot say how far a trial reports (a callable whose
# budget has no ``steps``): rungs stay at grace x rf^k, and no trial is stopped for its length
UNKNOWN_MAX_STEPS = 10**9


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
    the end of its budget, and none pauses one. `max_steps` 0: not known (hyperband then has
    one bracket). pbt: `PopulationBasedTraining` over the
    hyperparameters of `space` (`pbt_mutations`), deciding every ``interval`` steps (None:
    every evaluation) after ``min_resource`` steps; it pauses trials, which resume from
    their checkpoints; its random choices (donors, perturbations, resampling) follow `seed`.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if pruner.name == "pbt":
        return tune_classes().NumberedPBT(
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
    known = max_steps > 0  # a callable objective's budget may not say how far it reports
    max_steps = max_steps if known else UNKNOWN_MAX_STEPS
    grace = min(max(1, pruner.min_resource or first_eval_step), max_steps)
    if pruner.name in ("asha", "hyperband"):
        brackets = 1
        if pruner.name == "hyperband" and known:
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
        return tune_classes().MedianRule(
            time_attr="step",
            grace_period=pruner.min_resource or 0,
            min_samples_required=max(1, pruner.startup_trials),
            hard_stop=True,
        )
    return FIFOScheduler()


@functools.cache
def tune_classes() -> SimpleNamespace:
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
        """Shows a stage's counts as trials start and end (through `LIVE`, by key: a restored
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
            show = LIVE.get(self.key)
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
        return getattr(tune_classes(), name)
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


def storage_filesystem(storage: str) -> Any:
    """The filesystem Tune writes the storage through: atomic writes for a local folder; None
    (Tune's own) for a URI."""
    if "://" in storage:
        return None
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(tune_classes().AtomicLocalHandler())


# experiment key -> the function that shows its live trials (this process's view)
LIVE: dict[str, Callable[[list[Any]], None]] = {}
