"""`scaleplan diagnose RUN_DIR`: the training pathologies in a run's metrics.jsonl, with fixes.

Works on a finished run or one still being written (a partial last line is skipped).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from studies.cli import number
from studies.commands import output

MAX_LAYERS_SHOWN = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--update-ratio-band",
        type=number,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=None,
        help="healthy update/weight ratio per layer"
        " (default 1e-4 1e-2; small Adam-trained models sit higher)",
    )


def run(args: argparse.Namespace) -> int:
    from trainer.errors import ConfigError
    from trainer.pathologies import UPDATE_RATIO_BAND, diagnose_run

    band = tuple(args.update_ratio_band or UPDATE_RATIO_BAND)
    if not 0 < band[0] < band[1]:
        raise ConfigError(f"--update-ratio-band: {band[0]:g} {band[1]:g}; expected 0 < LOW < HIGH")
    n_records, findings = diagnose_run(args.run_dir, update_ratio_band=(band[0], band[1]))
    if args.json:
        output.print_json(
            {
                "run_dir": str(args.run_dir),
                "n_records": n_records,
                "findings": [finding.to_dict() for finding in findings],
            }
        )
        return 0
    if not findings:
        print(f"{args.run_dir}: no pathologies found in {n_records} records")
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    errors = sum(f.severity == "error" for f in findings)
    notes = sum(f.severity == "info" for f in findings)
    table = Table(
        title=f"{args.run_dir}: {len(findings)} finding(s) in {n_records} records",
        caption=f"{errors} error(s), {len(findings) - errors - notes} warning(s), {notes} note(s)."
        " Thresholds and their sources: trainer/pathologies.py.",
        title_justify="left",
        caption_justify="left",
        show_lines=True,
    )
    for column in ("pathology", "severity", "steps", "layers", "detail", "fix"):
        table.add_column(column, justify="right" if column == "steps" else "left")
    for finding in findings:
        layers = list(finding.layers[:MAX_LAYERS_SHOWN])
        if len(finding.layers) > MAX_LAYERS_SHOWN:
            layers.append(f"+{len(finding.layers) - MAX_LAYERS_SHOWN} more")
        colour = {"error": "red", "warning": "yellow"}.get(finding.severity, "cyan")
        first, last = finding.steps
        table.add_row(
            escape(finding.pathology),
            f"[{colour}]{finding.severity}[/{colour}]",
            f"{first}–{last}" if first != last else str(first),
            escape("\n".join(layers)) or "-",
            escape(finding.detail),
            escape(finding.fix),
        )
    Console(width=max(Console().width, 120)).print(table)
    return 0
