"""Population Based Training on the Ray backend, and ``scaleplan study show|best|export`` on a
Ray study: a trial that PBT exploits continues from the donor's checkpoint at the donor's step
with its own, new learning rate; a finished Ray stage is read back without Ray; an unfinished
one is shown as such; pbt on the Optuna backend is one line and exit 2.

The slow test runs one real PBT stage (4 trials of a tiny GPT, 20 steps, one decision at step
10) on a local Ray with 2 CPUs; the `study` command tests read what it left behind.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from test_ray_backend import make_study
from test_sweep_cli import write_study

from planner.runs import load_runs
from studies.backends.ray.adapters import make_scheduler
from studies.backends.ray.pbt import CHECKPOINT_META, pbt_mutations
from studies.backends.ray.records import META_FILE
from studies.backends.ray.runner import run_ray
from studies.cli import main
from studies.config import ParamSpec, PrunerSpec
from studies.sweep import StageReport
from trainer.checkpoint import load_checkpoint
from trainer.config import parse_config
from trainer.schedules import lr_multiplier

PBT_STAGE = {
    "name": "pbt",
    "sampler": "random",
    "trials": 4,
    "budget": {"steps": 20},
    "pruner": {"name": "pbt", "interval": 10, "quantile": 0.25},
}


@pytest.fixture(scope="module")
def pbt_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StageReport]:
    """One finished PBT stage (synchronous: all 4 trials decide together at step 10, so the
    worst one always takes over a best one's weights), MLflow off."""
    folder = tmp_path_factory.mktemp("pbt")
    study = make_study(folder, [PBT_STAGE], overrides={"tracking.enabled": False})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (report,) = run_ray(study, runs_dir=folder / "runs")
    finally:
        torch.set_num_threads(threads)
    return folder, report


# ---------------------------------------------------------------------------------------------
# Without Ray running


def test_pbt_perturbs_only_hyperparameters_inside_the_space() -> None:
    """Mutations cover the optimiser and schedule keys (a model key must stay the donor's, as
    its weights do); a perturbed value stays in range; the exploiting trial keeps its number."""
    space = {
        "optimizer.lr": ParamSpec(low=1e-4, high=1e-2, log=True),
        "optimizer.name": ParamSpec(choices=["adamw", "lion"]),
        "schedule.warmup_steps": ParamSpec(type="int", low=0, high=10),
        "model.d_model": ParamSpec(type="int", low=16, high=64),
    }
    assert set(pbt_mutations(space)) == {"optimizer.lr", "schedule.warmup_steps"}
    scheduler = make_scheduler(PrunerSpec(name="pbt", resample_probability=0.0), 20, 5, space=space)
    assert scheduler._perturbation_interval == 5  # interval None: every evaluation
    donor = SimpleNamespace(
        config={
            "_scaleplan_number": 1,
            "optimizer.lr": 1e-2,  # x 1.2 would leave the range
            "optimizer.name": "lion",
            "schedule.warmup_steps": 10,
            "model.d_model": 32,
        }
    )
    worst = SimpleNamespace(config={**donor.config, "_scaleplan_number": 3})
    for _ in range(20):
        config, _ = scheduler._get_new_config(worst, donor)
        assert config["_scaleplan_number"] == 3
        assert 1e-4 <= config["optimizer.lr"] <= 1e-2
        assert config["schedule.warmup_steps"] in range(0, 11)
        assert (config["optimizer.name"], config["model.d_model"]) == ("lion", 32)


def test_pbt_decides_with_its_own_seeded_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune's PBT draws donors and perturbations from `random` and resamples from NumPy's
    global generator: the scheduler swaps in its own state, seeded by the study, for each
    decision, so the same seed repeats the same choices and the caller's generators are
    left as they were."""
    from ray.tune.schedulers import PopulationBasedTraining

    def decide(self: Any, trial: str) -> tuple[float, float]:  # stands in for Tune's decision
        return random.random(), float(np.random.random_sample())

    monkeypatch.setattr(PopulationBasedTraining, "_checkpoint_or_exploit", decide)
    space = {"optimizer.lr": ParamSpec(low=1e-4, high=1e-2, log=True)}

    def decisions(seed: int) -> list[tuple[float, float]]:
        scheduler = make_scheduler(PrunerSpec(name="pbt"), 20, 5, space=space, seed=seed)
        return [scheduler._checkpoint_or_exploit(f"trial {n}") for n in range(3)]

    random.seed(123)
    np.random.seed(123)
    outer = random.getstate(), np.random.get_state()
    first = decisions(seed=7)
    assert len(set(first)) == 3  # the state carries over from one decision to the next
    assert decisions(seed=7) == first and decisions(seed=8) != first
    assert random.getstate() == outer[0]
    assert np.array_equal(np.random.get_state()[1], outer[1][1])


def test_pbt_on_the_optuna_backend_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_study(tmp_path)
    code = main(["sweep", str(path), "--set", "stages.coarse.pruner=pbt"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip() == (
        "scaleplan sweep: error: stages.coarse.pruner.name: pbt needs backend: ray (backend is "
        "optuna); with optuna use asha, hyperband, median or none"
    )
    assert main(["sweep", str(path), "--set", "stages.coarse.pruner=annealing"]) == 2
    assert "stages.coarse.pruner.name: 'annealing' is not one of" in capsys.readouterr().err


def test_an_unfinished_ray_stage_is_shown_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stage whose sweep is still running (or was stopped) has settings but no records."""
    stage = tmp_path / "runs" / "half" / "ray" / "half-coarse"
    stage.mkdir(parents=True)
    meta = {"index": 0, "stage": "coarse", "study": "half", "sampler": "sobol"}
    meta |= {"pruner": "asha", "trials": 6, "budget_steps": 10, "metric": "val_loss"}
    meta |= {"direction": "minimize", "space": {"optimizer.lr": {"low": 1e-4, "high": 0.1}}}
    (stage / META_FILE).write_text(json.dumps(meta))
    assert main(["study", "show", "half", "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "0/6" in out and "stage coarse: 0 of 6 trials finished" in out
    assert main(["study", "best", "half", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "study: 'half' has no complete trial yet" in capsys.readouterr().err
    assert main(["study", "show", "other", "--runs-dir", str(tmp_path / "runs")]) == 2
    missing = capsys.readouterr().err.strip()
    assert missing.endswith("other/optuna.journal; run `scaleplan sweep` first")
    ray = str(tmp_path / "runs" / "half" / "ray")
    assert main(["study", "show", "other", "--storage", ray]) == 2
    assert capsys.readouterr().err.strip() == (
        f"scaleplan study: error: study: no study 'other' in {ray}; studies there: half"
    )


# ---------------------------------------------------------------------------------------------
# On a local Ray


def _tune_checkpoints(storage: Path) -> dict[tuple[int, int], Path]:
    """(trial number, step) -> the folder of each Tune checkpoint the PBT trials reported."""
    found = {}
    for path in storage.glob(f"trial_*/checkpoint_*/{CHECKPOINT_META}"):
        meta = json.loads(path.read_text())
        found[(meta["number"], meta["step"])] = path.parent
    return found


def _takeover(trial: dict[str, Any]) -> tuple[int, int]:
    match = re.fullmatch(r"trial (\d+) at step (\d+)", trial["continued_from"] or "")
    assert match, trial["continued_from"]
    return int(match.group(1)), int(match.group(2))


@pytest.mark.slow
def test_an_exploited_trial_continues_from_the_donors_step_with_its_new_lr(
    pbt_study: tuple[Path, StageReport],
) -> None:
    folder, report = pbt_study
    assert [t["number"] for t in report.trials] == [0, 1, 2, 3]
    assert {t["state"] for t in report.trials} == {"complete"}  # PBT stops no trial
    assert all(t["steps"] == 20 and t["reason"] is None for t in report.trials)
    exploited = [t for t in report.trials if t["continued_from"]]
    assert len(exploited) == 1, report.trials  # quantile 0.25 of 4: the worst one, once
    trial = exploited[0]
    donor, step = _takeover(trial)
    assert donor != trial["number"] and step == 10

    # the donor's checkpoint that PBT handed over, as Tune kept it
    storage = folder / "runs" / "raytest" / "ray" / "raytest-pbt"
    donor_state = load_checkpoint(next(_tune_checkpoints(storage)[(donor, step)].glob("*.pt")))
    donor_lr = donor_state["config"]["optimizer"]["lr"]

    # the trial's run: its own (perturbed) lr, from the donor's step 10 on, with its curve
    run = Path(trial["out_dir"])
    config = parse_config(yaml.safe_load((run / "config.yaml").read_text()))
    assert config.optimizer.lr == pytest.approx(trial["params"]["optimizer.lr"])
    assert config.optimizer.lr != pytest.approx(donor_lr)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert min(r["step"] for r in records) > step
    for record in records:
        if "lr" in record:
            multiplier = lr_multiplier(config.schedule, record["step"] - 1, config.steps)
            assert record["lr"] == pytest.approx(config.optimizer.lr * multiplier)
    result = json.loads((run / "result.json").read_text())
    before = [point for point in result["val_curve"] if point[0] <= step]
    assert before == donor_state["loop"]["val_curve"]  # the donor's history, carried over
    assert result["steps"] == 20 and result["val_curve"][-1][0] == 20


@pytest.mark.slow
def test_study_show_best_export_read_a_ray_study(
    pbt_study: tuple[Path, StageReport], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, report = pbt_study
    runs = str(folder / "runs")
    best = min(report.trials, key=lambda t: t["value"])

    assert main(["study", "show", "raytest", "--runs-dir", runs]) == 0
    out = capsys.readouterr().out
    assert "Study raytest (val_loss, minimize)" in out and "Best trials (stage pbt)" in out
    assert "4/4" in out and "continued from" in out
    assert main(["study", "show", str(folder / "study.yaml"), "--runs-dir", runs, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["best_value"] == pytest.approx(best["value"])
    assert [(s["name"], s["pruner"], s["n_complete"]) for s in shown["stages"]] == [
        ("pbt", "pbt", 4)
    ]

    assert main(["study", "best", "raytest", "--runs-dir", runs]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"# Best trial of study 'raytest': stage pbt, trial {best['number']}")
    assert parse_config(yaml.safe_load(text)).optimizer.lr == pytest.approx(
        best["params"]["optimizer.lr"]
    )

    out_csv = tmp_path / "trials.csv"
    storage = str(folder / "runs" / "raytest" / "ray")
    assert main(["study", "export", "raytest", "--storage", storage, "--out", str(out_csv)]) == 0
    assert len(load_runs(out_csv)) == 4  # what `scaleplan fit` reads
    rows = out_csv.read_text().splitlines()
    assert rows[0].startswith("params,tokens,loss,study,stage,number,state,value,steps,")
    assert sum("at step 10" in row for row in rows[1:]) == 1
