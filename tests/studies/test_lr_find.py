"""The LR range test: its reading on a loss with a known cliff, the CLI, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from studies.cli import main
from studies.errors import StudyError
from studies.lr_find import RangeTest
from trainer.config import load_config
from trainer.schedules import ScheduleConfig, lr_multiplier

# A noisy quadratic: curvatures from 1 down to 1/30, so plain SGD diverges above lr = 2 / 1
# (the cliff), and small-curvature directions reward an lr close to it.
CURVATURE = np.logspace(0, -1.5, 20)
NOISE = 0.3


def quadratic_run(lrs, seed: int = 0, batch: int = 8):
    """SGD from 0 towards w* with the given lr per step; yields the loss before each update."""
    rng = np.random.default_rng(seed)
    w_star = rng.normal(size=CURVATURE.size)
    w = np.zeros(CURVATURE.size)
    for lr in lrs:
        d = w - w_star
        loss = 0.5 * float(np.sum(CURVATURE * d * d))
        yield loss
        if not math.isfinite(loss) or loss > 1e12:
            return
        noise = NOISE * np.sqrt(CURVATURE) * rng.normal(size=(batch, CURVATURE.size)).mean(0)
        w = w - lr * (CURVATURE * d + noise)


def one_cycle_final_loss(peak: float, steps: int = 200, seed: int = 0) -> float:
    config = ScheduleConfig(name="one_cycle")
    lrs = [peak * lr_multiplier(config, s, steps) for s in range(steps)] + [0.0]
    *_, last = quadratic_run(lrs, seed)
    return last if math.isfinite(last) and len(lrs) else math.inf


def test_suggestion_is_within_a_factor_of_two_of_the_best_one_cycle_peak() -> None:
    peaks = np.logspace(-1.5, 0.7, 23)
    finals = [np.median([one_cycle_final_loss(p, seed=s) for s in range(3)]) for p in peaks]
    best = float(peaks[int(np.argmin(finals))])
    assert 0.5 < best <= 2.0  # the cliff is at 2: the best peak sits just below it
    for seed in range(3):
        test = RangeTest(1e-4, 100.0, 100)
        for loss in quadratic_run((test.lr(s) for s in range(test.steps)), seed=seed + 10):
            if test.record(loss):
                break
        assert test.stopped is not None and test.lrs[-1] < 20  # stopped past the cliff
        suggested = test.suggestions()["suggested_lr"]
        assert best / 2 <= suggested <= 2 * best, (seed, suggested, best)


def test_range_test_sweeps_exponentially_and_stops_on_nan() -> None:
    test = RangeTest(1e-3, 1.0, 31)
    assert test.lr(0) == pytest.approx(1e-3) and test.lr(30) == pytest.approx(1.0)
    assert test.lr(15) == pytest.approx(math.sqrt(1e-3))
    assert not test.record(2.0)
    assert test.record(math.nan)
    assert "nan" in (test.stopped or "")


@pytest.mark.parametrize(
    ("low", "high", "steps", "message"),
    [
        (1.0, 1e-3, 100, r"--min / --max: 1 / 0.001; .*expected 0 < min < max"),
        (0.0, 1.0, 100, r"expected 0 < min < max"),
        (1e-5, 1.0, 5, r"--steps: 5; expected at least 20"),
    ],
)
def test_bad_ranges_are_one_line(low: float, high: float, steps: int, message: str) -> None:
    with pytest.raises(StudyError, match=message):
        RangeTest(low, high, steps)


TINY = {
    "steps": 10,
    "model": {"kind": "gpt", "n_layer": 1, "n_head": 2, "d_model": 32},
    "data": {"block_size": 32, "batch_size": 8},
    "optimizer": {"name": "adamw", "lr": 1e-3},
    "schedule": {"name": "cosine", "warmup_steps": 2},
}


def test_cli_prints_json_writes_the_plot_and_a_one_cycle_config(tmp_path: Path, capsys) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    written = tmp_path / "one-cycle.yaml"
    argv = [
        "lr-find",
        str(config),
        "--min",
        "1e-5",
        "--max",
        "10",
        "--steps",
        "40",
        "--out",
        str(tmp_path / "find"),
        "--write-config",
        str(written),
        "--json",
    ]
    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert main(argv) == 0  # a rerun into the same folder replaces the range test
    assert json.loads(capsys.readouterr().out)["curve"] == payload["curve"]
    assert 1e-5 <= payload["suggested_lr"] <= 10
    assert payload["steepest"] > 0 and payload["minimum_tenth"] > 0
    assert len(payload["curve"]) == payload["steps_run"] <= 40
    assert Path(payload["plot"]).is_file()
    assert (
        json.loads((tmp_path / "find" / "lr_find.json").read_text())["suggested_lr"]
        == (payload["suggested_lr"])
    )
    tuned = load_config(written)
    assert tuned.schedule.name == "one_cycle"
    assert tuned.optimizer.lr == pytest.approx(payload["suggested_lr"])
    assert tuned.steps == TINY["steps"] and tuned.model.d_model == 32  # the rest as it was


def test_cli_bad_range_exits_2_without_writing(tmp_path: Path, capsys) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "find"
    assert main(["lr-find", str(config), "--min", "1", "--max", "0.1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "scaleplan lr-find: error: --min / --max: 1 / 0.1; the range test sweeps from --min up "
        "to --max: expected 0 < min < max"
    ]
    assert not out.exists()


def write_around_study(tmp_path: Path, space: dict) -> Path:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "tracking": {"enabled": False}}))
    study = {
        "name": "around",
        "base": "tiny.yaml",
        "space": space,
        "stages": [{"name": "coarse", "sampler": "random", "trials": 2, "budget": {"steps": 6}}],
        "mlflow": False,
    }
    path = tmp_path / "around.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_a_study_range_centred_on_the_range_test_is_kept_for_the_resume(tmp_path: Path) -> None:
    from studies.sweep import prepare_study, run_sweep_reports

    path = write_around_study(tmp_path, {"optimizer.lr": {"around": "lr_find", "factor": 4}})
    runs = tmp_path / "runs"
    _, reports = run_sweep_reports(prepare_study(path), runs_dir=runs)
    kept = runs / "around" / "lr-find" / "lr_find.json"
    suggestion = json.loads(kept.read_text())["suggested_lr"]
    spec = reports[0].space["optimizer.lr"]
    assert spec.bounds == pytest.approx((suggestion / 4, suggestion * 4)) and spec.log
    assert all(spec.contains(t["params"]["optimizer.lr"]) for t in reports[0].trials)
    before = kept.stat().st_mtime_ns
    _, again = run_sweep_reports(prepare_study(path), runs_dir=runs)  # resume: nothing to run
    assert kept.stat().st_mtime_ns == before and len(again[0].trials) == 2


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            {"optimizer.lr": {"around": "lr_find", "low": 1e-4}},
            "space.optimizer.lr.low: not used with around: lr_find",
        ),
        (
            {"optimizer.weight_decay": {"around": "lr_find"}},
            "space.optimizer.weight_decay.around: lr_find suggests optimizer.lr",
        ),
        ({"optimizer.lr": {"low": 1e-4, "high": 1e-2, "factor": 3}}, "factor: only with around"),
    ],
)
def test_around_mistakes_are_one_line(tmp_path: Path, capsys, space: dict, message: str) -> None:
    path = write_around_study(tmp_path, space)
    assert main(["sweep", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
