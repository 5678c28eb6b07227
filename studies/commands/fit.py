"""`scaleplan fit`: fit a scaling law to a runs table and write the law file `plan` reads."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from studies.cli import key_value, number
from studies.commands import output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", help="runs table: CSV or Parquet with one row per training run")
    parser.add_argument("--out", help="law file to write (JSON), read by `plan --law FILE`")
    parser.add_argument(
        "--approach",
        choices=("parametric", "isoflop", "envelope", "hparams"),
        default="parametric",
        help="parametric: Approach 3 (default); isoflop: Approach 2; envelope: Approach 1, "
        "on a curves table (one row per point of each run's curve, e.g. a ladder's curves.csv); "
        "hparams: the learning-rate and batch laws, on a table of tuned optima per budget "
        "(columns flops, lr, batch_tokens)",
    )
    parser.add_argument(
        "--form",
        choices=("chinchilla", "kaplan"),
        default="chinchilla",
        help="parametric form (default chinchilla: E + A/N^alpha + B/D^beta)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples for intervals (default 1000; 0 for none)",
    )
    parser.add_argument(
        "--level",
        type=number,
        default=0.95,
        help="central level of the reported intervals (default 0.95)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument(
        "--delta",
        type=number,
        default=1e-3,
        help="Huber delta on log residuals (default 1e-3, as Hoffmann et al.)",
    )
    parser.add_argument(
        "--drop-highest-loss",
        type=int,
        default=0,
        metavar="K",
        help="leave out the K runs with the highest loss (outliers), e.g. 5 as"
        " Besiroglu et al. 2024 did",
    )
    columns = parser.add_argument_group("columns")
    columns.add_argument("--params-col", default="params", help="parameters N (default params)")
    columns.add_argument("--tokens-col", default="tokens", help="tokens D (default tokens)")
    columns.add_argument(
        "--flops-col",
        default="flops",
        help="training FLOPs, used when there is no tokens column: D = C / 6N",
    )
    columns.add_argument("--loss-col", default="loss", help="final loss (default loss)")
    columns.add_argument(
        "--run-col", default="run", help="envelope: the run each curve point belongs to (run)"
    )
    columns.add_argument("--lr-col", default="lr", help="hparams: the tuned peak LR (lr)")
    columns.add_argument(
        "--batch-col",
        default="batch_tokens",
        help="hparams: the tuned batch in tokens (batch_tokens)",
    )
    columns.add_argument(
        "--budget-col",
        default="budget",
        help="IsoFLOP budget of each run, if the table has one (default budget)",
    )
    columns.add_argument(
        "--where",
        type=key_value,
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="keep only rows where COLUMN equals VALUE",
    )
    parser.add_argument(
        "--n-counts",
        choices=("total", "non-embedding", "flops"),
        help="what the table's N counts, written into the law for `plan` to size a shape: "
        "total or non-embedding parameters, or flops (FLOPs per token / 6, a ladder's); "
        "default: the table's n_counts column, else total",
    )
    parser.add_argument("--name", help="law name in the file (default: the --out file's stem)")
    parser.add_argument("--plots", metavar="DIR", help="write PNG figures into DIR")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from planner.errors import InputError
    from planner.runs import Runs, load_runs

    if args.bootstrap < 0:
        raise InputError(f"--bootstrap: {args.bootstrap} must be 0 or more resamples")
    if not 0 < args.level < 1:
        raise InputError(f"--level: {args.level} must be between 0 and 1 (e.g. 0.95)")
    if args.delta <= 0:
        raise InputError(f"--delta: {args.delta} must be positive")
    if args.approach == "envelope":
        return _envelope(args)
    if args.approach == "hparams":
        return _hparams(args)
    runs = load_runs(
        args.runs,
        params_col=args.params_col,
        tokens_col=args.tokens_col,
        loss_col=args.loss_col,
        flops_col=args.flops_col,
        budget_col=args.budget_col,
        where=dict(args.where),
    )
    if args.drop_highest_loss:
        if not 0 < args.drop_highest_loss < len(runs):
            raise InputError(
                f"--drop-highest-loss: {args.drop_highest_loss} must be between 1"
                f" and {len(runs) - 1} for {len(runs)} runs"
            )
        keep = np.sort(np.argsort(runs.loss)[: len(runs) - args.drop_highest_loss])
        runs = Runs(
            runs.n_params[keep],
            runs.n_tokens[keep],
            runs.loss[keep],
            None if runs.budget_flops is None else runs.budget_flops[keep],
            runs.source,
        )
    name = args.name or (Path(args.out).stem if args.out else Path(args.runs).stem)
    if args.approach == "isoflop":
        return _isoflop(runs, name, args)
    return _parametric(runs, name, args)


def _finish(law: Any, summary: dict[str, Any], args: argparse.Namespace) -> None:
    from planner.published import save_law

    law = law.model_copy(update={"n_counts": _n_counts(args)})
    summary["n_counts"] = law.n_counts
    if args.out:
        summary["law_file"] = str(save_law(law, args.out))
    for warning in summary.get("warnings", []):
        if not args.json:
            output.warn(warning)
    if args.json:
        output.print_json(summary)
    elif args.out:
        print(
            f"law written to {args.out} (N counts {law.n_counts}); use it with: scaleplan plan "
            f"--law {args.out} --compute 1e21"
        )


def _finite_rows(samples: Any) -> list[list[float]] | None:
    """The bootstrap refits whose parameters are all finite: a refit that overflowed (A or B
    to inf) has no law to store, and JSON has no number for it."""
    import numpy as np

    if samples is None:
        return None
    return [list(map(float, row)) for row in samples if np.all(np.isfinite(row))]


def _n_counts(args: argparse.Namespace) -> str:
    """--n-counts, else the table's one n_counts value (a ladder writes flops), else total."""
    from planner.errors import InputError
    from planner.runs import read_table

    if args.n_counts:
        return str(args.n_counts)
    frame = read_table(args.runs)
    if "n_counts" not in frame.columns:
        return "total"
    values = sorted(set(frame["n_counts"].astype(str)))
    allowed = ("total", "non-embedding", "flops")
    if len(values) != 1 or values[0] not in allowed:
        raise InputError(
            f"{args.runs}: n_counts column has {values}; expected one of {list(allowed)} for "
            "every row (or pass --n-counts)"
        )
    return values[0]


