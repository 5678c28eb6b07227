"""Step-time cost of the online gradient noise scale (`diagnostics.gns: true`).

The same `trainer.train` run twice over, alternating and repeated: gpt-tiny's shape with two
micro-batches of 8 per step (the noise scale needs accumulation), the noise scale off, then on.
Step time is measured between the records of two steps (set-up, the final evaluation and the
checkpoint left out), as in benchmarks/trainer_overhead.py, whose timing this reuses. The ratio
of the medians, the median of the paired ratios (each on-run against the off-run beside it) and
that of the fastest repeats are printed; the issue asks for at most 1.05.

    python benchmarks/gns_overhead.py                 # about 2 minutes on 2 CPU cores
    python benchmarks/gns_overhead.py --repeats 9 --steps 120
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer_overhead import Timing, time_trainer  # noqa: E402

from trainer.config import TrainConfig, parse_config  # noqa: E402
from trainer.data import build_data  # noqa: E402


def make_config(steps: int, log_every: int, gns: bool) -> TrainConfig:
    return parse_config(
        {
            "steps": steps,
            "log_every": log_every,
            "eval_every": 0,
            "eval_batches": 2,
            "checkpoint_every": 0,
            "grad_accum_steps": 2,
            "model": {"n_layer": 2, "n_head": 4, "d_model": 64},
            "data": {"block_size": 128, "batch_size": 8},
            "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1},
            "schedule": {"name": "cosine", "warmup_steps": 10},
            "diagnostics": {"gns": gns},
            "tracking": {"enabled": False},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="alternating repetitions")
    parser.add_argument("--steps", type=int, default=80, help="steps per run")
    parser.add_argument("--log-every", type=int, default=10, help="log_every")
    parser.add_argument("--warmup", type=int, default=20, help="first timed record")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    off = make_config(args.steps, args.log_every, gns=False)
    on = make_config(args.steps, args.log_every, gns=True)
    first, last = args.warmup, args.steps - args.log_every
    build_data(off.data, seed=off.seed)  # the corpus cache, outside the timings
    time_trainer(off, first, last)  # warm-up
    without: list[Timing] = []
    with_gns: list[Timing] = []
    for _ in range(args.repeats):
        without.append(time_trainer(off, first, last))
        with_gns.append(time_trainer(on, first, last))

    def median(timings: list[Timing]) -> float:
        return statistics.median(t[0] for t in timings)

    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date: {dt.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"model: GPT d_model 64, 2 layers, block 128, 2 micro-batches of 8; {args.steps} steps, "
        f"timed steps {first}..{last}, {args.repeats} alternating repeats"
    )
    for name, timings in (("gns off", without), ("gns on", with_gns)):
        print(f"{name:8s} median {median(timings) * 1e3:7.2f} ms/step wall")
    print(f"step-time ratio on / off (medians):        {median(with_gns) / median(without):.3f}")
    paired = statistics.median(g[0] / w[0] for g, w in zip(with_gns, without, strict=True))
    print(f"step-time ratio, median of paired repeats: {paired:.3f} (target <= 1.05)")
    fastest = min(t[0] for t in with_gns) / min(t[0] for t in without)
    print(f"step-time ratio of the fastest repeats:    {fastest:.3f}")
    print(f"all wall ms/step, off: {[round(t[0] * 1e3, 2) for t in without]}")
    print(f"all wall ms/step, on:  {[round(t[0] * 1e3, 2) for t in with_gns]}")


if __name__ == "__main__":
    main()
