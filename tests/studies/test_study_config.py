"""Study files: the shipped quickstart loads, `--set` reaches every part, a trial's TrainConfig is
base + overrides + params + budget, and every user mistake is one StudyError line naming the
field, before any trial starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from studies.config import BudgetSpec, ParamSpec, StageSpec, StudyConfig, mask_password
from studies.errors import StudyError
from studies.study_file import load_study
from studies.trainer_config import space_limits, trainer_keys, trial_config
from trainer.errors import ConfigError
from trainer.models import GPTConfig

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "configs" / "quickstart.yaml"
GPT_TINY = REPO / "studies" / "configs" / "gpt-tiny.yaml"


def a_stage(**budget: int) -> StageSpec:
    """A stage with this budget and nothing else to say."""
    return StageSpec(name="only", sampler="random", trials=1, budget=BudgetSpec(**budget))


def write_study(tmp_path: Path, **fields: Any) -> Path:
    """A small valid study over gpt-tiny; `fields` replace top-level entries."""
    study: dict[str, Any] = {
        "base": str(GPT_TINY),
        "space": {"optimizer.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
        "stages": [{"name": "coarse", "sampler": "sobol", "trials": 4, "budget": {"steps": 20}}],
    }
    study.update(fields)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


# ---------------------------------------------------------------------------------------------
# The shipped study file


def test_quickstart_loads_with_coarse_sobol_then_fine_tpe() -> None:
    study = load_study(QUICKSTART)
    assert study.name == "quickstart"
    assert study.base == GPT_TINY  # resolved against the study file's folder
    assert list(study.space) == [
        "optimizer.lr",
        "schedule.warmup_fraction",
        "optimizer.weight_decay",
        "optimizer.betas.1",
    ]
    assert study.space["optimizer.lr"].log
    assert [(s.name, s.sampler) for s in study.stages] == [("coarse", "sobol"), ("fine", "tpe")]
    assert all(stage.budget.steps for stage in study.stages)
    narrow = study.stages[1].narrow
    assert narrow is not None and narrow.bracket and not narrow.warm_start
    assert study.objective.metric == "val_loss" and study.objective.direction == "minimize"
    assert study.backend == "optuna"


def test_quickstart_fits_the_cpu_budget() -> None:
    # 2048 tokens a step at 10 to 25 steps/s on 2 cores: all trials' steps stay under ~8 min
    study = load_study(QUICKSTART)
    total_steps = sum(stage.trials * (stage.budget.steps or 0) for stage in study.stages)
    assert total_steps <= 5_000


def test_trial_config_is_base_plus_overrides_plus_params_plus_budget() -> None:
    study = load_study(QUICKSTART)
    params = {"optimizer.lr": 1e-3, "optimizer.betas.1": 0.99, "schedule.warmup_fraction": 0.1}
    config = trial_config(study, params, study.stages[0])
    assert config.optimizer.lr == 1e-3
    assert config.optimizer.betas == (0.9, 0.99)  # element 1 replaced, element 0 from the base
    assert config.schedule.warmup_fraction == 0.1 and config.schedule.warmup_steps is None
    assert config.eval_every == 20  # a study override
    assert isinstance(config.model, GPTConfig) and config.model.d_model == 64  # the base
    assert config.steps == 120  # the coarse stage's budget
    assert config.optimizer.weight_decay == 0.1  # not sampled: the base value


def test_token_budget_becomes_steps_of_the_trial_batch() -> None:
    study = load_study(QUICKSTART)
    config = trial_config(study, {}, a_stage(tokens=1_000_000))
    assert config.steps == 1_000_000 // (16 * 128)
    bigger = trial_config(study, {"data.batch_size": 32}, a_stage(tokens=1_000_000))
    assert bigger.steps == 1_000_000 // (32 * 128)


def test_tracking_uri_goes_to_the_trial(tmp_path: Path) -> None:
    study = load_study(QUICKSTART, ["tracking_uri=http://mlflow.example:5000"])
    config = trial_config(study, {}, study.stages[0])
    assert config.tracking.tracking_uri == "http://mlflow.example:5000"
    assert config.tracking.experiment == "scaleplan-quickstart"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql+psycopg://u:s3cr%40t@db:5432/optuna",
            "postgresql+psycopg://u:***@db:5432/optuna",
        ),
        ("http://alice:pw@mlflow:5000", "http://alice:***@mlflow:5000"),
        ("postgresql://user@db/optuna", "postgresql://user@db/optuna"),
        ("sqlite:///runs/optuna.db", "sqlite:///runs/optuna.db"),
        ("runs/quickstart/optuna.journal", "runs/quickstart/optuna.journal"),
    ],
)
def test_passwords_in_urls_are_masked(url: str, shown: str) -> None:
    assert mask_password(url) == shown


def test_defaults_for_storage_and_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = load_study(QUICKSTART)
    assert study.resolved_storage("runs").endswith(
        os.path.join("runs", "quickstart", "optuna.journal")
    )
    assert study.resolved_tracking_uri() == "sqlite:///runs/mlflow.db"
    ray = load_study(QUICKSTART, ["backend=ray"])
    assert ray.resolved_storage("runs").endswith(os.path.join("runs", "quickstart", "ray"))
    rdb = load_study(QUICKSTART, ["storage=postgresql://user@db/optuna"])
    assert rdb.resolved_storage() == "postgresql://user@db/optuna"


def test_space_limits_come_from_the_trainer_fields() -> None:
    limits = space_limits(load_study(QUICKSTART))
    assert limits["optimizer.lr"].low == 0.0 and limits["optimizer.lr"].low_open
    assert limits["optimizer.betas.1"].high == 1.0 and limits["optimizer.betas.1"].high_open
    assert limits["schedule.warmup_fraction"].high == 1.0
    assert (
        limits["optimizer.weight_decay"].low == 0.0
        and not limits["optimizer.weight_decay"].low_open
    )


def test_trainer_keys_include_tuple_elements_and_the_model_kind() -> None:
    keys = trainer_keys("gpt")
    assert {"optimizer.lr", "optimizer.betas.0", "optimizer.betas.1", "model.n_layer"} <= set(keys)
    assert "model.channels" in trainer_keys("cnn") and "model.channels" not in keys


# ---------------------------------------------------------------------------------------------
# --set on the study file


def test_set_reaches_stages_space_overrides_and_top_level() -> None:
    study = load_study(
        QUICKSTART,
        [
            "stages.coarse.trials=4",
            "stages.1.budget.steps=50",
            "stages.coarse.pruner=none",
            "space.optimizer.lr.high=1e-2",
            "space.optimizer.weight_decay=null",
            "space.optimizer.eps={low: 1e-10, high: 1e-6, log: true}",
            "overrides.model.n_layer=1",
            "workers=2",
            "objective=best_val_loss",
        ],
    )
    assert study.stages[0].trials == 4 and study.stages[1].budget.steps == 50
    assert study.stages[0].pruner.name == "none"
    assert study.space["optimizer.lr"].high == 1e-2  # "1e-2" is a float, not YAML 1.1's string
    assert "optimizer.weight_decay" not in study.space
    assert study.space["optimizer.eps"].log
    model = trial_config(study, {}, study.stages[0]).model
    assert isinstance(model, GPTConfig) and model.n_layer == 1
    assert study.workers == 2 and study.objective.metric == "best_val_loss"


def test_exponent_numbers_without_a_dot_are_floats(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(
        f"base: {GPT_TINY}\n"
        "space:\n  optimizer.lr: {low: 1e-4, high: 3e-2, log: true}\n"
        "stages:\n  - {name: a, sampler: random, trials: 2, budget: 10}\n"
    )
    study = load_study(path)
    assert study.space["optimizer.lr"].bounds == (1e-4, 3e-2)
    assert study.name == "study"  # the file's name
    assert study.stages[0].budget.steps == 10  # `budget: 10` means steps


def test_conditional_parameter_on_a_categorical_one(tmp_path: Path) -> None:
    space = {
        "optimizer.name": {"choices": ["adamw", "momentum"]},
        "optimizer.momentum": {
            "low": 0.8,
            "high": 0.99,
            "condition": {"optimizer.name": "momentum"},
        },
    }
    study = load_study(write_study(tmp_path, space=space))
    momentum = study.space["optimizer.momentum"]
    assert momentum.condition == {"optimizer.name": ["momentum"]}
    assert momentum.is_active({"optimizer.name": "momentum"})
    assert not momentum.is_active({"optimizer.name": "adamw"})
    config = trial_config(
        study, {"optimizer.name": "momentum", "optimizer.momentum": 0.9}, a_stage(steps=5)
    )
    assert config.optimizer.name == "momentum" and config.optimizer.momentum == 0.9


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the field


BAD_SETS = [
    (
        ["space.optimizer.lrr={low: 1e-4, high: 1e-2}"],
        "space.optimizer.lrr: not a trainer config key (did you mean optimizer.lr?)",
    ),
    (
        ["overrides.optimizer.lrr=1"],
        "overrides.optimizer.lrr: not a trainer config key (did you mean optimizer.lr?)",
    ),
    (
        ["space.optimizer.lr.high=1e-5"],
        "space.optimizer.lr.high: 1e-05 is not above low 0.0001 (an inverted range)",
    ),
    (
        ["space.optimizer.weight_decay.high=0.0"],
        "space.optimizer.weight_decay.high: 0.0 is not above low 0.0 (an empty range)",
    ),
    (
        ["space.optimizer.lr.low=0"],
        "space.optimizer.lr.low: 0.0 with log: true; a log-scale range needs low > 0",
    ),
    (["space.optimizer.lr.low=-1e-3"], "space.optimizer.lr.low: -0.001 with log: true"),
    (
        ["stages.coarse.sampler=sobl"],
        "stages.coarse.sampler: 'sobl' is not one of: sobol, random, tpe, gp, cmaes",
    ),
    (
        ["stages.fine.pruner=asha2"],
        "stages.fine.pruner.name: 'asha2' is not one of: asha, hyperband, median, pbt, none",
    ),
    (["stages.0.trials=0"], "stages.coarse.trials: input should be greater than or equal to 1"),
    (
        ["stages.fine.budget={tokens: 10}"],
        "stages.fine.budget.tokens: 10 is less than one step (2048 tokens per step)",
    ),
    (
        ["stages.fine.budget={steps: 10, tokens: 10000}"],
        "stages.fine.budget.steps: set exactly one of steps, tokens and flops",
    ),
    (["stages.0.narrow={top_k: 3}"], "stages.coarse.narrow: stage 'coarse' is the first"),
    (["stages.1.name=coarse"], "stages.1.name: 'coarse' is used twice"),
    (
        ["stages.fine.narrow.quantiles=[0.5, 0.2]"],
        "stages.fine.narrow.quantiles: [0.5, 0.2]; expected 0 <= low < high <= 1",
    ),
    (
        ["space.optimizer.betas.1.high=1.0"],
        "space.optimizer.betas.1: 1.0 is not a valid trainer value",
    ),
    (
        ["space.schedule.name={choices: [cosine, sgdr]}"],
        "space.schedule.name: 'sgdr' is not a valid trainer value",
    ),
    (
        ["overrides.schedule.warmup_steps=10"],
        "space.schedule.warmup_fraction: 0.0 is not a valid trainer value "
        "(schedule.warmup_fraction: 0.0 is not allowed with warmup_steps=10",
    ),
    (
        ["storage=redis://host/0"],
        "storage: 'redis://host/0' has scheme 'redis', not one of: sqlite, postgresql",
    ),
    (
        ["backend=ray", "storage=postgresql://db/x"],
        "storage: 'postgresql://db/x' has scheme 'postgresql', not one of: file, s3",
    ),
    (["tracking_uri=htp://host:5000"], "tracking_uri: 'htp://host:5000' has scheme 'htp'"),
    (
        ["objective.direction=maximize"],
        "objective.direction: val_loss is improved by minimize, not by maximize",
    ),
    (
        ["objective=val_acc"],
        "objective.metric: 'val_acc' is not one of: val_loss, best_val_loss, val_accuracy",
    ),
    (["backend=dask"], "backend: 'dask' is not one of: optuna, ray"),
    (["bogus=1"], "bogus: unknown field; allowed: name, base, overrides, space"),
    (["stages.fin.trials=3"], "--set stages.fin.trials: no stage 'fin'; stages: coarse, fine"),
    (["space.x.low=3"], "--set space.x.low: no parameter 'x' in space"),
    (["space.optimizer.lr.hgh=3"], "--set space.optimizer.lr.hgh: 'hgh' is not a parameter field"),
    (["space.optimizer.lr.log=maybe"], "space.optimizer.lr.log: input should be a valid boolean"),
    (
        ["stages.fine.narrow.bracket=maybe"],
        "stages.fine.narrow.bracket: input should be a valid boolean",
    ),
    (["stages.coarse.trials=0"], "stages.coarse.trials: input should be greater than or equal"),
    (["workers=0"], "workers: input should be greater than or equal to 1"),
    (["name=my study"], "name: string should match pattern"),
    (["space={}"], "space: dictionary should have at least 1 item"),
    (["stages.0"], "--set: 'stages.0' is not of the form dotted.key=value"),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_SETS, ids=[s[1][:40] for s in BAD_SETS])
def test_bad_input_is_one_line_naming_the_field(overrides: list[str], expected: str) -> None:
    with pytest.raises(StudyError) as caught:
        load_study(QUICKSTART, overrides)
    message = str(caught.value)
    assert message.startswith(expected), message
    assert "\n" not in message


BAD_SPACES = [
    (
        {"optimizer.lr": {"type": "int", "low": 0.5, "high": 4}},
        "space.optimizer.lr.low: 0.5 is not an integer",
    ),
    ({"optimizer.lr": {"low": 1e-4}}, "space.optimizer.lr.high: missing"),
    (
        {"optimizer.lr": {"low": 1e-4, "high": 1e-2, "choices": [1]}},
        "space.optimizer.lr.low: not used by a categorical",
    ),
    (
        {"optimizer.name": {"type": "categorical", "choices": []}},
        "space.optimizer.name.choices: missing or empty",
    ),
    (
        {"optimizer.name": {"choices": ["adamw", "adamw"]}},
        "space.optimizer.name.choices: ['adamw', 'adamw'] has duplicates",
    ),
    (
        {"optimizer.lr": {"low": 1e-4, "high": 1e-2, "step": 2}},
        "space.optimizer.lr.step: unknown field; allowed: type, low, high",
    ),
    (
        {"optimizer.lr": {"low": 1e-4, "high": 1e-2, "type": "logfloat"}},
        "space.optimizer.lr.type: 'logfloat' is not one of: float, int, categorical",
    ),
    (
        {"optimizer.momentum": {"low": 0.8, "high": 0.9, "condition": {"optimizer.name": "sgd"}}},
        "space.optimizer.momentum.condition: 'optimizer.name' is not a parameter of the space",
    ),
    (
        {
            "optimizer.lr": {"low": 1e-4, "high": 1e-2},
            "optimizer.momentum": {"low": 0.8, "high": 0.9, "condition": {"optimizer.lr": 1e-3}},
        },
        "space.optimizer.momentum.condition: 'optimizer.lr' is a float parameter; "
        "a condition must name a categorical one",
    ),
    (
        {
            "optimizer.name": {"choices": ["adamw", "sgd"]},
            "optimizer.momentum": {
                "low": 0.8,
                "high": 0.9,
                "condition": {"optimizer.name": "lion"},
            },
        },
        "space.optimizer.momentum.condition: 'lion' is not a choice of 'optimizer.name'",
    ),
    (
        {
            "optimizer.name": {"choices": ["adamw", "sgd"], "condition": {"schedule.name": "wsd"}},
            "schedule.name": {"choices": ["cosine", "wsd"], "condition": {"optimizer.name": "sgd"}},
        },
        "space.optimizer.name.condition: conditions form a cycle",
    ),
]


@pytest.mark.parametrize(("space", "expected"), BAD_SPACES, ids=[s[1][:40] for s in BAD_SPACES])
def test_bad_space_is_one_line_naming_the_field(
    tmp_path: Path, space: dict[str, Any], expected: str
) -> None:
    with pytest.raises(StudyError) as caught:
        load_study(write_study(tmp_path, space=space))
    assert str(caught.value).startswith(expected), str(caught.value)


def test_tuple_element_needs_the_tuple_in_the_base(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("steps: 10\noptimizer: {name: adamw, lr: 1.0e-3}\n")  # no betas
    path = write_study(
        tmp_path, base="base.yaml", space={"optimizer.betas.1": {"low": 0.9, "high": 0.99}}
    )
    with pytest.raises(
        StudyError, match=r"^space.optimizer.betas.1: optimizer.betas has no elements"
    ):
        load_study(path)
    fixed = load_study(path, ["overrides.optimizer.betas=[0.9, 0.95]"])
    assert trial_config(fixed, {"optimizer.betas.1": 0.98}, a_stage(steps=1)).optimizer.betas == (
        0.9,
        0.98,
    )


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match=r"^study: '.*nope.yaml' does not exist"):
        load_study(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("space: [1, 2\n")
    with pytest.raises(StudyError, match=r"^study: '.*broken.yaml' is not valid YAML at line"):
        load_study(broken)
    with pytest.raises(StudyError, match=r"^base: '.*missing.yaml' does not exist"):
        load_study(write_study(tmp_path, base="missing.yaml"))
    with pytest.raises(StudyError, match=r"^base: missing; expected the trainer YAML"):
        load_study(write_study(tmp_path, base=None))


def test_bad_base_config_names_the_base(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("steps: 0\n")
    with pytest.raises(StudyError, match=r"^base: base.yaml: steps: input should be greater"):
        load_study(write_study(tmp_path, base="base.yaml"))


def test_study_error_is_what_the_cli_already_catches() -> None:
    # a ValueError, and a trainer ConfigError: `scaleplan` prints it as one line with exit 2
    assert issubclass(StudyError, ValueError) and issubclass(StudyError, ConfigError)


def test_spec_models_accept_their_shorthands() -> None:
    assert ParamSpec(choices=["a", "b"]).type == "categorical"
    assert ParamSpec(type="int", low=1.0, high=8).bounds == (1, 8)
    study_fields = StudyConfig.model_fields
    assert all(field.description for field in study_fields.values())
    assert all(field.description for field in ParamSpec.model_fields.values())


def test_importing_the_study_core_is_cheap() -> None:
    code = (
        "import sys, studies.config, studies.space, studies.stages\n"
        "heavy = [m for m in ('optuna', 'ray', 'torch') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
