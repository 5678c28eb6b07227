"""Population Based Training on Ray Tune.

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

"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studies.backends.ray.records import continued_text, one_line
from studies.backends.ray.trial import EXPLOITED, TrialContext, TrialFn, end_interrupted_run
from studies.config import ParamSpec, StudyConfig
from studies.errors import StudyError
from studies.objective import TrialOutcome, trial_dir
from studies.objectives import stage_steps
from studies.trainer_config import trial_config

if TYPE_CHECKING:
    from trainer.loop import StepInfo

CHECKPOINT_META = "scaleplan_checkpoint.json"  # in a PBT Tune checkpoint: whose, which step
# Tune checkpoints kept per PBT trial: a donor's newest must outlive the trials copying it
KEEP_PBT_CHECKPOINTS = 4


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


def check_pbt(study: StudyConfig, index: int, trial_fn: TrialFn | None) -> None:
    """A pbt stage must be able to decide: evaluations within the budget, an interval below
    it, hyperparameters to perturb, and the trainer's own checkpoints (no custom trial_fn)."""
    stage = study.stages[index]
    if stage.pruner.name != "pbt":
        return
    field = f"stages.{stage.name}.pruner"
    steps, first_eval = stage_steps(study, stage)
    if study.ray is not None and study.ray.workers_per_trial > 1:
        raise StudyError(
            f"{field}.name: pbt with ray.workers_per_trial {study.ray.workers_per_trial} is not "
            "supported (a paused Ray Train trial's worker group can keep its resources, and "
            "the population then waits forever); use asha, median or none, or one worker "
            "per trial"
        )
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


@dataclass(frozen=True)
class _PbtStart:
    """Where a PBT trial (re)starts: nothing (a fresh run), its own checkpoint (it was paused),
    or a donor's (it took over the donor's weights at ``step``)."""

    checkpoint: Path | None = None
    own: bool = False
    step: int = 0
    continued_from: dict[str, int] | None = None  # the last takeover in this trial's weights


def run_pbt_trial(
    ctx: TrialContext, number: int, params: dict[str, Any], trial_id: str, tags: dict[str, str]
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
    last_step = trial_config(study, params, stage).steps
    stopped = False
    with tempfile.TemporaryDirectory(prefix="scaleplan-pbt-") as scratch:
        try:
            start = _pbt_start(tune.get_checkpoint(), Path(scratch), number)
        except Exception as error:
            return TrialOutcome("failed", None, one_line(error), 0, []), False, None
        _, first_eval = stage_steps(study, stage)
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
                text = continued_text(start.continued_from)
                why = f"replaced: the trial continued from {text} in a new run"
                end_interrupted_run(ctx, trial_id, number, EXPLOITED, why)
                run_tags["continued_from"] = text
            else:
                end_interrupted_run(ctx, trial_id, number)
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
