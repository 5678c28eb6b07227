"""A study's plots and parameter importances, from an Optuna study or from plain trial records.

`study_plots` draws four views of a finished study, each as a PNG (Optuna's matplotlib
backend) and as a self-contained interactive HTML page (Optuna's plotly backend, plotly.js
embedded so it opens offline and in the MLflow UI):

- ``optimization_history``: objective per trial and the best so far;
- ``parallel_coordinate``: every complete trial as a line through its parameter values;
- ``slice``: objective against each parameter;
- ``contour``: objective over pairs of parameters (the four most important at most).

A backend without an `optuna.Study` (Ray Tune) passes its trials as records
``{number, stage, state, value, params, reason}``; `study_from_trials` turns them into an
in-memory Optuna study with `create_trial`, so one plotting path serves both backends. A plot
that cannot be drawn (no complete trial; a contour with fewer than two parameters) is skipped
with a note. Every file is written atomically (temp file + rename).

Example:
    >>> study = study_from_trials(
    ...     [{"number": 0, "state": "complete", "value": 2.1, "params": {"optimizer.lr": 1e-3}}]
    ... )
    >>> len(study.trials)
    1
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

    from studies.config import Direction, ParamSpec
    from studies.records import StageReport

__all__ = [
    "PLOT_NAMES",
    "atomic_path",
    "param_importances",
    "report_study",
    "study_from_trials",
    "study_plots",
]

PLOT_NAMES = ("optimization_history", "parallel_coordinate", "slice", "contour")
CONTOUR_MAX_PARAMS = 4  # a contour grid is params x params panels: keep it readable
# a float parameter inferred from values alone is drawn on a log axis when it spans this much
LOG_SPAN = 100.0
# a trial record's state -> Optuna's (interrupted and unknown states count as failed)
STATES = {
    "complete": "COMPLETE",
    "pruned": "PRUNED",
    "failed": "FAIL",
    "running": "RUNNING",
    "waiting": "WAITING",
}


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block succeeds,
    removed when it fails, so a half-written file never carries the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result is an ordinary file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def study_from_trials(
    trials: Sequence[Mapping[str, Any]],
    *,
    direction: Direction = "minimize",
    space: Mapping[str, ParamSpec] | None = None,
    study_name: str = "scaleplan",
) -> optuna.Study:
    """An in-memory Optuna study holding `trials` (records with state complete / pruned /
    failed, value, params, and optionally stage, reason, intermediate [(step, value)]).

    Distributions come from `space` when given, widened to every observed value (a fine stage
    may reach past the original range); else they are inferred from the values. A complete
    trial without a finite value is recorded as failed. Stage and reason become user attrs.
    """
    import optuna
    from optuna.trial import TrialState, create_trial

    distributions = _distributions(trials, space or {})
    with _quiet_optuna():
        study = optuna.create_study(direction=direction, study_name=study_name)
    frozen = []
    for record in sorted(trials, key=lambda r: int(r.get("number", 0))):
        state = STATES.get(str(record.get("state", "failed")), "FAIL")
        raw_value = record.get("value")
        value = float(raw_value) if isinstance(raw_value, int | float) else math.nan
        if state == "COMPLETE" and not math.isfinite(value):
            state = "FAIL"
        params = {k: v for k, v in (record.get("params") or {}).items() if k in distributions}
        attrs = {key: record[key] for key in ("stage", "reason", "number") if key in record}
        intermediate = {
            int(step): float(v)
            for step, v in record.get("intermediate") or []
            if isinstance(v, int | float) and math.isfinite(v)
        }
        frozen.append(
            create_trial(
                state=TrialState[state],
                value=value if state == "COMPLETE" else None,
                params=params,
                distributions={name: distributions[name] for name in params},
                user_attrs=attrs,
                intermediate_values=intermediate,
            )
        )
    study.add_trials(frozen)
    return study


def report_study(report: StageReport) -> optuna.Study:
    """One stage's trial records as an in-memory Optuna study over the stage's space: what
    Optuna's plots and importance evaluators take, whichever backend ran the stage."""
    return study_from_trials(
        report.trials,
        direction="maximize" if report.direction == "maximize" else "minimize",
        space=report.space,
        study_name=report.name,
    )


