"""`python -m trainer CONFIG`: one training run, the entry point torchrun starts on each rank.

    torchrun --nproc-per-node 2 -m trainer studies/configs/gpt-tiny.yaml --out runs/train/ddp

Rank 0 prints the result as JSON; a user mistake is one line on stderr (from rank 0) and exit
status 2 on every rank; a run stopped by a non-finite loss exits with status 1. `scaleplan
train` (studies.commands.train) takes the same arguments, adds a progress bar, and launches
torchrun itself with ``--nproc N``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from trainer.config import TrainConfig

__all__ = [
    "EXIT_NONFINITE",
    "EXIT_USAGE",
    "UsageParser",
    "add_arguments",
    "add_set_option",
    "load_run_config",
]

EXIT_NONFINITE = 1
EXIT_USAGE = 2
PROG = "python -m trainer"


def add_set_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--set KEY=VALUE ...``, repeatable, into ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help=help_text,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG, --set, --out, --resume, --json: what one training run takes."""
    parser.add_argument("config", metavar="CONFIG.yaml", help="training config (YAML)")
    add_set_option(
        parser,
        "override a field by its dotted path, value in YAML (e.g. optimizer.lr=3e-4 "
        "model.n_layer=4); repeatable",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="run folder (default runs/train/<run name or timestamp>)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --out"
    )
    parser.add_argument(
        "--json", action="store_true", help="print the result as JSON, without a progress bar"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="trace a few steps with torch.profiler (profile.* in the config: after 5 steps, "
        "2 warm-up, 3 recorded) into <run>/profile/, and print where the step time went",
    )


def load_run_config(args: argparse.Namespace) -> TrainConfig:
    """The run's config from CONFIG and --set; ConfigError (one line) on any mistake."""
    from pydantic import ValidationError

    from trainer.config import config_error, load_config
    from trainer.errors import ConfigError

    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out DIR: the folder of the run to continue")
    overrides = [*args.overrides, *(["profile.enabled=true"] if args.profile else [])]
    try:
        return load_config(args.config, overrides)
    except ValidationError as exc:  # a sub-config validated outside load_config's net
        raise config_error(exc) from None


class UsageParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the option, then exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    from trainer.distributed import world_from_env
    from trainer.errors import ConfigError

    parser = UsageParser(prog=PROG, description="Train one model from a YAML config.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    world = world_from_env()
    try:
        from trainer.loop import train
        from trainer.tracking import json_safe

        result = train(load_run_config(args), out_dir=args.out, resume=args.resume)
    except ConfigError as error:
        if world.main:
            print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if world.main:
        print(json.dumps(json_safe(result.to_dict()), indent=2))
    if result.stopped_reason == "nonfinite":
        if world.main:
            print(f"{PROG}: {result.stop_message}", file=sys.stderr)
        return EXIT_NONFINITE
    return 0
