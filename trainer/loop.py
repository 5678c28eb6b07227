"""The training loop: ``train(config, callbacks) -> RunResult``.

The loop reads like the seed's pseudo-code, one phase per numbered comment: sample, forward,
loss, backward (over micro-batches), unscale and check, clip, optimiser step, schedule,
then record, evaluate and checkpoint. Everything else hangs off it as small functions.

Step numbers: update s (0-based) draws micro-batch m from ``get_batch("train", s, micro=m)``
and uses the schedule's lr at s. Records, callbacks and checkpoints count *completed*
updates: the record after update s has ``step = s + 1``; ``step_0000100.pt`` holds the state
after 100 updates, and a resumed run continues with update 100.

Evaluation: on the fixed validation set, before the first update (step 0, unless eval_every is
0), every eval_every steps and after the last one.

Callbacks (any callable, e.g. an object with ``__call__``) are called after each recorded step
(logging or evaluation steps) with a `StepInfo`. A callback ends the run by raising
`StopTraining` (a study prunes a trial this way): the loop finishes that step, writes its
checkpoint and returns a RunResult whose ``stopped_reason`` is the exception's reason
("callback" unless given). Early stopping ends a run the same way. Resuming a stopped run
returns its result without training further. A callback that needs this very step on disk
(Population Based Training hands it to another trial) calls ``info.save_checkpoint()``.

Continuing under new hyperparameters: ``train(config, start_from=checkpoint)`` takes the
weights, optimiser moments, step and curves from a checkpoint (of this run or another) and the
optimiser's param-group values and the schedule from `config` (see trainer.rundir).

Non-finite loss or gradient norm: ``nonfinite: stop`` (default) ends the run before the update
(``stopped_reason`` "nonfinite", ``stop_message`` says which step and what); ``skip`` drops that
update (the schedule still advances) and counts it in ``skipped_steps``. Under fp16 an
overflowing gradient is the loss scaler's business: it skips the update and lowers the scale.

Host syncs: a step's loss, gradient norm and clipping flag stay on the device and are summed
there (`_DeviceTally`); the host reads them on logging, evaluation and checkpoint steps only,
so a GPU never waits on a plain step. Acting on a non-finite value *before* its update needs
the host to look every step: ``nonfinite_check: step`` (auto on CPU, where reading is free,
and with ``nonfinite: skip``). With ``log`` (auto on CUDA) a non-finite update goes through and
the run stops at the next read, naming the first bad step; it writes no checkpoint then, so
the last one holds finite weights. fp16's loss scaler reads its overflow flag on the host each
step itself (GradScaler's design), as does the gradient noise scale when it is on.

Run folder (see trainer.rundir): ``config.yaml`` (resolved), ``run.json`` (provenance, device,
sizes, status), ``metrics.jsonl`` (via trainer.tracking.Tracker),
``checkpoints/step_XXXXXXX.pt``, and ``result.json`` at the end (atomically). Nothing is
written before the config, device, precision, data, model and any checkpoint to resume from
have been checked.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.clipping import clip_gradients
from trainer.config import TrainConfig
from trainer.diagnostics import ActivationProbe, WeightSnapshot, grad_norms, per_layer_grad_norms
from trainer.distributed import (
    all_mean,
    all_sum,
    first_reason,
    gradient_sync,
    leave_world,
    shard_rows,
    state_bytes,
)
from trainer.noise_scale import GradientNoiseScale
from trainer.optim import needs_create_graph
from trainer.precision import Precision
from trainer.profiling import StepProfiler, phase
from trainer.reproducibility import deterministic_algorithms, set_rng_state
from trainer.rundir import (
    KILL_AFTER_CHECKPOINT_ENV,
    LoopState,
    Parts,
    RunResult,
    build_run,
    finish_run,
    run_result,
    save_run,
    start_run,
)
from trainer.tracking import Tracker

__all__ = [
    "KILL_AFTER_CHECKPOINT_ENV",
    "RunResult",
    "StepInfo",
    "StopTraining",
    "forward_backward",
    "train",
]


class StopTraining(Exception):
    """Raise from a callback to end the run after the current step.

    >>> def stop_above(info: StepInfo) -> None:
    ...     if info.val_loss is not None and info.val_loss > 3.0:
    ...         raise StopTraining("pruned")
    """

    def __init__(self, reason: str = "callback") -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class StepInfo:
    """What a callback sees after a recorded step (``metrics`` is the record that was logged).

    ``save_checkpoint()`` writes the checkpoint of this step now (before the loop's own, if
    one is due) and returns its path.
    """

    step: int
    tokens: int
    train_loss: float
    val_loss: float | None
    metrics: dict[str, float]
    save_checkpoint: Callable[[], Path] | None = None


Callback = Callable[[StepInfo], object]


# ---------------------------------------------------------------------------------------------
# The loop


def train(
    config: TrainConfig,
    callbacks: Sequence[Callback] = (),
    out_dir: str | Path | None = None,
    resume: bool = False,
    *,
    start_from: str | Path | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> RunResult:
    """Train `config`'s model on its data; see the module docstring for the run folder.

    `resume` continues from the newest checkpoint in `out_dir`. `start_from` continues from
    that checkpoint instead, under `config`'s hyperparameters: a new run in `out_dir`, or with
    `resume` the run there. `parent_run_id` and `tags` go to the MLflow run (a study nests its
    trials this way).
    """
    session_start = time.perf_counter()
    with deterministic_algorithms(config.deterministic), leave_world():
        parts = build_run(config, out_dir, resume, start_from)  # every user error is raised here
        tracker = start_run(parts, parent_run_id, tags)
        try:
            result = _loop(parts, tracker, list(callbacks), session_start)
        except BaseException as error:
            finish_run(parts, tracker, None, error)
            raise
        finish_run(parts, tracker, result, None)
    return result


def _loop(
    parts: Parts, tracker: Tracker, callbacks: list[Callback], session_start: float
) -> RunResult:
    config, data, model, optimizer = parts.config, parts.data, parts.model, parts.optimizer
    precision, scheduler, s, world = parts.precision, parts.scheduler, parts.state, parts.world
    named = [(n, p) for n, p in parts.raw_model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    probe = _activation_probe(parts)
    noise_scale = _noise_scale(parts, params)
    create_graph = needs_create_graph(optimizer)
    val_batches = [  # this rank's rows of the fixed set; the sums are reduced over ranks
        _to(shard_rows(batch, world), parts.device)
        for batch in data.val_batches(config.eval_batches)
    ]
    if parts.saved_rng is not None:
        set_rng_state(parts.saved_rng)  # last, so nothing above draws from the restored streams
    clip_options = config.clip.model_dump(exclude={"mode"})
    profiler = (
        StepProfiler(config.profile, parts.out_dir, world.rank, parts.device.type == "cuda")
        if config.profile.enabled
        else None
    )
    stopped_reason, stop_message = s.stopped_reason, None
    host_checks = config.host_checks(parts.device.type)
    tally = _DeviceTally(parts.device)

    if s.step == 0 and config.eval_every > 0:  # the untrained model's loss anchors the curve
        tracker.log_metrics({"tokens": 0.0, **_evaluate(parts, val_batches)}, step=0)
        _update_best(config, s)
    interval = _Interval(s.step, s.tokens, time.perf_counter())

    while s.step < config.steps and stopped_reason is None:
        step = s.step  # index of this update
        done = step + 1  # updates completed after it
        logging = done % config.log_every == 0 or done == config.steps
        evaluating = done == config.steps or (
            config.eval_every > 0 and done % config.eval_every == 0
        )
        diagnosing = logging and done % config.diagnostics_every == 0

        # 1. sample, forward, loss, backward: grad_accum_steps micro-batches, each loss / k
        if noise_scale is not None:
            noise_scale.start(precision.loss_scale())
        with phase("forward_backward"):
            loss = forward_backward(
                model,
                _micro_batches(parts, step),
                config.grad_accum_steps,
                precision,
                label_smoothing=config.label_smoothing,
                create_graph=create_graph,
                probe=probe if diagnosing else None,
                after_micro_batch=(
                    noise_scale.after_micro_batch if noise_scale is not None else None
                ),
            )

        # 2. true-size gradients, measured before clipping; stop or skip on NaN / inf
        precision.unscale_(optimizer)
        loss = all_mean(loss, world)  # each rank's loss is the mean over its equal share
        grad_norm, per_param = grad_norms(params)
        if noise_scale is not None:  # an opt-in diagnostic: it reads the norm every step
            noise_scale.update(grad_norm.item())
        lrs = [group["lr"] for group in optimizer.param_groups]  # the lr of this update
        clipped, snapshot = tally.no, None
        # under fp16 an overflowing gradient is routine: the scaler skips that step itself
        bad, finite_grads = _nonfinite(loss, grad_norm, precision) if host_checks else (None, True)
        if bad is None:
            # 3. clip, optimiser step, schedule (an fp16 overflow is left to the scaler)
            if finite_grads:
                clipped = clip_gradients(params, config.clip.mode, grad_norm, **clip_options)
            if diagnosing and config.diagnostics.per_layer:
                snapshot = WeightSnapshot(named)
            with phase("optimizer"):
                stepped = precision.step(optimizer)
            s.skipped_steps += int(not stepped)
            tally.add(step, loss, grad_norm, clipped, checked=host_checks, precision=precision)
        else:
            precision.skip()
            if config.nonfinite == "stop":
                stopped_reason = "nonfinite"
                stop_message = (
                    f"step {step}: {bad[0]} is {bad[1]} (non-finite); stopped before the update. "
                    "Lower optimizer.lr, set clip.mode, or set nonfinite: skip"
                )
                break
            s.skipped_steps += 1
        memory = state_bytes(parts.raw_model, optimizer) if logging else {}
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        s.step, s.tokens = done, s.tokens + parts.tokens_per_step
        if profiler is not None:
            profiler.step()

        # 4. read the device's tallies (the one host sync), record, evaluate, call back,
        # checkpoint
        checkpointing = (
            done == config.steps
            or (config.checkpoint_every > 0 and done % config.checkpoint_every == 0)
            or done in config.checkpoint_at
        )
        if not (logging or evaluating or checkpointing):
            continue
        (loss_value, grad_norm_value, clipped_value), first_bad = tally.read(
            s, loss, grad_norm, clipped
        )
        if first_bad is not None:  # only without host checks: the update was applied
            stopped_reason = "nonfinite"
            stop_message = (
                f"step {first_bad[0]}: {first_bad[1]} is non-finite (found when step {done} "
                "was recorded; nonfinite_check reads on logging steps); stopped. Lower "
                "optimizer.lr, set clip.mode, or set nonfinite_check: step to stop before the "
                "update"
            )
            break
        if logging or evaluating:
            metrics = _step_metrics(
                parts, interval, loss_value, grad_norm_value, bool(clipped_value), lrs
            )
            metrics.update(memory)
            if diagnosing and config.diagnostics.per_layer:
                metrics.update(per_layer_grad_norms(named, per_param))
                metrics.update(snapshot.metrics() if snapshot is not None else {})
            if diagnosing and probe is not None:
                metrics.update(probe.metrics())
            if noise_scale is not None:
                metrics.update(noise_scale.metrics())
            if logging:
                s.train_curve.append((done, loss_value))
            if evaluating:
                metrics.update(_evaluate(parts, val_batches))
                stopped_reason = _update_best(config, s)
            tracker.log_metrics(metrics, step=done)
            save_now = functools.partial(save_run, parts, session_start)
            info = StepInfo(done, s.tokens, loss_value, metrics.get("val_loss"), metrics, save_now)
            stopped_reason = first_reason(_call_back(callbacks, info), world) or stopped_reason
            interval = _Interval(s.step, s.tokens, time.perf_counter())
        if checkpointing or stopped_reason is not None:
            s.stopped_reason = stopped_reason
            save_run(parts, session_start)
            interval = _Interval(s.step, s.tokens, time.perf_counter())

    tally.read(s)  # a stop before the update leaves the last steps unread
    if profiler is not None:
        profiler.close()
    result = run_result(parts, session_start, stopped_reason, stop_message)
    result.profile = None if profiler is None else profiler.summary
    return result


BadStep = tuple[int, str]  # (step, "loss" or "gradient norm")


def _nonfinite(
    loss: torch.Tensor, grad_norm: torch.Tensor, precision: Precision
) -> tuple[tuple[str, float] | None, bool]:
    """Read on the host (nonfinite_check: step): what is non-finite this step, None if nothing
    is or only the gradient under fp16 (the scaler skips that update itself); and whether the
    gradient norm is finite."""
    loss_value, grad_norm_value = loss.item(), grad_norm.item()
    finite_grads = math.isfinite(grad_norm_value)
    if not math.isfinite(loss_value):
        return ("loss", loss_value), finite_grads
    if not finite_grads and not precision.scales_loss:
        return ("gradient norm", grad_norm_value), finite_grads
    return None, finite_grads


class _DeviceTally:
    """What the updates since the last read add up to, kept on the device, so a step reads
    nothing on the host (a GPU never waits for it); `read` is the one sync, on logging,
    evaluation and checkpoint steps.

    Without host checks a non-finite update is applied (nothing on the host knows of it yet):
    the tally keeps the first such step and what was non-finite, and `read` reports it.
    """

    def __init__(self, device: torch.device) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self._zero = torch.zeros((), dtype=dtype, device=device)
        self.no = torch.zeros((), dtype=torch.bool, device=device)  # "not clipped"
        self._reset()

    def _reset(self) -> None:
        zero = self._zero
        self.loss_sum, self.updates, self.clipped = zero.clone(), zero.clone(), zero.clone()
        self.first_bad, self.bad_kind = zero - 1, zero.clone()  # kind 1: loss, 2: gradient

    def add(
        self,
        step: int,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        clipped: torch.Tensor,
        *,
        checked: bool,
        precision: Precision,
    ) -> None:
        """One applied update; `checked`: its loss was found finite on the host already."""
        self.clipped += clipped
        if checked:
            self.loss_sum += loss
            self.updates += 1
            return
        finite_loss = torch.isfinite(loss)
        ok = finite_loss & (torch.isfinite(grad_norm) | precision.scales_loss)
        self.loss_sum += torch.where(ok, loss, 0.0)
        self.updates += ok
        new = ~ok & (self.first_bad < 0)
        self.bad_kind = torch.where(new, torch.where(finite_loss, 2.0, 1.0), self.bad_kind)
        self.first_bad = torch.where(new, float(step), self.first_bad)

    def read(self, s: LoopState, *current: torch.Tensor) -> tuple[list[float], BadStep | None]:
        """Fold the tally into `s` and start a new one, in one host read with the `current`
        step's tensors: their values, and (step, what) of the first non-finite update since
        the last read."""
        values = torch.stack(
            [t.to(self._zero.dtype) for t in current]
            + [self.loss_sum, self.updates, self.clipped, self.first_bad, self.bad_kind]
        ).tolist()
        loss_sum, updates, clipped_steps, first_bad, bad_kind = values[len(current) :]
        s.interval_loss_sum += loss_sum
        s.interval_steps += int(updates)
        s.clipped_steps += int(clipped_steps)
        self._reset()
        if first_bad < 0:
            return values[: len(current)], None
        return values[: len(current)], (
            int(first_bad),
            "loss" if bad_kind == 1 else "gradient norm",
        )


def _micro_batches(parts: Parts, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Update `step`'s micro-batches: every rank its rows of the single-process stream's."""
    for m in range(parts.config.grad_accum_steps):
        with phase("data"):
            batch = shard_rows(parts.data.get_batch("train", step, micro=m), parts.world)
            batch = _to(batch, parts.device)
        yield batch


