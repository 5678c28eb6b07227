"""The accounting of benchmarks/search_efficiency.py: every trial's steps count against the
budget, only complete trials score, and trials past the budget are left out."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from search_efficiency import best_at, curve, method_study, steps_to_reach  # noqa: E402


def entry(state: str, steps: int, value: float | None = None) -> dict[str, object]:
    return {"state": state, "steps": steps, "value": value}


def test_curve_counts_every_trial_and_scores_complete_ones_within_the_budget() -> None:
    entries = [
        entry("pruned", 20),
        entry("complete", 300, 2.5),
        entry("failed", 40),
        entry("complete", 300, 2.6),  # no better: no point
        entry("complete", 300, 2.4),
        entry("complete", 300, 2.0),  # ends past the budget of 1000: left out
    ]
    points = curve(entries, budget=1000)
    assert points == [(320, 2.5), (960, 2.4)]
    assert best_at(points, 319) == math.inf and best_at(points, 500) == 2.5
    assert steps_to_reach(points, 2.45) == 960 and steps_to_reach(points, 2.0) == math.inf


def test_methods_search_the_quickstart_space_with_the_same_trial_budget() -> None:
    c2f = method_study("coarse-to-fine", 1, 4320)
    tpe = method_study("tpe-median", 1, 4320)
    assert c2f.space == tpe.space and c2f.seed == tpe.seed == 1
    assert [s.name for s in c2f.stages] == ["coarse", "fine"]
    (stage,) = tpe.stages
    # enough trials that the budget, not the count, ends the search: 4320 / 20 + 1
    assert stage.sampler == "tpe" and stage.pruner.name == "median" and stage.trials == 217
    assert method_study("ray-random-asha", 0, 4320).backend == "ray"
