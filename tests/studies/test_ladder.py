"""The scaling ladder: shapes for the sizes, the two designs' runs, the study that trains them,
the runs table `scaleplan fit` reads, the FLOPs the warmup-stable-decay design saves, and bad
ladders refused before anything trains."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from planner.laws import FORMS
from studies.cli import main
from studies.ladder import LadderSpec, plan_ladder, rung_near, savings

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
    "check": False,
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
        ({"check": True}, "check: 3 isoflop points below the largest budget 3e+09 FLOPs"),
        # three LRs are one point each: still 3
        ({"check": True, "lrs": [1e-3, 3e-3, 1e-2]}, "check: 3 isoflop points below"),
        (
            {"check": True, "designs": ["isoflop"], "fit_design": "wsd"},
            "fit_design: 'wsd' is not one of the ladder's designs ['isoflop']",
        ),
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


def test_the_check_fits_below_the_largest_budget_and_trains_the_law_s_optimum(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A ladder this small has no optimum inside its sizes (the smallest wins everywhere), so
    # the fit sees the ladder's own (N, D) points with losses from a known Chinchilla surface;
    # the check's run is still trained (or found among the ladder's runs) for real.
    import planner.fit

    real_fit = planner.fit.fit_law
    surface: dict[str, float] = {}

    def fit_the_surface(n: Any, d: Any, loss: Any, **options: Any) -> Any:
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return real_fit(n, d, FORMS["chinchilla"].loss(surface, n, d), **options)

    monkeypatch.setattr(planner.fit, "fit_law", fit_the_surface)
    changes = {"designs": ["isoflop"], "budgets": [5e8, 1e9, 2e9], "check": True}
    path, out = write(tmp_path, **changes), tmp_path / "out"
    command = ["ladder", str(path), "--out", str(out), "--tracking-uri", "none", "--json"]

    # N_opt 14k at 2e9 FLOPs: the ladder's 1 x 32, whose run there is the check
    surface.update(E=1.5, A=400.0, B=400.0, alpha=0.35, beta=0.35)
    assert main(command) == 0
    shown = json.loads(capsys.readouterr().out)
    check = shown["check"]
    assert check["fitted_runs"] == 6 and check["budget"] == 2e9  # the 5e8 and 1e9 runs
    assert check["law"]["alpha"] == pytest.approx(0.35, rel=1e-3)
    n_opt = float(FORMS["chinchilla"].optimal_n(surface, 2e9))
    assert check["n_opt"] == pytest.approx(n_opt, rel=1e-2)
    twin = next(row for row in shown["rows"] if row["run"] == check["trained_by"])
    assert (twin["d_model"], twin["budget"]) == (32, 2e9)
    assert check["measured"] == twin["loss"] and not (out / "check-study.yaml").exists()

    # N_opt 60k: no ladder size; the nearest shape of the family trains at 2e9 FLOPs
    surface.update(A=920.0)
    assert main(command) == 0
    check = json.loads(capsys.readouterr().out)["check"]
    n_opt = float(FORMS["chinchilla"].optimal_n(surface, 2e9))
    assert "trained_by" not in check and 0.7 < check["params"] / n_opt < 1.4
    assert check["tokens"] == check["steps"] * 128  # D = C / (6 N) in whole steps
    assert abs(6 * check["params"] * check["tokens"] / 2e9 - 1) < 0.05
    expected = float(FORMS["chinchilla"].loss(surface, check["params"], check["tokens"]))
    assert check["predicted"] == pytest.approx(expected, rel=1e-4)
    assert check["measured"] < 5.0  # it trained (5.55 untrained)
    assert check["error"] == pytest.approx(check["predicted"] / check["measured"] - 1)
    low, high = check["interval"]
    assert check["covered"] == (low <= check["measured"] <= high)
    assert json.loads((out / "ladder.json").read_text())["check"] == check
    study = yaml.safe_load((out / "check-study.yaml").read_text())
    assert [stage["name"] for stage in study["stages"]] == ["check"]


def test_rung_near_finds_the_shape_whose_flop_equivalent_n_is_nearest() -> None:
    plan = plan_ladder(LadderSpec(**LADDER), BASE)
    for rung in plan.rungs:  # a ladder size is found again from its own N
        found = rung_near(plan, rung.flop_params)
        assert (found.n_layer, found.d_model) == (rung.n_layer, rung.d_model)
    target = (plan.rungs[1].flop_params * plan.rungs[2].flop_params) ** 0.5
    between = rung_near(plan, target)
    assert between.index == len(plan.rungs)  # a rung of its own, after the ladder's
    miss = abs(np.log(between.flop_params / target))
    # nearest by the planner's count (norms and biases left out: under 1% here)
    assert miss <= min(abs(np.log(r.flop_params / target)) for r in plan.rungs) + 0.01


def test_with_lrs_every_point_trains_at_each_lr_and_cool_downs_branch_off_their_own_lr(
    tmp_path: Path,
) -> None:
    from studies.ladder import study_file

    plan = plan_ladder(LadderSpec(**{**LADDER, "lrs": [3e-3, 1e-2]}), BASE)
    assert len(plan.runs) == 2 * len(plan_ladder(LadderSpec(**LADDER), BASE).runs)
    assert {r.lr for r in plan.runs} == {3e-3, 1e-2}
    stages = {s["name"]: s for s in study_file(plan, tmp_path / "base.yaml", tmp_path)["stages"]}
    for run in plan.runs:
        stage = stages[run.stage]
        assert stage["overrides"]["optimizer.lr"] == run.lr
        if run.role == "cooldown":  # from the stable run of the same size and LR
            j = [3e-3, 1e-2].index(run.lr or 0.0)
            assert f"wsd-n{run.size}-lr{j}-0" in stage["start_from"]


def test_a_tuned_ladder_keeps_each_point_s_best_lr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lrs = [1e-3, 3e-2]
    path = write(tmp_path, designs=["wsd"], lrs=lrs)
    out = tmp_path / "out"
    assert main(["ladder", str(path), "--out", str(out), "--tracking-uri", "none", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    tried = list(csv.DictReader((out / "lr-sweep.csv").open()))
    kept = list(csv.DictReader((out / "runs.csv").open()))
    assert len(tried) == 12 and len(kept) == 6 == shown["finished"]
    for row in kept:  # the lowest loss of its point's two runs
        point = [t for t in tried if (t["role"], t["size"], t["budget"]) == (row["role"],
                 row["size"], row["budget"])]  # fmt: skip
        assert {float(t["lr"]) for t in point} == set(lrs)
        assert float(row["loss"]) == min(float(t["loss"]) for t in point)
    # two LRs: every best is at an edge of the grid, and the ladder says so
    assert len(shown["lr_edges"]) == 6
    curves = list(csv.DictReader((out / "curves.csv").open()))
    assert {c["run"] for c in curves} == {row["run"] for row in kept}
    # each budget's best run, its LR and batch: the table `fit --approach hparams` reads
    optima = list(csv.DictReader((out / "hparams.csv").open()))
    assert [float(o["flops"]) for o in optima] == [1e9, 3e9]
    for optimum in optima:
        at = [row for row in kept if float(row["budget"]) == float(optimum["flops"])]
        assert float(optimum["loss"]) == min(float(row["loss"]) for row in at)
        assert float(optimum["lr"]) in lrs and float(optimum["batch_tokens"]) == 128


def test_run_ladder_from_python(tmp_path: Path) -> None:
    from studies.ladder import load_ladder, run_ladder
    from trainer.config import read_yaml_mapping

    spec, base = load_ladder(write(tmp_path), ["designs=[isoflop]"])
    plan = plan_ladder(spec, read_yaml_mapping(base, "base"))
    result = run_ladder(plan, base, tmp_path / "out", tracking_uri="none")
    assert result["finished"] == 6 == len(result["rows"])
    assert (tmp_path / "out" / "runs.csv").is_file() and result["check"] is None
    assert [row["approach"][0] for row in result["approaches"]] == ["1", "2", "3"]
