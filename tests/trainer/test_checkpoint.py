"""Checkpoints: a SIGKILLed run resumes bit-identically; files are atomic, pruned, safe to load;
a corrupt checkpoint or a different config is refused without overwriting anything."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from trainer.checkpoint import list_checkpoints, load_checkpoint
from trainer.config import TrainConfig, parse_config
from trainer.errors import ConfigError
from trainer.loop import KILL_AFTER_CHECKPOINT_ENV, train
from trainer.reproducibility import rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[2]


def digits(**overrides: Any) -> TrainConfig:
    raw: dict[str, Any] = {
        "steps": 6,
        "log_every": 1,
        "eval_every": 3,
        "checkpoint_every": 3,
        "model": {"kind": "mlp", "width": 16, "dropout": 0.1},
        "data": {"kind": "digits", "batch_size": 16},
        "tracking": {"enabled": False},
    }
    raw.update(overrides)
    return parse_config(raw)


def losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def test_sigkilled_run_resumes_bit_identically(tmp_path: Path) -> None:
    """N steps straight == N/2 steps, SIGKILL, --resume to N: same weights, same losses."""
    config = {
        "seed": 3,
        "steps": 8,
        "log_every": 1,
        "eval_every": 4,
        "eval_batches": 2,
        "checkpoint_every": 4,
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "dropout": 0.1},
        "data": {
            "block_size": 32,
            "batch_size": 4,
            "max_bytes": 200_000,
            "cache_dir": str(tmp_path / "cache"),
        },
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1},
        "schedule": {"warmup_steps": 2},
        "tracking": {"enabled": True, "tracking_uri": None},
    }
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config))

    def scaleplan_train(out: Path, *args: str, kill_after: int | None = None) -> Any:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        env.pop(KILL_AFTER_CHECKPOINT_ENV, None)
        if kill_after is not None:
            env[KILL_AFTER_CHECKPOINT_ENV] = str(kill_after)
        command = [sys.executable, "-m", "studies.cli", "train", str(config_file)]
        return subprocess.run(
            [*command, "--out", str(out), "--json", "--set", "tracking.enabled=false", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            cwd=tmp_path,
        )

    straight = scaleplan_train(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr

    killed = scaleplan_train(tmp_path / "killed", kill_after=4)
    assert killed.returncode == -9, killed.stderr  # a real SIGKILL: no clean-up ran
    killed_dir = tmp_path / "killed"
    assert [p.name for p in list_checkpoints(killed_dir)] == ["step_0000004.pt"]
    assert not (killed_dir / "result.json").exists()
    assert json.loads((killed_dir / "run.json").read_text())["status"] == "running"

    resumed = scaleplan_train(killed_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == 8

    final_a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_0000008.pt")
    final_b = load_checkpoint(killed_dir / "checkpoints" / "step_0000008.pt")
    assert final_a["model"].keys() == final_b["model"].keys()
    for name, tensor in final_a["model"].items():
        assert torch.equal(tensor, final_b["model"][name]), name
    for state_a, state_b in zip(
        final_a["optimizer"]["state"].values(),
        final_b["optimizer"]["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert losses(killed_dir) == losses(tmp_path / "straight")
    assert [s for s, _ in losses(killed_dir)] == list(range(1, 9))
    result_a = json.loads((tmp_path / "straight" / "result.json").read_text())
    result_b = json.loads((killed_dir / "result.json").read_text())
    assert result_a["val_curve"] == result_b["val_curve"]
    assert result_a["train_curve"] == result_b["train_curve"]


def test_resume_in_process_continues_exactly(tmp_path: Path) -> None:
    straight = train(digits(), out_dir=tmp_path / "a")
    stopped = train(digits(steps=6), out_dir=tmp_path / "b")
    # pretend the run died after step 3: drop the later checkpoint, then resume
    (tmp_path / "b" / "checkpoints" / "step_0000006.pt").unlink()
    resumed = train(digits(), out_dir=tmp_path / "b", resume=True)
    assert stopped.train_curve == straight.train_curve == resumed.train_curve
    assert resumed.val_curve == straight.val_curve
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_checkpoints_are_plain_pruned_and_atomic(tmp_path: Path) -> None:
    train(digits(checkpoint_every=1, keep_checkpoints=2), out_dir=tmp_path / "run")
    kept = list_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step_0000005.pt", "step_0000006.pt"]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    state = torch.load(kept[-1], weights_only=True)  # plain tensors, dicts, lists, numbers
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "loop", "config"):
        assert key in state
    assert state["step"] == 6 and state["data_position"] == {"step": 6}
    assert state["loop"]["tokens"] == 6 * 16
    assert state["loop"]["best_val_loss"] == min(v for _, v in state["loop"]["val_curve"])


def test_corrupt_checkpoint_is_refused_and_nothing_overwritten(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(digits(), out_dir=run)
    newest = list_checkpoints(run)[-1]
    newest.write_bytes(newest.read_bytes()[:200])  # a truncated file
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"checkpoint '.*step_0000006.pt' is unreadable"):
        train(digits(), out_dir=run, resume=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_different_config_names_the_first_differing_field(tmp_path: Path) -> None:
    train(digits(), out_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="different config: field optimizer.lr differs"):
        train(digits(optimizer={"lr": 0.5}), out_dir=tmp_path / "run", resume=True)
    # logging, tracking and checkpoint cadence may change on resume
    result = train(digits(log_every=2, steps=6), out_dir=tmp_path / "run", resume=True)
    assert result.steps == 6


def test_resume_without_a_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(digits(), out_dir=tmp_path / "empty", resume=True)
    assert not (tmp_path / "empty").exists()


def test_rng_state_round_trips_through_weights_only(tmp_path: Path) -> None:
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_scaler_state_is_checkpointed(tmp_path: Path) -> None:
    train(digits(precision="fp16", device="cuda"), out_dir=tmp_path / "run")
    state = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert state["scaler"]["scale"] > 0
