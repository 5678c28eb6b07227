"""Data parallelism inside one job: DDP and FSDP2 over the processes torchrun starts.

Launch with ``scaleplan train CONFIG --nproc N`` (which starts torchrun's elastic agent) or
``torchrun --nproc-per-node N -m trainer CONFIG`` directly; several nodes through torchrun's
rendezvous options. Each process reads RANK, WORLD_SIZE and LOCAL_RANK from the environment;
one process (no WORLD_SIZE) is the single-device trainer, untouched.

- Backend: NCCL on CUDA (device ``cuda:LOCAL_RANK``), gloo on CPU, chosen from the device.
- ``strategy: ddp``: `DistributedDataParallel`; gradients are all-reduced (averaged) in the
  backward pass. ``fsdp``: FSDP2 (`torch.distributed.fsdp.fully_shard`) on every transformer
  block (or MLP layer / CNN stage), then on the root; parameters, gradients and optimiser state
  are sharded across ranks (``reshard_after_forward: true`` frees the gathered parameters after
  each block's forward, ZeRO-3-like; false keeps them until backward, ZeRO-2-like), with a
  mixed-precision policy from the run's precision and CPU offload (`CPUOffloadPolicy`) as an
  option. Sharding is one step of the model pipeline: after parametrization (muP's init and
  multipliers are set on the full model first), before the optimiser and compile.
- Batches stay a pure function of (seed, step): every rank draws the step's micro-batch and
  keeps its rows ``[rank * b / N, (rank + 1) * b / N)`` (`shard_rows`), so N ranks together
  see exactly the single-process stream, and averaging their gradients gives the gradient of
  the same global batch.
- Gradient accumulation skips the gradient all-reduce on all but the last micro-batch
  (`gradient_sync`: DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``).
- Metrics are reduced across ranks (`all_mean`, `all_sum`) and written by rank 0 only.
- Collectives time out after ``timeout_s``: a rank that dies takes the job down instead of
  hanging it (the elastic agent stops the others).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainer.errors import ConfigError

__all__ = [
    "DistributedConfig",
    "World",
    "all_mean",
    "all_sum",
    "barrier",
    "gradient_sync",
    "init_world",
    "parallelize",
    "shard_rows",
    "state_bytes",
    "world_from_env",
]

Strategy = Literal["none", "ddp", "fsdp"]
# modules that get their own FSDP2 unit, by the attribute that holds them in each model
_SHARD_UNITS = ("blocks", "hidden_layers", "stages")


class DistributedConfig(BaseModel):
    """How the processes torchrun started split the work (ignored with one process)."""

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy = Field(
        default="ddp",
        description="ddp: replicate the model, average gradients; fsdp: FSDP2, shard "
        "parameters, gradients and optimiser state per block; none: refuse to run on more "
        "than one process. With one process nothing is wrapped.",
    )
    reshard_after_forward: bool = Field(
        default=True,
        description="fsdp: free each block's gathered parameters after its forward and gather "
        "them again for backward (ZeRO-3-like); false keeps them (ZeRO-2-like, more memory).",
    )
    cpu_offload: bool = Field(
        default=False,
        description="fsdp: keep sharded parameters, gradients and optimiser state in CPU "
        "memory (CPUOffloadPolicy); the optimiser step runs on the CPU.",
    )
    timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="Seconds a collective may wait for the other ranks before the job fails.",
    )


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank, number of ranks, rank on this node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run folder and talks to MLflow."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The World torchrun's environment describes; one process when WORLD_SIZE is unset."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun); got "
            f"{os.environ.get('WORLD_SIZE')!r}, {os.environ.get('RANK')!r}, "
            f"{os.environ.get('LOCAL_RANK')!r}"
        ) from None
    return World(rank=rank, size=size, local_rank=local)


def init_world(config: DistributedConfig, device: torch.device) -> tuple[World, torch.device]:
    """Join the job's process group (once per process) and pick this rank's device."""
    world = world_from_env()
    if not world.distributed:
        return world, device
    if config.strategy == "none":
        raise ConfigError(
            f"distributed.strategy: 'none' but the job has {world.size} processes; set ddp "
            "or fsdp, or launch one process"
        )
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if world.local_rank >= count:
            raise ConfigError(
                f"--nproc: local rank {world.local_rank} has no GPU (this node has {count}); "
                f"start at most {count} processes per node"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(
            f"device: {device.type!r} cannot run distributed training; use cuda (NCCL) or "
            "cpu (gloo)"
        )
    if not dist.is_initialized():
        global _OWN_GROUP
        _OWN_GROUP = True  # ours to tear down when the run ends (not a launcher's, e.g. Ray's)
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=dt.timedelta(seconds=config.timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return world, device


def parallelize(
    model: nn.Module,
    config: DistributedConfig,
    world: World,
    device: torch.device,
    param_dtype: torch.dtype | None,
) -> nn.Module:
    """The module the loop runs forward on: `model` itself with one process; DDP around it;
    or `model` sharded in place by FSDP2 (its parameters become DTensors, names unchanged)."""
    if not world.distributed:
        return model
    if config.strategy == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {"reshard_after_forward": config.reshard_after_forward}
    if param_dtype is not None:  # compute in the autocast dtype, reduce gradients in fp32
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32
        )
    if config.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for attribute in _SHARD_UNITS:
        for unit in getattr(model, attribute, ()):
            fully_shard(unit, **options)
    fully_shard(model, **options)
    return model


def gradient_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    """A context for one micro-batch's backward: all-reduce its gradients (the last
    micro-batch of a step) or only accumulate them locally (the others)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    target = getattr(model, "_orig_mod", model)  # under torch.compile
    setter = getattr(target, "set_requires_gradient_sync", None)
    if setter is not None:  # an FSDP2 module
        setter(enabled)
    return contextlib.nullcontext()


