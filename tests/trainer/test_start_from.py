"""Continuing a checkpoint under new hyperparameters (``train(start_from=...)``), as Population
Based Training does: weights, optimiser moments, step and curves come from the checkpoint; the
param-group values and the schedule from the new config. Anything else that differs is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_checkpoint import digits as checkpoint_digits

from trainer.checkpoint import checkpoint_path, load_checkpoint
from trainer.config import TrainConfig
from trainer.errors import ConfigError
from trainer.loop import StepInfo, train
from trainer.rundir import build_run
from trainer.schedules import lr_multiplier


def digits(**overrides: Any) -> TrainConfig:
    """test_checkpoint's digits run, with an optimiser and schedule the tests then change."""
    base = {
        "optimizer": {"name": "adamw", "lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.0},
        "schedule": {"name": "cosine", "warmup_steps": 2},
    }
    return checkpoint_digits(**{**base, **overrides})


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


NEW_HYPERPARAMETERS = {
    "optimizer": {"name": "adamw", "lr": 3e-3, "betas": [0.8, 0.9], "weight_decay": 0.05},
    "schedule": {"name": "linear", "warmup_steps": 1},
}


def test_restore_takes_state_from_the_checkpoint_and_values_from_the_config(
    tmp_path: Path,
) -> None:
    train(digits(), out_dir=tmp_path / "donor")
    checkpoint = checkpoint_path(tmp_path / "donor", 3)
    saved = load_checkpoint(checkpoint)
    config = digits(**NEW_HYPERPARAMETERS)

    parts = build_run(config, tmp_path / "new", resume=False, start_from=checkpoint)
    assert not (tmp_path / "new").exists()  # nothing written before the first step
    assert (parts.state.step, parts.state.tokens) == (3, 3 * 16)
    assert parts.state.val_curve == [tuple(p) for p in saved["loop"]["val_curve"]]
    for name, tensor in parts.raw_model.state_dict().items():
        assert torch.equal(tensor, saved["model"][name]), name
    moments = saved["optimizer"]["state"]
    for index, state in enumerate(parts.optimizer.state_dict()["state"].values()):
        assert torch.equal(state["exp_avg"], moments[index]["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], moments[index]["exp_avg_sq"])
        assert float(state["step"]) == 3.0
    # the next update (index 3) uses the new config's lr, betas and decay, on its schedule
    expected_lr = 3e-3 * lr_multiplier(config.schedule, 3, config.steps)
    for group in parts.optimizer.param_groups:
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["initial_lr"] == pytest.approx(3e-3)
        assert tuple(group["betas"]) == (0.8, 0.9)
        assert group["weight_decay"] in (0.0, 0.05)  # no-decay groups stay at 0
    assert any(group["weight_decay"] == 0.05 for group in parts.optimizer.param_groups)
    assert parts.scheduler.last_epoch == 3


def test_a_run_continues_another_from_its_step_with_the_new_lr(tmp_path: Path) -> None:
    straight = train(digits(), out_dir=tmp_path / "straight")
    checkpoint = checkpoint_path(tmp_path / "straight", 3)

    # same config: exactly the straight run's steps 4-6 (weights, moments, RNG, data position)
    same = train(digits(), out_dir=tmp_path / "same", start_from=checkpoint)
    assert same.train_curve == straight.train_curve and same.val_curve == straight.val_curve

    config = digits(**NEW_HYPERPARAMETERS)
    changed = train(config, out_dir=tmp_path / "changed", start_from=checkpoint)
    logged = records(tmp_path / "changed")
    assert [r["step"] for r in logged if "loss" in r] == [4, 5, 6]  # from the donor's step
    for record in logged:
        if "lr" in record:
            expected = 3e-3 * lr_multiplier(config.schedule, record["step"] - 1, config.steps)
            assert record["lr"] == pytest.approx(expected)
    assert changed.steps == 6 and changed.train_curve[:3] == straight.train_curve[:3]
    assert changed.train_curve[3:] != straight.train_curve[3:]
    run = json.loads((tmp_path / "changed" / "run.json").read_text())
    assert run["resumed_from"] == str(checkpoint)


def test_a_callback_can_save_the_step_it_sees(tmp_path: Path) -> None:
    saved: list[Path] = []

    def save_at_4(info: StepInfo) -> None:
        if info.step == 4 and info.save_checkpoint is not None:
            saved.append(info.save_checkpoint())

    train(digits(), [save_at_4], out_dir=tmp_path / "run")
    assert saved == [checkpoint_path(tmp_path / "run", 4)]
    assert load_checkpoint(saved[0])["loop"]["step"] == 4


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"model": {"kind": "mlp", "width": 32, "dropout": 0.1}}, "model.width"),
        ({"optimizer": {"name": "sgd", "lr": 1e-2}}, "optimizer.name"),
        ({"seed": 7}, "seed"),
    ],
    ids=["model", "optimizer", "seed"],
)
def test_only_hyperparameters_may_change(
    tmp_path: Path, changes: dict[str, Any], field: str
) -> None:
    train(digits(), out_dir=tmp_path / "donor")
    with pytest.raises(ConfigError, match=f"cannot continue under this config: field {field} "):
        train(
            digits(**changes),
            out_dir=tmp_path / "new",
            start_from=checkpoint_path(tmp_path / "donor", 3),
        )


def test_a_cool_down_branches_off_a_stable_run_at_another_horizon(tmp_path: Path) -> None:
    # warmup-stable-decay: a 12-step run checkpointed at step 4 (checkpoint_at) in its stable
    # phase; a 6-step run continues from there and decays over its own last 2 steps
    wsd = {"name": "wsd", "warmup_steps": 1, "decay_fraction": 0.25, "decay_shape": "linear"}
    stable = digits(steps=12, checkpoint_every=0, checkpoint_at=[4], schedule=wsd, eval_every=4)
    train(stable, out_dir=tmp_path / "stable")
    names = sorted(p.name for p in (tmp_path / "stable" / "checkpoints").iterdir())
    assert names == ["step_0000004.pt", "step_0000012.pt"]
    short = {**wsd, "decay_fraction": 2 / 6}
    branch = digits(steps=6, schedule=short, eval_every=2)
    result = train(
        branch, out_dir=tmp_path / "branch", start_from=checkpoint_path(tmp_path / "stable", 4)
    )
    assert result.steps == 6
    lrs = [(r["step"], r["lr"]) for r in records(tmp_path / "branch") if "lr" in r]
    peak = branch.optimizer.lr
    assert [step for step, _ in lrs] == [5, 6]
    # updates 4 and 5 (0-based) are the branch's own decay, not the stable run's plateau
    for step, lr in lrs:
        assert lr == pytest.approx(peak * lr_multiplier(branch.schedule, step - 1, 6))
    assert lrs[-1][1] < lrs[0][1] <= peak
    # its history up to the branch is the stable run's
    stable_curve = json.loads((tmp_path / "stable" / "result.json").read_text())["val_curve"]
    assert result.val_curve[:2] == [tuple(p) for p in stable_curve[:2]]
