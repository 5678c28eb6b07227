"""DDP and FSDP2 on two CPU processes (gloo): the single-process trajectory, half the memory,
checkpoints that resume under another number of processes, a killed rank, and bad input.

Every multi-process run goes through a real launcher: `scaleplan train --nproc 2` (torchrun's
elastic agent) or ``python -m torch.distributed.run ... -m trainer`` (torchrun itself).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from planner.memory import AUTOCAST, model_state_bytes
from trainer.tracking import read_metrics

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
STEPS = 60
CONFIG = {
    "steps": STEPS,
    "eval_every": 20,
    "eval_batches": 4,
    "log_every": 10,
    "checkpoint_every": 30,
    "grad_accum_steps": 2,  # non-final micro-batches skip the all-reduce
    "model": {"d_model": 32, "n_layer": 2, "n_head": 2, "dropout": 0.0},
    "data": {"batch_size": 8, "block_size": 32, "max_bytes": 2_000_000},
    "optimizer": {"name": "adamw", "lr": 0.003},
    "tracking": {"enabled": False},
}


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("WORLD_SIZE", None)
    return env


def scaleplan(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 240):
    return subprocess.run(
        [sys.executable, "-m", "studies.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=timeout,
    )


def torchrun(*args: str | Path, timeout: float = 240):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=timeout)


def result(run: Path) -> dict:
    return json.loads((run / "result.json").read_text())


def first_record(run: Path) -> dict:
    return next(r for r in read_metrics(run / "metrics.jsonl") if "memory/params" in r)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def runs(config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One process; DDP through torchrun -m trainer; FSDP2 through scaleplan train --nproc."""
    root = tmp_path_factory.mktemp("runs")
    done = scaleplan("train", config, "--out", root / "single", "--json")
    assert done.returncode == 0, done.stderr
    done = torchrun("-m", "trainer", config, "--out", root / "ddp")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == STEPS  # rank 0 alone printed the result
    done = scaleplan(
        "train", config, "--out", root / "fsdp", "--nproc", "2", "--json",
        "--set", "distributed.strategy=fsdp",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {name: root / name for name in ("single", "ddp", "fsdp")}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_reproduce_the_single_process_run(runs: dict[str, Path], strategy: str) -> None:
    single, parallel = result(runs["single"]), result(runs[strategy])
    assert [s for s, _ in parallel["val_curve"]] == [0, 20, 40, 60]
    for (_, expected), (_, got) in zip(single["val_curve"], parallel["val_curve"], strict=True):
        assert got == pytest.approx(expected, rel=1e-3)
    assert parallel["val_curve"][-1][1] < parallel["val_curve"][0][1] - 1.0  # it learned
    assert parallel["tokens"] == single["tokens"]  # the same global batch
    # rank 0 wrote the run folder alone, the metrics of all ranks reduced
    records = read_metrics(runs[strategy] / "metrics.jsonl")
    assert [r["step"] for r in records].count(STEPS) == 1
    single_loss = read_metrics(runs["single"] / "metrics.jsonl")[-1]["loss"]
    assert records[-1]["loss"] == pytest.approx(single_loss, rel=1e-3)


def test_fsdp_holds_half_of_ddps_parameter_gradient_and_optimiser_memory(
    runs: dict[str, Path],
) -> None:
    ddp, fsdp = first_record(runs["ddp"]), first_record(runs["fsdp"])
    for key in ("memory/params", "memory/grads", "memory/optimizer"):
        assert fsdp[key] / ddp[key] == pytest.approx(0.5, abs=0.05), key
    total = sum(ddp[k] for k in ("memory/params", "memory/grads", "memory/optimizer"))
    assert total == pytest.approx(4 * ddp["memory/params"])  # AdamW: 2 moments, fp32

    # the planner's memory plan predicts both: fp32 weights and gradients, Adam's 2 moments
    # (AUTOCAST), none sharded under DDP and all of it (ZeRO-3) under FSDP2
    n_params = result(runs["fsdp"])["n_params"]
    for record, stage in ((ddp, 0), (fsdp, 3)):
        predicted = model_state_bytes(n_params, stage, data_parallel=2, precision=AUTOCAST)
        for part in ("params", "grads", "optimizer"):
            assert record[f"memory/{part}"] == pytest.approx(predicted[part], rel=0.01), part


def test_sharded_checkpoints_are_written_by_every_rank(runs: dict[str, Path]) -> None:
    checkpoint = runs["fsdp"] / "checkpoints" / "step_0000060.dcp"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.pt",
    ]  # fmt: skip
    assert not list((runs["fsdp"] / "checkpoints").glob(".*tmp"))


