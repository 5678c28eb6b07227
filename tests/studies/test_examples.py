"""The example objectives of studies/configs/examples: their published numbers, the fidelity
knob that moves their optimum, and their study files run end to end."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from studies.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "studies" / "configs" / "examples"
sys.path.insert(0, str(EXAMPLES))
import multifidelity  # noqa: E402


@pytest.mark.parametrize("point", [(-math.pi, 12.275), (math.pi, 2.275), (9.42478, 2.475)])
def test_branin_has_its_published_minimum_at_full_fidelity(point: tuple[float, float]) -> None:
    # Dixon and Szego 1978: 0.397887 at the three minimisers
    assert multifidelity.branin_value(*point) == pytest.approx(0.397887, abs=1e-5)
    trial = SimpleNamespace(budget={"fidelity": 1.0}, seed=0, number=3)
    assert multifidelity.branin(dict(zip(("x1", "x2"), point, strict=True)), trial) == (
        pytest.approx(0.397887, abs=1e-5)
    )


def test_low_fidelity_moves_the_branin_minimum() -> None:
    grid = [(x1 / 20, x2 / 20) for x1 in range(-100, 201) for x2 in range(0, 301)]
    x1, x2 = min(grid, key=lambda p: multifidelity.branin_value(*p, 0.3))
    full = [(-math.pi, 12.275), (math.pi, 2.275), (9.42478, 2.475)]
    # at z = 0.3 none of the full-fidelity minimisers is where the minimum is
    assert min(math.dist((x1, x2), p) for p in full) > 0.2


def test_the_learning_curves_best_lr_falls_with_the_horizon() -> None:
    def best(steps: int) -> float:
        grid = [10 ** (k / 50) for k in range(-200, 1)]
        return min(grid, key=lambda lr: multifidelity.learning_curve_value(lr, 0.1, steps))

    assert best(25) == pytest.approx(multifidelity.best_lr(25), rel=0.05)
    assert best(400) == pytest.approx(multifidelity.best_lr(400), rel=0.05)
    assert best(25) / best(400) == pytest.approx(4.0, rel=0.1)  # (400/25) ** 0.5


@pytest.mark.parametrize("name", ["branin", "learning-curve"])
def test_the_example_studies_run(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = EXAMPLES / f"{name}.yaml"
    args = ["--set", "stages.coarse.trials=8", "--set", "stages.fine.trials=6"]
    code = main(["sweep", str(path), "--json", "--runs-dir", str(tmp_path), *args])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_complete"] >= 10
    assert summary["top"][0]["stage"] == "fine"
    # narrowing a callable's space may widen it, never past the domain the study declares
    declared = yaml.safe_load(path.read_text())["space"]
    for name, text in summary["stages"][1]["space"].items():
        low, high = (float(v) for v in re.findall(r"[-+0-9.e]+", text)[:2])
        assert declared[name]["low"] <= low < high <= declared[name]["high"]