def forward_backward(
    model: nn.Module,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    accum_steps: int,
    precision: Precision,
    *,
    label_smoothing: float = 0.0,
    create_graph: bool = False,
    probe: ActivationProbe | None = None,
    after_micro_batch: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """Accumulate the gradient of the mean loss over `accum_steps` equal micro-batches.

    Each micro-batch's mean loss is divided by `accum_steps` before its backward, so the summed
    gradient equals the gradient of the mean loss over the concatenated batch. Returns that
    mean loss (detached). `probe` hooks the first micro-batch's forward pass only;
    `after_micro_batch(m)` is called after micro-batch m's backward (the gradient noise scale
    reads each micro-batch's gradient there).
    """
    total: torch.Tensor | None = None
    for m, (x, y) in enumerate(micro_batches):
        hooks = probe.attached() if probe is not None and m == 0 else contextlib.nullcontext()
        # under DDP / FSDP2, gradients are all-reduced on the last micro-batch only
        with gradient_sync(model, m == accum_steps - 1):
            with hooks, _twice_differentiable(create_graph), precision.autocast():
                _, loss = model(x, y, label_smoothing=label_smoothing)
            assert loss is not None  # targets were given
            if accum_steps > 1:
                loss = loss / accum_steps
            precision.backward(loss, create_graph=create_graph)
        if after_micro_batch is not None:
            after_micro_batch(m)
        total = loss.detach().float() if total is None else total + loss.detach().float()
    assert total is not None, "no micro-batches"
    return total


def _twice_differentiable(create_graph: bool) -> contextlib.AbstractContextManager[object]:
    """Attention as plain ops when the backward must itself be differentiated (Sophia's
    Hessian): the fused SDPA kernels (flash, memory-efficient) have no double backward."""
    if not create_graph:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


# ---------------------------------------------------------------------------------------------
# What the loop records


@dataclass(frozen=True)
class _Interval:
    """Where the current throughput interval started."""

    step: int
    tokens: int
    time: float


def _step_metrics(
    parts: Parts,
    interval: _Interval,
    loss: float,
    grad_norm: float,
    clipped: bool,
    lrs: list[float],
) -> dict[str, float]:
    s = parts.state
    seconds = time.perf_counter() - interval.time
    tokens_per_s = (s.tokens - interval.tokens) / seconds if seconds > 0 else 0.0
    metrics = {
        "tokens": float(s.tokens),
        "loss": loss,
        "lr": lrs[0],
        **_lr_metrics(parts.optimizer, lrs),
        "grad_norm": grad_norm,
        "clipped": float(clipped),
        "clip_rate": s.clipped_steps / max(s.step, 1),
        "tokens_per_s": tokens_per_s,
        "mfu": parts.flops_per_token * tokens_per_s / parts.peak_flops,
        "skipped_steps": float(s.skipped_steps),
    }
    return metrics


def _lr_metrics(optimizer: torch.optim.Optimizer, lrs: list[float]) -> dict[str, float]:
    """``lr/<group name>``; a name used twice (muP scales) gets ``_<index>`` after the first."""
    out: dict[str, float] = {}
    for index, (group, lr) in enumerate(zip(optimizer.param_groups, lrs, strict=True)):
        name = str(group.get("name", index))
        key = f"lr/{name}" if f"lr/{name}" not in out else f"lr/{name}_{index}"
        out[key] = float(lr)
    return out


@torch.no_grad()
def _evaluate(
    parts: Parts, val_batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, float]:
    """Validation loss (and accuracy for classifiers) on the fixed set; updates the curves."""
    s, model = parts.state, parts.model
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=parts.device)
    correct = torch.zeros((), device=parts.device)
    count = 0
    for x, y in val_batches:
        with parts.precision.autocast():
            logits, loss = model(x, y)
        assert loss is not None
        n = y.numel()
        loss_sum += loss.float() * n
        count += n
        if parts.data.task == "classify":
            correct += (logits.argmax(dim=-1) == y).sum()
    model.train(was_training)
    totals = all_sum(
        torch.stack([loss_sum, correct.float(), torch.tensor(float(count), device=parts.device)]),
        parts.world,
    )
    loss_sum, correct, total = totals.unbind()
    metrics = {"val_loss": (loss_sum / total.clamp_min(1)).item()}
    s.val_curve.append((s.step, metrics["val_loss"]))
    if parts.data.task == "classify":
        metrics["val_accuracy"] = (correct / total.clamp_min(1)).item()
        s.val_accuracy_curve.append((s.step, metrics["val_accuracy"]))
    if s.interval_steps > 0:
        metrics["train_loss_avg"] = s.interval_loss_sum / s.interval_steps
        s.interval_loss_sum, s.interval_steps = 0.0, 0
    return metrics