def _parametric(runs: Any, name: str, args: argparse.Namespace) -> int:
    from planner.errors import InputError
    from planner.fit import fit_law
    from planner.published import Law

    try:
        result = fit_law(
            runs.n_params,
            runs.n_tokens,
            runs.loss,
            form=args.form,
            delta=args.delta,
            bootstrap=args.bootstrap,
            interval_level=args.level,
            seed=args.seed,
        )
    except InputError as error:  # about the runs as a whole: name the table
        raise InputError(f"{runs.source}: {error}") from None
    fit_info: dict[str, Any] = {
        "approach": "parametric",
        "method": "Huber on log residuals, L-BFGS multi-start (Hoffmann et al. 2022, App. D.2)",
        "source": runs.source,
        "n_points": result.n_points,
        "objective": result.objective,
        "converged": result.converged,
        "residuals": result.residuals,
        "delta": args.delta,
        "n_starts": result.n_starts,
        "seconds": result.seconds,
        "warnings": result.warnings,
    }
    law = Law(
        name=name,
        form=args.form,
        params=result.params,
        citation=f"fitted by scaleplan to {runs.source}",
        interval_level=args.level if result.bootstrap is not None else None,
        intervals=result.intervals,
        bootstrap=_finite_rows(result.bootstrap),
        fit=fit_info,
    )
    summary = {
        "form": result.form,
        "params": result.params,
        "intervals": {k: list(v) for k, v in result.intervals.items()},
        "interval_level": args.level,
        "n_points": result.n_points,
        "objective": result.objective,
        "converged": result.converged,
        "residuals": result.residuals,
        "seconds": result.seconds,
        "warnings": result.warnings,
    }
    if not args.json:
        rows = [
            [key, f"{value:.6g}", _interval(result.intervals.get(key))]
            for key, value in result.params.items()
        ]
        output.print_table(
            f"{args.form} law, {result.n_points} runs",
            ["parameter", "estimate", f"{args.level:.0%} bootstrap interval"],
            rows,
            caption=(
                f"{runs.source}\n"
                f"objective {result.objective:.6g} (summed Huber, delta {args.delta:g});"
                f" log-residual RMSE {result.residuals.get('rmse_log', float('nan')):.4f};"
                f" {result.n_starts} starts, {result.seconds:.1f} s"
            ),
        )
    if args.plots:
        summary["plots"] = _parametric_plots(runs, law, Path(args.plots))
    _finish(law, summary, args)
    return 0


def _interval(bounds: tuple[float, float] | None) -> str:
    return "-" if bounds is None else f"{bounds[0]:.4g} – {bounds[1]:.4g}"


def _parametric_plots(runs: Any, law: Any, folder: Path) -> list[str]:
    from planner import plots

    compute = runs.compute_flops
    paths = [
        plots.isoflop_view(runs, law, folder / "isoflop_view.png"),
        plots.frontier_plot(
            law, folder / "frontier.png", (compute.min() / 10, compute.max() * 1e4), runs=runs
        ),
        plots.residuals_plot(runs, law, folder / "residuals.png"),
    ]
    if law.bootstrap:
        paths.append(
            plots.tokens_per_param_plot(law, float(compute.max()), folder / "tokens_per_param.png")
        )
    return [str(p) for p in paths]


