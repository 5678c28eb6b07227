"""`scaleplan sweep`: run a study's coarse-to-fine stages, with a live view, then the summary.

    scaleplan sweep studies/configs/quickstart.yaml
    scaleplan sweep study.yaml --set stages.coarse.trials=8 --workers 2
    scaleplan sweep study.yaml --storage postgresql://user:pw@db/optuna --workers 4
    scaleplan sweep study.yaml --tracking-uri http://mlflow:5000 --json
    scaleplan sweep studies/configs/optimizers.yaml --arms adamw lion   # a comparison

The same command again resumes: finished trials are kept, interrupted ones are retried. A
comparison file (one with ``arms``, see `studies.compare`) runs its study once per arm, then
prints the best of each arm side by side.

Exit status: 0 when the sweep ends with a best configuration; 1 when it ended without any
complete trial (every reason is listed); 2 for a user mistake (a study field, an unreachable
storage or tracking URI), always before any trial starts; 130 on ^C.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studies.backends import BACKENDS
from studies.commands import output
from trainer.cli import add_set_option

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from studies.config import ParamSpec, StageSpec
    from studies.records import StageCounts, StageReport

EXIT_NO_RESULT = 1
# complete trials per searched parameter below which the importances are only a hint (a forest
# on fewer moves with its own seed: notebooks/04_sweep_analysis.ipynb, section 3)
TRIALS_PER_IMPORTANCE = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY.yaml", help="study file (YAML)")
    add_set_option(
        parser,
        "override a study field by its dotted path, value in YAML (e.g. "
        "stages.coarse.trials=8 space.optimizer.lr.high=1e-2 overrides.model.n_layer=4)",
    )
    parser.add_argument(
        "--backend", choices=tuple(BACKENDS), help="search backend (default: the study's)"
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="optuna: a journal file, sqlite:///file.db or postgresql://...; ray: a folder or "
        "s3:// URI (default runs/<study>/optuna.journal or runs/<study>/ray)",
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db); "
        "'none' turns MLflow off",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="trials at once (optuna: worker processes on one storage; default: the study's)",
    )
    parser.add_argument(
        "--ray-address", metavar="HOST:PORT", help="ray: an existing cluster (default: local)"
    )
    parser.add_argument(
        "--runs-dir", default="runs", metavar="DIR", help="where runs/<study>/ goes (default runs)"
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        metavar="ARM",
        help="comparison files: run only these arms (default: all)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the summary as JSON, without the live view"
    )


def run(args: argparse.Namespace) -> int:
    from studies.compare import is_comparison
    from studies.errors import StudyError
    from studies.sweep import NullView, prepare_study, run_sweep

    if is_comparison(args.study):
        return run_comparison(args)
    if args.arms:
        raise StudyError(f"--arms: {args.study} is a study, not a comparison (it has no arms)")
    study = prepare_study(
        args.study,
        args.overrides,
        backend=args.backend,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        workers=args.workers,
    )
    if args.json:
        summary = run_sweep(
            study,
            runs_dir=args.runs_dir,
            view=NullView(),
            study_file=args.study,
            ray_address=args.ray_address,
        )
        output.print_json(summary)
    else:
        with LiveView(study.name, len(study.stages)) as view:
            summary = run_sweep(
                study,
                runs_dir=args.runs_dir,
                view=view,
                study_file=args.study,
                ray_address=args.ray_address,
            )
        print_summary(summary)
    if summary["best_value"] is None:
        reasons = failure_line(summary) or "no trial finished"
        print(f"scaleplan sweep: no trial completed; {reasons}", file=sys.stderr)
        return EXIT_NO_RESULT
    return 0


def run_comparison(args: argparse.Namespace) -> int:
    """A comparison file: each arm's study with its live view, then the comparison table."""
    from studies.compare import load_comparison
    from studies.compare import run_comparison as run_arms

    config, studies = load_comparison(
        args.study,
        args.overrides,
        arms=args.arms,
        backend=args.backend,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        workers=args.workers,
    )
    summary = run_arms(
        config,
        studies,
        runs_dir=args.runs_dir,
        view_for=None if args.json else lambda study: LiveView(study.name, len(study.stages)),
        comparison_file=args.study,
        ray_address=args.ray_address,
    )
    if args.json:
        output.print_json(summary)
    else:
        print_comparison(summary)
    if summary["winner"] is None:
        print("scaleplan sweep: no arm has a complete trial", file=sys.stderr)
        return EXIT_NO_RESULT
    return 0


