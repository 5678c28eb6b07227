"""A `torch.profiler` trace of a few training steps, and where their time went.

``profile: {enabled: true, wait: 5, warmup: 2, active: 3}`` (or ``scaleplan train --profile``):
after `wait` steps and `warmup` profiled-but-discarded steps, `active` steps are recorded and
written as a Chrome / Perfetto trace, ``<run>/profile/trace_rank<R>.json`` (open it in
https://ui.perfetto.dev or chrome://tracing), with ``summary_rank<R>.json`` beside it. The
loop marks its phases with `record_function` (``scaleplan.data``,
``scaleplan.forward_backward``, ``scaleplan.optimizer``), and the summary splits the active
steps' wall time into:

- data: drawing and moving the batches;
- compute: forward and backward, less the data and communication inside them;
- communication: collectives (all-reduce, reduce-scatter, all-gather, broadcast; gloo or
  NCCL), the union of their intervals; asynchronous ones overlap compute, so compute +
  communication can exceed the time they shared;
- optimizer: the optimiser step (and the fp16 scaler's bookkeeping);
- host overhead: the rest of the step (gradient norms, clipping, metrics, logging).

On CUDA it adds ``gpu_busy``: the fraction of the steps' wall time in which some kernel ran
(the union of kernel intervals), the "is the GPU actually busy" number; and ``host_syncs``,
the ``cuda*Synchronize`` calls per step (the host waiting for the GPU: what ``.item()`` does).
A plain step makes none (see trainer.loop: values are read on recorded steps), so with the
default window (steps 8-10, log_every 10) they come from the one recorded step.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch.profiler import ProfilerActivity, profile, record_function, schedule

__all__ = ["PHASES", "ProfileConfig", "StepProfiler", "phase", "split_step_time"]

PHASES = ("data", "compute", "communication", "optimizer", "host_overhead")
COMMUNICATION = ("all_reduce", "allreduce", "reduce_scatter", "all_gather", "allgather",
                 "broadcast", "nccl", "gloo")  # fmt: skip


class ProfileConfig(BaseModel):
    """Profile a few steps with torch.profiler (see trainer.profiling)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Record a trace of `active` steps.")
    wait: int = Field(default=5, ge=0, description="Steps run before profiling starts.")
    warmup: int = Field(
        default=2, ge=0, description="Steps profiled then discarded (the profiler settles)."
    )
    active: int = Field(default=3, ge=1, description="Steps recorded in the trace.")


def phase(name: str) -> contextlib.AbstractContextManager[Any]:
    """Mark a phase of the step in the trace (cheap when nothing is profiling)."""
    return record_function(f"scaleplan.{name}")


class StepProfiler:
    """The loop calls ``step()`` after every update; the trace is written once `active` steps
    are recorded (`summary` is then set)."""

    def __init__(self, config: ProfileConfig, out_dir: Path, rank: int, cuda: bool) -> None:
        self.folder = out_dir / "profile"
        self.rank = rank
        self.summary: dict[str, float] | None = None
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self._profile = profile(
            activities=activities,
            schedule=schedule(
                wait=config.wait, warmup=config.warmup, active=config.active, repeat=1
            ),
            on_trace_ready=self._write,
        )
        self._profile.start()
        self._open = True

    def step(self) -> None:
        if self._open:
            self._profile.step()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._profile.stop()

    def _write(self, prof: profile) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"trace_rank{self.rank}.json"
        prof.export_chrome_trace(str(trace))
        self.summary = split_step_time(prof.events())
        text = json.dumps({"trace": str(trace), **self.summary}, indent=2) + "\n"
        (self.folder / f"summary_rank{self.rank}.json").write_text(text)


SYNCHRONIZE = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def split_step_time(events: Iterable[Any]) -> dict[str, float]:
    """Seconds per step in each phase (see the module docstring), ``step_s``, ``steps``, and
    on CUDA ``gpu_busy`` and ``host_syncs``, from a profiler's events."""
    spans: dict[str, list[tuple[float, float]]] = {
        k: [] for k in ("step", "data", "fb", "opt", "comm", "kernel")
    }
    syncs = 0
    for event in events:
        name, span = event.name, (event.time_range.start, event.time_range.end)
        lowered = name.lower()
        if name.startswith("ProfilerStep"):
            spans["step"].append(span)
        elif name == "scaleplan.data":
            spans["data"].append(span)
        elif name == "scaleplan.forward_backward":
            spans["fb"].append(span)
        elif name == "scaleplan.optimizer":
            spans["opt"].append(span)
        if any(word in lowered for word in COMMUNICATION):
            spans["comm"].append(span)
        if str(getattr(event, "device_type", "")).endswith("CUDA"):
            spans["kernel"].append(span)
        if name in SYNCHRONIZE:
            syncs += 1
    steps = len(spans["step"])
    total = _union(spans["step"])
    data, optimizer = _union(spans["data"]), _union(spans["opt"])
    communication = _union(spans["comm"])
    forward_backward = _merged(spans["fb"])

    def within(kind: str) -> float:  # the part of `kind` inside forward and backward
        return _union(list(_intersect(_merged(spans[kind]), forward_backward)))

    compute = max(0.0, _union(forward_backward) - within("data") - within("comm"))
    host = max(0.0, total - data - compute - communication - optimizer)
    per_step = 1e-6 / max(steps, 1)  # microseconds over all steps -> seconds per step
    out = {
        "steps": float(steps),
        "step_s": total * per_step,
        "data": data * per_step,
        "compute": compute * per_step,
        "communication": communication * per_step,
        "optimizer": optimizer * per_step,
        "host_overhead": host * per_step,
    }
    if spans["kernel"] and total > 0:
        out["gpu_busy"] = _union(spans["kernel"]) / total
        out["host_syncs"] = syncs / max(steps, 1)
    return out


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _union(spans: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in _merged(spans))


def _intersect(
    a: list[tuple[float, float]], b: list[tuple[float, float]]
) -> Iterator[tuple[float, float]]:
    for start_a, end_a in a:
        for start_b, end_b in b:
            start, end = max(start_a, start_b), min(end_a, end_b)
            if start < end:
                yield start, end
