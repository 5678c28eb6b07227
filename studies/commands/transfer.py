"""`scaleplan transfer --from PROXY --width W`: the wide model's trainer config, from a tuned proxy.

    scaleplan transfer --from best.yaml --width 512 --out wide.yaml
    scaleplan transfer --from proxy-study --width 512 --steps 2000 --horizon-b 0.3
    scaleplan train wide.yaml

PROXY is a trainer config (a run's config.yaml, or what `scaleplan study best` printed), a study
file or a study name (its best trial's config). Under muP the tuned LR, init and multipliers carry
over unchanged (an SP proxy becomes muP's base width); ``--steps`` different from the proxy's
moves the LR along the horizon law (``log lr* = a - b log T``: ``--horizon-b``, or the law a
``scaleplan transfer-check --horizons`` fitted, ``--horizon-from``) and stretches the schedule's
step counts. The config goes to ``--out`` (atomically) or standard output, its notes (what
transferred, what did not) as comments above it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from studies.cli import number
from studies.commands import output

if TYPE_CHECKING:
    from studies.horizon import HorizonLaw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="PROXY",
        help="the tuned proxy: a trainer config, a study file or a study name",
    )
    parser.add_argument("--width", type=int, help="the target's width (GPT d_model, MLP width)")
    parser.add_argument("--depth", type=int, help="the target's depth (GPT n_layer, MLP depth)")
    parser.add_argument("--steps", type=int, help="the target's training steps")
    law = parser.add_mutually_exclusive_group()
    law.add_argument("--horizon-b", type=number, metavar="B", help="the horizon law's exponent b")
    law.add_argument(
        "--horizon-from",
        metavar="JSON",
        help="a transfer-check JSON whose horizon_law was fitted (--horizons)",
    )
    parser.add_argument(
        "--runs-dir", default="runs", metavar="DIR", help="where a study's runs are (runs)"
    )
    parser.add_argument("--storage", metavar="URL", help="a study's storage, if not the default")
    parser.add_argument("--out", type=Path, metavar="FILE", help="write the config here")
    parser.add_argument("--json", action="store_true", help="print JSON (config and notes)")


def run(args: argparse.Namespace) -> int:
    import yaml

    from studies.errors import StudyError
    from studies.transfer import transfer_config
    from trainer.tracking import write_text_atomic

    for field in ("width", "depth", "steps"):
        value = getattr(args, field)
        if value is not None and value < 1:
            raise StudyError(f"--{field}: {value}; expected a positive integer")
    if args.width is None and args.depth is None and args.steps is None:
        raise StudyError("--width / --depth / --steps: none given; expected the target's size")
    raw, origin = _proxy_config(args.source, args.storage, Path(args.runs_dir))
    config, notes = transfer_config(
        raw, width=args.width, depth=args.depth, steps=args.steps, law=_law(args)
    )
    text = yaml.safe_dump(config, sort_keys=False)
    header = "".join(f"# {line}\n" for line in [f"transferred from {origin}", *notes])
    if args.out is not None:
        write_text_atomic(args.out, header + text)
    if args.json:
        out = None if args.out is None else str(args.out)
        output.print_json({"from": origin, "config": config, "notes": notes, "out": out})
    elif args.out is None:
        sys.stdout.write(header + text)
    else:
        sys.stdout.write(header + f"wrote {args.out} (scaleplan train {args.out})\n")
    return 0


def _law(args: argparse.Namespace) -> HorizonLaw | None:
    from studies.horizon import HorizonLaw

    if args.horizon_b is not None:
        return HorizonLaw(a=0.0, b=args.horizon_b)
    if args.horizon_from is None:
        return None
    import json

    from studies.errors import StudyError

    path = Path(args.horizon_from)
    try:
        law = json.loads(path.read_text()).get("horizon_law")
    except (OSError, ValueError, AttributeError) as error:
        raise StudyError(f"--horizon-from: '{path}' is not a readable JSON ({error})") from None
    parsed = HorizonLaw.from_dict(law)
    if parsed is None:
        raise StudyError(
            f"--horizon-from: '{path}' has no horizon_law; expected the JSON of "
            "`scaleplan transfer-check --horizons`"
        )
    return parsed


def _proxy_config(source: str, storage: str | None, runs_dir: Path) -> tuple[dict, str]:
    """(the proxy's trainer config as a mapping, where it came from)."""
    import yaml

    from studies.commands.study import best_of, read_study
    from studies.errors import StudyError
    from trainer.config import read_yaml_mapping

    path = Path(source)
    if path.is_file():
        raw = read_yaml_mapping(path, "--from", StudyError)
        if "stages" not in raw:  # a trainer config
            return raw, str(path)
    try:
        name, _, reports = read_study(source, storage, runs_dir)
    except StudyError as error:
        if path.exists():
            raise
        raise StudyError(f"--from: '{source}' is no file, and as a study name: {error}") from None
    best, text = best_of(name, reports)
    if not text:
        raise StudyError(
            f"--from: the best trial of study '{name}' (stage {best['stage']}, trial "
            f"{best['number']}) has no config.yaml on this machine; give its config file"
        )
    origin = f"study '{name}', stage {best['stage']}, trial {best['number']}"
    return yaml.safe_load(text), origin
