"""`scaleplan lr-find CONFIG`: the learning-rate range test (Smith 2017; fastai's `lr_find`).

One short run from the config's initialisation with an exponentially growing LR; prints the
suggested peak LR and the two readings behind it, writes OUT/lr_find.png and OUT/lr_find.json
(the curve), and with ``--write-config FILE`` the config with a one-cycle schedule at that peak.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from studies.cli import number
from studies.commands import output
from trainer.cli import add_set_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml", help="training config (YAML)")
    add_set_option(parser, "override a trainer field by its dotted path; repeatable")
    parser.add_argument("--min", type=number, default=1e-7, help="first learning rate (1e-7)")
    parser.add_argument("--max", type=number, default=10.0, help="last learning rate (10)")
    parser.add_argument("--steps", type=int, default=100, help="updates in the sweep (100)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the run, plot and curve go (default runs/lr-find/<config name>)",
    )
    parser.add_argument(
        "--write-config",
        type=Path,
        metavar="FILE",
        help="write the config with a one-cycle schedule peaking at the suggested LR",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    import yaml

    from studies.lr_find import check_range, lr_find, one_cycle_config
    from trainer.config import apply_overrides, parse_config, read_yaml_mapping
    from trainer.tracking import write_text_atomic

    check_range(args.min, args.max, args.steps)
    raw = apply_overrides(read_yaml_mapping(Path(args.config), "config"), args.overrides)
    parse_config(raw)  # the user's own mistakes first, named as in their file
    out = args.out or Path("runs/lr-find") / Path(args.config).stem
    found = lr_find(raw, min_lr=args.min, max_lr=args.max, steps=args.steps, out_dir=out)
    payload = found.to_dict()
    if args.write_config is not None:
        written = one_cycle_config(raw, found.suggestions["suggested_lr"])
        parse_config(written)
        args.write_config.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.write_config, yaml.safe_dump(written, sort_keys=False))
        payload["config_written"] = str(args.write_config)
    if args.json:
        output.print_json(payload)
        return 0
    s = found.suggestions
    print(
        f"suggested peak lr: {s['suggested_lr']:.3g} (steepest descent {s['steepest']:.3g}, "
        f"minimum/10 {s['minimum_tenth']:.3g})"
    )
    print(
        f"swept {payload['steps_run']} steps from {args.min:g} to {found.test.lrs[-1]:.3g}; "
        f"stopped: {payload['stopped']}"
    )
    print(f"plot: {found.plot}")
    print(f"curve: {out / 'lr_find.json'}")
    if args.write_config is not None:
        print(f"config with a one-cycle schedule at {s['suggested_lr']:.3g}: {args.write_config}")
    return 0
