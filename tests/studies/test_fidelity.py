"""A fidelity per stage: stage overrides (a cheaper proxy of the target), budgets in FLOPs, a
study's best taken from the target's setting only, and what every stage cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_study import TINY_BASE

from studies.cli import main
from studies.config import ParamSpec, StudyConfig
from studies.errors import StudyError
from studies.records import StageCounts, StageReport, study_ranking, trial_record
from studies.study_file import load_study
from studies.trainer_config import trial_config
from trainer.config import parse_config
from trainer.rundir import flops_per_step

PROXY_STUDY: dict[str, Any] = {
    "name": "proxy",
    "base": "base.yaml",
    "mlflow": False,
    "space": {"optimizer.lr": {"low": 1e-3, "high": 3e-2, "log": True}},
    "stages": [
        {
            "name": "proxy",
            "sampler": "sobol",
            "trials": 4,
            "budget": {"flops": 4.0e7},
            "overrides": {"model.d_model": 8, "data.block_size": 16},
        },
        {"name": "target", "sampler": "tpe", "trials": 2, "budget": {"steps": 6}, "narrow": {}},
    ],
}


def write_study(folder: Path, **changes: Any) -> Path:
    (folder / "base.yaml").write_text(yaml.safe_dump(TINY_BASE))
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({**PROXY_STUDY, **changes}, sort_keys=False))
    return path


def with_stage(index: int, **changes: Any) -> list[dict[str, Any]]:
    stages = [dict(stage) for stage in PROXY_STUDY["stages"]]
    stages[index].update(changes)
    return stages


def test_a_proxy_stage_trains_its_own_settings_for_its_flops(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path))
    proxy, target = study.stages
    proxy_config = trial_config(study, {"optimizer.lr": 0.01}, proxy)
    target_config = trial_config(study, {"optimizer.lr": 0.01}, target)
    assert (proxy_config.model.d_model, proxy_config.data.block_size) == (8, 16)
    assert (target_config.model.d_model, target_config.data.block_size) == (16, 32)
    assert proxy_config.optimizer.lr == target_config.optimizer.lr == 0.01
    per_step = flops_per_step(proxy_config)
    assert proxy_config.steps == int(4.0e7 // per_step) and proxy_config.steps >= 1
    assert target_config.steps == 6


def test_flops_per_step_is_the_trainers_own_count() -> None:
    config = parse_config(TINY_BASE)
    # 6N + 12 * n_layer * d_model * block_size per token (the GPT's flops_per_token), times
    # batch_size * block_size tokens per step
    n = sum(
        p.numel()
        for name, p in _tiny_gpt(config).named_parameters()
        if not name.startswith(("wte", "wpe"))
    )
    per_token = 6 * n + 12 * 1 * 16 * 32
    assert flops_per_step(config) == pytest.approx(per_token * 4 * 32)
    doubled = config.model_copy(update={"grad_accum_steps": 2})
    assert flops_per_step(doubled) == pytest.approx(2 * flops_per_step(config))


def _tiny_gpt(config: Any) -> torch.nn.Module:
    from trainer.models import build_model

    return build_model(config.model, vocab_size=256)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"stages": with_stage(0, overrides={"optimizer.lr": 0.01})},
            "stages.proxy.overrides.optimizer.lr: optimizer.lr is searched (space.optimizer.lr); "
            "a key is either searched or overridden, not both",
        ),
        (
            {"stages": with_stage(0, overrides={"model.widht": 8})},
            "stages.proxy.overrides.model.widht: not a trainer config key",
        ),
        (
            {"stages": with_stage(0, budget={"flops": 1000.0})},
            "stages.proxy.budget.flops: 1000 is less than one step",
        ),
        (
            {"stages": with_stage(0, budget={"flops": 1.0e9, "steps": 3})},
            "stages.proxy.budget.steps: set exactly one of steps, tokens and flops",
        ),
        (
            {"stages": with_stage(0, overrides={"model.d_model": 7})},
            "stages.proxy.overrides: with base",
        ),
    ],
)
def test_bad_stage_fidelities_are_one_line(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(StudyError) as error:
        load_study(write_study(tmp_path, **changes))
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)


def test_a_callable_objective_takes_its_fidelity_in_its_budget(tmp_path: Path) -> None:
    raw = {
        "name": "c",
        "objective": {"callable": "mod:f"},
        "space": {"x": {"low": 0.0, "high": 1.0}},
        "stages": [
            {
                "name": "a",
                "sampler": "random",
                "trials": 1,
                "budget": {"fidelity": 0.5},
                "overrides": {"model.d_model": 8},
            }
        ],
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(StudyError, match=r"^stages.a.overrides: trainer config keys, but the "):
        load_study(path)


def test_set_reaches_a_stages_dotted_override(tmp_path: Path) -> None:
    study = load_study(write_study(tmp_path), ["stages.proxy.overrides.model.d_model=12"])
    assert study.stages[0].overrides == {"model.d_model": 12, "data.block_size": 16}


def _report(name: str, index: int, value: float | None, overrides: dict[str, Any]) -> StageReport:
    trials = []
    if value is not None:
        trials.append(
            trial_record(
                stage=name,
                number=0,
                state="complete",
                value=value,
                params={"x": value},
                steps=10,
                flops=1.0e9,
                seconds=2.0,
            )
        )
    fidelity: dict[str, Any] = {"steps": 10 * (index + 1)}
    if overrides:
        fidelity["overrides"] = overrides
    return StageReport(
        name=name,
        index=index,
        sampler="random",
        pruner="none",
        budget_steps=10 * (index + 1),
        space={"x": ParamSpec(low=0.0, high=10.0)},
        notes=[],
        counts=StageCounts(requested=1),
        trials=trials,
        meta={"fidelity": fidelity},
    )


@pytest.mark.parametrize(
    ("stages", "chosen"),
    [
        # the proxy's better value does not count: it trained another model
        ([("proxy", 0.5, {"model.d_model": 8}), ("target", 2.0, {})], "target"),
        # the target has nothing complete: a shorter stage of the target stands in, not a proxy
        ([("short", 3.0, {}), ("proxy", 0.5, {"model.d_model": 8}), ("target", None, {})], "short"),
        ([("proxy", 0.5, {"model.d_model": 8}), ("target", None, {})], None),
    ],
)
def test_the_best_is_never_a_proxys(stages: list[Any], chosen: str | None) -> None:
    reports = [_report(name, i, value, o) for i, (name, value, o) in enumerate(stages)]
    stage, ranked = study_ranking(reports, "minimize")
    assert (stage.name if stage else None) == chosen
    assert [t["stage"] for t in ranked] == ([chosen] if chosen else [])


def test_a_proxy_study_runs_and_reports_its_cost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_study(
        tmp_path, mlflow=True, tracking_uri=tracking, overrides={"tracking.enabled": True}
    )
    runs = tmp_path / "runs"
    assert main(["sweep", str(path), "--json", "--runs-dir", str(runs)]) == 0
    summary = json.loads(capsys.readouterr().out)
    proxy, target = summary["stages"]
    assert proxy["overrides"] == {"model.d_model": 8, "data.block_size": 16}
    assert target["overrides"] == {}
    study: StudyConfig = load_study(path)
    per_trial = flops_per_step(trial_config(study, {}, study.stages[0])) * proxy["budget_steps"]
    assert proxy["cost_per_trial"]["flops"] == pytest.approx(per_trial)
    assert proxy["cost"]["flops"] == pytest.approx(per_trial * proxy["n_finished"])
    assert summary["flops"] == pytest.approx(proxy["cost"]["flops"] + target["cost"]["flops"])
    assert proxy["cost"]["seconds"] > 0 and summary["trial_seconds"] > 0
    # the parent run in MLflow carries the same costs
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(tracking).get_run(summary["mlflow_parent_run_id"]).data.metrics
    assert logged["cost/proxy/flops"] == pytest.approx(proxy["cost"]["flops"])
    assert logged["cost/proxy/flops_per_trial"] == pytest.approx(per_trial)
    assert logged["cost/flops"] == pytest.approx(summary["flops"])
    assert logged["cost/target/seconds"] == pytest.approx(target["cost"]["seconds"])
    # the best is the target's, and its config is the target's model
    assert summary["top"][0]["stage"] == "target"
    best = yaml.safe_load(Path(summary["best_config"]).read_text())
    assert best["model"]["d_model"] == 16 and best["data"]["block_size"] == 32
    # the stage table shows the budget, the proxy's settings and the cost
    assert main(["study", "show", "proxy", "--runs-dir", str(runs)]) == 0
    table = capsys.readouterr().out
    assert "(4e+07 FLOPs)" in table and "FLOPs/trial" in table
    assert "proxy: model.d_model=8, data.block_size=16" in table
    # a resumed study whose proxy changed is one line
    changed = write_study(
        tmp_path, stages=with_stage(0, overrides={"model.d_model": 12}), mlflow=False
    )
    assert main(["sweep", str(changed), "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "stages.proxy.overrides: {'model.d_model': 12}, but the stage was started with" in err
