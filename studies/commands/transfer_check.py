"""`scaleplan transfer-check`: LR sweeps at several widths under SP and muP, on the studies engine.

Writes DIR/base.yaml (the trainer config; --config replaces it), DIR/transfer-check.yaml (the
study: a stage per parametrization and width, rerun or resumed with `scaleplan sweep`), the
study's trials under DIR/, DIR/transfer_check.png (loss against log2 LR per width, SP beside
muP) and DIR/transfer_check.json; prints the optimal log2 LR per width and the drift.

``--horizons 75,150,300`` sweeps the step count instead, at the smallest width under muP, and
fits the horizon law ``log lr* = a - b log T`` (Bjorck et al. 2024) to the optima: the JSON's
``horizon_law``, which ``scaleplan transfer --horizon-from`` reads.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from studies.cli import add_study_options, comma_ints, number
from studies.commands import output

NAME = "transfer-check"
# the default: a 2-layer byte-level GPT on the standard library's sources, 150 steps a trial. At
# the base width SP and muP are the same network: the readout starts at zero, and its output
# multiplier (alpha_output, tuned at width 32: the best val loss over LRs 2^-10..2^-5 was 2.87 at
# 1, 2.52 at 8, 2.40 at 32 and at 64; BENCHMARKS.md) lets it keep up with the rest. The init is
# fan-in (std 1/sqrt(fan_in)): with the GPT's fixed std 0.02, far below that at these widths, muP's
# drift was 0.58 and its wide models gained little; with fan-in init 0.47 (BENCHMARKS.md).
BASE = {
    "steps": 150,
    "log_every": 50,
    "eval_every": 0,
    "eval_batches": 8,
    "checkpoint_every": 0,
    "model": {
        "kind": "gpt",
        "n_layer": 2,
        "n_head": 4,
        "tie_embeddings": False,
        "zero_init_readout": True,
        "output_multiplier": 32.0,
        "init": "lecun",
    },
    "data": {"block_size": 64, "batch_size": 16},
    "optimizer": {"name": "adamw", "weight_decay": 0.0},
    "schedule": {"warmup_steps": 10},
    "tracking": {"experiment": "scaleplan-transfer-check"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--widths",
        type=comma_ints,
        default=[32, 64, 128, 256],
        help="comma-separated GPT widths (d_model); muP's base is the smallest (32,64,128,256)",
    )
    parser.add_argument(
        "--depths",
        type=comma_ints,
        default=[],
        help="sweep depths (n_layer) instead, at the smallest width (depth-muP base: the smallest)",
    )
    parser.add_argument(
        "--horizons",
        type=comma_ints,
        default=[],
        help="sweep step counts instead, at the smallest width under muP, and fit the horizon "
        "law log lr* = a - b log T (for `scaleplan transfer --steps`)",
    )
    parser.add_argument("--optimizer", help="optimizer.name for every trial (default adamw)")
    parser.add_argument("--config", metavar="CONFIG.yaml", help="the trainer config to start from")
    parser.add_argument("--trials", type=int, default=16, help="learning rates per width (16)")
    parser.add_argument("--steps", type=int, default=150, help="steps per trial (150)")
    parser.add_argument(
        "--log2-lr",
        type=number,
        nargs=2,
        default=[-13.0, -4.0],
        metavar=("LOW", "HIGH"),
        help="the LR range, as log2 (-13 -4)",
    )
    add_study_options(parser, "runs/transfer-check")


def run(args: argparse.Namespace) -> int:
    import yaml

    from studies.commands.sweep import run_study_reports
    from studies.errors import StudyError
    from studies.sweep import prepare_study
    from studies.transfer import (
        TransferCheck,
        plot_transfer,
        transfer_study_file,
        write_json,
        write_study_file,
    )
    from trainer.tracking import write_text_atomic

    if args.horizons and args.depths:
        raise StudyError(
            f"--horizons / --depths: both given ({args.horizons} / {args.depths}); expected one "
            "axis to sweep"
        )
    if args.trials < 3 or args.steps < 1:
        raise StudyError(
            f"--trials / --steps: {args.trials} / {args.steps}; expected at least 3 learning "
            "rates (a parabola) and 1 step"
        )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.config:
        base = Path(args.config).absolute()
    else:
        base = out.absolute() / "base.yaml"
        write_text_atomic(base, yaml.safe_dump(BASE, sort_keys=False))
    raw = transfer_study_file(
        base,
        name=NAME,
        widths=args.widths,
        depths=args.depths,
        horizons=args.horizons,
        optimizer=args.optimizer,
        trials=args.trials,
        steps=args.steps,
        log2_lr=(args.log2_lr[0], args.log2_lr[1]),
        seed=args.seed,
    )
    study_path = write_study_file(raw, out / f"{NAME}.yaml")
    study = prepare_study(study_path, tracking_uri=args.tracking_uri)
    summary, reports = run_study_reports(
        study, runs_dir=out, study_file=study_path, quiet=args.json
    )
    axis = "horizon" if args.horizons else "depth" if args.depths else "width"
    check = TransferCheck.from_reports(reports, axis)
    if not any(points for curves in check.curves.values() for points in curves.values()):
        raise StudyError(
            f"no trial finished; their reasons: scaleplan study show {NAME} --runs-dir {out}"
        )
    plot = plot_transfer(check, out / "transfer_check.png")
    payload = check.to_dict(plot)
    payload["cost"] = {
        "flops": summary.get("cost", {}).get("flops"),
        "seconds": summary.get("wall_seconds"),
    }
    write_json(payload, out / "transfer_check.json")
    if args.json:
        output.print_json(payload)
        return 0
    _print(check, payload)
    if "horizon_law" in payload:
        print(f"horizon law: log lr* = a - b log T, {payload['horizon_law']['text']}")
    print(f"plot: {plot}")
    print(f"study: {study_path} (scaleplan sweep {study_path} --runs-dir {out} reruns it)")
    return 0


def _print(check: object, payload: dict) -> None:
    from studies.transfer import TransferCheck

    assert isinstance(check, TransferCheck)
    names = list(check.curves)
    values = sorted({v for curves in check.curves.values() for v in curves})
    columns = (
        [check.axis] + [f"{n} optimal log2 lr" for n in names] + [f"{n} best loss" for n in names]
    )
    rows = []
    for v in values:
        row = [str(v)]
        for n in names:
            x = payload[n]["optimal_log2_lr"].get(str(v))
            edge = " (edge)" if str(v) in payload[n]["at_edge"] else ""
            row.append("-" if x is None else f"{x:+.2f}{edge}")
        for n in names:
            best = payload[n]["best_loss"].get(str(v))
            row.append("-" if best is None else f"{best:.4f}")
        rows.append(row)
    drifts = ", ".join(
        f"{n} {payload[n]['drift']:.2f}" for n in names if not math.isnan(payload[n]["drift"])
    )
    output.print_table(
        f"Transfer check: optimal learning rate per {check.axis}",
        columns,
        rows,
        caption=f"drift (max - min optimal log2 LR): {drifts}",
    )
