"""Coarse-to-fine against one-stage TPE and random search on the example objectives of
studies/configs/examples, at equal cost: the callable-objective counterpart of
benchmarks/search_efficiency.py (which runs the real trainer on the quickstart).

Tasks (studies/configs/examples/multifidelity.py):

- ``branin``: the study file branin.yaml (32 Sobol trials at fidelity 0.3, then 24 TPE trials
  at fidelity 1 in the narrowed space). A trial costs its fidelity, so c2f costs
  32 x 0.3 + 24 = 33.6 and each baseline gets 33 trials at fidelity 1. Score: the noiseless
  full-fidelity Branin at the best full-fidelity trial's params, minus the global minimum
  0.397887 (the regret).
- ``learning-curve``: learning-curve.yaml (32 Sobol trials of 25 steps pruned by the median
  rule, then 24 TPE trials of 400 steps). A trial costs the steps it reported up to; the
  baselines get as many 400-step trials as c2f's median cost pays for. Score: the best
  400-step loss minus the task's minimum (2 + 3/sqrt(400)).

Every method runs through `studies.run_study` (backend optuna, one worker, MLflow off) under
seeds 0-4; the table gives the median regret over the seeds and each method's cost.

    python benchmarks/example_tasks.py            # 2 tasks x 3 methods x 5 seeds, a few minutes
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
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "studies" / "configs" / "examples"
sys.path[:0] = [str(REPO), str(EXAMPLES)]

import multifidelity  # noqa: E402

from studies import run_study  # noqa: E402

METHODS = ("c2f", "tpe", "random")
LC_MINIMUM = 2.0 + 3.0 / math.sqrt(400)


def _study_file(task: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / f"{task}.yaml").read_text())


def _regret(task: str, trial: dict[str, Any] | None) -> float:
    if trial is None:
        return math.inf
    if task == "branin":
        x1, x2 = float(trial["params"]["x1"]), float(trial["params"]["x2"])
        return multifidelity.branin_value(x1, x2) - multifidelity.BRANIN_MINIMUM
    return float(trial["value"]) - LC_MINIMUM


def run(task: str, method: str, seed: int, baseline_trials: int) -> dict[str, Any]:
    """One search; its cost (branin: the sum of the trials' fidelities; learning-curve: the
    steps the trials reported up to) and the regret of its best full-fidelity trial."""
    raw = _study_file(task)
    stages = raw["stages"]
    if method != "c2f":
        full = {k: v for k, v in stages[-1].items() if k != "narrow"}
        stages = [{**full, "name": "only", "sampler": method, "trials": baseline_trials}]
    with tempfile.TemporaryDirectory() as folder:
        summary = run_study(
            raw["objective"]["callable"],
            raw["space"],
            stages,
            name=f"{task}-{method}",
            runs_dir=Path(folder),
            seed=seed,
            mlflow=False,
        )
    if task == "branin":
        cost = sum(s["n_finished"] * float(s["budget"]["fidelity"]) for s in summary["stages"])
    else:
        cost = float(summary["trial_steps"])
    best = summary["top"][0] if summary["top"] else None  # the last stage's: full fidelity
    return {"method": method, "seed": seed, "cost": cost, "regret": _regret(task, best)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["branin", "learning-curve"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    args = parser.parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print(f"# {' '.join([Path(__file__).name, *(argv or sys.argv[1:])])}")
    print(
        f"# {dt.datetime.now().isoformat(timespec='seconds')}, {platform.node()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"optuna {optuna.__version__}"
    )
    for task in args.tasks:
        c2f = [run(task, "c2f", seed, 0) for seed in args.seeds]
        cost = statistics.median(r["cost"] for r in c2f)
        per_trial = 1.0 if task == "branin" else 400.0
        trials = int(cost // per_trial)
        rows = {"c2f": c2f}
        for method in ("tpe", "random"):
            rows[method] = [run(task, method, seed, trials) for seed in args.seeds]
        print(f"\n{task}: baselines get {trials} full-fidelity trials (c2f median cost {cost:g})")
        print(f"{'method':8} {'median regret':>14} {'regrets by seed':40} {'median cost':>12}")
        for method, runs in rows.items():
            regrets = [r["regret"] for r in runs]
            by_seed = " ".join(f"{v:.4f}" for v in regrets)
            print(
                f"{method:8} {statistics.median(regrets):>14.4f} {by_seed:40} "
                f"{statistics.median(r['cost'] for r in runs):>12g}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
