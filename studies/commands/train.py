"""`scaleplan train`: train one model from a YAML config, with a live progress bar.

Exit status: 0 when the run ends (all steps, early stopping, or a callback's stop); 1 when it
stopped on a non-finite loss or gradient (the reason goes to stderr); 2 for a user mistake
(bad config field, missing data, fp16 without a GPU, unreadable checkpoint, nothing to resume).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from studies.commands import output

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from trainer.loop import RunResult, StepInfo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trainer.cli import add_arguments as add_run_arguments

    add_run_arguments(parser)
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="processes on this machine (one per GPU; CPU: gloo), started by torchrun's "
        "elastic agent; distributed.strategy picks DDP or FSDP2. Several machines: run "
        "`torchrun ... -m trainer CONFIG` on each (README)",
    )


def run(args: argparse.Namespace) -> int:
    from trainer.cli import EXIT_NONFINITE, load_run_config
    from trainer.distributed import world_from_env
    from trainer.loop import train

    config = load_run_config(args)  # checked once here, before any process starts
    world = world_from_env()
    if args.nproc != 1 and not world.distributed:
        from studies.launch import launch

        return launch(args, config)
    if args.json or not world.main:  # under torchrun, rank 0 alone prints
        result = train(config, out_dir=args.out, resume=args.resume)
        if world.main:
            output.print_json(result.to_dict())
    else:
        with _ProgressBar(config.steps) as bar:
            result = train(config, [bar.update], out_dir=args.out, resume=args.resume)
        _print_summary(result)
    if result.stopped_reason == "nonfinite":
        if world.main:
            print(f"scaleplan train: {result.stop_message}", file=sys.stderr)
        return EXIT_NONFINITE
    return 0


class _ProgressBar:
    """A rich progress bar on stderr: step, loss, val loss, tokens/s, ETA."""

    def __init__(self, steps: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress: Progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("val {task.fields[val]}"),
            TextColumn("{task.fields[speed]} tok/s"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task: TaskID = self.progress.add_task(
            "train", total=steps, loss="-", val="-", speed="-"
        )

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def update(self, info: StepInfo) -> None:
        # started by the first record, so a config error never leaves an empty bar behind
        if not self.progress.live.is_started:
            self.progress.start()
        fields: dict[str, Any] = {"loss": output.fixed(info.train_loss)}
        if info.val_loss is not None:
            fields["val"] = output.fixed(info.val_loss)
        if "tokens_per_s" in info.metrics:
            fields["speed"] = output.count(info.metrics["tokens_per_s"])
        self.progress.update(self.task, completed=info.step, **fields)


def _print_summary(result: RunResult) -> None:
    val = f"val loss {output.fixed(result.final_val_loss)}"
    val += f" (best {output.fixed(result.best_val_loss)})"
    if result.final_val_accuracy is not None:
        val += f", val accuracy {result.final_val_accuracy:.3f}"
    lines = [
        f"steps {result.steps}, tokens {output.count(result.tokens)}, "
        f"{output.sci(result.flops)} FLOPs, {result.wall_seconds:.1f} s",
        val,
    ]
    if result.stopped_reason not in (None, "nonfinite"):
        lines.append(f"stopped: {result.stopped_reason}")
    if result.profile is not None:
        lines.append(_profile_line(result.profile, result.out_dir))
    lines.append(f"run folder: {result.out_dir}")
    print("\n".join(lines))


def _profile_line(split: dict[str, float], out_dir: str) -> str:
    """``step 41.2 ms: compute 62%, communication 9%, ...`` and where the trace is."""
    from trainer.profiling import PHASES

    step = split["step_s"]
    parts = [f"{name.replace('_', ' ')} {split[name] / step:.0%}" for name in PHASES if step > 0]
    busy = (
        f", GPU busy {split['gpu_busy']:.0%}, {split['host_syncs']:.1f} host syncs per step"
        if "gpu_busy" in split
        else ""
    )
    return (
        f"profile: step {step * 1e3:.1f} ms over {split['steps']:.0f} steps: "
        f"{', '.join(parts)}{busy}; trace in {out_dir}/profile/"
    )