def _update_best(config: TrainConfig, s: LoopState) -> str | None:
    """Track the best val loss; "early_stopping" once patience evaluations brought nothing."""
    val_loss = s.val_curve[-1][1]
    if s.best_val_loss is None or val_loss < s.best_val_loss - config.early_stopping.min_delta:
        s.evals_since_best = 0
    else:
        s.evals_since_best += 1
    if math.isfinite(val_loss) and (s.best_val_loss is None or val_loss < s.best_val_loss):
        s.best_val_loss = val_loss
    patience = config.early_stopping.patience
    return "early_stopping" if patience is not None and s.evals_since_best >= patience else None


def _call_back(callbacks: list[Callback], info: StepInfo) -> str | None:
    """Call every callback; the reason of the first StopTraining, if any."""
    reason = None
    for callback in callbacks:
        try:
            callback(info)
        except StopTraining as stop:
            reason = reason or stop.reason
    return reason


def _activation_probe(parts: Parts) -> ActivationProbe | None:
    diagnostics = parts.config.diagnostics
    if not diagnostics.activations or parts.config.compile:
        return None  # hooks on a compiled module would force recompilation
    return ActivationProbe(parts.raw_model)


def _noise_scale(parts: Parts, params: list[nn.Parameter]) -> GradientNoiseScale | None:
    config = parts.config
    if not config.diagnostics.gns:
        return None
    micro_batch = parts.data.batch_size
    noise_scale = GradientNoiseScale(
        params,
        micro_batch=micro_batch,
        accum_steps=config.grad_accum_steps,
        tokens_per_example=parts.data.tokens_per_batch // micro_batch,
        ema=config.diagnostics.gns_ema,
        world=parts.world,
    )
    ddp = getattr(parts.model, "_orig_mod", parts.model)  # under torch.compile
    if isinstance(ddp, nn.parallel.DistributedDataParallel):  # per-rank gradients, see there
        ddp.register_comm_hook(None, noise_scale.ddp_comm_hook)
    return noise_scale


def _to(
    batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
