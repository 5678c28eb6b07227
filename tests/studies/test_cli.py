"""The `scaleplan` CLI as a user runs it: fast help, JSON shapes, one-line errors, exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from studies.cli import main

REPO = Path(__file__).resolve().parents[2]


def _scaleplan(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "studies.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_help_answers_in_well_under_a_second() -> None:
    _scaleplan("--help")  # warm the file cache
    start = time.perf_counter()
    result = _scaleplan("--help")
    elapsed = time.perf_counter() - start
    assert result.returncode == 0 and "plan" in result.stdout and "fit" in result.stdout
    assert elapsed < 1.0, f"scaleplan --help took {elapsed:.2f} s"


def test_plan_imports_no_torch_ray_or_optuna() -> None:
    code = (
        "import sys; from studies.cli import main; "
        "main(['plan', '--compute', '1e21', '--json']); "
        "print(sorted(m for m in ('torch', 'ray', 'optuna', 'mlflow') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_plan_json_has_the_documented_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--compute", "1e21", "1e22", "--law", "hoffmann2022", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2
    for key in ("compute_flops", "n_params", "n_tokens", "tokens_per_param", "loss"):
        assert isinstance(rows[0][key], float)
    assert rows[1]["n_params"] > rows[0]["n_params"]


def test_plan_gpu_hours_converts_with_the_peak_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--gpu-hours", "1000", "--gpu", "h100", "--mfu", "0.4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["compute_flops"] == pytest.approx(1000 * 3600 * 989.4e12 * 0.4)


def test_plan_inference_aware_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "plan",
                "--target-loss",
                "2.1",
                "--inference-tokens",
                "1e12",
                "--law",
                "hoffmann2022",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    for key in ("n_params", "n_tokens", "train_flops", "inference_flops", "total_flops"):
        assert result[key] > 0
    assert (
        main(
            [
                "plan",
                "--compute",
                "1e23",
                "--inference-tokens",
                "1e12",
                "--law",
                "hoffmann2022",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)[0]["loss"] > 1.69


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "--compute", "abc"], "argument --compute: 'abc' is not a number"),
        (["plan", "--compute", "0"], "--compute: 0.0 is not allowed"),
        (["plan", "--compute", "1e21", "--law", "nope"], "--law: 'nope' is neither"),
        (["plan"], "give exactly one of --compute"),
        (["plan", "--gpu-hours", "10", "--gpu", "tpu-v9"], "--gpu: 'tpu-v9'"),
        (["fit", "missing.csv"], "missing.csv: no such file"),
        (["plan", "--compute", "1e21", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = _scaleplan(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_fit_with_bad_table_writes_nothing(tmp_path: Path) -> None:
    table = tmp_path / "runs.csv"
    pd.DataFrame({"params": [1e8, -2e8], "tokens": [1e9, 2e9], "loss": [3.0, 2.9]}).to_csv(
        table, index=False
    )
    out = tmp_path / "law.json"
    result = _scaleplan("fit", str(table), "--out", str(out), "--plots", str(tmp_path / "plots"))
    assert result.returncode == 2
    assert "column 'params', row 2" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv"]


def test_fit_on_runs_of_one_model_size_is_refused(tmp_path: Path) -> None:
    # what `scaleplan study export` writes for a sweep: every trial the same model
    table = tmp_path / "sweep.csv"
    pd.DataFrame(
        {"params": [123200] * 6, "tokens": [2e5, 8e4, 2.4e5, 6e5, 6e5, 3e5], "loss": [2.7] * 6}
    ).to_csv(table, index=False)
    result = _scaleplan("fit", str(table), "--out", str(tmp_path / "law.json"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"scaleplan fit: error: {table}: n_params: every run has 123200; a law in N and D needs"
        " runs at 3 or more model sizes to determine its exponent"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv"]


def test_isoflop_fit_writes_a_law_that_plan_reads(
    scaling_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "approach2.json"
    assert (
        main(
            [
                "fit",
                str(scaling_data / "chinchilla_isoflops.csv"),
                "--approach",
                "isoflop",
                "--bootstrap",
                "50",
                "--out",
                str(out),
                "--plots",
                str(tmp_path / "plots"),
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert 0.48 < summary["n_exponent"] < 0.51
    assert any(b["flagged"] for b in summary["budgets"])
    assert (tmp_path / "plots" / "isoflop_profiles.png").stat().st_size > 10_000
    assert main(["plan", "--law", str(out), "--compute", "5.76e23", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["law"] == "approach2" and row["loss"] is None
