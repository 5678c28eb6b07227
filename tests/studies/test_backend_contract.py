"""The backend contract: every backend in `studies.backends.BACKENDS` runs the same study of a
callable objective to the same counts, derives stage 2's space by the same narrowing of its
stage-1 records, records failures with their reason and pruned trials as pruned, and after a
SIGKILL the same command ends with exactly the requested number of trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from studies.backends import BACKENDS, load_stage_reports
from studies.config import NarrowSpec
from studies.records import StageReport
from studies.stages import narrow_space
from studies.study_file import load_study
from studies.sweep import run_sweep_reports

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

STAGES = [
    {
        "name": "coarse",
        "sampler": "sobol",
        "trials": 12,
        "budget": {"steps": 9},
        "pruner": {"name": "asha", "min_resource": 1, "reduction_factor": 3},
    },
    {"name": "fine", "sampler": "tpe", "trials": 4, "budget": {"steps": 9}, "narrow": {"top_k": 3}},
]


def write_study(folder: Path, backend: str, stages: list[dict[str, Any]] = STAGES) -> Path:
    """The contract study beside a copy of its objective's module (imported from there)."""
    (folder / "contract_objective.py").write_text((HERE / "contract_objective.py").read_text())
    study = {
        "name": "contract",
        "objective": {"callable": "contract_objective:bowl", "direction": "minimize"},
        "space": {"x": {"low": 0.0, "high": 1.0}, "y": {"low": 0.0, "high": 1.0}},
        "stages": stages,
        "backend": backend,
        "mlflow": False,
        "ray": {"num_cpus": 1},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[StageReport]]:
    """The contract study run once on every backend."""
    reports = {}
    for backend in BACKENDS:
        folder = tmp_path_factory.mktemp(backend)
        study = load_study(write_study(folder, backend))
        _, reports[backend] = run_sweep_reports(study, runs_dir=folder / "runs")
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_stage_ends_with_its_requested_trials(
    ran: dict[str, list[StageReport]], backend: str
) -> None:
    reports = ran[backend]
    assert [r.name for r in reports] == ["coarse", "fine"]
    for report, stage in zip(reports, STAGES, strict=True):
        assert report.counts.finished == stage["trials"] == len(report.trials)
        assert report.counts.interrupted == 0
        assert {t["budget"]["steps"] for t in report.trials} == {9}


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_stage_two_is_the_same_narrowing_of_stage_one(
    ran: dict[str, list[StageReport]], backend: str
) -> None:
    coarse, fine = ran[backend]
    narrow = NarrowSpec.model_validate(STAGES[1]["narrow"])
    scored = [(t["params"], t["value"]) for t in coarse.trials]
    space, warm, _ = narrow_space(coarse.space, scored, narrow, "minimize")
    assert fine.space == space
    # the best earlier trials inside the new space are measured again first
    first = sorted(fine.trials, key=lambda t: t["number"])[: len(warm)]
    assert [t["params"] for t in first] == warm


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_failures_carry_their_reason_and_pruned_trials_are_pruned(
    ran: dict[str, list[StageReport]], backend: str
) -> None:
    trials = [t for r in ran[backend] for t in r.trials]
    for trial in trials:
        x, y = trial["params"]["x"], trial["params"]["y"]
        if x > 0.9:
            assert trial["state"] == "failed"
            assert trial["reason"] == f"ValueError: x {x:.3f} is past the cliff"
        elif x < 0.05:
            assert (trial["state"], trial["reason"]) == ("failed", "returned nan")
        elif y > 0.95:
            assert trial["state"] == "failed"
            assert trial["reason"] == "returned 'not a number', not a number"
        elif trial["state"] == "pruned":
            assert trial["reason"].startswith("pruned at step ")
            assert trial["value"] is None and trial["last_value"] is not None
            assert trial["intermediate"][-1][0] < 9
        else:
            assert trial["state"] == "complete"
            assert trial["value"] == pytest.approx((x - 0.3) ** 2 + (y - 0.6) ** 2)
    states = {t["state"] for t in trials}
    assert {"complete", "pruned", "failed"} <= states


@pytest.mark.slow
def test_the_backends_agree_on_counts(ran: dict[str, list[StageReport]]) -> None:
    counts = {
        backend: [(r.counts.requested, r.counts.finished) for r in reports]
        for backend, reports in ran.items()
    }
    assert len(set(map(tuple, counts.values()))) == 1, counts


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_reading_a_study_back_gives_the_records_the_sweep_had(
    ran: dict[str, list[StageReport]], backend: str
) -> None:
    reports = ran[backend]
    trials = reports[0].trials
    folder = Path(str(trials[0]["out_dir"])).parents[3]
    study = load_study(folder / "study.yaml")
    read = load_stage_reports("contract", study.resolved_storage(folder / "runs"))
    assert [[(t["number"], t["state"], t["value"]) for t in r.trials] for r in read] == [
        [(t["number"], t["state"], t["value"]) for t in r.trials] for r in reports
    ]


# Ray's instance of this clause is tests/studies/test_ray_backend.py's
# test_same_command_after_kill_resumes_the_stage (the same kill and count, with its failed
# trials and GPU shares): one Ray kill-and-resume in the suite, not two (each is ~40 s of CI).
@pytest.mark.slow
@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "ray"])
def test_a_killed_sweep_resumes_to_exactly_the_requested_count(
    tmp_path: Path, backend: str
) -> None:
    stages = [{"name": "only", "sampler": "random", "trials": 6, "budget": {"steps": 2}}]
    path = write_study(tmp_path, backend, stages)
    finished = tmp_path / "finished.txt"
    env = {
        **os.environ,
        "CONTRACT_SLEEP_S": "0.4",
        "CONTRACT_FINISHED_FILE": str(finished),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "studies.cli", "sweep", str(path), "--json"]
    first = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    try:
        while not finished.exists() or len(finished.read_text().split()) < 2:
            assert first.poll() is None, "the sweep ended before it was killed"
            assert time.monotonic() < deadline, "no trials finished in time"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the sweep and whatever it started (Ray)
        first.wait()
    second = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert second.returncode == 0, second.stderr[-2000:]
    summary = json.loads(second.stdout)
    assert summary["n_trials"] == 6
    assert summary["stages"][0]["n_finished"] == 6
