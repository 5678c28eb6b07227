"""`scaleplan coord-check`: muP's coordinate check (Tensor Programs V, Fig. 5) over widths.

Trains the model at each width for a few steps under SP and under muP (base width: the smallest)
and prints, per layer type, how much its mean |activation| changes across the widths at the
worst step, with the slope of log2 coordinate against log2 width. Writes DIR/coord_check.png
(one panel per step) and DIR/coord_check.json.

Exit status: 0 when every muP coordinate stays within --tolerance across the widths; 1 when one
does not (the offending layer types are named on stderr); 2 for a user mistake.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from studies.cli import number
from studies.commands import output
from trainer.cli import add_set_option

EXIT_UNSTABLE = 1
# small, fast defaults: the check is about width, not about the rest of the model
DEFAULTS = {
    "gpt": {
        "model": {"kind": "gpt", "n_layer": 2, "n_head": 4},
        "data": {"block_size": 64, "batch_size": 8, "max_bytes": 300_000},
    },
    "mlp": {
        "model": {"kind": "mlp", "depth": 3},
        "data": {"kind": "digits", "batch_size": 64},
    },
}


def _widths(text: str) -> list[int]:
    try:
        widths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a comma-separated list of widths"
        ) from None
    return widths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=list(DEFAULTS), default="gpt", help="default gpt")
    parser.add_argument(
        "--config",
        metavar="CONFIG.yaml",
        help="a trainer config to start from (default: a "
        "small model of --model on the default data)",
    )
    add_set_option(
        parser,
        "override a trainer config field (e.g. optimizer.name=sgd)",
    )
    parser.add_argument(
        "--widths",
        type=_widths,
        default=[64, 128, 256, 512, 1024],
        help="comma-separated widths (GPT d_model, MLP width); default 64,128,256,512,1024",
    )
    parser.add_argument("--steps", type=int, default=3, help="forward passes per width (3)")
    parser.add_argument("--seeds", type=int, default=3, help="initialisations averaged (3)")
    parser.add_argument("--lr", type=number, default=1e-2, help="constant learning rate (1e-2)")
    parser.add_argument(
        "--tolerance",
        type=number,
        default=1.5,
        help="largest max/min of a muP coordinate across the widths (1.5)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/coord-check"), metavar="DIR")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from trainer.config import apply_overrides, load_config, parse_config
    from trainer.coord_check import coord_check, plot_coord_check
    from trainer.errors import ConfigError
    from trainer.tracking import write_text_atomic

    if not args.tolerance > 1:
        raise ConfigError(f"--tolerance: {args.tolerance:g}; expected a ratio above 1")
    if args.config:
        config = load_config(args.config, args.overrides)
    else:
        raw = json.loads(json.dumps(DEFAULTS[args.model]))
        config = parse_config(apply_overrides(raw, args.overrides))
    if config.model.kind != args.model and args.config is None:
        raise ConfigError(f"--set model.kind: {config.model.kind}; use --model instead")
    result = coord_check(config, args.widths, steps=args.steps, seeds=args.seeds, lr=args.lr)
    args.out.mkdir(parents=True, exist_ok=True)
    plot = plot_coord_check(result, args.out / "coord_check.png")
    payload = {**result.to_dict(), "offending": result.offending("mup", args.tolerance)}
    payload["plot"] = str(plot)
    write_text_atomic(args.out / "coord_check.json", json.dumps(payload, indent=2) + "\n")
    offending = payload["offending"]
    if args.json:
        output.print_json(payload)
    else:
        _print(result, args.tolerance)
        print(f"plot: {plot}")
    if offending:
        print(
            "scaleplan coord-check: muP coordinates change with width: " + "; ".join(offending),
            file=sys.stderr,
        )
        return EXIT_UNSTABLE
    return 0


def _print(result: object, tolerance: float) -> None:
    from trainer.coord_check import CoordCheck

    assert isinstance(result, CoordCheck)
    names = list(result.coords)
    columns = ["layer"]
    for name in names:
        columns += [f"{name} max/min", f"{name} slope"]
    rows = []
    for layer in result.coords[names[0]]:
        row = [layer]
        for name in names:
            worst = max(range(result.steps), key=lambda s: result.spread(name, layer, s))
            row += [
                f"x{result.spread(name, layer, worst):.3g} (step {worst + 1})",
                f"{result.slope(name, layer, worst):+.2f}",
            ]
        rows.append(row)
    widths = ",".join(str(w) for w in result.widths)
    output.print_table(
        f"Coordinate check: widths {widths}, {result.steps} steps, lr {result.lr:g}",
        columns,
        rows,
        caption=f"max/min: the largest ratio of mean |activation| across the widths over the "
        f"steps; slope: d log2 coordinate / d log2 width there (0: flat). muP passes within "
        f"x{tolerance:g}.",
    )
