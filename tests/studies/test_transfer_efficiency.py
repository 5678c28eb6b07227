"""The accounting of the transfer task (benchmarks/transfer_efficiency.py): the budget counts
every trial's FLOPs, proxies included, only full target trials can be a method's result, and
the goal compares retrained qualities."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import transfer_efficiency as te  # noqa: E402
from search_efficiency import curve  # noqa: E402

from studies.trainer_config import trial_config  # noqa: E402
from trainer.rundir import flops_per_step  # noqa: E402

W, T = te.TARGET_WIDTH, te.TARGET_STEPS


def entry(
    state: str, steps: int, flops: float, value: float | None = None, width: int = W
) -> dict[str, object]:
    return {"state": state, "steps": steps, "flops": flops, "value": value, "width": width,
            "params": {"optimizer.lr": flops}}  # fmt: skip


def test_proxy_trials_spend_the_budget_but_never_score() -> None:
    entries = [
        entry("complete", 100, 1.0, 2.0, width=32),  # a proxy: counted, never the result
        entry("pruned", 20, 2.0),
        entry("complete", T, 10.0, 2.6),
        entry("complete", 100, 3.0, 2.1),  # the target width, short: not the target trial
        entry("complete", T, 10.0, 2.5),
        entry("complete", T, 10.0, 2.2),  # ends past the budget of 30: left out
    ]
    assert curve(entries, 30.0, cost="flops", counts=te.is_target) == [(13.0, 2.6), (26.0, 2.5)]
    result = {"method": "transfer", "seed": 0, "budget": 30.0, "trials": entries}
    assert te.found(result) == entries[4]
    assert te.found({**result, "trials": entries[:2]}) is None


def test_report_meets_the_goal_only_with_half_the_flops_and_tpe_s_quality() -> None:
    def run(method: str, seed: int, spent: float, value: float) -> dict[str, object]:
        trials = [entry("complete", T, spent, value)]
        return {"method": method, "seed": seed, "budget": 10.0, "seconds": 60.0,
                "trials": trials, "curve": curve(trials, 10.0, "flops", te.is_target)}  # fmt: skip

    results = [run("transfer", s, 4.0, 2.3) for s in (0, 1)]
    results += [run("tpe-median-sp", s, 10.0, 2.2) for s in (0, 1)]
    draws = {("transfer", s): [2.30, 2.31, 2.29] for s in (0, 1)}
    draws |= {("tpe-median-sp", s): [2.35, 2.34, 2.33] for s in (0, 1)}
    text = te.report(results, draws)
    assert "transfer: retrained 2.3000 with 0.40 of the FLOPs" in text
    assert text.endswith("met") and "not met" not in text
    draws |= {("tpe-median-sp", 0): [2.2, 2.2, 2.2], ("tpe-median-sp", 1): [2.2, 2.2, 2.2]}
    assert te.report(results, draws).endswith("not met")


def test_every_method_searches_the_same_target_under_its_parametrization() -> None:
    for method, (backend, name, _) in te.METHODS.items():
        study = te.method_study(method, 3)
        assert study.backend == backend and study.seed == 3
        assert study.overrides["parametrization.name"] == name
        assert study.stages[-1].budget.steps == T
        assert study.overrides["model.d_model"] == W
    study = te.method_study("transfer", 0)
    proxy = flops_per_step(trial_config(study, {}, study.stages[0]))
    assert te.target_flops() / T >= 8 * proxy  # the issue: a target step costs >= 8 proxy steps


def test_retrain_reads_the_cache_and_leaves_out_runs_missing_a_seed(tmp_path: Path) -> None:
    import json

    best = entry("complete", T, 10.0, 2.5)
    runs = [{"method": "transfer", "seed": s, "budget": 30.0, "trials": [best]} for s in (0, 1)]
    runs[1]["trials"] = [entry("complete", T, 9.0, 2.4)]  # other params
    cached = [
        {"method": "transfer", "params": best["params"], "seed": 100, "value": 2.6},
        {"method": "transfer", "params": best["params"], "seed": 101, "value": None},
    ]
    (tmp_path / "retrain.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cached))
    draws = te.retrain(runs, tmp_path, [100, 101], jobs=1, train=False)
    assert draws == {("transfer", 0): [2.6, float("inf")]}  # failed: no model; seed 1: not cached
