"""Comparisons: one study run once per arm (an optimiser, a schedule), then the best of each.

A comparison file names a study and the arms it is run for; each arm is a set of study
overrides in the ``--set`` syntax, written as a mapping::

    name: optimizers                # runs/optimizers/: comparison.csv, comparison.png
    study: gpt-lr.yaml              # the study every arm runs (relative to this file)
    shared:                         # study overrides every arm gets first
      overrides.tracking.experiment: scaleplan-optimizers
    arms:                           # arm -> study overrides
      adamw: {overrides.optimizer.name: adamw}
      lion:
        overrides.optimizer.name: lion
        space.optimizer.lr: {low: 1.0e-5, high: 3.0e-3, log: true}

``scaleplan sweep optimizers.yaml`` runs the arms one after the other, each as the study
``<name>-<arm>`` (its own storage, MLflow parent run and trials, resumed like any study; the
arms share the study's MLflow experiment, so the UI shows them side by side), then writes the
comparison: a table of each arm's best value and parameters, and a plot of the best per arm
beside each arm's objective against its first searched parameter (the learning-rate curve).

Every arm runs the study's stages, so every arm gets the same trial budget: an arm may change
the trainer (``overrides.*``) and the search space (``space.*``), not the stages. ``--set``
applies to every arm's study (``--set stages.coarse.trials=4``); ``--arms a b`` runs a subset.
Every arm's study is loaded and checked before the first trial of any arm.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from studies.config import NAME_PATTERN, StudyConfig
from studies.errors import StudyError, first_error
from studies.sweep import NullView, StageReport, prepare_study, run_sweep_reports
from trainer.tracking import write_text_atomic

__all__ = [
    "ComparisonConfig",
    "is_comparison",
    "load_comparison",
    "run_comparison",
]

# an arm may not change these: every arm runs the same stages under its own name
FIXED_FIELDS = ("stages", "name")


class ComparisonConfig(BaseModel):
    """A comparison file: a study and the arms it is run for."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Comparison name: runs/<name>/ holds its table and plot; arm studies are "
        "<name>-<arm>. Default: the file's name.",
    )
    study: Path = Field(description="The study file every arm runs (relative to this file).")
    shared: dict[str, Any] = Field(
        default_factory=dict, description="Study overrides every arm gets before its own."
    )
    arms: dict[str, dict[str, Any]] = Field(
        min_length=2,
        description="Arm name -> study overrides (dotted keys as --set takes them: "
        "overrides.optimizer.name, space.optimizer.lr, ...).",
    )


def is_comparison(path: str | Path) -> bool:
    """Whether a YAML file is a comparison (it has ``arms``) rather than a study."""
    from trainer.config import read_yaml_mapping

    try:
        raw = read_yaml_mapping(Path(path), "study", StudyError)
    except StudyError:
        return False  # the study loader says what is wrong with it
    return "arms" in raw


def load_comparison(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    arms: Sequence[str] | None = None,
    backend: str | None = None,
    storage: str | None = None,
    tracking_uri: str | None = None,
    workers: int | None = None,
) -> tuple[ComparisonConfig, dict[str, StudyConfig]]:
    """The comparison and each arm's study (``--set`` `overrides` and the command's options
    applied to each), checked; `arms` picks a subset. Raises StudyError naming the field."""
    from trainer.config import read_yaml_mapping

    path = Path(path)
    raw = dict(read_yaml_mapping(path, "comparison", StudyError))
    raw.setdefault("name", path.stem)
    try:
        config = ComparisonConfig.model_validate(raw)
    except ValidationError as exc:
        raise first_error(exc, "comparison") from None
    study_path = config.study if config.study.is_absolute() else path.parent / config.study
    if not study_path.is_file():
        raise StudyError(f"study: {config.study} not found (looked for {study_path})")
    for item in overrides:  # --set reaches each arm's study, not the comparison file
        key = item.partition("=")[0].strip()
        if key.split(".")[0] in ("arms", "shared", "study"):
            raise StudyError(
                f"--set {key}: --set applies to every arm's study; edit the comparison file "
                "for its arms, shared settings or study, and pick arms with --arms"
            )
    chosen = list(arms) if arms else list(config.arms)
    unknown = [arm for arm in chosen if arm not in config.arms]
    if unknown:
        raise StudyError(f"--arms: no arm {unknown[0]!r}; arms: {', '.join(config.arms)}")
    studies: dict[str, StudyConfig] = {}
    for arm in chosen:
        items = [
            *_arm_items("shared", config.shared),
            *_arm_items(f"arms.{arm}", config.arms[arm]),
            *overrides,
            f"name={config.name}-{arm}",
        ]
        try:
            studies[arm] = prepare_study(
                study_path,
                items,
                backend=backend,
                storage=storage,
                tracking_uri=tracking_uri,
                workers=workers,
            )
        except StudyError as error:
            raise StudyError(f"arms.{arm}: {error}") from None
    return config, studies


