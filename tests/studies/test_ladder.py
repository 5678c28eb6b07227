"""The scaling ladder: shapes for the sizes, the two designs' runs, the study that trains them,
the runs table `scaleplan fit` reads, the FLOPs the warmup-stable-decay design saves, and bad
ladders refused before anything trains."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from studies.cli import main
from studies.ladder import LadderSpec, plan_ladder, savings

BASE = {
    "steps": 100,
    "eval_batches": 2,
    "checkpoint_every": 0,
    "model": {"kind": "gpt", "n_layer": 1, "n_head": 1, "d_model": 16, "dropout": 0.0},
    "data": {"block_size": 32, "batch_size": 4, "max_bytes": 300_000},
    "optimizer": {"name": "adamw", "lr": 1e-2},
    "schedule": {"warmup_steps": None, "warmup_fraction": 0.05},
    "tracking": {"enabled": False},
}
LADDER: dict[str, Any] = {
    "name": "tiny-ladder",
    "base": "base.yaml",
    "sizes": [4e3, 1.2e4, 3.6e4],
    "budgets": [1e9, 3e9],
    "min_steps": 10,
}


def write(tmp_path: Path, **changes: Any) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump({**LADDER, **changes}))
    return path


def test_the_plan_has_both_designs_and_the_wsd_branches_share_the_stable_phase() -> None:
    plan = plan_ladder(LadderSpec(**LADDER), BASE)
    assert [r.n_params for r in plan.rungs] == sorted(r.n_params for r in plan.rungs)
    iso = [r for r in plan.runs if r.design == "isoflop"]
    assert len(iso) == 6  # every size at both budgets
    for run in iso:  # D = C / (6 N), in whole steps of 128 tokens, N = FLOPs per token / 6
        rung = plan.rungs[run.size]
        assert rung.flop_params > rung.n_params  # the head and attention cost too
        assert run.steps == round(run.budget_flops / (6 * rung.flop_params * 128))
    stable = [r for r in plan.runs if r.role == "stable"]
    cooldowns = [r for r in plan.runs if r.role == "cooldown"]
    assert len(stable) == 3 and len(cooldowns) == 3
    for branch in cooldowns:
        long = next(r for r in stable if r.size == branch.size)
        assert branch.start_step < long.steps - long.decay_steps  # inside the stable phase
        assert branch.steps - branch.start_step == branch.decay_steps
    saved = savings(plan)
    assert saved is not None and saved["points"] == 6
    # wsd trains the larger budget's runs plus short cool-downs, not both budgets' runs
    assert 0.1 < saved["saved_fraction"] < 0.4


def test_a_ladder_trains_into_a_runs_table_that_fit_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path)
    out = tmp_path / "out"
    assert main(["ladder", str(path), "--out", str(out), "--tracking-uri", "none", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["finished"] == 12
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert {row["design"] for row in rows} == {"isoflop", "wsd"}
    by_run = {row["run"]: row for row in rows}
    # a cool-down continued the stable run from its branch point: its curve starts there
    curves = list(csv.DictReader((out / "curves.csv").open()))
    branch = next(row for row in rows if row["role"] == "cooldown")
    points = [int(c["step"]) for c in curves if c["run"] == branch["run"]]
    stable = by_run[f"wsd-n{branch['size']}"]
    assert min(points) == 0 and max(points) == int(branch["steps"])
    assert int(stable["steps"]) > int(branch["steps"])
    for row in rows:
        assert float(row["loss"]) < 5.0  # every run learned (5.55 untrained)
    # a cool-down is a run of its own budget: its tokens, its steps, the stable run's history
    assert int(branch["tokens"]) == int(branch["steps"]) * 128
    assert float(branch["trained_flops"]) < float(branch["flops"])  # it paid for its decay only

    # the table is what `scaleplan fit` reads (Approach 3 here: this ladder is too small to
    # bracket each budget's optimum, which Approach 2 needs)
    fit = ["fit", str(out / "runs.csv"), "--where", "design=isoflop", "--bootstrap", "0"]
    assert main([*fit, "--json"]) == 0, capsys.readouterr().err
    law = json.loads(capsys.readouterr().out)
    assert law["n_points"] == 6 and law["converged"], law


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"budgets": [1e9, 1e8]}, "budgets: Value error, expected distinct numbers in ascending"),
        ({"budgets": [1e7, 1e9]}, "budgets[0]: 1e+07 FLOPs holds 0 of the sizes"),
        ({"sizes": [4e3, 4.1e3, 1e4]}, "give the same GPT shape twice"),
        ({"base": "missing.yaml"}, "base: 'missing.yaml' is not a file"),
        ({"sizes": [10, 1e4]}, "sizes[0]: params: 10 non-embedding parameters is below"),
    ],
)
def test_bad_ladders_are_one_line_and_exit_2(
    changes: dict[str, Any], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, **changes)
    assert main(["ladder", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_dry_run_prints_the_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ladder", str(write(tmp_path)), "--dry-run", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown["runs"]) == 12 and shown["savings"]["points"] == 6