def _hparams(args: argparse.Namespace) -> int:
    from planner.hparams import fit_hparam_law, save_hparam_law
    from planner.runs import numeric_column, read_table, select_rows

    frame = select_rows(read_table(args.runs), dict(args.where), args.runs)
    values = [
        numeric_column(frame, name, args.runs, option)
        for name, option in (
            (args.flops_col, "--flops-col"),
            (args.lr_col, "--lr-col"),
            (args.batch_col, "--batch-col"),
        )
    ]
    name = args.name or (Path(args.out).stem if args.out else Path(args.runs).stem)
    law = fit_hparam_law(
        *values,
        name=name,
        source=str(args.runs),
        bootstrap=args.bootstrap,
        interval_level=args.level,
        seed=args.seed,
    )
    summary = law.model_dump(mode="json")
    if args.out:
        summary["law_file"] = str(save_hparam_law(law, args.out))
    if args.json:
        output.print_json(summary)
        return 0
    lr, batch = law.learning_rate, law.batch_tokens
    print(
        f"eta_opt = {lr.coefficient:.4g} C^{lr.exponent:.4f} [{_interval(lr.exponent_interval)}]"
        f", B_opt = {batch.coefficient:.4g} C^{batch.exponent:.4f} "
        f"[{_interval(batch.exponent_interval)}] tokens ({args.level:.0%} bootstrap intervals "
        f"over {law.n_points} budgets; DeepSeek LLM: 0.3118 C^-0.1250, 0.2920 C^0.3271)"
    )
    if args.out:
        print(f"law written to {args.out}; use it with: scaleplan plan --hparams {args.out}")
    return 0


def _allocation_summary(approach: str, result: Any) -> dict[str, Any]:
    """What Approaches 1 and 2 both report: the exponents, coefficients and intervals."""
    return {
        "approach": approach,
        "n_exponent": result.n_exponent,
        "n_exponent_interval": list(result.n_exponent_interval),
        "n_coefficient": result.n_coefficient,
        "d_exponent": result.d_exponent,
        "d_exponent_interval": list(result.d_exponent_interval),
        "d_coefficient": result.d_coefficient,
        "interval_level": result.interval_level,
    }


def _envelope(args: argparse.Namespace) -> int:
    from planner.envelope import fit_envelope, load_curves

    curves = load_curves(
        args.runs,
        run_col=args.run_col,
        params_col=args.params_col,
        tokens_col=args.tokens_col,
        loss_col=args.loss_col,
        where=dict(args.where),
    )
    result = fit_envelope(
        curves, bootstrap=args.bootstrap, interval_level=args.level, seed=args.seed
    )
    name = args.name or (Path(args.out).stem if args.out else Path(args.runs).stem)
    law = result.to_law(name, curves.source)
    summary: dict[str, Any] = {
        **_allocation_summary("envelope", result),
        "n_curves": len(curves.runs),
        "envelope": [
            {"flops": float(c), "n_opt": float(n), "loss": float(loss), "run": run}
            for c, n, loss, run in zip(
                result.grid_flops, result.n_opt, result.loss, result.winners, strict=True
            )
        ],
        "warnings": result.warnings,
    }
    if not args.json:
        print(
            f"Approach 1 (lower envelope) over {len(curves.runs)} curves of {curves.source}: "
            f"N_opt ∝ C^{result.n_exponent:.3f} [{_interval(result.n_exponent_interval)}], "
            f"D_opt ∝ C^{result.d_exponent:.3f} [{_interval(result.d_exponent_interval)}] "
            f"({args.level:.0%} bootstrap intervals over runs)"
        )
    _finish(law, summary, args)
    return 0


def _isoflop(runs: Any, name: str, args: argparse.Namespace) -> int:
    from planner.isoflop import fit_isoflop

    result = fit_isoflop(runs, bootstrap=args.bootstrap, interval_level=args.level, seed=args.seed)
    law = result.to_law(name, runs.source)
    summary: dict[str, Any] = {
        **_allocation_summary("isoflop", result),
        "n_points": len(runs),
        "budgets": [
            {
                "budget_flops": b.budget_flops,
                "n_points": b.n_points,
                "n_opt": b.n_opt,
                "d_opt": b.d_opt,
                "loss_at_opt": b.loss_at_opt,
                "flagged": b.flagged,
            }
            for b in result.budgets
        ],
        "warnings": result.warnings,
    }
    if not args.json:
        rows = [
            [
                output.sci(b.budget_flops),
                str(b.n_points),
                output.count(b.n_opt),
                output.count(b.d_opt),
                output.fixed(b.loss_at_opt),
                b.flagged or "used",
            ]
            for b in result.budgets
        ]
        output.print_table(
            f"IsoFLOP profiles of {runs.source}",
            ["budget (FLOPs)", "runs", "N_opt", "D_opt", "loss at N_opt", "status"],
            rows,
            caption=(
                f"N_opt ∝ C^{result.n_exponent:.3f} [{_interval(result.n_exponent_interval)}],"
                f" D_opt ∝ C^{result.d_exponent:.3f} [{_interval(result.d_exponent_interval)}]"
                f" ({args.level:.0%} bootstrap intervals)"
            ),
        )
    if args.plots:
        from planner import plots

        summary["plots"] = [
            str(plots.isoflop_profiles(runs, result, Path(args.plots) / "isoflop_profiles.png"))
        ]
    _finish(law, summary, args)
    return 0
