"""The accounting of benchmarks/search_efficiency.py: every trial's steps count against the
budget, only complete trials score, and trials past the budget are left out."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import pytest  # noqa: E402
import search_efficiency  # noqa: E402
from search_efficiency import (  # noqa: E402
    best_at,
    curve,
    finished,
    method_study,
    rank_agreement,
    seed_noise,
    steps_to_reach,
)


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


def test_rank_agreement_ranks_early_against_final_val_loss(tmp_path: Path) -> None:
    # four complete 300-step trials and one pruned one: at step 60 the order is reversed, from
    # step 200 it is the final order; among the three best, step 120 gets one pair wrong
    finals = [2.3, 2.4, 2.5, 2.6]
    early = {60: [3.0, 2.9, 2.8, 2.7], 120: [2.55, 2.6, 2.58, 2.8], 200: [2.4, 2.5, 2.6, 2.7]}
    trials = tmp_path / "coarse-to-fine-s0" / "coarse-to-fine-s0" / "trials"
    for n, final in enumerate([*finals, None]):
        folder = trials / f"fine-{n}"
        folder.mkdir(parents=True)
        steps = {step: values[n % 4] for step, values in early.items()}
        if final is not None:
            steps[300] = final
        lines = [json.dumps({"step": step, "val_loss": value}) for step, value in steps.items()]
        (folder / "metrics.jsonl").write_text("\n".join([*lines, json.dumps({"step": 7})]))
    text = rank_agreement(tmp_path, ["coarse-to-fine"], below=2.55)
    assert "4 complete 300-step trials" in text
    everything, good = text.splitlines()[1:]
    assert "step 60: -1.00 (4)" in everything and "step 200: 1.00 (4)" in everything
    assert "step 120: 0.50 (3)" in good and "step 240: nan (0)" in good


def test_seed_noise_retrains_each_runs_best_configuration_under_every_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def trial(state: str, steps: int, value: float | None, lr: float) -> dict[str, object]:
        return {**entry(state, steps, value), "params": {"optimizer.lr": lr}}

    runs = {
        ("coarse-to-fine", 0): [
            trial("complete", 120, 2.0, 0.9),  # a coarse trial: not full-length, not a result
            trial("complete", 300, 2.4, 0.1),
            trial("complete", 300, 2.3, 0.2),  # the run's best
        ],
        ("tpe-median", 0): [trial("complete", 300, 2.5, 0.3)],
        ("tpe-median", 1): [
            trial("complete", 300, 2.35, 0.3),
            trial("failed", 250, None, 0.5),
            trial("complete", 300, 2.1, 0.4),  # ends past the budget of 800: left out
        ],
    }
    for (method, seed), trials in runs.items():
        run = {"method": method, "seed": seed, "budget": 800, "trials": trials}
        run["curve"] = curve(trials, 800)
        (tmp_path / f"{method}-s{seed}.json").write_text(json.dumps(run))
    calls: list[tuple[float, int]] = []

    def fake_retrain(
        params: dict[str, float], seed: int, threads: int, runs_dir: Path, where: object
    ) -> object:
        assert where == (search_efficiency.QUICKSTART, (), search_efficiency.TRIAL_STEPS)
        calls.append((params["optimizer.lr"], seed))
        if params["optimizer.lr"] == 0.3 and seed == 1:
            return None  # a failed retraining counts as no model at all
        return 2.0 + params["optimizer.lr"] + seed / 10

    monkeypatch.setattr(search_efficiency, "_retrain", fake_retrain)
    results = finished(tmp_path, ["coarse-to-fine", "tpe-median"], [0, 1])
    text = seed_noise(results, tmp_path, [0, 1], jobs=1)
    # lr 0.3 is the best of two tpe-median runs, retrained once per seed
    assert sorted(calls) == [(0.2, 0), (0.2, 1), (0.3, 0), (0.3, 1)]
    lines = text.splitlines()
    # runs, median found, median (range) over runs of the median over seeds, median range
    assert lines[2].split() == ["coarse-to-fine", "1", "2.3000", "2.2500", "(2.250-2.250)", "0.100"]
    assert lines[3].split() == ["tpe-median", "2", "2.4250", "inf", "(inf-inf)", "inf"]
    # each seed's best over both methods: 2.3 (seed 0), 2.35 (seed 1)
    assert lines[6].split()[:5] == ["seed", "0", "coarse-to-fine", "2.3000", "2.2000"]
    assert lines[7].split()[:5] == ["seed", "1", "tpe-median", "2.3500", "2.3000"]
    # the best baseline (tpe-median) has a median final of 2.425: 3 of the 4 draws are below
    assert lines[8].startswith("75% of these 4 runs end at or below tpe-median's median final")
    calls.clear()
    assert seed_noise(results, tmp_path, [0, 1], jobs=1) == text
    assert calls == []  # kept in seed-noise.jsonl: nothing retrained twice
