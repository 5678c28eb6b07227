"""Search efficiency on the quickstart task: coarse-to-fine against three baselines, same budget.

Every method searches the quickstart study's space (learning rate, warm-up fraction, weight
decay, beta2 of gpt-tiny on the stdlib corpus) with the real trainer, one trial at a time, and
may spend the same total budget in trial-steps (``--budget``, default 4320: what the first
quickstart's stages could spend, 16 x 120 + 8 x 300):

- ``coarse-to-fine``: the quickstart study as it is: 16 Sobol trials of 120 steps pruned by
  ASHA, then 10 TPE trials of 300 steps inside the range of the coarse top 4 bracketed by the
  nearest worse values tried, pruned by the median rule from step 200.
- ``tpe-median``: Optuna's defaults, one stage: TPE (10 random start-up trials) and the
  median pruner (5 start-up trials, no warm-up), every trial 300 steps.
- ``ray-random-asha``: the Ray backend: random search with ASHA (Ray's default reduction
  factor 4, grace period 20 steps, the first evaluation), every trial up to 300 steps.
- ``random``: random search, no pruning, every trial 300 steps.
- Coarse-to-fine variants, not run by default: ``c2f-gp`` (the quickstart with a GP sampler in
  the fine stage), ``c2f-first`` (the quickstart as first shipped: fine range the span of the
  coarse top 4, which are re-run first, median rule from step 100) and ``c2f-full-schedule``
  (the coarse stage on the final 300-step schedule, stopped early by ASHA).

The baselines get as many trials as the budget pays for: a ledger counts the steps each trial
trained (pruned ones included), and once it reaches the budget the remaining trials end at
once without training (``budget spent``; they are not counted). The trial that crosses the
budget is allowed to finish; only trials that end within the budget count for the result.
Trials run one at a time, so the ledger's order is the order the searcher saw results in.

The score of a method after spending s trial-steps is the best final validation loss of its
complete trials so far (a model trained to the end of its own schedule; a coarse trial's 120-step
model counts with its own, higher, loss). Reported over the seeds (each seed changes the
samplers and the trainer's seed): the median best at 1/8, 1/4, 1/2 and all of the budget, and
the budget coarse-to-fine needs to reach the best baseline's median final result. The issue's
goal: at most half of that baseline's budget.

    python benchmarks/search_efficiency.py --out /tmp/eff      # 4 methods x 5 seeds, ~1.5 h
    python benchmarks/search_efficiency.py --out /tmp/eff --methods c2f-full-schedule
    python benchmarks/search_efficiency.py --seeds 0 --methods random --budget 600 --out /tmp/e
    python benchmarks/search_efficiency.py --out /tmp/eff --report   # the tables again
    python benchmarks/search_efficiency.py --out /tmp/eff --rank-agreement 2.35
    python benchmarks/search_efficiency.py --out /tmp/eff --seed-noise
    python benchmarks/search_efficiency.py --task branin learning-curve   # the example tasks

``--task`` picks the tasks: ``quickstart`` (the default, this file's methods above) and the
example objectives of studies/configs/examples (``branin``, ``learning-curve``: coarse-to-fine
as shipped against one-stage TPE and random search at equal cost, regret of the best
full-fidelity trial; benchmarks/example_tasks.py has their accounting, and runs them alone).

``--seed-noise`` retrains the configuration each finished run of ``--methods`` ended with under
every trainer seed of ``--seeds``: how far the seed alone moves one configuration's final val
loss, and what each method's configurations are worth on average (a run's own seed reproduces
its ledger's value: the trainer is deterministic on CPU).

Each (method, seed) runs in its own process (``--jobs`` at once, the cores split between
them) and leaves ``<out>/<method>-s<seed>.json``; a finished one is not run again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from studies.config import StageSpec, StudyConfig  # noqa: E402
from studies.objective import Report, TrialOutcome, run_trial  # noqa: E402
from studies.study_file import load_study  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "studies" / "configs" / "quickstart.yaml"
BUDGET = 16 * 120 + 8 * 300  # trial-steps the quickstart's stages can spend
EXAMPLE_TASKS = ("branin", "learning-curve")  # benchmarks/example_tasks.py
TRIAL_STEPS = 300  # the baselines' trial budget: the quickstart's final stage's
FIRST_EVAL = 20  # the quickstart's eval_every: the earliest step a pruner can stop a trial at
QUICKSTART_STAGES: list[dict[str, Any]] = yaml.safe_load(QUICKSTART.read_text())["stages"]
FRACTIONS = (0.125, 0.25, 0.5, 1.0)
COARSE_TO_FINE = ("coarse-to-fine", "c2f-gp", "c2f-first", "c2f-full-schedule")
GOAL = 0.5  # coarse-to-fine should reach the best baseline's result with this share of budget


# A coarse-to-fine variant: the coarse stage trains on the final 300-step schedule and ASHA
# stops most trials early (rungs 20, 60, 180), so its survivors are final-budget results and
# the coarse ranking is not biased by a shorter schedule; the fine stage narrows around them.
FULL_SCHEDULE = [
    {"name": "coarse", "sampler": "sobol", "trials": 16, "budget": {"steps": TRIAL_STEPS},
     "pruner": {"name": "asha", "min_resource": FIRST_EVAL, "reduction_factor": 3}},
    {"name": "fine", "sampler": "tpe", "trials": 8, "budget": {"steps": TRIAL_STEPS},
     "pruner": {"name": "median", "min_resource": 100, "startup_trials": 3},
     "narrow": {"top_k": 4, "warm_start": False}},
]  # fmt: skip

# The quickstart's fine stage as it was first shipped: TPE started from the coarse top 4
# (re-run at 300 steps first), the median rule from step 100, the range of the top 4 only.
FIRST = [
    QUICKSTART_STAGES[0],
    {"name": "fine", "sampler": "tpe", "trials": 8, "budget": {"steps": TRIAL_STEPS},
     "pruner": {"name": "median", "min_resource": 100, "startup_trials": 3},
     "narrow": {"top_k": 4, "quantiles": [0.0, 1.0], "widen": 2.0, "warm_start": True}},
]  # fmt: skip

# The quickstart with Optuna's Gaussian-process sampler in the fine stage instead of TPE.
GP_FINE = [
    {**stage, "sampler": "gp"} if stage["name"] == "fine" else stage for stage in QUICKSTART_STAGES
]


# method -> (backend, the one stage's sampler and pruner, or the stages; None: the quickstart's)
METHODS: dict[str, tuple[str, tuple[str, dict[str, Any]] | list[dict[str, Any]] | None]] = {
    "coarse-to-fine": ("optuna", None),
    "c2f-gp": ("optuna", GP_FINE),
    "c2f-first": ("optuna", FIRST),
    "c2f-full-schedule": ("optuna", FULL_SCHEDULE),
    "tpe-median": ("optuna", ("tpe", {"name": "median", "startup_trials": 5})),
    "ray-random-asha": (
        "ray",
        ("random", {"name": "asha", "min_resource": FIRST_EVAL, "reduction_factor": 4}),
    ),
    "random": ("optuna", ("random", {"name": "none"})),
}


# ---------------------------------------------------------------------------------------------
# One run: a method and a seed


def method_study(method: str, seed: int, budget: int) -> StudyConfig:
    """The quickstart study as `method` searches it with `seed`, MLflow off. A baseline's
    stage asks for more trials than `budget` can pay for (the ledger ends the search)."""
    backend, search = METHODS[method]
    return load_study(QUICKSTART, study_items(method, seed, backend, search, TRIAL_STEPS, budget))


def study_items(
    method: str,
    seed: int,
    backend: str,
    search: tuple[str, dict[str, Any]] | list[dict[str, Any]] | None,
    steps: int,
    budget: int,
) -> list[str]:
    """`load_study` overrides for `method` with `seed` on `backend`, MLflow off: `search` is
    its stages, or one stage's (sampler, pruner) whose trials train `steps` each and number
    more than `budget` trial-steps pay for, or None (the study file's stages)."""
    items = [
        f"name={method}-s{seed}",
        f"seed={seed}",
        f"overrides.seed={seed}",
        "overrides.tracking.enabled=false",
        f"backend={backend}",
    ]
    if isinstance(search, list):
        items.append(f"stages={json.dumps(search)}")
    elif search is not None:
        sampler, pruner = search
        shortest = steps if pruner["name"] == "none" else FIRST_EVAL
        stage = {
            "name": "search",
            "sampler": sampler,
            "trials": budget // shortest + 1,
            "budget": {"steps": steps},
            "pruner": pruner,
        }
        items.append(f"stages={json.dumps([stage])}")
    return items


def budgeted_trial(
    study: StudyConfig,
    stage: StageSpec,
    params: dict[str, Any],
    *,
    trial_id: str,
    report: Report | None = None,
    runs_dir: Path | None = None,
    **kwargs: Any,
) -> TrialOutcome:
    """`run_trial` while the ledger in `runs_dir` has budget left; afterwards, nothing.

    ``budget.json`` there holds the total and what it counts (``cost``: ``steps``, the
    default, or ``flops``); each ledger entry has the trial's steps, its training FLOPs (the
    trainer's count for the trial's own model) and its model's width."""
    assert runs_dir is not None
    from studies.trainer_config import trial_config
    from trainer.rundir import flops_per_step

    ledger = Path(runs_dir) / "ledger.jsonl"
    budget = json.loads((Path(runs_dir) / "budget.json").read_text())
    cost = budget.get("cost", "steps")
    spent = sum(entry[cost] for entry in _read_ledger(ledger))
    if spent >= float(budget["total"]):
        return TrialOutcome("failed", None, "budget spent", 0, [])
    started = time.perf_counter()
    outcome = run_trial(
        study, stage, params, trial_id=trial_id, report=report, runs_dir=runs_dir, **kwargs
    )
    config = trial_config(study, params, stage)
    entry = {
        "trial": trial_id,
        "stage": stage.name,
        "state": outcome.state,
        "value": outcome.value,
        "steps": outcome.steps,
        "flops": outcome.steps * flops_per_step(config),
        "width": getattr(config.model, "d_model", None),
        "seconds": round(time.perf_counter() - started, 3),
        "params": params,
    }
    with ledger.open("a") as stream:
        stream.write(json.dumps(entry) + "\n")
    return outcome


def _read_ledger(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(
    entries: Sequence[dict[str, Any]],
    budget: float,
    cost: str = "steps",
    counts: Callable[[dict[str, Any]], bool] | None = None,
) -> list[tuple[float, float]]:
    """(budget spent, best complete value so far) after each trial that ended within the
    budget and improved the best; `cost` is the entries' key the budget counts, `counts`
    which complete trials may be the best (default: all)."""
    points: list[tuple[float, float]] = []
    spent: float = 0
    best = math.inf
    for entry in entries:
        spent += entry[cost]
        if spent > budget:
            break
        value = entry["value"]
        complete = entry["state"] == "complete" and value is not None
        if counts is not None and not counts(entry):
            continue
        if complete and math.isfinite(value) and value < best:
            best = value
            points.append((spent, best))
    return points


def best_at(points: Sequence[tuple[float, float]], spent: float) -> float:
    """The best value once `spent` of the budget is spent (inf before the first complete
    trial)."""
    values = [value for steps, value in points if steps <= spent]
    return min(values) if values else math.inf


def steps_to_reach(points: Sequence[tuple[float, float]], target: float) -> float:
    """Trial-steps until the best value is at most `target` (inf: never within the budget)."""
    return next((float(steps) for steps, value in points if value <= target), math.inf)


def run_one(method: str, seed: int, budget: int, out: Path) -> dict[str, Any]:
    """Run `method` with `seed` in `out/<method>-s<seed>/` and summarise it."""
    return run_study(method_study(method, seed, budget), method, seed, budget, out)


def run_study(
    study: StudyConfig,
    method: str,
    seed: int,
    budget: float,
    out: Path,
    cost: str = "steps",
    counts: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """Run `study` (`method` with `seed`) in `out/<method>-s<seed>/` on its backend, one trial
    at a time, with `budget` of `cost` in the ledger; the summary, its curve scoring the
    trials `counts` accepts (default: all)."""
    from studies.backends.optuna import run_optuna
    from studies.backends.ray.runner import run_ray

    runs = (out / f"{method}-s{seed}").absolute()
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "budget.json").write_text(json.dumps({"total": budget, "cost": cost}))
    started = time.perf_counter()
    if study.backend == "ray":
        # the Ray workers import this module for the trainable
        here = str(Path(__file__).resolve().parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [here, str(REPO), os.environ.get("PYTHONPATH", "")]
        )
        run_ray(study, runs_dir=runs, workers=1, trial_fn=budgeted_trial)
    else:
        run_optuna(study, runs_dir=runs, workers=1, trial_fn=budgeted_trial)
    entries = _read_ledger(runs / "ledger.jsonl")
    return {
        "method": method,
        "seed": seed,
        "budget": budget,
        "seconds": round(time.perf_counter() - started, 1),
        "trials": entries,
        "curve": curve(entries, budget, cost, counts),
    }


# ---------------------------------------------------------------------------------------------
# All runs, and the report


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def report(results: Sequence[dict[str, Any]]) -> str:
    """The tables: best value against budget per method, and the goal."""
    budget = int(results[0]["budget"])
    by_method: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_method.setdefault(result["method"], []).append(result)
    lines = [
        f"budget {budget} trial-steps; median (min-max) over seeds of the best final val loss "
        "of complete trials after spending each share of the budget",
        f"{'method':16} {'seeds':>5} "
        + " ".join(f"{f'{f:g} B':>20}" for f in FRACTIONS)
        + f" {'trials':>7} {'min':>6}",
    ]
    finals: dict[str, float] = {}
    for method, runs in by_method.items():
        cells = []
        for fraction in FRACTIONS:
            values = [best_at(r["curve"], fraction * budget) for r in runs]
            cells.append(
                f"{_median(values):.4f} ({min(values):.3f}-{max(values):.3f})"
                if all(math.isfinite(v) for v in values)
                else f"{_median(values):.4f} (some none)"
            )
        finals[method] = _final(runs)
        counted = [sum(1 for _ in _within(r["trials"], budget)) for r in runs]
        minutes = _median([r["seconds"] / 60 for r in runs])
        lines.append(
            f"{method:16} {len(runs):>5} "
            + " ".join(f"{c:>20}" for c in cells)
            + f" {_median(counted):>7g} {minutes:>6.1f}"
        )
    baselines = {m: v for m, v in finals.items() if m not in COARSE_TO_FINE}
    if baselines:
        best_baseline, target = _best_baseline(results)
        lines.append(f"best baseline: {best_baseline}, median final {target:.4f}")
    for method in COARSE_TO_FINE:
        if method not in by_method or not baselines:
            continue
        for baseline, final in sorted(baselines.items(), key=lambda item: item[1]):
            steps = [steps_to_reach(r["curve"], final) for r in by_method[method]]
            lines.append(
                f"{method} reaches {baseline}'s median final {final:.4f} with a median "
                f"{_median(steps):g} trial-steps ({_median(steps) / budget:.2f} of the budget; "
                f"per seed: {', '.join(f'{n:g}' for n in steps)})"
            )
        needed = [steps_to_reach(r["curve"], target) for r in by_method[method]]
        share = _median(needed) / budget
        verdict = "met" if share <= GOAL else "not met"
        reached = sum(1 for n in needed if math.isfinite(n))
        lines.append(
            f"{method} reaches it in {reached} of {len(needed)} seeds; median budget needed "
            f"{_median(needed):g} trial-steps = {share:.2f} of the baseline's (goal <= {GOAL}: "
            f"{verdict}); per seed: {', '.join(f'{n:g}' for n in needed)}"
        )
    return "\n".join(lines)


def _final(runs: Sequence[dict[str, Any]]) -> float:
    """The median over `runs` (one method's seeds) of the best value within the budget."""
    return _median([best_at(r["curve"], int(r["budget"])) for r in runs])


def _best_baseline(results: Sequence[dict[str, Any]]) -> tuple[str, float]:
    """The baseline with the lowest median final value among `results`, and that value."""
    finals = {
        method: _final([r for r in results if r["method"] == method])
        for method in {r["method"] for r in results} - set(COARSE_TO_FINE)
    }
    if not finals:
        return "none", math.nan
    method = min(finals, key=lambda m: finals[m])
    return method, finals[method]


def _within(
    entries: Sequence[dict[str, Any]], budget: float, cost: str = "steps"
) -> list[dict[str, Any]]:
    """The trials that ended within the budget (`cost`: the entries' key it counts)."""
    kept: list[dict[str, Any]] = []
    spent: float = 0
    for entry in entries:
        spent += entry[cost]
        if spent > budget:
            break
        kept.append(entry)
    return kept


def _run_child(method: str, seed: int, budget: int, out: Path, threads: int) -> Path:
    target = out / f"{method}-s{seed}.json"
    if target.exists():
        return target
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = out / f"{method}-s{seed}.log"
    command = [sys.executable, __file__, "--one", method, str(seed), "--budget", str(budget)]
    with log.open("w") as stream:
        subprocess.run(
            [*command, "--out", str(out)], env=env, stdout=stream, stderr=stream, check=True
        )
    return target


def plot(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Median best-so-far against budget spent, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = int(results[0]["budget"])
    grid = [budget * i / 64 for i in range(1, 65)]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    methods = sorted({r["method"] for r in results})
    for method in methods:
        runs = [r for r in results if r["method"] == method]
        ys = [_median([best_at(r["curve"], s) for r in runs]) for s in grid]
        ax.plot(grid, ys, label=method, drawstyle="steps-post")
    ax.set_xlabel("trial-steps spent")
    ax.set_ylabel("best val loss (median over seeds)")
    ax.set_ylim(top=2.6)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rank_agreement(out: Path, methods: Sequence[str], below: float) -> str:
    """How well the validation loss at an early step ranks the final one: Spearman's rho over
    the complete full-length trials the runs in `out` left (each trial's metrics.jsonl), for
    all of them and for those that end below `below` (the good region)."""
    curves: list[dict[int, float]] = []
    for method in methods:
        for metrics in sorted(out.glob(f"{method}-s*/*/trials/*/metrics.jsonl")):
            points = {}
            for line in metrics.read_text().splitlines():
                record = json.loads(line)
                if "val_loss" in record and math.isfinite(record["val_loss"]):
                    points[int(record["step"])] = float(record["val_loss"])
            if TRIAL_STEPS in points:
                curves.append(points)
    lines = [
        f"rank agreement with the final val loss, {len(curves)} complete {TRIAL_STEPS}-step "
        f"trials of {', '.join(methods)} (Spearman rho; n)"
    ]
    good = [c for c in curves if c[TRIAL_STEPS] < below]
    for name, group in (("all", curves), (f"final < {below:g}", good)):
        cells = []
        for step in (60, 100, 120, 160, 200, 240):
            pairs = [(c[step], c[TRIAL_STEPS]) for c in group if step in c]
            cells.append(f"step {step}: {_spearman(pairs):.2f} ({len(pairs)})")
        lines.append(f"  {name:14} " + "  ".join(cells))
    return "\n".join(lines)


def finished(out: Path, methods: Sequence[str], seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The finished runs in `out` of `methods` with `seeds` (`run_one`'s summaries)."""
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*-s*.json"))]
    return [r for r in results if r["method"] in methods and r["seed"] in seeds]


def seed_noise(
    results: Sequence[dict[str, Any]], out: Path, seeds: Sequence[int], jobs: int
) -> str:
    """Retrain the configuration each run in `results` ended with (its best complete
    full-length trial within the budget) under every trainer seed in `seeds`. A run's score is
    one draw of a noisy function; the median over the seeds is what a user retraining that
    configuration can expect, the range how much the seed alone moves it. Results are kept in
    `out/seed-noise.jsonl` (a configuration and a seed a line): a second call only reports."""
    methods = list(dict.fromkeys(result["method"] for result in results))
    found: dict[tuple[str, int], dict[str, Any]] = {}  # (method, seed) -> the run's best trial
    for result in results:
        full = [
            entry
            for entry in _within(result["trials"], int(result["budget"]))
            if entry["state"] == "complete" and entry["steps"] == TRIAL_STEPS
        ]
        if full:
            found[result["method"], result["seed"]] = min(full, key=lambda e: e["value"])
    cache = out / "seed-noise.jsonl"
    done = {(_key(r["params"]), r["seed"]): r["value"] for r in _read_ledger(cache)}
    todo = {(_key(e["params"]), s): e["params"] for e in found.values() for s in seeds}
    todo = {key: params for key, params in todo.items() if key not in done}
    for (key, seed), value in _retrain_all(todo, jobs, out / "seed-noise"):
        done[key, seed] = value
        with cache.open("a") as stream:
            record = {"params": todo[key, seed], "seed": seed, "value": value}
            stream.write(json.dumps(record) + "\n")

    def draws(entry: dict[str, Any]) -> list[float]:
        values = [done[_key(entry["params"]), s] for s in seeds]
        return [math.inf if v is None else v for v in values]  # a failed run: no model

    lines = [
        f"the configuration each run ended with, retrained with trainer seeds "
        f"{', '.join(map(str, seeds))}: median over the runs of the value found (the score "
        "above), of the configuration's median over the seeds, and of its range over them",
        f"{'method':16} {'runs':>4} {'found':>7} {'retrained':>20} {'range':>6}",
    ]
    for method in methods:
        runs = [entry for (m, _), entry in sorted(found.items()) if m == method]
        if not runs:
            continue
        medians = [_median(draws(entry)) for entry in runs]
        ranges = [max(draws(entry)) - min(draws(entry)) for entry in runs]
        lines.append(
            f"{method:16} {len(runs):>4} {_median([e['value'] for e in runs]):>7.4f} "
            f"{_median(medians):>7.4f} ({min(medians):.3f}-{max(medians):.3f}) "
            f"{_median(ranges):>6.3f}"
        )
    header = " ".join(f"{f'seed {s}':>8}" for s in seeds)
    lines += [
        "each seed's best configuration over these methods, retrained with each trainer seed",
        f"{'found with':12} {'by':16} {'found':>7} {header} {'median':>7}",
    ]
    pooled: list[float] = []
    for seed in sorted({s for _, s in found}):
        method, entry = min(
            ((m, e) for (m, s), e in found.items() if s == seed), key=lambda me: me[1]["value"]
        )
        values = draws(entry)
        pooled += values
        cells = " ".join(f"{v:>8.4f}" for v in values)
        lines.append(
            f"seed {seed:<7} {method:16} {entry['value']:>7.4f} {cells} {_median(values):>7.4f}"
        )
    name, target = _best_baseline(results)  # as the report has it for these methods
    if pooled and math.isfinite(target):
        share = sum(1 for v in pooled if v <= target) / len(pooled)
        lines.append(
            f"{share:.0%} of these {len(pooled)} runs end at or below {name}'s median final "
            f"{target:.4f}"
        )
    return "\n".join(lines)


def _retrain_all(
    todo: dict[tuple[str, int], dict[str, Any]],
    jobs: int,
    runs_dir: Path,
    where: tuple[Path, Sequence[str], int] = (QUICKSTART, (), TRIAL_STEPS),
) -> Iterator[tuple[tuple[str, int], float | None]]:
    """(key, final value) for each (configuration key, seed) -> params in `todo`, `jobs` at
    once in their own processes (one: in this one), the cores split between them, trained as
    `_retrain` does under `where` (study file, its overrides, steps; default the quickstart's)."""
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    if jobs <= 1:
        for key, params in todo.items():
            yield key, _retrain(params, key[1], threads, runs_dir, where)
        return
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=spawn) as pool:
        futures = {
            key: pool.submit(_retrain, params, key[1], threads, runs_dir, where)
            for key, params in todo.items()
        }
        for key, future in futures.items():
            yield key, future.result()


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


def _retrain(
    params: dict[str, Any],
    seed: int,
    threads: int,
    runs_dir: Path,
    where: tuple[Path, Sequence[str], int] = (QUICKSTART, (), TRIAL_STEPS),
) -> float | None:
    """Train the model of study file `where[0]` (with overrides `where[1]`) with `params` and
    trainer seed `seed` for `where[2]` steps, unpruned, MLflow off; the final val loss (None:
    the trial failed)."""
    import torch

    torch.set_num_threads(threads)
    study_file, items, steps = where
    stage = {"name": "retrain", "sampler": "random", "trials": 1,
             "budget": {"steps": steps}, "pruner": {"name": "none"}}  # fmt: skip
    study = load_study(
        study_file,
        [
            *items,
            "name=seed-noise",
            f"overrides.seed={seed}",
            "overrides.tracking.enabled=false",
            f"stages={json.dumps([stage])}",
        ],
    )
    trial_id = f"{hashlib.sha1(_key(params).encode()).hexdigest()[:10]}-seed{seed}"
    outcome = run_trial(study, study.stages[0], params, trial_id=trial_id, runs_dir=runs_dir)
    return outcome.value if outcome.state == "complete" else None


def _spearman(pairs: Sequence[tuple[float, float]]) -> float:
    if len(pairs) < 3:
        return math.nan
    import numpy as np
    from scipy.stats import rankdata

    ranks = [rankdata([pair[i] for pair in pairs]) for i in (0, 1)]
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=[m for m in METHODS if m == "coarse-to-fine" or m not in COARSE_TO_FINE],
        help="default: coarse-to-fine and the three baselines",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget", type=int, default=BUDGET, help="trial-steps per method")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument(
        "--task",
        nargs="+",
        choices=["quickstart", "transfer", *EXAMPLE_TASKS],
        default=["quickstart"],
        help="quickstart (default): the trainer; transfer (first, alone): a muP proxy study "
        "against searches on an expensive target (benchmarks/transfer_efficiency.py and its "
        "flags); branin, "
        "learning-curve: the example objectives",
    )
    parser.add_argument("--out", type=Path, help="folder for the runs (quickstart: required)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--report", action="store_true", help="only report the finished runs")
    parser.add_argument(
        "--rank-agreement",
        type=float,
        metavar="BELOW",
        help="only report how well early val loss ranks the final one, over the trials of the "
        "finished runs, and among those that end below BELOW",
    )
    parser.add_argument(
        "--seed-noise",
        action="store_true",
        help="only retrain the best configuration of each finished run of --methods under "
        "every seed of --seeds, and report what the seed alone changes",
    )
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--task", "transfer"]:  # its own methods and flags follow
        import transfer_efficiency

        return transfer_efficiency.main(argv[2:])
    args = parser.parse_args(argv)
    examples = [task for task in args.task if task in EXAMPLE_TASKS]
    if examples:
        import example_tasks

        seeds = [str(seed) for seed in args.seeds]
        example_tasks.main(["--tasks", *examples, "--seeds", *seeds])
        if "quickstart" not in args.task:
            return 0
    if args.out is None:
        parser.error("--out: required for the quickstart task (a folder for the runs)")
    args.out.mkdir(parents=True, exist_ok=True)

    if args.one:
        method, seed = args.one[0], int(args.one[1])
        result = run_one(method, seed, args.budget, args.out)
        target = args.out / f"{method}-s{seed}.json"
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, target)
        return 0

    print(f"# {' '.join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}")
    print(
        f"# {dt.datetime.now().isoformat(timespec='seconds')}, {platform.node()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    if args.rank_agreement is not None:
        print(rank_agreement(args.out, args.methods, args.rank_agreement))
        return 0
    if args.seed_noise:
        results = finished(args.out, args.methods, args.seeds)
        print(
            seed_noise(results, args.out, args.seeds, args.jobs) if results else "no finished runs"
        )
        return 0 if results else 1
    if not args.report:
        threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
        jobs = [(m, s) for s in args.seeds for m in args.methods]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [
                pool.submit(_run_child, m, s, args.budget, args.out, threads) for m, s in jobs
            ]
            for future in futures:
                future.result()
    results = finished(args.out, args.methods, args.seeds)
    if not results:
        print("no finished runs")
        return 1
    print(report(results))
    plot(results, args.out / "search_efficiency.png")
    print(f"# plot: {args.out / 'search_efficiency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
