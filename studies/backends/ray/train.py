"""A trial of several workers: a Ray Train `TorchTrainer` inside the Tune experiment.

With ``ray: {workers_per_trial: W, cpus_per_worker: c, gpus_per_worker: g}``, each trial's
Tune function builds a TorchTrainer of W workers (gloo on CPU, NCCL when the workers have GPUs)
and drives it. Every worker runs the same `studies.objective.run_trial` as a one-process trial:
Ray Train has started the process group and set RANK / WORLD_SIZE / LOCAL_RANK, so the trainer
runs DDP or FSDP2 by its ``distributed.strategy`` (trainer.distributed), rank 0 writing the
trial's folder and its MLflow child run under the study's parent run.

Reports and stopping: at each evaluation every worker calls ``ray.train.report``; a Train
callback in the controller forwards rank 0's metrics to the Tune function (a Ray queue), which
reports them to Tune (``tune.report``) as a one-process trial does. Tune's scheduler answers
there: a stop raises SystemExit in that call. The answer for that step goes back to the workers
(a small actor they wait on), so they stop at the very evaluation the scheduler judged: the
trainer ends the run cleanly, the trial is pruned and its MLflow run says so. The workers' last
report is the trial's outcome.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any

from studies.backends.ray.trial import TrialContext
from studies.config import RayOptions

__all__ = ["run_train_trial"]

DECISION_TIMEOUT_S = 600.0  # how long a worker waits for the scheduler's answer to a report
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Train passes it to its controller
POLL_S = 0.05


def run_train_trial(
    ctx: TrialContext, params: dict[str, Any], number: int
) -> tuple[dict[str, Any] | None, bool]:
    """Run one trial on `ctx.study.ray.workers_per_trial` Ray Train workers, reporting each
    evaluation to Tune; returns (the workers' final report, stopped by the scheduler). Raises
    what the Train run raised when it ended without a final report (a Ray-level failure)."""
    import ray
    from ray import tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    # a worker group waits for the resources a stopped trial's group is still giving back (on
    # a busy machine that took over Train's default 60 s, and the trial failed)
    os.environ.setdefault(START_TIMEOUT_ENV, str(int(DECISION_TIMEOUT_S)))
    options = ctx.study.ray or RayOptions()
    gpus = options.gpus_per_worker
    resources = {"CPU": options.cpus_per_worker, **({"GPU": gpus} if gpus > 0 else {})}
    reports: Queue = Queue(actor_options={"num_cpus": 0})
    decisions: Any = ray.remote(num_cpus=0)(_Decisions).remote()
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "ctx": ctx,
            "params": params,
            "number": number,
            "decisions": decisions,
        },  # fmt: skip
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=options.workers_per_trial,
            use_gpu=gpus > 0,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=f"{ctx.study.name}-{ctx.stage.name}-{number}",
            storage_path=str((ctx.runs_dir / ctx.study.name / "ray-train").resolve()),
            callbacks=[_callback(reports)],  # a Train V2 callback
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as error:  # handed to the Tune function below
            failure.append(error)

    thread = threading.Thread(target=fit, name="scaleplan-ray-train", daemon=True)
    thread.start()
    final: dict[str, Any] | None = None
    stopped = False
    while True:
        try:
            item = reports.get(timeout=0.5)
        except queue.Empty:
            if thread.is_alive() or not reports.empty():
                continue
            break
        if "state" in item:  # the outcome, after the run
            final = item
            continue
        if not stopped:
            try:
                tune.report({"objective": float(item["objective"]), "step": int(item["step"])})
            except SystemExit:  # the scheduler stops this trial: the workers prune it
                stopped = True
        decisions.decide.remote(int(item["step"]), stopped)
    thread.join()
    if final is None and failure:
        raise failure[0]
    return final, stopped


class _Decisions:
    """The scheduler's answer to each report, for the workers (a Ray actor)."""

    def __init__(self) -> None:
        self.answered: set[int] = set()
        self.stop = False

    def decide(self, step: int, stop: bool) -> None:
        self.answered.add(step)
        self.stop = self.stop or stop

    def answer(self, step: int) -> bool | None:
        """True: stop; False: go on; None: not answered yet."""
        return self.stop if step in self.answered or self.stop else None


def _callback(reports: Any) -> Any:
    """A Train callback, run in the controller: rank 0's metrics of each report -> `reports`."""
    from ray.train.v2.api.callback import UserCallback

    class ForwardToTune(UserCallback):
        def after_report(
            self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
        ) -> None:
            reports.put(dict(metrics[0]))

    return ForwardToTune()


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a trial: the trial as a one-process trial runs it."""
    import ray
    import ray.train

    from studies.backends.ray.records import final_metrics
    from studies.objectives import call_trial

    ctx: TrialContext = config["ctx"]
    decisions = config["decisions"]
    if ctx.cwd and os.path.isdir(ctx.cwd):
        os.chdir(ctx.cwd)

    def report(step: int, value: float) -> bool:
        ray.train.report({"objective": float(value), "step": int(step)})
        deadline = time.monotonic() + DECISION_TIMEOUT_S
        while time.monotonic() < deadline:  # every rank gets the same answer for this step
            answer = ray.get(decisions.answer.remote(int(step)))
            if answer is not None:
                return bool(answer)
            time.sleep(POLL_S)
        return False

    outcome = call_trial(
        ctx.trial_fn,
        ctx.study,
        ctx.stage,
        config["params"],
        number=config["number"],
        report=report,
        parent_run_id=ctx.parent_run_id,
        runs_dir=ctx.runs_dir,
        tags={"backend": "ray", "ray_train_workers": str(ray.train.get_context().get_world_size())},
    )
    ray.train.report(final_metrics(outcome))