def test_a_killed_rank_stops_the_job_and_one_process_resumes_it(
    config: Path, runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    killed = scaleplan(
        "train", config, "--out", out, "--nproc", "2", "--json",
        "--set", "distributed.strategy=fsdp",
        env=_env(SCALEPLAN_TEST_KILL_AFTER_CHECKPOINT="30", SCALEPLAN_TEST_KILL_RANK="1"),
        timeout=120,  # a hang would time out: the agent stops the surviving rank
    )  # fmt: skip
    assert killed.returncode == 1
    assert "scaleplan train: rank 1 was killed by SIGKILL; the other ranks were stopped" in (
        killed.stderr
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000030.dcp"]
    resumed = scaleplan("train", config, "--out", out, "--resume", "--json")  # 2 -> 1 process
    assert resumed.returncode == 0, resumed.stderr
    assert "Warning" not in resumed.stderr
    expected = result(runs["single"])["val_curve"]
    for (step, want), (got_step, got) in zip(expected, result(out)["val_curve"], strict=True):
        assert (got_step, got) == (step, pytest.approx(want, rel=1e-4))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_single_process_checkpoint_resumes_on_two_ranks(
    config: Path, runs: dict[str, Path], tmp_path: Path, strategy: str
) -> None:
    out = tmp_path / "single-at-30"
    shutil.copytree(runs["single"], out)
    (out / "checkpoints" / "step_0000060.pt").unlink()  # as if it had stopped at step 30
    resumed = scaleplan(
        "train", config, "--out", out, "--resume", "--nproc", "2", "--json",
        "--set", f"distributed.strategy={strategy}",
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    expected = result(runs["single"])["val_curve"]
    for (step, want), (got_step, got) in zip(expected, result(out)["val_curve"], strict=True):
        assert (got_step, got) == (step, pytest.approx(want, rel=1e-3))


def test_ddp_noise_scale_from_per_rank_gradients_matches_the_analytic_one(tmp_path: Path) -> None:
    out = tmp_path / "gns.json"
    done = torchrun(HERE / "distributed_workers.py", "gns", out)
    assert done.returncode == 0, done.stderr
    measured = json.loads(out.read_text())
    assert measured["b_small"] == 16  # 32 rows over 2 ranks
    for expected, got in measured["checked"]:
        assert got == pytest.approx(expected, rel=0.10), measured


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--nproc", "999"], r"--nproc: 999 processes, but this machine has \d+ CPU cores"),
        (
            ["--nproc", "2", "--set", "data.batch_size=7"],
            "data.batch_size: 7 rows cannot be split evenly over 2 processes",
        ),
        (
            ["--nproc", "2", "--set", "distributed.strategy=none"],
            "distributed.strategy: 'none' cannot run on 2 processes",
        ),
        (
            ["--nproc", "2", "--set", "distributed.strategy=fsdp", "optimizer.name=muon"],
            "optimizer.name: 'muon' cannot run under distributed.strategy fsdp",
        ),
        (
            ["--nproc", "2", "--set", "distributed.strategy=fsdp", "diagnostics.gns=true"],
            "diagnostics.gns: not available under distributed.strategy fsdp",
        ),
        (
            ["--set", "diagnostics.gns=true", "grad_accum_steps=1"],
            "or run on several DDP processes",
        ),
        (["--nproc", "2", "--set", "distributed.strategy=zero"], "distributed.strategy"),
    ],
)
def test_bad_input_is_one_line_before_any_process_starts(
    config: Path, tmp_path: Path, args: list[str], says: str
) -> None:
    done = scaleplan("train", config, "--out", tmp_path / "run", *args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert re.search(says, done.stderr), done.stderr
    assert not (tmp_path / "run").exists()


def test_a_user_mistake_inside_the_ranks_is_one_line_from_rank_zero(
    config: Path, tmp_path: Path
) -> None:
    done = torchrun("-m", "trainer", config, "--out", tmp_path / "run", "--resume")
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    folder = tmp_path / "run" / "checkpoints"
    assert lines == [
        f"python -m trainer: error: resume: no checkpoint in '{folder}'; start without resume"
    ]


def test_compile_composes_with_fsdp(config: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    # torch.compile wraps the FSDP2-sharded model (the pipeline's last step): 2 compiled ranks
    # give the single-process eager run's validation curve
    done = scaleplan(
        "train", config, "--out", tmp_path / "compiled", "--nproc", "2", "--json",
        "--set", "distributed.strategy=fsdp", "compile=true", timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = result(tmp_path / "compiled")["val_curve"]
    expected = result(runs["single"])["val_curve"]
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-3)


def test_mup_and_activation_checkpointing_compose_with_fsdp(config: Path, tmp_path: Path) -> None:
    # sharding comes after parametrization in the model pipeline: muP's init, multipliers and
    # per-group learning rates are set on the whole model, then FSDP2 shards it
    mup = [
        "parametrization.name=mup", "parametrization.base_width=16", "model.d_model=64",
        "model.n_head=4", "model.tie_embeddings=false", "model.output_multiplier=8.0",
        "model.activation_checkpointing=true", "steps=50", "checkpoint_every=0",
    ]  # fmt: skip
    one = scaleplan("train", config, "--out", tmp_path / "one", "--json", "--set", *mup)
    assert one.returncode == 0, one.stderr
    two = scaleplan(
        "train", config, "--out", tmp_path / "two", "--nproc", "2", "--json",
        "--set", *mup, "distributed.strategy=fsdp",
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    expected, got = result(tmp_path / "one"), result(tmp_path / "two")
    assert got["steps"] == 50 and got["final_val_loss"] < got["val_curve"][0][1] - 1.0
    assert got["final_val_loss"] == pytest.approx(expected["final_val_loss"], rel=1e-3)
    lrs = {k: v for k, v in first_record(tmp_path / "two").items() if k.startswith("lr/")}
    assert len(set(lrs.values())) > 1  # muP's per-group learning rates survived sharding
