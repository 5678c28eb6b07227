"""Per-trial framework overhead of the search backends, with a trainable that does nothing.

The trainable (`noop_trial`) reports three intermediate values and returns a complete outcome at
once, so a trial costs only what the backend adds around it. For the Optuna backend that is:
count the stage's trials, ``ask`` (the sampler), record the worker, suggest the parameters,
``report`` + ``should_prune`` (the pruner) three times, write the outcome's user attrs,
``tell``, and, with MLflow on, the trial's child run (`StudyTracker.record_trial`). Per-trial
time is the gap between the starts of consecutive trials; the median over the trials is the
number reported (the first trials, before the model-based sampler takes over, are cheaper;
the mean is printed too). Stage set-up and the study's plots are left out.

One function per backend (`optuna_overhead`, ...) returns its measurements; `main` prints them
with the machine, the date and the command.

    python benchmarks/trial_overhead.py                  # Optuna: about a minute on 2 CPU cores
    python benchmarks/trial_overhead.py --trials 100 --sampler sobol
    python benchmarks/trial_overhead.py --backend ray --trials 32   # local Ray, 2 CPUs
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from studies.config import StageSpec, StudyConfig  # noqa: E402
from studies.objective import Report, TrialOutcome  # noqa: E402
from studies.study_file import load_study  # noqa: E402

TARGET_S = 0.3  # the budget for the Optuna backend's per-trial overhead
REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "studies" / "configs" / "quickstart.yaml"


class Clock:
    """Records when each trial's trainable was called."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def per_trial(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]


CLOCK = Clock()


def noop_trial(
    study: StudyConfig,
    stage: StageSpec,
    params: dict[str, Any],
    *,
    trial_id: str,
    report: Report | None = None,
    **_: Any,
) -> TrialOutcome:
    """A trainable that trains nothing: a value from the params, three reports, done."""
    CLOCK.starts.append(time.perf_counter())
    value = 2.0 + (math.log10(float(params.get("optimizer.lr", 1e-3))) + 2.5) ** 2
    intermediate = [(step, value + 1.0 / step) for step in (40, 80, 120)]
    for step, reported in intermediate:
        if report is not None and report(step, reported):
            return TrialOutcome("pruned", None, f"pruned at step {step}", step, intermediate)
    return TrialOutcome("complete", value, None, 120, intermediate, None, "", 123_000, 245_760)


def _study(folder: Path, trials: int, sampler: str, storage: str | None) -> StudyConfig:
    """The quickstart's space and overrides, one stage of `trials` trials, MLflow off."""
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["base"] = str(QUICKSTART.parent / raw["base"])
    raw["name"] = "overhead"
    raw["stages"] = [
        {
            "name": "coarse",
            "sampler": sampler,
            "trials": trials,
            "budget": {"steps": 120},
            "pruner": {"name": "median", "startup_trials": 5, "min_resource": 40},
        }
    ]
    if storage is not None:
        raw["storage"] = storage
    path = folder / "overhead.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_study(path)


