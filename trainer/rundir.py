"""A training run's parts, its checkpointed state, and its folder.

`build_run` checks and builds everything a run needs (device, precision, data, model,
optimiser, schedule, and the checkpoint to resume or start from) without writing anything;
`start_run` creates the folder (config.yaml, run.json, the Tracker's metrics.jsonl); `save_run`
writes a checkpoint; `finish_run` writes result.json and the final status. The loop itself is
in trainer.loop.

Starting from a checkpoint under a new config (``start_from``): the weights, the optimiser's
moments and step counts, the schedule's position, the loop's counters and curves and the RNG
come from the checkpoint; the optimiser's param-group values (lr, betas, weight decay, ...) and
the schedule come from the config, so the next update uses the new hyperparameters at the
checkpoint's step. Population Based Training continues one trial from another's this way.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from trainer.checkpoint import (
    check_config,
    check_continuation,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_and_optimizer,
    save_checkpoint,
    save_sharded_checkpoint,
)
from trainer.config import TrainConfig, config_hash
from trainer.data import DataSource, build_data
from trainer.diagnostics import flops_per_token, peak_flops
from trainer.distributed import World, init_world, parallelize
from trainer.errors import ConfigError
from trainer.models import build_model
from trainer.optim import build_optimizer
from trainer.parametrization import parametrize
from trainer.precision import Precision, build_precision, resolve_device
from trainer.reproducibility import rng_state, run_provenance, seed_everything
from trainer.schedules import build_scheduler
from trainer.tracking import NullTracker, Tracker, json_safe, plot_run, write_text_atomic

__all__ = [
    "KILL_AFTER_CHECKPOINT_ENV",
    "LoopState",
    "Parts",
    "RunResult",
    "build_run",
    "check_world",
    "default_run_dir",
    "finish_run",
    "flops_per_step",
    "run_result",
    "save_run",
    "start_run",
]

DEFAULT_RUNS_DIR = Path("runs") / "train"
# Test hook: SIGKILL this process right after the checkpoint of this step is on disk (under
# several processes, only the rank in KILL_RANK_ENV when it is set).
KILL_AFTER_CHECKPOINT_ENV = "SCALEPLAN_TEST_KILL_AFTER_CHECKPOINT"
KILL_RANK_ENV = "SCALEPLAN_TEST_KILL_RANK"


@dataclass
class RunResult:
    """What one call of `train` produced; ``to_dict()`` is what result.json holds.

    `flops` is flops_per_token * tokens: for a GPT, 6N + attention per token (Kaplan et al.
    2020); for MLP and CNN an estimate, 6 FLOPs per multiply-accumulate of their Linear and
    Conv layers, per example (see trainer.diagnostics.flops_per_token). `tokens` counts examples
    for classifiers. `wall_seconds` adds up the time of every resumed part of the run.
    `stopped_reason`: None (ran all steps), "nonfinite", "early_stopping", or a callback's
    StopTraining reason.
    """

    train_curve: list[tuple[int, float]]
    val_curve: list[tuple[int, float]]
    final_val_loss: float | None
    best_val_loss: float | None
    final_val_accuracy: float | None
    steps: int
    tokens: int
    flops: float
    flops_per_token: float
    wall_seconds: float
    out_dir: str
    n_params: int
    n_params_non_embedding: int
    stopped_reason: str | None
    stop_message: str | None
    skipped_steps: int
    clip_rate: float
    profile: dict[str, float] | None = None  # the step-time split, with profile.enabled

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoopState:
    """The loop's counters: checkpointed, so a resumed run carries on exactly."""

    step: int = 0
    tokens: int = 0
    clipped_steps: int = 0
    skipped_steps: int = 0
    best_val_loss: float | None = None
    evals_since_best: int = 0
    interval_loss_sum: float = 0.0
    interval_steps: int = 0
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    val_accuracy_curve: list[tuple[int, float]] = field(default_factory=list)
    wall_seconds: float = 0.0
    stopped_reason: str | None = None  # a stopped run resumes as a no-op

    def to_dict(self) -> dict[str, Any]:
        return {
            k: [list(p) for p in v] if k.endswith("_curve") else v for k, v in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LoopState:
        state = cls(**{k: v for k, v in saved.items() if not k.endswith("_curve")})
        for key in ("train_curve", "val_curve", "val_accuracy_curve"):
            setattr(state, key, [(int(s), float(v)) for s, v in saved[key]])
        return state


@dataclass
class Parts:
    """Everything `train` builds before its first step."""

    config: TrainConfig
    out_dir: Path
    device: torch.device
    precision: Precision
    data: DataSource
    raw_model: nn.Module  # the module itself (checkpoints, diagnostics)
    model: nn.Module  # what runs forward: raw_model (FSDP2-sharded or not) or DDP around it,
    # or torch.compile of that
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: LoopState
    resumed_from: Path | None  # the checkpoint the run starts from, if any
    continues_run: bool  # resume: this folder's run goes on (metrics.jsonl, the MLflow run)
    saved_rng: dict[str, Any] | None
    flops_per_token: float
    peak_flops: float  # of all ranks together
    peak_flops_source: str
    tokens_per_step: int  # over all ranks
    world: World = field(default_factory=World)


# ---------------------------------------------------------------------------------------------
# Building a run, checkpoints, the run folder


def build_run(
    config: TrainConfig,
    out_dir: str | Path | None,
    resume: bool,
    start_from: str | Path | None = None,
) -> Parts:
    """Check everything and build the run; writes nothing in the run folder.

    `start_from`: a checkpoint (this run's or another's) to continue under `config`'s
    hyperparameters (see the module docstring); with `resume` the run in `out_dir` goes on
    from it, else `out_dir` starts a new run at the checkpoint's step.
    """
    world, device = init_world(config.distributed, resolve_device(config.device))
    precision = build_precision(config.precision, device)
    run_dir = _run_dir(config, out_dir, resume, world)
    saved: dict[str, Any] | None = None
    resumed_from = None
    if start_from is not None:
        resumed_from = Path(start_from)
        saved = load_checkpoint(resumed_from)
        check_continuation(saved, config, resumed_from)
    elif resume:
        resumed_from = latest_checkpoint(run_dir)
        if resumed_from is None:
            raise ConfigError(
                f"resume: no checkpoint in '{run_dir / 'checkpoints'}'; start without resume"
            )
        saved = load_checkpoint(resumed_from)
        check_config(saved, config, resumed_from)

    seed_everything(config.seed)  # the same on every rank: identical initial weights
    data = build_data(config.data, seed=config.seed)
    check_world(config, world)
    raw_model: nn.Module = build_model(
        config.model,
        vocab_size=data.vocab_size,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        seed=config.seed,
    ).to(device)
    # the model pipeline: build -> parametrize -> precision -> parallelize -> optimiser
    # -> (state) -> compile
    parametrized = parametrize(raw_model, config.parametrization, config.optimizer)
    example = data.val_batches(1)[0][0].to(device)
    per_token = flops_per_token(raw_model, example, config.data.block_size)
    raw_model = precision.prepare(raw_model)
    model = parallelize(raw_model, config.distributed, world, device, precision.dtype)
    optimizer = build_optimizer(
        raw_model,
        config.optimizer,
        parametrized.lr_scale,
        independent_wd=parametrized.independent_wd,
    )
    scheduler = build_scheduler(optimizer, config.schedule, config.steps)
    state = LoopState()
    if saved is not None:
        assert resumed_from is not None
        _load_state(
            raw_model,
            optimizer,
            scheduler,
            saved,
            resumed_from,
            start_from is not None,
            fsdp=world.distributed and config.distributed.strategy == "fsdp",
        )
        precision.load_state_dict(saved.get("scaler") or {})
        state = LoopState.from_dict(saved["loop"])
        if start_from is not None:
            state.stopped_reason = None  # a new config is a new decision to go on
    if config.compile:
        model = torch.compile(model)  # type: ignore[assignment]  # a callable module
    peak, peak_source = peak_flops(device, config.diagnostics.peak_flops)
    return Parts(
        config=config,
        out_dir=run_dir,
        device=device,
        precision=precision,
        data=data,
        raw_model=raw_model,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        resumed_from=resumed_from,
        continues_run=resume,
        saved_rng=None if saved is None else saved["rng"],
        flops_per_token=per_token,
        peak_flops=peak * world.size,
        peak_flops_source=peak_source,
        tokens_per_step=data.tokens_per_batch * config.grad_accum_steps,
        world=world,
    )


def check_world(config: TrainConfig, world: World) -> None:
    """What a run needs of the job's processes, checked before anything is written (and by
    the launcher, before any process starts)."""
    ranks, batch_size = world.size, config.data.batch_size
    if batch_size % ranks:
        raise ConfigError(
            f"data.batch_size: {batch_size} rows cannot be split evenly over {ranks} "
            f"processes; use a multiple of {ranks}"
        )
    fsdp = world.distributed and config.distributed.strategy == "fsdp"
    if config.diagnostics.gns and fsdp:
        raise ConfigError(
            "diagnostics.gns: not available under distributed.strategy fsdp (its gradients "
            "are reduce-scattered, never whole on a rank); use ddp, or gradient accumulation "
            "on one process"
        )
    if config.diagnostics.gns and config.grad_accum_steps < 2 and not world.distributed:
        raise ConfigError(
            f"diagnostics.gns: true needs two batch sizes, but grad_accum_steps is "
            f"{config.grad_accum_steps} on one process; set grad_accum_steps >= 2 (each "
            "micro-batch is the small batch, the step's accumulated gradient the big one), "
            "or run on several DDP processes (each rank's gradient is the small batch)"
        )
    if fsdp and config.optimizer.name in FSDP_REFUSED_OPTIMIZERS:
        raise ConfigError(
            f"optimizer.name: {config.optimizer.name!r} cannot run under distributed.strategy "
            f"fsdp ({FSDP_REFUSED_OPTIMIZERS[config.optimizer.name]}); use ddp, or another "
            "optimizer"
        )


# optimizers whose update needs a whole matrix (or a second backward) on one rank
FSDP_REFUSED_OPTIMIZERS = {
    "muon": "its orthogonalisation needs each whole matrix on one rank",
    "shampoo": "its preconditioners need each whole matrix on one rank",
    "soap": "its preconditioners need each whole matrix on one rank",
    "sophia": "its Hessian estimate needs a second backward through the sharded model",
    "adafactor": "its factored moments need each whole matrix on one rank",
    "lars": "its per-layer trust ratio needs each whole parameter's norm on one rank",
    "lamb": "its per-layer trust ratio needs each whole parameter's norm on one rank",
}


def flops_per_step(config: TrainConfig) -> float:
    """Training FLOPs of one optimiser step under `config`: the run's own flops_per_token
    (see trainer.diagnostics) times the tokens a step consumes, counted on a model built on
    the meta device (no memory, no initialisation), so a budget in FLOPs can become steps."""
    key = json.dumps(
        [config.model.model_dump(mode="json"), config.data.model_dump(mode="json")],
        sort_keys=True,
        default=str,
    )
    if key not in _FLOPS_PER_BATCH:  # the model and the data are all the count depends on
        data = build_data(config.data, seed=config.seed)
        with torch.device("meta"):
            model = build_model(
                config.model,
                vocab_size=data.vocab_size,
                input_shape=data.input_shape,
                num_classes=data.num_classes,
            )
        example = data.val_batches(1)[0][0][:1].to("meta")
        per_token = flops_per_token(model, example, config.data.block_size)
        _FLOPS_PER_BATCH[key] = per_token * data.tokens_per_batch
    return _FLOPS_PER_BATCH[key] * config.grad_accum_steps


_FLOPS_PER_BATCH: dict[str, float] = {}


def _load_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    saved: dict[str, Any],
    path: Path,
    under_new_config: bool,
    *,
    fsdp: bool,
) -> None:
    """The checkpoint's weights, optimiser state and schedule position. Under a new config
    (``start_from``) the optimiser's param-group values and the schedule are the ones just
    built from the config: only the moments, step counts and the step reached come along."""
    built = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    base_lrs = list(scheduler.base_lrs)
    try:
        load_model_and_optimizer(model, optimizer, saved, path, sharded_params=fsdp)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ConfigError(
            f"checkpoint '{path}' holds state for another model or optimiser "
            f"({_first_line(error)}); continue it under the same model and optimiser"
        ) from None
    if not under_new_config:
        scheduler.load_state_dict(saved["scheduler"])
        return
    for group, values in zip(optimizer.param_groups, built, strict=True):
        group.update(values)  # this config's lr, betas, weight decay, ...
    scheduler.load_state_dict({**saved["scheduler"], "base_lrs": base_lrs})  # the step reached
    # this config's schedule at that step: recompute the step just taken
    scheduler.last_epoch -= 1
    scheduler.step()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def default_run_dir(config: TrainConfig) -> Path:
    """runs/train/<run name or timestamp>, with -2, -3, ... when taken."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = DEFAULT_RUNS_DIR / (config.tracking.run_name or stamp)
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _run_dir(config: TrainConfig, out_dir: str | Path | None, resume: bool, world: World) -> Path:
    if out_dir is None:
        if resume:
            raise ConfigError("resume: needs the run's folder (out_dir / --out) to continue")
        if world.distributed:  # each rank would pick its own folder
            raise ConfigError(
                f"--out: needed with {world.size} processes, so that every rank writes to the "
                "same run folder"
            )
        return default_run_dir(config)
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out: '{path}' is a file; expected a folder for the run")
    if not resume and (list_checkpoints(path) or (path / "metrics.jsonl").exists()):
        raise ConfigError(f"out: '{path}' already holds a run; resume it, or choose another folder")
    return path


def save_run(parts: Parts, session_start: float) -> Path:
    s = parts.state
    loop = s.to_dict()
    loop["wall_seconds"] = s.wall_seconds + time.perf_counter() - session_start
    state = {
        "step": s.step,
        "data_position": {"step": s.step},
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.precision.state_dict(),
        "rng": rng_state(),  # the same on every rank: all draw the same numbers
        "loop": loop,
        "config": parts.config.model_dump(mode="json"),
        "config_hash": config_hash(parts.config),
    }
    keep = parts.config.keep_checkpoints
    if parts.world.distributed:
        path = save_sharded_checkpoint(
            parts.out_dir, state, parts.raw_model, parts.optimizer, keep, main=parts.world.main
        )
    else:
        state["model"] = parts.raw_model.state_dict()
        state["optimizer"] = parts.optimizer.state_dict()
        path = save_checkpoint(parts.out_dir, state, keep=keep)
    kill_rank = os.environ.get(KILL_RANK_ENV)
    if os.environ.get(KILL_AFTER_CHECKPOINT_ENV) == str(s.step) and (
        kill_rank is None or kill_rank == str(parts.world.rank)
    ):
        os.kill(os.getpid(), signal.SIGKILL)
    return path


def start_run(parts: Parts, parent_run_id: str | None, tags: dict[str, str] | None) -> Tracker:
    """Create the run folder: config.yaml, run.json, and the tracker (metrics.jsonl); on
    ranks other than 0, nothing (a tracker that logs nothing)."""
    config, run_dir = parts.config, parts.out_dir
    if not parts.world.main:
        return NullTracker()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        run_dir / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    )
    _write_run_json(parts, "running")
    tracking = config.tracking
    tracker = Tracker(
        run_dir,
        enabled=tracking.enabled,
        tracking_uri=tracking.tracking_uri,
        experiment=tracking.experiment,
        run_name=tracking.run_name or run_dir.name,
        parent_run_id=parent_run_id,
        tags=tags,
        resume_step=parts.state.step if parts.continues_run else None,
    )
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_params(
        {
            **config.model_dump(mode="json"),
            "n_params": _n_params(parts.raw_model, True),
            "n_params_non_embedding": _n_params(parts.raw_model, False),
            "config_hash": config_hash(config),
            "data_fingerprint": parts.data.fingerprint,
        }
    )
    return tracker


def finish_run(
    parts: Parts, tracker: Tracker, result: RunResult | None, error: BaseException | None
) -> None:
    if not parts.world.main:
        return
    if result is None:
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        tracker.finish("KILLED" if status == "interrupted" else "FAILED", {"error": repr(error)})
        _write_run_json(parts, status)
        return
    summary = result.to_dict()
    write_text_atomic(parts.out_dir / "result.json", _json(summary))
    tracker.log_artifact(parts.out_dir / "result.json")
    if tracker.run_id is not None:  # loss and grad-norm curves, for the MLflow UI
        for plot in plot_run(parts.out_dir):
            tracker.log_artifact(plot)
    status = "completed" if result.stopped_reason is None else "stopped"
    tracker.finish(
        "FAILED" if result.stopped_reason == "nonfinite" else "FINISHED",
        {k: v for k, v in summary.items() if not k.endswith("_curve")},
    )
    _write_run_json(parts, status)


def _write_run_json(parts: Parts, status: str) -> None:
    provenance = run_provenance(config_hash(parts.config), parts.data.fingerprint, parts.device)
    run = {
        "status": status,
        "updated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **provenance,
        "model": parts.config.model.kind,
        "n_params": _n_params(parts.raw_model, True),
        "n_params_non_embedding": _n_params(parts.raw_model, False),
        "flops_per_token": parts.flops_per_token,
        "peak_flops": parts.peak_flops,
        "peak_flops_source": parts.peak_flops_source,
        "precision": parts.config.precision,
        "data": parts.data.meta,
        "resumed_from": None if parts.resumed_from is None else str(parts.resumed_from),
    }
    write_text_atomic(parts.out_dir / "run.json", _json(run))


def run_result(
    parts: Parts, session_start: float, stopped_reason: str | None, stop_message: str | None
) -> RunResult:
    s = parts.state
    return RunResult(
        train_curve=list(s.train_curve),
        val_curve=list(s.val_curve),
        final_val_loss=s.val_curve[-1][1] if s.val_curve else None,
        best_val_loss=s.best_val_loss,
        final_val_accuracy=s.val_accuracy_curve[-1][1] if s.val_accuracy_curve else None,
        steps=s.step,
        tokens=s.tokens,
        flops=parts.flops_per_token * s.tokens,
        flops_per_token=parts.flops_per_token,
        wall_seconds=s.wall_seconds + time.perf_counter() - session_start,
        out_dir=str(parts.out_dir),
        n_params=_n_params(parts.raw_model, True),
        n_params_non_embedding=_n_params(parts.raw_model, False),
        stopped_reason=stopped_reason,
        stop_message=stop_message,
        skipped_steps=s.skipped_steps,
        clip_rate=s.clipped_steps / max(s.step, 1),
    )


def _n_params(model: nn.Module, include_embeddings: bool) -> int:
    count = getattr(model, "num_params", None)
    if count is None:
        return sum(p.numel() for p in model.parameters())
    return int(count(include_embeddings=include_embeddings))


def _json(payload: Any) -> str:
    return json.dumps(json_safe(payload), indent=2) + "\n"
