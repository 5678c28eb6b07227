"""`scaleplan diagnose RUN_DIR`: JSON shape, table, healthy message, one-line errors, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from studies.cli import main

REPO = Path(__file__).resolve().parents[2]


def _write_run(run_dir: Path, spike: bool) -> Path:
    rng = np.random.default_rng(0)
    steps = np.arange(0, 3000, 10)
    loss = 1.5 + 3.0 * np.exp(-steps / 500) + rng.normal(0, 0.02, len(steps))
    if spike:
        loss[150:153] += 1.5  # steps 1500..1520, back at 1530
    run_dir.mkdir()
    lines = [
        json.dumps({"step": int(s), "loss": float(v)}) for s, v in zip(steps, loss, strict=True)
    ]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def _scaleplan(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "studies.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def test_json_names_the_spike(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _write_run(tmp_path / "run", spike=True)
    assert main(["diagnose", str(run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run_dir"] == str(run_dir) and report["n_records"] == 300
    assert len(report["findings"]) == 1
    finding = report["findings"][0]
    assert set(finding) == {"pathology", "severity", "steps", "detail", "fix"}
    assert finding["pathology"] == "loss spike" and finding["steps"] == [1500, 1520]
    assert finding["severity"] == "warning" and "recovered at step 1530" in finding["detail"]


def test_table_and_healthy_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", str(_write_run(tmp_path / "sick", spike=True))]) == 0
    table = capsys.readouterr().out
    assert "loss spike" in table and "1500–1520" in table and "1 finding(s)" in table
    assert main(["diagnose", str(_write_run(tmp_path / "fine", spike=False))]) == 0
    assert "no pathologies found in 300 records" in capsys.readouterr().out


def test_bad_run_dir_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for run_dir, message in (
        (tmp_path / "missing", "no such run directory"),
        (tmp_path, "no metrics.jsonl in this directory"),
    ):
        result = _scaleplan("diagnose", str(run_dir))
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"scaleplan diagnose: error: {run_dir}: {message}")
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_diagnose_imports_no_torch_or_mlflow(tmp_path: Path) -> None:
    run_dir = _write_run(tmp_path / "run", spike=False)
    code = (
        "import sys; from studies.cli import main; "
        f"main(['diagnose', {str(run_dir)!r}, '--json']); "
        "print(sorted(m for m in ('torch', 'mlflow', 'optuna', 'ray') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
