"""`scaleplan train --nproc N`: N training processes on this machine through torchrun's
elastic agent (`torch.distributed.launcher`), the same launcher `torchrun` is.

Each process runs ``python -m studies.cli train`` with this command's arguments, under the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); trainer.distributed
does the rest. The agent watches its processes: when one fails or dies, it stops the others, so
the job ends instead of hanging, and this process reports which rank went first in one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.cli import EXIT_USAGE
from trainer.config import TrainConfig
from trainer.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

__all__ = ["launch", "worker_argv"]


def launch(args: argparse.Namespace, config: TrainConfig) -> int:
    """Start `args.nproc` ranks of ``scaleplan train`` and wait for them; the exit status is
    rank 0's (2 when a rank met a user mistake, which rank 0 printed)."""
    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from trainer.distributed import World
    from trainer.precision import resolve_device
    from trainer.rundir import check_world, default_run_dir

    nproc = args.nproc
    device = resolve_device(config.device)
    if device.type == "cuda":
        available, what = torch.cuda.device_count(), "GPUs"
    else:
        available, what = os.cpu_count() or 1, "CPU cores"
    if not 1 <= nproc <= available:
        raise ConfigError(
            f"--nproc: {nproc} processes, but this machine has {available} {what}; "
            f"use 1 to {available}"
        )
    if config.distributed.strategy == "none":
        raise ConfigError(
            f"distributed.strategy: 'none' cannot run on {nproc} processes; set ddp or fsdp"
        )
    check_world(config, World(size=nproc))  # what each rank would refuse, said once
    out = Path(args.out) if args.out is not None else default_run_dir(config)
    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a free port on this machine, as torchrun --standalone
        max_restarts=0,
        monitor_interval=0.2,
    )
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # we report
    # each rank its share of the cores (torchrun sets 1); oversubscribed threads crawl
    threads = max(1, (os.cpu_count() or 1) // nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        elastic_launch(launch_config, sys.executable)(*worker_argv(args, out))
    except ChildFailedError as failed:
        return _report(failed.failures, out)
    return 0


def worker_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """The command line of one rank: this command, without --nproc, with --out fixed (every
    rank must write to the same run folder)."""
    argv = ["-m", "studies.cli", "train", str(args.config), "--out", str(out)]
    if args.overrides:
        argv += ["--set", *args.overrides]
    argv += ["--resume"] if args.resume else []
    argv += ["--json"] if args.json else []
    argv += ["--profile"] if args.profile else []
    return argv


def _report(failures: Mapping[int, ProcessFailure], out: Path) -> int:
    codes = {rank: int(failure.exitcode) for rank, failure in failures.items()}
    if EXIT_USAGE in codes.values():
        return EXIT_USAGE  # a user mistake: rank 0 printed it
    first = min(codes, key=lambda rank: failures[rank].timestamp)
    code = codes[first]
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
    print(
        f"scaleplan train: rank {first} {how}; the other ranks were stopped. The newest "
        f"checkpoint in '{out}' resumes it (--resume --out {out})",
        file=sys.stderr,
    )
    return 1
