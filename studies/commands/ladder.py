"""`scaleplan ladder LADDER.yaml`: train the ladder (studies.ladder), write its runs table."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from studies.commands import output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ladder", type=Path, help="the ladder file (studies/configs/ladder.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a ladder field (budgets=[1e11,3e11], designs=[isoflop], "
        "overrides.optimizer.lr=3e-3); repeatable",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="the ladder's folder (default runs/<name>)"
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI; 'none' turns MLflow off"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the runs and their FLOPs; train nothing"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    from studies.commands.sweep import run_study_reports
    from studies.ladder import load_ladder, plan_dict, plan_ladder, run_ladder
    from trainer.config import read_yaml_mapping

    spec, base = load_ladder(args.ladder, args.overrides)
    out: Path = (args.out or Path("runs") / spec.name).absolute()
    plan = plan_ladder(spec, read_yaml_mapping(base, "base"))
    summary = plan_dict(plan)
    if args.dry_run:
        _print_plan(plan, summary, as_json=args.json)
        return 0

    def runner(study: Any, runs_dir: Path, study_file: Path) -> list[Any]:
        return run_study_reports(study, runs_dir=runs_dir, study_file=study_file, quiet=args.json)[
            1
        ]

    payload = run_ladder(
        plan,
        base,
        out,
        tracking_uri=args.tracking_uri,
        by=f"scaleplan ladder {args.ladder}",
        runner=runner,
    )
    if args.json:
        output.print_json(payload)
        return 0
    rows = payload.pop("rows")
    _print_plan(plan, summary, as_json=False)
    _print_rows(rows)
    for line in payload["lr_edges"]:
        print(f"warning: {line}")
    _print_approaches(payload["approaches"], spec.budgets[-1])
    _print_check(payload["check"])
    print(f"runs table: {out / 'runs.csv'} (scaleplan fit {out / 'runs.csv'})")
    print(f"curves: {out / 'curves.csv'}; study: {out / 'ladder-study.yaml'}")
    if spec.lrs:
        print(
            f"tuned optima per budget: {out / 'hparams.csv'} (scaleplan fit "
            f"{out / 'hparams.csv'} --approach hparams; the batch was not tuned)"
        )
    return 0


def _print_check(check: dict[str, Any] | None) -> None:
    if not check:
        return
    if "skipped" in check:
        print(f"extrapolation check not trained: {check['skipped']}")
        return
    shape = check["shape"]
    low, high = check["interval"]
    measured = "-" if check["measured"] is None else output.fixed(check["measured"], 4)
    error = "-" if check["error"] is None else f"{check['error']:+.1%}"
    covered = {None: "-", True: "yes", False: "no"}[check["covered"]]
    output.print_table(
        f"Extrapolation check at {check['budget']:.3g} FLOPs ({check['design']} runs below it "
        "fitted, Approach 3)",
        ["N_opt (law)", "trained shape", "N", "tokens", "predicted", "measured", "error",
         f"in {check['level']:.0%} interval"],
        [[
            output.count(check["n_opt"]),
            f"{shape['n_layer']} x {shape['d_model']}, {shape['n_head']} heads",
            output.count(check["params"]),
            output.count(check["tokens"]),
            f"{check['predicted']:.4f} [{low:.4f}, {high:.4f}]",
            measured,
            error,
            covered,
        ]],
        caption="; ".join(
            ([f"the law's shape is a ladder size: its run {check['trained_by']} is the check"]
             if check.get("trained_by") else []) + check["warnings"]
        ),  # fmt: skip
    )  # fmt: skip


def _print_plan(plan: Any, summary: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        output.print_json(summary)
        return
    output.print_table(
        f"Ladder {plan.spec.name}: {len(plan.rungs)} sizes x {len(plan.spec.budgets)} budgets, "
        f"{len(plan.runs)} runs ({', '.join(plan.spec.designs)})",
        [
            "size",
            "shape",
            "params (non-emb.)",
            "N = FLOPs/6 per token",
            *(f"{c:.3g} FLOPs" for c in plan.spec.budgets),
        ],
        [
            [
                str(rung.index),
                f"{rung.n_layer} x {rung.d_model}, {rung.n_head} heads",
                f"{rung.n_params:,}",
                f"{rung.flop_params:,.0f}",
                *(_steps_cell(plan, rung.index, b) for b in range(len(plan.spec.budgets))),
            ]
            for rung in plan.rungs
        ],
        caption=_caption(plan, summary),
    )


def _steps_cell(plan: Any, size: int, budget: int) -> str:
    runs = [r for r in plan.runs if r.size == size and r.budget == budget]
    if not runs:
        return "-"
    lrs = len(plan.spec.lrs or [None])
    cells = dict.fromkeys(f"{r.design} {r.steps} steps" for r in runs)  # one per LR: once
    return ", ".join(cells) + (f" (x {lrs} lrs)" if lrs > 1 else "")


def _caption(plan: Any, summary: dict[str, Any]) -> str:
    lines = [f"{plan.tokens_per_step:,} tokens per step; D = C / (6 N)."]
    saved = summary.get("savings")
    if saved:
        lines.append(
            f"wsd trains its {saved['points']} points in {saved['wsd_flops']:.3g} FLOPs, the "
            f"IsoFLOP grid in {saved['isoflop_flops']:.3g}: {saved['saved_fraction']:.0%} saved "
            "(Hägele et al. 2024)."
        )
    if plan.left_out:
        lines.append("left out: " + "; ".join(plan.left_out))
    return "\n".join(lines)


def _print_rows(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    output.print_table(
        "Finished runs",
        ["run", "design", "params", "budget", "tokens", "lr", "val loss", "time"],
        [
            [
                row["run"],
                row["design"],
                output.count(row["params"]),
                f"{row['budget']:.3g}",
                output.count(row["tokens"]),
                f"{row['lr']:.3g}",
                output.fixed(row["loss"], 4),
                output.duration(row["seconds"]),
            ]
            for row in rows
        ],
    )


def _print_approaches(rows: list[dict[str, Any]], at_flops: float) -> None:
    if not rows:
        return
    output.print_table(
        "Hoffmann et al.'s three approaches on this ladder",
        ["approach", "a in N_opt ∝ C^a", f"N_opt at {at_flops:.3g} FLOPs", "note"],
        [
            [
                row["approach"],
                "-" if row["a"] is None else f"{row['a']:.3f}",
                output.count(row["n_opt"]),
                row["note"],
            ]
            for row in rows
        ],
        caption="Hoffmann et al. 2022 found a = 0.50, 0.49 and 0.46 with approaches 1, 2, 3.",
    )