def print_comparison(summary: dict[str, Any]) -> None:
    """The arms best first, with the gap to the best and the best parameters."""
    metric = summary["metric"]
    rows = summary["arms"]
    names = sorted({name for row in rows for name in row["best_params"]})
    best = rows[0]["best_value"]
    output.print_table(
        f"Comparison {summary['comparison']}: best {metric} of each arm, same budget",
        ["#", "arm", metric, "gap", *names, "complete", "pruned", "failed", "trial-steps"],
        [
            [
                str(rank),
                row["arm"],
                output.metric(row["best_value"]),
                _gap(row["best_value"], best),
                *[output.param(row["best_params"].get(name)) for name in names],
                str(row["n_complete"]),
                str(row["n_pruned"]),
                str(row["n_failed"]),
                str(row["trial_steps"]),
            ]
            for rank, row in enumerate(rows, 1)
        ],
    )
    lines = [f"table: {summary['table']}", f"plot: {summary['plot']}"]
    if summary["mlflow_experiment"]:
        lines.append(
            f"MLflow: experiment {summary['mlflow_experiment']} at {summary['tracking_uri']}, "
            "one parent run per arm"
        )
    lines.append(f"an arm's trials: scaleplan study show {rows[0]['study']}")
    print("\n".join(lines))


def _gap(value: float | None, best: float | None) -> str:
    if value is None or best is None:
        return "-"
    return "-" if value == best else f"{value - best:+.4f}"


# ---------------------------------------------------------------------------------------------
# The live view


def run_study_reports(
    study: Any, *, runs_dir: Path, study_file: Path, quiet: bool
) -> tuple[dict[str, Any], list[Any]]:
    """`studies.sweep.run_sweep_reports` with the live view on stderr, or none when `quiet`
    (a command printing JSON): what the study commands built on the engine run."""
    from studies.sweep import NullView, run_sweep_reports

    if quiet:
        return run_sweep_reports(study, runs_dir=runs_dir, view=NullView(), study_file=study_file)
    with LiveView(study.name, len(study.stages)) as view:
        return run_sweep_reports(study, runs_dir=runs_dir, view=view, study_file=study_file)


