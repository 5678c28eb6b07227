"""The `scaleplan` command line: one root, subcommands whose imports happen only when they run.

Every user mistake ends as one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from trainer.cli import EXIT_USAGE
from trainer.cli import UsageParser as _Parser  # one line, exit status 2, for every command


def number(text: str) -> float:
    """A float option value, e.g. 1e21; argparse names the option when this fails."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    return value


def comma_ints(text: str) -> list[int]:
    """A comma-separated list of integers, e.g. 8,16,32; argparse names the option."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list") from None


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"'{text}' is not of the form key=value")
    return key, value


def add_study_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    """The options of a command that runs a study it writes: --seed, --out, --tracking-uri,
    --json."""
    from pathlib import Path

    parser.add_argument("--seed", type=int, default=0, help="the samplers' seed")
    parser.add_argument("--out", type=Path, default=Path(default_out), metavar="DIR")
    parser.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow tracking URI; 'none' turns MLflow off"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


# Subcommand name -> (module, one-line help). Each module has `add_arguments(parser)` and
# `run(args) -> int`; it is imported only to build its own parser or to run.
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("studies.commands.plan", "Compute-optimal model size, tokens and loss for a budget."),
    "laws": ("studies.commands.laws", "List the published scaling laws."),
    "ladder": (
        "studies.commands.ladder",
        "Train a scaling ladder (IsoFLOP grid and WSD cool-downs) into a runs table.",
    ),
    "memory": (
        "studies.commands.memory",
        "Memory per GPU (DDP, ZeRO-1/2/3, activations) and the splits of the GPUs that fit.",
    ),
    "fit": ("studies.commands.fit", "Fit a scaling law to your runs (CSV or Parquet)."),
    "diagnose": ("studies.commands.diagnose", "Name the training pathologies in a run folder."),
    "train": ("studies.commands.train", "Train one model from a YAML config (--set to override)."),
    "sweep": ("studies.commands.sweep", "Run a coarse-to-fine hyperparameter sweep (study YAML)."),
    "study": ("studies.commands.study", "Show, pick the best of, or export an existing study."),
    "transfer-check": (
        "studies.commands.transfer_check",
        "LR sweeps at several widths under SP and muP: does the optimum move?",
    ),
    "transfer": (
        "studies.commands.transfer",
        "The wide model's config from a tuned muP proxy (width, depth, horizon).",
    ),
    "lr-find": (
        "studies.commands.lr_find",
        "The learning-rate range test: a peak LR from one short run.",
    ),
    "batch-size": (
        "studies.commands.batch_size",
        "The critical batch size: steps and examples to a loss at several batch sizes.",
    ),
    "coord-check": (
        "studies.commands.coord_check",
        "muP's coordinate check: activation sizes across widths, SP vs muP.",
    ),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="scaleplan",
        description="How to spend a training budget: plan with scaling laws, sweep, train.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    # Only the chosen subcommand's module is imported: `scaleplan --help` stays fast.
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (module, summary) in COMMANDS.items():
        child = sub.add_parser(name, help=summary, description=summary)
        if name == chosen:
            importlib.import_module(module).add_arguments(child)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean a user mistake, from the packages already imported."""
    errors: list[type[BaseException]] = []
    for module, name in (("planner.errors", "InputError"), ("trainer.errors", "ConfigError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    run: Callable[[argparse.Namespace], int] = importlib.import_module(
        COMMANDS[args.command][0]
    ).run
    try:
        return run(args)
    except _user_errors() as err:
        print(f"scaleplan {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"scaleplan {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
