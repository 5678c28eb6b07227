"""`scaleplan transfer` (studies.transfer.transfer_config) and the horizon law (studies.horizon):
a tuned proxy's config widened, deepened and lengthened under muP; one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from studies.cli import main
from studies.errors import StudyError
from studies.horizon import HorizonLaw, fit_horizon_law
from studies.transfer import transfer_config
from trainer.config import parse_config

PROXY: dict[str, Any] = {
    "steps": 100,
    "model": {"kind": "gpt", "n_layer": 2, "n_head": 4, "d_model": 32, "tie_embeddings": False},
    "optimizer": {"name": "adamw", "lr": 0.02, "weight_decay": 0.1},
    "schedule": {"warmup_steps": 10},
    "parametrization": {"name": "mup", "base_width": 32},
}


def test_the_horizon_law_recovers_a_power_law_and_its_error() -> None:
    law = fit_horizon_law([(t, 0.5 * t**-0.4) for t in (100, 200, 400, 800)])
    assert law.b == pytest.approx(0.4) and law.a == pytest.approx(math.log(0.5))
    assert law.b_stderr == pytest.approx(0.0, abs=1e-9) and law.horizons == (100, 200, 400, 800)
    assert law.lr(300) == pytest.approx(0.5 * 300**-0.4)
    noisy = fit_horizon_law([(100, 1e-2), (200, 8e-3), (400, 4e-3)])
    assert noisy.b_stderr is not None and noisy.b_stderr > 0
    assert "b = " in noisy.describe() and "3 horizons" in noisy.describe()
    # Bjorck et al.'s form: twice the horizon, the LR x 2^-b
    assert HorizonLaw(a=0.0, b=0.5).shift(1e-2, 100, 200) == pytest.approx(1e-2 / math.sqrt(2))


@pytest.mark.parametrize(
    "optima", [[(100, 1e-2)], [(100, 1e-2), (100, 2e-2)], [(100, 1e-2), (200, -1.0)]]
)
def test_a_horizon_law_needs_two_horizons_and_positive_rates(
    optima: list[tuple[int, float]],
) -> None:
    with pytest.raises(StudyError, match="horizon law: "):
        fit_horizon_law(optima)


def test_width_and_depth_carry_the_tuned_values_over_unchanged() -> None:
    target, notes = transfer_config(PROXY, width=256, depth=4)
    config = parse_config(target)
    assert config.model.d_model == 256 and config.model.n_layer == 4
    assert config.optimizer.lr == 0.02 and config.steps == 100  # muP rescales per layer
    assert config.parametrization.base_width == 32 and config.parametrization.base_depth == 2
    assert any("not transferred: data.batch_size" in n for n in notes)
    assert PROXY["model"]["d_model"] == 32  # the proxy's mapping is left as it was


def test_a_longer_horizon_moves_the_lr_and_stretches_the_schedule() -> None:
    law = HorizonLaw(a=0.0, b=0.3)
    target, notes = transfer_config(PROXY, width=64, steps=400, law=law)
    assert target["steps"] == 400 and target["schedule"]["warmup_steps"] == 40
    assert target["optimizer"]["lr"] == pytest.approx(0.02 * 4**-0.3, rel=1e-3)
    assert any("optimizer.lr: 0.02 at 100 steps" in n and "b = 0.30" in n for n in notes)


def test_an_sp_proxy_becomes_mups_base_width() -> None:
    sp = {**PROXY, "parametrization": {"name": "sp"}}
    target, notes = transfer_config(sp, width=128)
    par = parse_config(target).parametrization
    assert (par.name, par.base_width, par.readout_init) == ("mup", 32, "tp5")  # SP's readout
    assert any("sp proxy" in n for n in notes)


@pytest.mark.parametrize(
    ("change", "kwargs", "message"),
    [
        ({}, {"width": 90}, "--width: 90 is not divisible by model.n_head 4"),
        ({}, {"width": 16}, "--width: 16 is below parametrization.base_width 32"),
        ({}, {"steps": 300}, "--steps: 300 differs from the proxy's 100"),
        (
            {"model": {**PROXY["model"], "tie_embeddings": True}, "parametrization": {}},
            {"width": 64},
            "--from: model.tie_embeddings is true",
        ),
        ({"optimizer": {"name": "sgd", "lr": 0.1}}, {"depth": 4}, "parametrization.base_depth"),
    ],
)
def test_bad_targets_are_one_line_naming_the_field(
    change: dict[str, Any], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(StudyError) as error:
        transfer_config({**PROXY, **change}, **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_command_writes_a_config_that_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = tmp_path / "proxy.yaml"
    proxy.write_text(yaml.safe_dump({**PROXY, "steps": 3, "eval_every": 0, "schedule": {}}))
    wide = tmp_path / "wide.yaml"
    argv = ["transfer", "--from", str(proxy), "--width", "64", "--steps", "6"]
    assert main([*argv, "--horizon-b", "0.5", "--out", str(wide)]) == 0
    printed = capsys.readouterr().out
    assert "model.d_model: 32 -> 64" in printed and f"wrote {wide}" in printed
    assert wide.read_text().startswith("# transferred from")
    assert main(["train", str(wide), "--out", str(tmp_path / "run"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--width", "0"], "--width: 0; expected a positive integer"),
        ([], "--width / --depth / --steps: none given"),
        (["--width", "64", "--horizon-from", "missing.json"], "--horizon-from: 'missing.json'"),
        (["--width", "64", "--from", "no-such-study"], "--from: 'no-such-study' is no file"),
    ],
)
def test_the_commands_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    proxy = tmp_path / "proxy.yaml"
    proxy.write_text(yaml.safe_dump(PROXY))
    code = main(["transfer", "--from", str(proxy), *argv, "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