def _arm_items(field: str, settings: Mapping[str, Any]) -> list[str]:
    """Study overrides (``shared``, ``arms.<arm>``) as ``--set`` items (values as JSON, which
    YAML reads)."""
    if not isinstance(settings, Mapping):
        raise StudyError(f"{field}: expected a mapping of study overrides")
    items = []
    for key, value in settings.items():
        if str(key).split(".")[0] in FIXED_FIELDS:
            raise StudyError(
                f"{field}.{key}: a comparison may not change {str(key).split('.')[0]} (every "
                "arm runs the same stages, so each gets the same budget); allowed: "
                "overrides.*, space.*"
            )
        items.append(f"{key}={json.dumps(value)}")
    return items


def run_comparison(
    config: ComparisonConfig,
    studies: Mapping[str, StudyConfig],
    *,
    runs_dir: str | Path = "runs",
    view_for: Any = None,
    comparison_file: str | Path | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Pre-flight every arm, run each arm's study, then the table and plot of the best per arm.

    `view_for(study)` gives the live view of an arm (a context manager yielding a `SweepView`;
    None: no view). Returns the comparison summary (``arms`` best first, ``table``, ``plot``).
    """
    from studies.sweep import preflight

    runs = Path(runs_dir)
    for arm, study in studies.items():
        try:
            preflight(study, runs, ray_address)
        except StudyError as error:
            raise StudyError(f"arms.{arm}: {error}") from None
    results: dict[str, tuple[dict[str, Any], list[StageReport]]] = {}
    for arm, study in studies.items():
        with view_for(study) if view_for else contextlib.nullcontext(NullView()) as view:
            results[arm] = run_sweep_reports(
                study,
                runs_dir=runs,
                view=view,
                study_file=comparison_file,
                ray_address=ray_address,
            )
    return summarise_comparison(config, results, runs / config.name)


def summarise_comparison(
    config: ComparisonConfig,
    results: Mapping[str, tuple[dict[str, Any], list[StageReport]]],
    out_dir: Path,
) -> dict[str, Any]:
    """Arms ranked by their best value; the table (CSV) and the plot (PNG) in `out_dir`."""
    first = next(iter(results.values()))[0]
    direction = str(first["direction"])
    rows = []
    for arm, (summary, _) in results.items():
        rows.append(
            {
                "arm": arm,
                "study": summary["study"],
                "best_value": summary["best_value"],
                "best_params": summary["best_params"] or {},
                "n_trials": summary["n_trials"],
                "n_complete": summary["n_complete"],
                "n_pruned": summary["n_pruned"],
                "n_failed": summary["n_failed"],
                "trial_steps": summary["trial_steps"],
                "best_config": summary["best_config"],
                "mlflow_parent_run_id": summary["mlflow_parent_run_id"],
            }
        )
    rows.sort(key=lambda row: _rank_key(row["best_value"], direction))
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "comparison.csv"
    write_text_atomic(table, _csv_text(rows))
    plot = out_dir / "comparison.png"
    curves = {arm: _final_budget_trials(reports) for arm, (_, reports) in results.items()}
    spaces = [reports[-1].space for _, reports in results.values() if reports]
    plot_comparison(rows, curves, str(first["metric"]), plot, spaces)
    best = rows[0] if rows[0]["best_value"] is not None else None
    return {
        "comparison": config.name,
        "metric": first["metric"],
        "direction": direction,
        "winner": best["arm"] if best else None,
        "arms": rows,
        "table": str(table),
        "plot": str(plot),
        "mlflow_experiment": first["mlflow_experiment"],
        "tracking_uri": first["tracking_uri"],
    }


def _rank_key(value: float | None, direction: str) -> tuple[int, float]:
    if value is None or not math.isfinite(value):
        return (1, 0.0)
    return (0, -value if direction == "maximize" else value)


def _final_budget_trials(reports: Sequence[StageReport]) -> list[tuple[dict[str, Any], float]]:
    """(params, value) of the complete trials trained with the last stage's budget: the only
    values comparable with each other and with the other arms'."""
    if not reports:
        return []
    steps = reports[-1].budget_steps
    return [
        (trial["params"], float(trial["value"]))
        for report in reports
        if report.budget_steps == steps
        for trial in report.trials
        if trial["state"] == "complete" and trial["value"] is not None
    ]


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    params = sorted({name for row in rows for name in row["best_params"]})
    columns = ["arm", "study", "best_value", *params, "n_trials", "n_complete", "n_pruned"]
    columns += ["n_failed", "trial_steps", "best_config", "mlflow_parent_run_id"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = {**row, **{name: row["best_params"].get(name) for name in params}}
        writer.writerow(["" if cells.get(c) is None else cells.get(c) for c in columns])
    return buffer.getvalue()


def plot_comparison(
    rows: Sequence[Mapping[str, Any]],
    curves: Mapping[str, Sequence[tuple[dict[str, Any], float]]],
    metric: str,
    path: Path,
    spaces: Sequence[Mapping[str, Any]] = (),
) -> None:
    """Left: each arm's best value. Right: each arm's values against the first numeric
    parameter its trials share (the learning rate in the ready-made comparisons), on a log
    axis when an arm's space searches it on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ranked = [row for row in rows if row["best_value"] is not None]
    names = [str(row["arm"]) for row in ranked]
    values = [float(row["best_value"]) for row in ranked]
    left.barh(names[::-1], values[::-1], color="tab:blue")
    for y, value in enumerate(values[::-1]):
        left.annotate(f" {value:.4g}", (value, y), va="center", fontsize=8)
    if values:
        spread = max(values) - min(values)
        left.set_xlim(min(values) - max(spread, 1e-3), max(values) + 0.6 * max(spread, 1e-3))
    left.set_xlabel(f"best {metric}")
    left.set_title("best of each arm (same budget)")
    parameter = _shared_numeric_parameter(curves)
    if parameter is not None:
        log = any(getattr(space.get(parameter), "log", False) for space in spaces)
        for arm, trials in curves.items():
            points = sorted((float(p[parameter]), value) for p, value in trials if parameter in p)
            if points:
                right.plot(*zip(*points, strict=True), marker="o", ms=3, label=arm)
        if log:
            right.set_xscale("log")
        finite = [value for trials in curves.values() for _, value in trials]
        if finite:
            low = min(finite)
            top = sorted(finite)[int(0.9 * (len(finite) - 1))]
            right.set_ylim(low - 0.05 * (top - low + 1e-9), top + 0.25 * (top - low + 1e-9))
        right.set_xlabel(parameter)
        right.set_ylabel(metric)
        right.set_title(f"{metric} against {parameter} (final-budget trials)")
        right.legend(fontsize=8)
    else:
        right.axis("off")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _shared_numeric_parameter(
    curves: Mapping[str, Sequence[tuple[dict[str, Any], float]]],
) -> str | None:
    """The first parameter that every arm searched with numbers."""
    arms = [trials for trials in curves.values() if trials]
    if not arms:
        return None
    for name in arms[0][0][0]:
        numeric = all(
            any(isinstance(p.get(name), int | float) and not isinstance(p.get(name), bool)
                for p, _ in trials)
            for trials in arms
        )  # fmt: skip
        if numeric:
            return name
    return None
