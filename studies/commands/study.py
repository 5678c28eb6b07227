"""`scaleplan study show|best|export NAME`: an existing study, read back from its storage.

    scaleplan study show quickstart              # stages, counts, the best trials, failures
    scaleplan study best quickstart > best.yaml  # the best trial's trainer config (YAML)
    scaleplan study export quickstart --out runs.csv
    scaleplan fit runs.csv                       # the export is a runs table

NAME is a study name or a study file, whose name, backend and storage are used. A bare name is
read from what runs/NAME/ holds: ``optuna.journal`` (the Optuna backend) or ``ray/`` (the Ray
backend, whose finished stages keep their trial records beside each Tune experiment; no Ray is
started to read them). ``--storage`` names another storage: a journal file or database URL
(sqlite:///, postgresql://) is Optuna's, a folder or s3:// / gs:// URI Ray's. A stage that has
not finished (the sweep is running, or was stopped) shows how many of its trials did.

The export has one row per trial that measured a loss (complete, and pruned at the step it
stopped), with the runs-table columns ``params`` (parameters), ``tokens`` (tokens trained) and
``loss`` (final validation loss), then ``study, stage, number, state, value, steps, flops,
seconds, reason, out_dir, run_id, continued_from`` (a PBT trial's takeover of another's
weights: ``trial 3 at step 40``) and one column per hyperparameter. ``--all`` adds failed and
interrupted trials, with empty loss. A callable objective's study has a row per trial that
measured a value (no model size or tokens: not a runs table for ``scaleplan fit``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studies.commands import output

if TYPE_CHECKING:
    from studies.records import StageReport

RUNS_TABLE_COLUMNS = ("params", "tokens", "loss")
TRIAL_COLUMNS = (
    "study",
    "stage",
    "number",
    "state",
    "value",
    "steps",
    "flops",
    "seconds",
    "reason",
    "out_dir",
    "run_id",
    "continued_from",
)
TOP_TRIALS = 5
# what `show --json` says of each trial it lists
BRIEF_KEYS = (
    "stage",
    "number",
    "state",
    "value",
    "reason",
    "params",
    "out_dir",
    "run_id",
    "continued_from",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("show", "best", "export"), help="what to do")
    parser.add_argument("name", metavar="NAME", help="study name, or its study file (YAML)")
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="the study's storage (default: runs/NAME/optuna.journal or runs/NAME/ray, or the "
        "study file's)",
    )
    parser.add_argument(
        "--runs-dir", default="runs", metavar="DIR", help="where runs/NAME/ is (default runs)"
    )
    parser.add_argument(
        "--out", metavar="FILE", help="export: write the CSV here (default: standard output)"
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="export: every trial, failed and interrupted ones too (their loss is empty)",
    )
    parser.add_argument("--json", action="store_true", help="show, best: print JSON")


def run(args: argparse.Namespace) -> int:
    name, storage, reports = read_study(args.name, args.storage, Path(args.runs_dir))
    if args.action == "show":
        return _show(name, storage, reports, args.json)
    if args.action == "best":
        return _best(name, reports, args.json)
    return _export(name, reports, args.out, args.all)


def read_study(
    name: str, storage: str | None, runs_dir: Path
) -> tuple[str, str, list[StageReport]]:
    """(name, storage, its stage reports) of a study named, or given by its study file."""
    from studies.backends import load_stage_reports, locate_study

    if name.endswith((".yaml", ".yml")):  # a study file: its name, backend and storage
        from studies.study_file import load_study

        study = load_study(name)
        name, storage = study.name, storage or study.resolved_storage(runs_dir)
        backend = study.backend
    else:
        storage, backend = locate_study(name, storage, runs_dir)
    return name, storage, load_stage_reports(name, storage, backend)


def best_of(name: str, reports: Sequence[StageReport]) -> tuple[dict[str, Any], str]:
    """(the study's best trial, its trainer config's YAML text, "" when not on this machine)."""
    from studies.errors import StudyError
    from studies.sweep import study_ranking

    _, ranked = study_ranking(reports, reports[0].direction)
    if not ranked:
        raise StudyError(f"study: '{name}' has no complete trial yet; see `scaleplan study show`")
    best = dict(ranked[0])
    return best, _trial_config_text(best)


# ---------------------------------------------------------------------------------------------
# show


def _show(name: str, storage: str, reports: list[StageReport], as_json: bool) -> int:
    from studies.config import mask_password
    from studies.sweep import study_ranking

    direction = reports[0].direction
    metric = reports[0].metric
    _, ranked = study_ranking(reports, direction)
    top = ranked[:TOP_TRIALS]
    if as_json:
        best = top[0] if top else None
        output.print_json(
            output.json_ready(
                {
                    "study": name,
                    "storage": mask_password(storage),
                    "metric": metric,
                    "direction": direction,
                    "best_value": best["value"] if best else None,
                    "best_params": best["params"] if best else None,
                    "stages": [r.to_dict(direction) for r in reports],
                    "top": [_brief(t) for t in top],
                    "failed": [_brief(t) for r in reports for t in r.trials if t["reason"]],
                }
            )
        )
        return 0
    columns, rows, caption = output.stage_rows([r.to_dict(direction) for r in reports])
    unfinished = [
        f"stage {r.name}: {r.counts.finished} of {r.counts.requested} trials finished (the "
        "sweep is running, or was stopped: the same `scaleplan sweep` resumes it)"
        for r in reports
        if r.counts.finished < r.counts.requested
    ]
    output.print_table(
        f"Study {name} ({metric}, {direction}) in {mask_password(storage)}",
        columns,
        rows,
        "\n".join(line for line in [caption, *unfinished] if line),
    )
    if top:
        names = list(top[0]["params"])
        lineage = any(t.get("continued_from") for t in top)  # PBT
        where, labels = output.trial_labels(top)
        output.print_table(
            f"Best trials ({where})",
            ["#", "trial", metric, *names] + (["continued from"] if lineage else []),
            [
                [str(rank), label, output.metric(t["value"])]
                + [output.param(t["params"].get(key)) for key in names]
                + ([t.get("continued_from") or "-"] if lineage else [])
                for rank, (t, label) in enumerate(zip(top, labels, strict=True), 1)
            ],
        )
    failed = [t for r in reports for t in r.trials if t["state"] in ("failed", "interrupted")]
    if failed:
        output.print_table(
            "Failed and interrupted trials",
            ["stage", "trial", "state", "reason"],
            [[t["stage"], str(t["number"]), t["state"], str(t["reason"])] for t in failed],
        )
    return 0


# ---------------------------------------------------------------------------------------------
# best


def _best(name: str, reports: list[StageReport], as_json: bool) -> int:
    metric = reports[0].metric
    best, config_text = best_of(name, reports)
    if as_json:
        import yaml

        output.print_json(
            output.json_ready(
                {
                    "study": name,
                    "stage": best["stage"],
                    "number": best["number"],
                    "metric": metric,
                    "best_value": best["value"],
                    "best_params": best["params"],
                    "out_dir": best["out_dir"],
                    "run_id": best["run_id"],
                    "config": yaml.safe_load(config_text) if config_text else None,
                }
            )
        )
        return 0
    header = [
        f"# Best trial of study '{name}': stage {best['stage']}, trial {best['number']}, "
        f"{metric} {best['value']:.6g}",
        *(f"#   {key} = {output.param(value)}" for key, value in best["params"].items()),
    ]
    if best["out_dir"]:
        header.append(f"# run folder: {best['out_dir']}")
    if not config_text:
        header.append("# (its config.yaml is not on this machine: the parameters are above)")
    sys.stdout.write("\n".join(header) + "\n" + config_text)
    return 0


def _trial_config_text(trial: Mapping[str, Any]) -> str:
    if not trial.get("out_dir"):
        return ""
    try:
        return (Path(trial["out_dir"]) / "config.yaml").read_text()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# export


def export_rows(name: str, reports: Sequence[StageReport], every: bool) -> list[dict[str, Any]]:
    """One runs-table row per trial (only those with a loss unless `every`)."""

    loss_metric = reports[0].metric in ("val_loss", "best_val_loss") if reports else True
    # a callable objective's trials are no runs table: each one that measured a value is a row
    callable_objective = bool(reports) and reports[0].meta.get("objective") == "callable"
    rows = []
    for report in reports:
        for trial in report.trials:
            if trial["state"] in ("running", "waiting"):
                continue
            loss = _final_val_loss(trial)
            if loss is None and loss_metric:
                loss = trial["last_value"]
            usable = (
                loss is not None
                and math.isfinite(loss)
                and bool(trial["params_count"])
                and bool(trial["tokens"])
            )
            measured = callable_objective and trial["last_value"] is not None
            if not (usable or every or measured):
                continue
            row: dict[str, Any] = {
                "params": trial["params_count"],
                "tokens": trial["tokens"],
                "loss": loss if usable else None,
                "study": name,
                "stage": trial["stage"],
                "number": trial["number"],
                "state": trial["state"],
                "value": trial["value"],
                "steps": trial["steps"],
                "flops": trial.get("flops"),
                "seconds": trial.get("seconds"),
                "reason": trial["reason"],
                "out_dir": trial["out_dir"],
                "run_id": trial["run_id"],
                "continued_from": trial.get("continued_from"),
            }
            row.update(trial["params"])
            rows.append(row)
    return rows


def _final_val_loss(trial: Mapping[str, Any]) -> float | None:
    """The trial's last validation loss from its result.json, when it is on this machine."""
    if not trial.get("out_dir"):
        return None
    try:
        result = json.loads((Path(trial["out_dir"]) / "result.json").read_text())
    except (OSError, ValueError):
        return None
    value = result.get("final_val_loss") if isinstance(result, dict) else None
    return float(value) if isinstance(value, int | float) else None


def _export(name: str, reports: list[StageReport], out: str | None, every: bool) -> int:
    rows = export_rows(name, reports, every)
    hyper: list[str] = []
    for report in reports:
        for key in report.space:
            if key not in hyper:
                hyper.append(key)
    for row in rows:
        hyper.extend(key for key in row if key not in hyper and _is_param_key(key))
    columns = [*RUNS_TABLE_COLUMNS, *TRIAL_COLUMNS, *hyper]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(row.get(key)) for key in columns})
    if out is None:
        sys.stdout.write(buffer.getvalue())
        return 0
    from trainer.tracking import write_text_atomic

    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, buffer.getvalue())
    print(f"{len(rows)} trials -> {out}", file=sys.stderr)
    return 0


def _is_param_key(key: str) -> bool:
    return key not in RUNS_TABLE_COLUMNS and key not in TRIAL_COLUMNS


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


# ---------------------------------------------------------------------------------------------
# Formatting


def _brief(trial: Mapping[str, Any]) -> dict[str, Any]:
    return {key: trial.get(key) for key in BRIEF_KEYS}