def optuna_overhead(
    trials: int = 50,
    *,
    sampler: str = "tpe",
    storage: str = "journal",
    tracking: bool = False,
) -> dict[str, Any]:
    """Per-trial seconds of the Optuna backend around a no-op trainable.

    storage: journal (the default journal file) or sqlite; tracking: MLflow child runs in a
    SQLite store (the default tracking), else off.
    """
    import optuna

    from studies.backends.optuna import run_optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        url = f"sqlite:///{root / 'optuna.db'}" if storage == "sqlite" else None
        study = _study(root, trials, sampler, url)
        tracker = None
        if tracking:
            from studies.mlflow_study import StudyTracker

            study = study.model_copy(update={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"})
            tracker = StudyTracker(study, resume=False, runs_dir=root / "runs")
        CLOCK.starts.clear()
        started = time.perf_counter()
        run_optuna(study, runs_dir=root / "runs", workers=1, tracker=tracker, trial_fn=noop_trial)
        total = time.perf_counter() - started
        gaps = CLOCK.per_trial()
    return {
        "backend": "optuna",
        "sampler": sampler,
        "storage": storage,
        "tracking": "mlflow (sqlite)" if tracking else "off",
        "trials": trials,
        "median_s": statistics.median(gaps),
        "mean_s": statistics.fmean(gaps),
        "max_s": max(gaps),
        "total_s": total,
    }


RAY_TARGET_S = 2.0  # the budget for the Ray backend's per-trial overhead


def _timed_noop_trial(
    study: StudyConfig,
    stage: StageSpec,
    params: dict[str, Any],
    *,
    trial_id: str,
    report: Report | None = None,
    runs_dir: Path | None = None,
    **_: Any,
) -> TrialOutcome:
    """`noop_trial` in a Ray worker: its start time (wall clock, shared by the processes of
    one machine) goes to ``<runs_dir>/starts/<trial_id>``."""
    assert runs_dir is not None
    folder = Path(runs_dir) / "starts"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / trial_id).write_text(repr(time.time()))
    return noop_trial(study, stage, params, trial_id=trial_id, report=report)


def ray_overhead(trials: int = 32, *, workers: int = 1, sampler: str = "tpe") -> dict[str, Any]:
    """Per-trial seconds of the Ray Tune backend around the same no-op trainable.

    A local Ray with 2 CPUs, `workers` trials at once (1: the gap between consecutive trial
    starts is everything Tune adds to one trial: OptunaSearch, the scheduler, the actor, the
    result round trips, the experiment saves). Ray's start-up is reported apart (``start_s``).
    """
    import logging

    import ray

    from studies.backends.ray.runner import run_ray

    # the Ray workers import this module for the trainable
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join([here, str(REPO), os.environ.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        study = _study(root, trials, sampler, None)
        study = study.model_copy(
            update={"backend": "ray", "workers": workers, "storage": str(root / "ray")}
        )
        started = time.perf_counter()
        ray.init(
            num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR
        )
        start_s = time.perf_counter() - started
        try:
            started = time.perf_counter()
            run_ray(study, runs_dir=root / "runs", workers=workers, trial_fn=_timed_noop_trial)
            total = time.perf_counter() - started
        finally:
            ray.shutdown()
        starts = sorted(float(p.read_text()) for p in (root / "runs" / "starts").iterdir())
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    return {
        "backend": "ray",
        "sampler": sampler,
        "storage": "folder",
        "tracking": f"off, {workers} at once",
        "trials": trials,
        "median_s": statistics.median(gaps),
        "mean_s": statistics.fmean(gaps),
        "max_s": max(gaps),
        "total_s": total,
        "start_s": start_s,
    }


CALLABLE_TARGETS_S = {"optuna": 0.005, "ray": 0.030}  # the studies-engine issue's goals


def trivial(params: dict[str, Any], trial: Any) -> float:
    """The trivial callable objective: its start time to ``<out_dir>/start``, three reports,
    a value."""
    (trial.out_dir / "start").write_text(repr(time.time()))
    value = (float(params["x"]) - 0.3) ** 2
    for step in (1, 2, 3):
        if trial.report(step, value + 1.0 / step):
            return value + 1.0 / step
    return value


def callable_overhead(
    backend: str, trials: int = 100, *, sampler: str = "random"
) -> dict[str, Any]:
    """Per-trial seconds around the trivial callable objective, through `studies.run_study`
    (the public entry point), one trial at a time, MLflow off: the gap between consecutive
    trial starts (the backend's start-up, Ray's included, is before the first)."""
    from studies import run_study

    here = str(Path(__file__).resolve().parent)
    sys.path.insert(0, here)  # `trial_overhead:trivial` imports here and in Ray's workers
    os.environ["PYTHONPATH"] = os.pathsep.join([here, str(REPO), os.environ.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        started = time.perf_counter()
        run_study(
            "trial_overhead:trivial",
            {"x": {"low": 0.0, "high": 1.0}},
            [{"name": "only", "sampler": sampler, "trials": trials, "budget": {"steps": 3}}],
            name="overhead",
            backend=backend,
            runs_dir=root / "runs",
            mlflow=False,
        )
        total = time.perf_counter() - started
        starts = sorted(float(p.read_text()) for p in (root / "runs").rglob("start"))
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    return {
        "backend": f"{backend}:fn",
        "sampler": sampler,
        "storage": "default",
        "tracking": "off, 1 at once",
        "trials": trials,
        "median_s": statistics.median(gaps),
        "mean_s": statistics.fmean(gaps),
        "max_s": max(gaps),
        "total_s": total,
    }


BACKENDS: dict[str, Callable[..., dict[str, Any]]] = {
    "optuna": optuna_overhead,
    "ray": ray_overhead,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=[*BACKENDS, "all"], default="all")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--sampler", default="tpe", help="stage sampler (default tpe)")
    parser.add_argument(
        "--objective",
        choices=["trainer", "callable"],
        default="trainer",
        help="trainer: the no-op trainer trial (trial_fn); callable: a trivial callable "
        "objective through studies.run_study",
    )
    args = parser.parse_args(argv)

    print(f"# {' '.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}")
    print(
        f"# {dt.datetime.now().isoformat(timespec='seconds')}, {platform.node()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    rows: list[dict[str, Any]] = []
    if args.objective == "callable":
        for name in BACKENDS:
            if args.backend in (name, "all"):
                rows.append(callable_overhead(name, args.trials, sampler=args.sampler))
    elif args.backend in ("optuna", "all"):
        for storage, tracking in (("journal", False), ("sqlite", False), ("journal", True)):
            rows.append(
                optuna_overhead(
                    args.trials, sampler=args.sampler, storage=storage, tracking=tracking
                )
            )
    for name, measure in BACKENDS.items():
        if args.objective == "trainer" and name != "optuna" and args.backend in (name, "all"):
            rows.append(measure(args.trials))
    print(
        f"{'backend':8} {'sampler':8} {'storage':8} {'tracking':15} {'trials':>6} "
        f"{'median s':>9} {'mean s':>8} {'max s':>7}"
    )
    for row in rows:
        print(
            f"{row['backend']:8} {row['sampler']:8} {row['storage']:8} {row['tracking']:15} "
            f"{row['trials']:>6} {row['median_s']:>9.4f} {row['mean_s']:>8.4f} "
            f"{row['max_s']:>7.3f}"
        )
    for row in rows:
        if row["backend"] == "ray":
            verdict = "within" if row["median_s"] <= RAY_TARGET_S else "OVER"
            print(
                f"# Ray backend: {row['median_s']:.3f} s per trial ({verdict} the "
                f"{RAY_TARGET_S} s budget); {row['total_s'] / row['trials']:.3f} s with the "
                f"stage's set-up spread over its trials; Ray start-up {row['start_s']:.1f} s"
            )
        if row["backend"].endswith(":fn"):
            goal = CALLABLE_TARGETS_S[row["backend"].removesuffix(":fn")]
            verdict = "within" if row["median_s"] <= goal else "OVER"
            print(
                f"# {row['backend']} (callable objective): {1000 * row['median_s']:.1f} ms per "
                f"trial ({verdict} the {1000 * goal:.0f} ms goal)"
            )
    default = rows[0] if rows and rows[0]["backend"] == "optuna" else None
    if default is not None:
        verdict = "within" if default["median_s"] <= TARGET_S else "OVER"
        print(
            f"# Optuna backend, default storage, MLflow off: {default['median_s']:.3f} s per "
            f"trial ({verdict} the {TARGET_S} s budget)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