class LiveView:
    """One progress line per stage on stderr: trials done, by state, and the best so far."""

    def __init__(self, study: str, n_stages: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(stderr=True)
        self.bars: Progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[states]}"),
            TextColumn("best {task.fields[best]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.tasks: dict[str, TaskID] = {}
        self.study = study
        self.n_stages = n_stages

    def __enter__(self) -> LiveView:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars.live.is_started:
            self.bars.stop()

    def stage_started(
        self, stage: StageSpec, index: int, space: dict[str, ParamSpec], notes: list[str]
    ) -> None:
        if not self.bars.live.is_started:
            self.bars.start()
        pruner = stage.pruner.name
        self.bars.console.print(
            f"[bold]{self.study}[/bold] stage {index + 1}/{self.n_stages} "
            f"[bold]{stage.name}[/bold]: {stage.trials} trials, sampler {stage.sampler}, "
            f"pruner {pruner}",
            highlight=False,
        )
        for note in notes:
            self.bars.console.print(f"  {note}", highlight=False, markup=False)
        self.tasks[stage.name] = self.bars.add_task(
            stage.name, total=stage.trials, states="", best="-"
        )

    def progress(self, stage: str, counts: StageCounts) -> None:
        task = self.tasks.get(stage)
        if task is None:
            return
        self.bars.update(
            task,
            completed=min(counts.finished, counts.requested),
            states=state_text(counts),
            best=_best_text(counts),
        )

    def stage_finished(self, report: StageReport) -> None:
        self.progress(report.name, report.counts)

    def message(self, text: str) -> None:
        self.bars.console.print(text, highlight=False, markup=False)


def state_text(counts: StageCounts) -> str:
    parts = [f"complete {counts.complete}", f"pruned {counts.pruned}", f"failed {counts.failed}"]
    if counts.running:
        parts.append(f"running {counts.running}")
    if counts.interrupted:
        parts.append(f"interrupted {counts.interrupted}")
    return "  ".join(parts)


def _best_text(counts: StageCounts) -> str:
    if counts.best_value is None:
        return "-"
    return f"{counts.best_value:.4f} (#{counts.best_number})"


# ---------------------------------------------------------------------------------------------
# The summary


def print_summary(summary: dict[str, Any]) -> None:
    """Stages, the best configurations, importances, and where everything is."""
    metric = summary["metric"]
    columns, rows, caption = output.stage_rows(summary["stages"])
    output.print_table(f"Study {summary['study']}: stages", columns, rows, caption)
    top = summary["top"]
    if top:
        names = list(top[0]["params"])
        where, labels = output.trial_labels(top)
        output.print_table(
            f"Best configurations ({where}, {metric})",
            ["#", "trial", metric, *names],
            [
                [str(rank), label, output.metric(t["value"])]
                + [output.param(t["params"].get(name)) for name in names]
                for rank, (t, label) in enumerate(zip(top, labels, strict=True), 1)
            ],
        )
    importances, origin = summary["importances"], summary.get("importances_from")
    if importances:
        output.print_table(
            "Parameter importances (fANOVA)",
            ["parameter", "importance"],
            [[name, f"{value:.3f}"] for name, value in importances.items()],
        )
    lines = []
    if importances and origin:
        few = origin["n_complete"] < TRIALS_PER_IMPORTANCE * len(importances)
        lines.append(
            f"importances: from the {origin['n_complete']} complete trials of stage "
            f"{origin['stage']}" + (" (too few to act on: a hint, not a finding)" if few else "")
        )
    if summary["best_value"] is not None:
        lines.append(f"best {metric}: {output.metric(summary['best_value'])}")
    spent = [f"{output.sci(summary['flops'])} training FLOPs"] if summary.get("flops") else []
    if summary.get("trial_seconds") is not None:
        spent.append(f"{output.duration(summary['trial_seconds'])} of trial time")
    if spent:
        lines.append(f"cost: {', '.join(spent)}")
    failures = failure_line(summary)
    if failures:
        lines.append(failures)
    if summary["best_config"]:
        lines.append(f"best config: {summary['best_config']}")
    if summary["plots"]:
        folder = str(summary["plots"][0]).rsplit("/", 1)[0]
        kinds = sorted({str(p).rsplit("/", 1)[-1].rsplit(".", 1)[0] for p in summary["plots"]})
        lines.append(f"plots: {folder}/ ({', '.join(kinds)}; PNG and HTML)")
    if summary["mlflow_parent_run_id"]:
        lines.append(
            f"MLflow: experiment {summary['mlflow_experiment']}, parent run "
            f"{summary['mlflow_parent_run_id']} at {summary['tracking_uri']}"
        )
        if str(summary["tracking_uri"]).startswith(("sqlite:", "file:")):
            lines.append(f"  mlflow ui --backend-store-uri {summary['tracking_uri']}")
    else:
        lines.append("MLflow: off")
    if summary.get("storage"):
        lines.append(f"storage: {_relative(summary['storage'])}")
    print("\n".join(lines))


def _relative(storage: str) -> str:
    """A journal file under the working folder as the best config is shown: relative."""
    if "://" in storage:
        return storage
    try:
        return str(Path(storage).relative_to(Path.cwd()))
    except ValueError:
        return storage


def failure_line(summary: dict[str, Any]) -> str:
    """``failed 2: diverged: non-finite loss at step 37 (1), out of memory (1)``."""
    reasons: Counter[str] = Counter()
    for stage in summary.get("failures", {}).values():
        reasons.update(stage)
    if not reasons:
        return ""
    listed = ", ".join(f"{reason} ({n})" for reason, n in reasons.most_common(5))
    return f"failed {sum(reasons.values())}: {listed}"
