"""What a trial needs inside a Ray worker, and how an attempt's MLflow run is ended when the
trial runs again (after a kill) or continues from another's weights (PBT)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from studies.config import ParamSpec, StageSpec, StudyConfig
from studies.objective import TrialOutcome, trial_dir, trial_run_id

if TYPE_CHECKING:
    pass

INTERRUPTED = "interrupted"
EXPLOITED = "exploited"  # a PBT trial's earlier run, replaced by one from another's checkpoint

TrialFn = Callable[..., TrialOutcome]


@dataclass(frozen=True)
class TrialContext:
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


def end_interrupted_run(
    ctx: TrialContext,
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
