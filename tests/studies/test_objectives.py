"""The objective interface: a user's callable as the objective (its handle, its outcomes, the
study-file errors it gets), and the trainer objective left as it was."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from studies.errors import StudyError
from studies.objectives import (
    CallableObjective,
    TrainerObjective,
    callable_name,
    import_callable,
    objective_for,
)
from studies.study_file import load_study
from studies.sweep import preflight, run_study

MODULE = """
def quadratic(params, trial):
    for step in range(1, int(trial.budget.get("steps", 1)) + 1):
        if trial.report(step, (params["x"] - 0.3) ** 2 + 1.0 / step):
            return 99.0
    return (params["x"] - 0.3) ** 2

def raises(params, trial):
    raise KeyError("x")

def handle(params, trial):
    trial.out_dir.joinpath("seen.txt").write_text(
        f"{trial.stage} {trial.number} {trial.seed} {dict(trial.budget)}")
    return 1.0

not_a_function = 3
"""


def study_file(folder: Path, **changes: Any) -> Path:
    (folder / "userobj.py").write_text(MODULE)
    raw: dict[str, Any] = {
        "name": "callable",
        "objective": {"callable": "userobj:quadratic"},
        "space": {"x": {"low": -1.0, "high": 1.0}},
        "stages": [{"name": "only", "sampler": "random", "trials": 3, "budget": {"epochs": 4}}],
        "mlflow": False,
    }
    raw.update(changes)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_callable_study_needs_no_base_and_keeps_its_own_budget_keys(tmp_path: Path) -> None:
    study = load_study(study_file(tmp_path))
    assert study.base is None and not study.is_trainer
    assert study.objective.metric == "objective" and study.objective.direction == "minimize"
    assert study.stages[0].budget.as_written() == {"epochs": 4}
    assert isinstance(objective_for(study), CallableObjective)


def test_the_trial_handle_says_where_the_trial_is(tmp_path: Path) -> None:
    study = load_study(study_file(tmp_path, objective={"callable": "userobj:handle"}, seed=7))
    outcome = objective_for(study).run(
        study, study.stages[0], {"x": 0.1}, trial_id="only-2", number=2, runs_dir=tmp_path
    )
    assert (outcome.state, outcome.value) == ("complete", 1.0)
    seen = (Path(outcome.out_dir) / "seen.txt").read_text()
    assert seen == "only 2 7 {'epochs': 4}"
    assert outcome.seconds is not None and outcome.seconds >= 0


@pytest.mark.parametrize(
    ("function", "state", "reason"),
    [
        ("raises", "failed", "KeyError: 'x'"),
        ("not_a_number", "failed", "returned 'text', not a number"),
        ("nan", "failed", "returned nan"),
        ("pruned", "pruned", "pruned at step 2 (objective 0.59)"),
    ],
)
def test_what_a_callable_does_becomes_a_trial_state(
    tmp_path: Path, function: str, state: str, reason: str
) -> None:
    def not_a_number(params: Any, trial: Any) -> Any:
        return "text"

    def nan(params: Any, trial: Any) -> float:
        return math.nan

    study = load_study(
        study_file(
            tmp_path,
            stages=[{"name": "only", "sampler": "random", "trials": 3, "budget": {"steps": 5}}],
        )
    )
    functions = {"not_a_number": not_a_number, "nan": nan}
    name = "userobj:raises" if function == "raises" else "userobj:quadratic"
    if function in functions:
        name = callable_name(functions[function])
    objective = CallableObjective(name, tmp_path)

    def report(step: int, value: float) -> bool:
        return step == 2 and function == "pruned"

    outcome = objective.run(
        study,
        study.stages[0],
        {"x": 0.0},
        trial_id="only-0",
        number=0,
        report=report,
        runs_dir=tmp_path,
    )
    assert (outcome.state, outcome.reason) == (state, reason)
    assert outcome.value is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"objective": {"callable": "nomodule_here:fn"}},
            "objective.callable: cannot import 'nomodule_here:fn' (ModuleNotFoundError: No "
            "module named 'nomodule_here')",
        ),
        (
            {"objective": {"callable": "userobj:not_a_function"}},
            "objective.callable: 'userobj:not_a_function' is not callable (it is 3)",
        ),
        (
            {"objective": {"callable": "userobj:missing"}},
            "objective.callable: cannot import 'userobj:missing' (module userobj has no missing)",
        ),
        (
            {"objective": {"callable": "userobj"}},
            "objective.callable: 'userobj' is not of the form 'package.module:function'",
        ),
    ],
)
def test_a_callable_that_cannot_run_is_one_line_before_any_trial(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    study = load_study(study_file(tmp_path, **changes))
    with pytest.raises(StudyError) as error:
        preflight(study, tmp_path / "runs")
    assert str(error.value) == message
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"base": "gpt.yaml"},
            "objective.callable: 'userobj:quadratic' replaces the trainer; a study with a "
            "callable objective takes no base (remove base or objective.callable)",
        ),
        (
            {"overrides": {"optimizer.lr": 0.1}},
            "overrides: trainer config keys, but the objective is a callable "
            "('userobj:quadratic'); remove overrides",
        ),
        (
            {"objective": {"callable": "userobj:quadratic", "metric": "val_loss"}},
            "objective.metric: val_loss is a trainer metric; a callable objective returns its "
            "own value (leave metric out)",
        ),
        (
            {"stages": [{"name": "only", "sampler": "random", "trials": 2, "budget": {}}]},
            "stages.only.budget: empty; the callable gets it",
        ),
        (
            {
                "backend": "ray",
                "stages": [
                    {"name": "only", "sampler": "random", "trials": 2, "budget": 4, "pruner": "pbt"}
                ],
            },
            "stages.only.pruner.name: pbt continues trials from the trainer's checkpoints; a "
            "callable objective has none",
        ),
    ],
)
def test_study_file_mistakes_of_a_callable_study(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    (tmp_path / "gpt.yaml").write_text("steps: 5\n")
    with pytest.raises(StudyError) as error:
        load_study(study_file(tmp_path, **changes))
    assert str(error.value) == message


def test_a_trainer_study_refuses_a_budget_it_does_not_know(tmp_path: Path) -> None:
    from tiny_study import TINY_BASE

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(TINY_BASE))
    raw = {
        "base": "base.yaml",
        "space": {"optimizer.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
        "stages": [{"name": "only", "sampler": "random", "trials": 2, "budget": {"epochs": 3}}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(StudyError) as error:
        load_study(path)
    assert str(error.value) == (
        "stages.only.budget.epochs: not a budget the trainer objective knows; use steps, "
        "tokens or flops"
    )
    assert isinstance(
        objective_for(load_study(path, ["stages.only.budget={steps: 3}"])), TrainerObjective
    )


def test_run_study_takes_a_plain_function(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def bowl(params: dict[str, Any], trial: Any) -> float:
        seen.append(dict(trial.budget))
        return (params["x"] - 0.3) ** 2

    summary = run_study(
        bowl,
        {"x": {"low": -1.0, "high": 1.0}},
        [
            {"name": "coarse", "sampler": "sobol", "trials": 8, "budget": {"fidelity": 0.5}},
            {
                "name": "fine",
                "sampler": "tpe",
                "trials": 6,
                "budget": {"fidelity": 1.0},
                "narrow": {"top_k": 3},
            },
        ],
        name="plain",
        runs_dir=tmp_path / "runs",
        mlflow=False,
    )
    assert summary["n_complete"] == 14 and summary["metric"] == "objective"
    assert abs(summary["best_params"]["x"] - 0.3) < 0.2
    assert summary["best_trial"]["stage"] == "fine"
    assert seen[:8] == [{"fidelity": 0.5}] * 8 and seen[8:] == [{"fidelity": 1.0}] * 6
    best = yaml.safe_load((tmp_path / "runs" / "plain" / "best_config.yaml").read_text())
    assert best["params"] == summary["best_params"] and best["budget"] == {"fidelity": 1.0}


def test_a_function_only_this_process_has_cannot_go_to_other_processes(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match=r"^objective.callable: .*<lambda> is defined where "):
        run_study(
            lambda params, trial: 0.0,
            {"x": {"low": 0.0, "high": 1.0}},
            [{"name": "only", "sampler": "random", "trials": 2, "budget": {"steps": 1}}],
            runs_dir=tmp_path / "runs",
            workers=2,
            mlflow=False,
        )


def test_an_importable_function_is_named_by_its_module() -> None:
    assert callable_name(math.sqrt) == "math:sqrt"
    assert import_callable("math:sqrt") is math.sqrt


def test_a_stage_start_from_is_refused_for_a_callable(tmp_path: Path) -> None:
    stage = {"name": "only", "sampler": "random", "trials": 1, "budget": {"epochs": 1}}
    path = study_file(tmp_path, stages=[{**stage, "start_from": "ckpt/step_0000004.pt"}])
    with pytest.raises(StudyError, match=r"^stages\.only\.start_from: a trainer checkpoint"):
        load_study(path)