def shard_rows(
    batch: tuple[torch.Tensor, torch.Tensor], world: World
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous share of a batch's rows (uneven batches: the first ranks get
    one more row, as `torch.tensor_split`)."""
    if not world.distributed:
        return batch
    x, y = batch
    return x.tensor_split(world.size)[world.rank], y.tensor_split(world.size)[world.rank]


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of `values` over ranks (every rank gets it)."""
    if world.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return values


def all_mean(values: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of `values` over ranks."""
    return all_sum(values, world) / world.size if world.distributed else values


def barrier(world: World) -> None:
    """Wait for every rank (nothing with one process)."""
    if world.distributed and dist.is_initialized():
        dist.barrier()


def first_reason(reason: str | None, world: World) -> str | None:
    """The first non-None stop reason over ranks, so every rank stops together."""
    if not world.distributed:
        return reason
    reasons: list[str | None] = [None] * world.size
    dist.all_gather_object(reasons, reason)
    return next((r for r in reasons if r is not None), None)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Bytes this rank holds for parameters, gradients and optimiser state (its shards under
    FSDP2): ``memory/params``, ``memory/grads``, ``memory/optimizer``."""

    def size(tensor: torch.Tensor) -> int:
        local = local_tensor(tensor)
        return local.numel() * local.element_size()

    params = list({id(p): p for p in model.parameters()}.values())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "memory/params": float(sum(size(p) for p in params)),
        "memory/grads": float(sum(size(p.grad) for p in params if p.grad is not None)),
        "memory/optimizer": float(sum(size(v) for v in state if v.dim() > 0)),
    }


_OWN_GROUP = False


@contextlib.contextmanager
def leave_world() -> Iterator[None]:
    """Tear down the process group `init_world` started, when the run ends (so the process
    exits cleanly); a group someone else started (Ray Train's) stays."""
    global _OWN_GROUP
    try:
        yield
    finally:
        if _OWN_GROUP and dist.is_initialized():
            dist.destroy_process_group()
        _OWN_GROUP = False
