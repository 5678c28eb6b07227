"""The profiler's trace and its split of the step time."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from trainer.config import TrainConfig
from trainer.loop import train
from trainer.profiling import PHASES, split_step_time


def event(name: str, start: float, end: float, device: str = "DeviceType.CPU") -> SimpleNamespace:
    return SimpleNamespace(
        name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device
    )


def test_the_split_adds_up_to_the_step_on_known_intervals() -> None:
    # one 1000 us step: data 100, forward/backward 600 (holding 50 of data and an all-reduce
    # of 100), optimizer 200, the rest (100) host overhead
    events = [
        event("ProfilerStep#7", 0, 1000),
        event("scaleplan.data", 0, 50),
        event("scaleplan.forward_backward", 50, 650),
        event("scaleplan.data", 60, 110),
        event("gloo:all_reduce", 500, 600),
        event("scaleplan.optimizer", 700, 900),
        event("aten::mm", 120, 400, "DeviceType.CUDA"),
        event("cudaStreamSynchronize", 910, 920),
    ]
    split = split_step_time(events)
    assert split["steps"] == 1 and split["step_s"] == pytest.approx(1e-3)
    assert split["data"] == pytest.approx(100e-6)
    assert split["communication"] == pytest.approx(100e-6)
    assert split["compute"] == pytest.approx(450e-6)  # 600 less 50 data, 100 all-reduce
    assert split["optimizer"] == pytest.approx(200e-6)
    assert split["host_overhead"] == pytest.approx(150e-6)
    assert sum(split[name] for name in PHASES) == pytest.approx(split["step_s"])
    assert split["gpu_busy"] == pytest.approx(0.28)
    assert split["host_syncs"] == 1


def test_profile_writes_a_chrome_trace_and_the_split(tmp_path) -> None:
    config = TrainConfig(
        steps=12,
        eval_every=0,
        log_every=4,
        model={"n_layer": 1, "d_model": 32, "n_head": 2},
        data={"batch_size": 4, "block_size": 16},
        profile={"enabled": True, "wait": 2, "warmup": 1, "active": 3},
        tracking={"enabled": False},
    )
    result = train(config, out_dir=tmp_path / "run")
    assert result.profile is not None and result.profile["steps"] == 3
    phases = [result.profile[name] for name in PHASES]
    assert all(value >= 0 for value in phases) and result.profile["compute"] > 0
    assert sum(phases) == pytest.approx(result.profile["step_s"], rel=0.05)
    trace = json.loads((tmp_path / "run" / "profile" / "trace_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"scaleplan.data", "scaleplan.forward_backward", "scaleplan.optimizer"} <= names
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["profile"] == result.profile
