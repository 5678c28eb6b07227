"""`scaleplan batch-size CONFIG --batches 8,16,32,64,128`: the critical batch size, measured.

A study on the studies engine with a stage per batch size (see studies.batch_size): writes
DIR/batch-size.yaml (rerun or resume it with `scaleplan sweep`), the trials under DIR/,
DIR/batch_size.png (steps against examples to the target, with McCandlish's fitted curve) and
DIR/batch_size.json, which `scaleplan plan --batch-from` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from studies.cli import add_study_options, comma_ints, number
from studies.commands import output
from trainer.cli import add_set_option

NAME = "batch-size"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml", help="training config (YAML)")
    add_set_option(parser, "override a trainer field by its dotted path; repeatable")
    parser.add_argument(
        "--batches",
        type=comma_ints,
        default=[8, 16, 32, 64, 128],
        help="comma-separated batch sizes, examples per step (8,16,32,64,128)",
    )
    parser.add_argument(
        "--lr-rule",
        choices=("linear", "sqrt", "tuned"),
        default="sqrt",
        help="how the config's LR moves with the batch: linear (SGD), sqrt (Adam; default), "
        "or tuned: --trials learning rates per batch size",
    )
    parser.add_argument(
        "--target-loss",
        type=number,
        metavar="L",
        help="validation loss to reach (default: 90%% of the way from the untrained loss to the "
        "highest of the batch sizes' best losses)",
    )
    parser.add_argument(
        "--examples",
        type=int,
        help="examples each batch size trains (default: the config's steps x its batch)",
    )
    parser.add_argument(
        "--min-steps",
        type=int,
        help="steps every batch size trains at least (default: half the config's steps)",
    )
    parser.add_argument("--trials", type=int, default=6, help="--lr-rule tuned: LRs per batch (6)")
    add_study_options(parser, "runs/batch-size")


def run(args: argparse.Namespace) -> int:
    import yaml

    from studies.batch_size import (
        batch_size_study_file,
        check_batches,
        critical_batch,
        plot_critical_batch,
    )
    from studies.commands.sweep import run_study_reports
    from studies.errors import StudyError
    from studies.sweep import prepare_study
    from studies.transfer import write_json, write_study_file
    from trainer.config import apply_overrides, parse_config, read_yaml_mapping
    from trainer.data import build_data
    from trainer.schedules import warmup_steps
    from trainer.tracking import write_text_atomic

    batches = check_batches(args.batches)
    if args.trials < 2 and args.lr_rule == "tuned":
        raise StudyError(f"--trials: {args.trials}; --lr-rule tuned needs at least 2 per batch")
    if args.target_loss is not None and not args.target_loss > 0:
        raise StudyError(f"--target-loss: {args.target_loss:g}; expected a loss above 0")
    raw = apply_overrides(read_yaml_mapping(Path(args.config), "config"), args.overrides)
    config = parse_config(raw)
    base_batch = config.data.batch_size * config.grad_accum_steps
    data = build_data(config.data, seed=config.seed)
    per_example = data.tokens_per_batch // data.batch_size
    available = data.train_size // per_example
    if batches[-1] > available:
        raise StudyError(
            f"--batches: {batches[-1]} is larger than the training data ({available} examples "
            f"of {config.data.kind}); use batch sizes up to {available}"
        )
    examples = args.examples if args.examples is not None else config.steps * base_batch
    out: Path = args.out
    base = out.absolute() / "base.yaml"
    study_raw = batch_size_study_file(
        base,
        batches=batches,
        lr_rule=args.lr_rule,
        base_lr=config.optimizer.lr,
        base_batch=base_batch,
        examples=examples,
        min_steps=args.min_steps if args.min_steps is not None else max(1, config.steps // 2),
        warmup_steps=warmup_steps(config.schedule, config.steps),
        trials=args.trials,
        name=NAME,
        seed=args.seed,
    )
    # every check above writes nothing; from here the study's folder
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(base, yaml.safe_dump(raw, sort_keys=False))
    study_path = write_study_file(study_raw, out / f"{NAME}.yaml", by=f"scaleplan {NAME}")
    study = prepare_study(study_path, tracking_uri=args.tracking_uri)
    _, reports = run_study_reports(study, runs_dir=out, study_file=study_path, quiet=args.json)
    result = critical_batch(
        reports,
        target_loss=args.target_loss,
        lr_rule=args.lr_rule,
        tokens_per_example=per_example,
    )
    plot = plot_critical_batch(result, out / "batch_size.png")
    payload = result.to_dict(plot)
    write_json(payload, out / "batch_size.json")
    if args.json:
        output.print_json(payload)
        return 0
    _print(payload)
    print(f"plot: {plot}")
    print(f"result: {out / 'batch_size.json'} (scaleplan plan --batch-from reads it)")
    print(f"study: {study_path} (scaleplan sweep {study_path} --runs-dir {out} reruns it)")
    return 0


def _print(payload: dict) -> None:
    rows = []
    for p in payload["batches"]:
        rows.append(
            [
                str(p["batch"]),
                "-" if p["lr"] is None else f"{p['lr']:.3g}",
                output.fixed(p["best_loss"], 4),
                "-" if p["steps_to_target"] is None else f"{p['steps_to_target']:.0f}",
                output.count(p["examples_to_target"]),
                output.count(p["tokens_to_target"]),
                "-" if p["b_simple"] is None else f"{p['b_simple']:.3g}",
            ]
        )
    t = payload["tokens_per_example"]
    b_simple = payload["b_simple"]
    online = (
        "online B_simple at the target: not measured"
        if b_simple is None
        else f"online B_simple at the target ≈ {b_simple:.3g} examples"
        + (f" ({output.count(b_simple * t)} tokens)" if t > 1 else "")
    )
    output.print_table(
        f"Critical batch size at val loss {payload['target_loss']:.4g} "
        f"(lr rule {payload['lr_rule']})",
        ["batch", "lr", "best loss", "steps to target", "examples", "tokens", "B_simple"],
        rows,
        caption=(
            f"B_crit = E_min/S_min ≈ {payload['b_crit']:.3g} examples "
            f"[{payload['b_crit_low']:.3g}–{payload['b_crit_high']:.3g}, central "
            f"{payload['level']:.0%} bootstrap]"
            + (f" = {output.count(payload['b_crit_tokens'])} tokens" if t > 1 else "")
            + f"; S_min {payload['s_min']:.3g} steps, E_min {output.count(payload['e_min'])} "
            f"examples. {online}. McCandlish et al. 2018, eq. 2.11."
        ),
    )
