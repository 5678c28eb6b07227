"""`scaleplan train` as a user runs it: JSON results, a progress bar, exit statuses, and one-line
errors (exit 2, no traceback, nothing written) for every user mistake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from studies.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """A seconds-long digits run with tracking off."""
    path = tmp_path / "digits.yaml"
    config = {
        "steps": 20,
        "log_every": 5,
        "eval_every": 10,
        "checkpoint_every": 10,
        "model": {"kind": "mlp", "width": 16, "init": "he"},
        "data": {"kind": "digits", "batch_size": 16},
        "optimizer": {"lr": 1e-2},
        "tracking": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_json_from_the_command_line(config_file: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "studies.cli", "train", str(config_file), "--out", str(out)]
        + ["--json", "--set", "steps=10", "optimizer.lr=3e-3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    for key in ("final_val_loss", "best_val_loss", "steps", "tokens", "flops", "wall_seconds"):
        assert isinstance(payload[key], int | float), key
    assert payload["steps"] == 10 and payload["out_dir"] == str(out)
    assert payload["final_val_accuracy"] is not None
    assert (out / "result.json").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["optimizer"]["lr"] == 3e-3


def test_progress_bar_and_summary(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", str(config_file), "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert "val loss" in captured.out and "run folder" in captured.out
    assert "20/20" in captured.err  # the bar, on stderr


def test_resume_checks_the_config(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "run")
    assert main(["train", str(config_file), "--out", out, "--json", "--set", "steps=10"]) == 0
    first = json.loads(capsys.readouterr().out)
    # without the override, steps differ: a different run
    assert main(["train", str(config_file), "--out", out, "--json", "--resume"]) == 2
    assert "field steps differs (checkpoint: 10, now: 20)" in capsys.readouterr().err
    # the same config resumes the finished run: nothing left to do, the same result
    args = ["train", str(config_file), "--out", out, "--json", "--resume", "--set", "steps=10"]
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["val_curve"] == first["val_curve"] and again["steps"] == 10


def test_nonfinite_stop_exits_1_with_the_reason(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["optimizer.name=sgd", "optimizer.lr=1e12", "clip.mode=none"]
    code = main(
        ["train", str(config_file), "--out", str(tmp_path / "run"), "--json", "--set", *args]
    )
    assert code == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["stopped_reason"] == "nonfinite"
    assert "non-finite" in captured.err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "model.widht=3"], "--set model.widht: unknown key 'widht'"),
        (["--set", "optimizer.name=adamx"], "optimizer.name: 'adamx' is not one of"),
        (["--set", "precision=fp16"], "precision: 'fp16' needs a CUDA GPU"),
        (["--set", "data={kind: text, path: /nonexistent/corpus}"], "data.path: '/nonexistent"),
        (["--set", "steps=-1"], "steps: input should be greater than or equal to 1"),
        (["--resume"], "resume: no checkpoint in"),
    ],
)
def test_user_mistakes_are_one_line_exit_2_and_write_nothing(
    config_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    if "precision=fp16" in extra and torch.cuda.is_available():
        pytest.skip("fp16 runs here")
    out = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scaleplan train: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_resume_needs_out_and_a_readable_checkpoint(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", str(config_file), "--resume"]) == 2
    assert "--resume needs --out DIR" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    newest = out / "checkpoints" / "step_0000020.pt"
    newest.write_bytes(b"not a checkpoint")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["train", str(config_file), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "step_0000020.pt' is unreadable" in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config: '" in capsys.readouterr().err


def test_help_lists_train_without_importing_torch() -> None:
    code = (
        "import sys; from studies.cli import build_parser; "
        "build_parser(['train', '--help']).parse_known_args(['train', 'x.yaml']); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