def study_plots(
    source: optuna.Study | Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    direction: Direction = "minimize",
    space: Mapping[str, ParamSpec] | None = None,
    notes: list[str] | None = None,
) -> list[Path]:
    """Write the four plots as `<name>.png` and `<name>.html` under `out_dir`.

    `source` is an Optuna study or trial records (see `study_from_trials`, which also takes
    `direction` and `space`). A plot that cannot be drawn is skipped and a one-line note is
    appended to `notes` (printed to stderr when `notes` is None). Returns the files written.
    """
    import optuna

    study = (
        source
        if isinstance(source, optuna.Study)
        else study_from_trials(source, direction=direction, space=space)
    )
    out = Path(out_dir)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    names = sorted({name for trial in complete for name in trial.params})
    skipped: list[str] = []
    if not complete:
        skipped = [f"plots: {name} skipped (no complete trial)" for name in PLOT_NAMES]
    drawn: list[tuple[str, list[str] | None]] = []
    if complete:
        drawn = [("optimization_history", None)]
        if names:
            drawn += [("parallel_coordinate", names), ("slice", names)]
        else:
            skipped.append("plots: parallel_coordinate, slice skipped (trials have no parameters)")
        if len(names) >= 2:
            drawn.append(("contour", _contour_params(study, names)))
        else:
            skipped.append(f"plots: contour skipped (needs >= 2 parameters, got {len(names)})")

    written: list[Path] = []
    for name in PLOT_NAMES:  # an earlier call's plot that is not drawn now must not linger
        if name not in dict(drawn):
            for suffix in (".png", ".html"):
                (out / f"{name}{suffix}").unlink(missing_ok=True)
    with _quiet_optuna():
        for name, params in drawn:
            try:
                written.append(_png(study, name, params, out / f"{name}.png"))
                written.append(_html(study, name, params, out / f"{name}.html"))
            except Exception as error:  # a plotting library refusing odd data must not end a study
                skipped.append(f"plots: {name} skipped ({type(error).__name__}: {error})")
    for note in skipped:
        if notes is None:
            print(note, file=sys.stderr)
        else:
            notes.append(note)
    return written


def param_importances(study: optuna.Study, *, seed: int = 0) -> dict[str, float]:
    """fANOVA importances of the parameters (normalised to sum to 1), most important first;
    {} with fewer than 2 complete trials or when they cannot be computed."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2 or not any(trial.params for trial in complete):
        return {}
    with _quiet_optuna():
        try:
            importances = get_param_importances(
                study, evaluator=FanovaImportanceEvaluator(seed=seed)
            )
        except (ValueError, RuntimeError, ZeroDivisionError):
            return {}
    return {name: float(value) for name, value in importances.items()}


# --- drawing ---------------------------------------------------------------------------------


def _contour_params(study: optuna.Study, names: list[str]) -> list[str]:
    if len(names) <= CONTOUR_MAX_PARAMS:
        return names
    ranked = list(param_importances(study)) or names
    return ranked[:CONTOUR_MAX_PARAMS]


def _png(study: optuna.Study, name: str, params: list[str] | None, path: Path) -> Path:
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_mpl

    draw = getattr(optuna_mpl, f"plot_{name}")
    # Optuna's plots switch the global style to ggplot; keep it to these figures
    style = {k: v for k, v in plt.rcParams.items() if k != "interactive"}
    try:
        axes = draw(study) if params is None else draw(study, params=params)
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated rc keys warn when set back
            plt.rcParams.update(cast(Any, style))
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    figure = first.figure
    try:
        if hasattr(axes, "flat") and len(axes.flat) > 1:  # a grid (contour) or a row (slice)
            rows = axes.shape[0] if axes.ndim == 2 else 1
            figure.set_size_inches(min(4.0 * axes.shape[-1], 16.0), min(3.5 * rows + 1, 15.0))
        else:
            figure.set_size_inches(8, 5)
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


def _html(study: optuna.Study, name: str, params: list[str] | None, path: Path) -> Path:
    from optuna import visualization

    draw = getattr(visualization, f"plot_{name}")
    figure = draw(study) if params is None else draw(study, params=params)
    with atomic_path(path) as tmp:
        # plotly.js embedded: the page works offline and inside the MLflow UI's preview
        figure.write_html(str(tmp), include_plotlyjs=True, full_html=True)
    return path


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """No experimental-API warnings and no Optuna log lines while drawing."""
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


# --- distributions for records -----------------------------------------------------------------


def _distributions(
    trials: Sequence[Mapping[str, Any]], space: Mapping[str, ParamSpec]
) -> dict[str, BaseDistribution]:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    observed: dict[str, list[Any]] = {}
    for record in trials:
        for name, value in (record.get("params") or {}).items():
            observed.setdefault(name, []).append(value)
    distributions: dict[str, BaseDistribution] = {}
    for name, values in observed.items():
        spec = space.get(name)
        if spec is not None and spec.type == "categorical":
            choices = list(spec.choices or [])
            choices += [v for v in dict.fromkeys(values) if v not in choices]
            distributions[name] = CategoricalDistribution(choices)
            continue
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(numbers) < len(values) or not numbers:  # strings, booleans, None: choices
            distributions[name] = CategoricalDistribution(list(dict.fromkeys(values)))
            continue
        low, high = min(numbers), max(numbers)
        if spec is not None:
            low, high = min(low, spec.bounds[0]), max(high, spec.bounds[1])
            log = spec.log and low > 0
            integer = spec.type == "int" and all(float(v) == int(v) for v in numbers)
        else:
            integer = all(isinstance(v, int) for v in numbers)
            log = low > 0 and high / low >= LOG_SPAN
        if integer:
            distributions[name] = IntDistribution(int(low), int(high), log=log)
        else:
            distributions[name] = FloatDistribution(float(low), float(high), log=log)
    return distributions
