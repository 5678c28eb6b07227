"""Step-time overhead of `trainer.train` (default diagnostics) over a bare hand-written loop.

Both loops train the same byte-level GPT (gpt-tiny's shape) with the same optimiser, schedule,
clipping and batches, for the same steps, in this one process, alternating, repeated; the
median of each is compared. Step time is measured between the records of two steps (from
step `--warmup` to step `steps - log_every`), so set-up, the final evaluation and the final
checkpoint are left out of both; the whole-call times are printed too. Three ratios: of the
medians; the median of the per-repeat ratios (each trainer run against the bare run right after
it, which shares its load); and of the fastest repeats.

`trainer.train` runs with MLflow tracking off: it still writes metrics.jsonl (one JSON line per
logging step), run.json and config.yaml, and computes every default diagnostic.

    python benchmarks/trainer_overhead.py            # about 2 minutes on 2 CPU cores
    python benchmarks/trainer_overhead.py --repeats 9 --steps 100
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import TrainConfig, parse_config  # noqa: E402
from trainer.data import build_data  # noqa: E402
from trainer.loop import StepInfo, train  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.schedules import build_scheduler  # noqa: E402


def make_config(steps: int, log_every: int) -> TrainConfig:
    return parse_config(
        {
            "steps": steps,
            "log_every": log_every,
            "eval_every": 0,  # one evaluation, at the end (outside the timed span)
            "eval_batches": 2,
            "checkpoint_every": 0,  # one checkpoint, at the end (outside the timed span)
            "model": {"n_layer": 2, "n_head": 4, "d_model": 64},
            "data": {"block_size": 128, "batch_size": 16},
            "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1},
            "schedule": {"name": "cosine", "warmup_steps": 10},
            "tracking": {"enabled": False},
        }
    )


Timing = tuple[float, float, float]  # wall s/step, CPU s/step, whole call wall s


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def per_step(marks: dict[int, tuple[float, float]], first: int, last: int) -> tuple[float, float]:
    steps = last - first
    return (
        (marks[last][0] - marks[first][0]) / steps,
        (marks[last][1] - marks[first][1]) / steps,
    )


def time_trainer(config: TrainConfig, first: int, last: int) -> Timing:
    """Seconds per step between the records of steps `first` and `last`; the whole call."""
    marks: dict[int, tuple[float, float]] = {}

    def mark(info: StepInfo) -> None:
        marks[info.step] = clocks()

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        train(config, [mark], out_dir=Path(out) / "run")
        whole = time.perf_counter() - start
    return (*per_step(marks, first, last), whole)


def time_bare(config: TrainConfig, first: int, last: int) -> Timing:
    """The same training by hand, nanoGPT style: loss.item() only every log_every steps."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    data = build_data(config.data, seed=config.seed)
    model = build_model(config.model, vocab_size=data.vocab_size, seed=config.seed)
    optimizer = build_optimizer(model, config.optimizer)
    scheduler = build_scheduler(optimizer, config.schedule, config.steps)
    marks: dict[int, tuple[float, float]] = {}
    for step in range(config.steps):
        x, y = data.get_batch("train", step)
        _, loss = model(x, y)
        assert loss is not None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip.max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % config.log_every == 0:
            loss.item()
            marks[step + 1] = clocks()
    whole = time.perf_counter() - start
    return (*per_step(marks, first, last), whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="alternating repetitions (>= 5)")
    parser.add_argument("--steps", type=int, default=80, help="steps per run")
    parser.add_argument("--log-every", type=int, default=10, help="log_every (and diagnostics)")
    parser.add_argument("--warmup", type=int, default=20, help="first timed record")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = make_config(args.steps, args.log_every)
    first, last = args.warmup, args.steps - args.log_every
    build_data(config.data, seed=config.seed)  # build the corpus cache outside the timings

    trainer: list[Timing] = []
    bare: list[Timing] = []
    time_bare(config, first, last)  # warm-up: allocator, kernels, file cache
    for _ in range(args.repeats):
        trainer.append(time_trainer(config, first, last))
        bare.append(time_bare(config, first, last))

    def median(timings: list[Timing], index: int) -> float:
        return statistics.median(t[index] for t in timings)

    tokens_per_step = config.data.batch_size * config.data.block_size
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date: {dt.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"model: GPT d_model 64, 2 layers, block 128, batch 16; {args.steps} steps, "
        f"timed steps {first}..{last}, {args.repeats} alternating repeats; tracking: JSONL only"
    )
    for name, timings in (("bare loop", bare), ("trainer.train", trainer)):
        print(
            f"{name:14s} median {median(timings, 0) * 1e3:7.2f} ms/step wall "
            f"({tokens_per_step / median(timings, 0):,.0f} tok/s), "
            f"{median(timings, 1) * 1e3:7.2f} ms/step CPU; whole call {median(timings, 2):.2f} s"
        )
    print(
        f"step-time ratio trainer / bare (median wall): {median(trainer, 0) / median(bare, 0):.3f}"
        " (target <= 1.05)"
    )
    print(
        f"CPU-time ratio trainer / bare (median):      {median(trainer, 1) / median(bare, 1):.3f}"
    )
    paired = statistics.median(t[0] / b[0] for t, b in zip(trainer, bare, strict=True))
    print(f"step-time ratio, median of paired repeats:   {paired:.3f} (neighbours share the load)")
    fastest = min(t[0] for t in trainer) / min(t[0] for t in bare)
    print(f"step-time ratio of the fastest repeats:       {fastest:.3f} (least disturbed by load)")
    print(f"all wall ms/step, trainer: {[round(t[0] * 1e3, 2) for t in trainer]}")
    print(f"all wall ms/step, bare:    {[round(t[0] * 1e3, 2) for t in bare]}")


if __name__ == "__main__":
    main()
