"""A stage's ``horizon``: the LR range moved from the stage before's horizon to its own along
``log lr* = a - b log T``, with b given or fitted from the earlier stages' optima."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from studies.errors import StudyError
from studies.sweep import run_study

SPACE = {"lr": {"low": 1e-4, "high": 1.0, "log": True}}


def lr_star(steps: int) -> float:  # the objective's optimum: b = 0.5 exactly
    return 0.3 * steps**-0.5


def bowl(params: dict[str, Any], trial: Any) -> float:
    """A loss whose optimal LR falls as T^-0.5 with the horizon T = the budget's steps."""
    return (math.log2(params["lr"]) - math.log2(lr_star(trial.budget["steps"]))) ** 2


def stages(horizon: dict[str, Any] | None) -> list[dict[str, Any]]:
    last: dict[str, Any] = {"name": "long", "sampler": "tpe", "trials": 3}
    last.update(budget={"steps": 1600}, narrow={"top_k": 3})
    if horizon is not None:
        last["horizon"] = horizon
    return [
        {"name": "short", "sampler": "sobol", "trials": 16, "budget": {"steps": 25}},
        {"name": "mid", "sampler": "sobol", "trials": 16, "budget": {"steps": 100}, "seed": 0},
        last,
    ]


def notes_of(summary: dict[str, Any], stage: str) -> list[str]:
    return next(s["notes"] for s in summary["stages"] if s["name"] == stage)


def test_a_fitted_horizon_law_centres_the_long_stage_on_its_optimum(tmp_path: Path) -> None:
    summary = run_study(
        bowl, SPACE, stages({"key": "lr"}), runs_dir=tmp_path, mlflow=False, name="fit"
    )
    note = next(n for n in notes_of(summary, "long") if n.startswith("lr: centre"))
    assert "at 100 steps ->" in note and "fitted at 2 horizons 25,100" in note
    fitted_b = float(note.split("b = ")[1].split(",")[0])
    assert fitted_b == pytest.approx(0.5, abs=0.1)
    best = summary["best_params"]["lr"]  # the long stage found the long horizon's optimum
    assert abs(math.log2(best) - math.log2(lr_star(1600))) < 0.5


def test_without_the_law_the_long_stage_stays_at_the_mid_optimum(tmp_path: Path) -> None:
    summary = run_study(bowl, SPACE, stages(None), runs_dir=tmp_path, mlflow=False, name="none")
    best = summary["best_params"]["lr"]
    assert abs(math.log2(best) - math.log2(lr_star(1600))) > 1.0  # two octaves off, less narrowed


def test_a_given_b_moves_the_range_by_that_power(tmp_path: Path) -> None:
    summary = run_study(
        bowl, SPACE, stages({"key": "lr", "b": 0.5}), runs_dir=tmp_path, mlflow=False, name="b"
    )
    note = next(n for n in notes_of(summary, "long") if n.startswith("lr: centre"))
    before, after = (float(part.split()[0]) for part in note[len("lr: centre ") :].split("->"))
    assert after / before == pytest.approx(16**-0.5, rel=1e-2) and "given" in note


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"key": "momentum"}, "stages.long.horizon.key: 'momentum' is not a searched log-scale"),
    ],
)
def test_bad_horizons_are_one_line(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(StudyError) as error:
        run_study(bowl, SPACE, stages(change), runs_dir=tmp_path, mlflow=False)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_fitting_needs_two_earlier_horizons(tmp_path: Path) -> None:
    two = stages({"key": "lr"})
    two[1]["budget"] = {"steps": 25}  # both earlier stages at one horizon
    with pytest.raises(StudyError, match="stages.long.horizon: horizon law: optimal LRs at 1"):
        run_study(bowl, SPACE, two, runs_dir=tmp_path, mlflow=False)
    with pytest.raises(StudyError, match="stages.mid.horizon.b: not given"):
        run_study(bowl, SPACE, [two[0], {**two[2], "name": "mid"}], runs_dir=tmp_path)
