"""Accelerators: peak throughput, memory and links, and GPU-hours <-> training FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from planner.errors import InputError

# Peak dense (no 2:4 sparsity) bf16 FLOP/s from the vendors' datasheets; V100 has no bf16: fp16.
PEAK_FLOPS: dict[str, float] = {
    "h100": 989.4e12,  # H100 SXM5
    "h100-pcie": 756.0e12,
    "h200": 989.4e12,
    "b200": 2250.0e12,
    "a100": 312.0e12,
    "v100": 125.0e12,
    "l40s": 362.05e12,
    "l4": 121.0e12,
    "mi300x": 1307.4e12,
    "tpu-v4": 275.0e12,
    "tpu-v5e": 197.0e12,
    "tpu-v5p": 459.0e12,
}


@dataclass(frozen=True)
class Accelerator:
    """Memory and links of one accelerator: HBM, intra-node bandwidth per GPU (one
    direction), GPUs per node."""

    memory_gb: float
    intra_node_gbs: float
    gpus_per_node: int = 8


# vendors' datasheets: HBM capacity, NVLink / Infinity Fabric bandwidth per direction per GPU
ACCELERATORS: dict[str, Accelerator] = {
    "h100": Accelerator(80.0, 450.0),
    "h100-pcie": Accelerator(80.0, 64.0),
    "h200": Accelerator(141.0, 450.0),
    "b200": Accelerator(192.0, 900.0),
    "a100": Accelerator(80.0, 300.0),
    "v100": Accelerator(32.0, 150.0),
    "l40s": Accelerator(48.0, 32.0),
    "l4": Accelerator(24.0, 32.0),
    "mi300x": Accelerator(192.0, 448.0),
}
INTER_NODE_GBS = 50.0  # 400 Gb/s InfiniBand NDR per GPU, one direction


def accelerator(gpu: str) -> Accelerator:
    try:
        return ACCELERATORS[gpu.lower()]
    except KeyError:
        raise InputError(
            f"--gpu: '{gpu}' has no memory figure; expected one of: {', '.join(ACCELERATORS)}"
        ) from None


def peak_flops(gpu: str) -> float:
    """Peak dense bf16 FLOP/s of one accelerator, by its short name."""
    try:
        return PEAK_FLOPS[gpu.lower()]
    except KeyError:
        raise InputError(f"--gpu: '{gpu}' is not one of: {', '.join(PEAK_FLOPS)}") from None


def gpu_hours_to_flops(
    gpu_hours: ArrayLike, gpu: str, mfu: float, *, field: str = "--gpu-hours"
) -> NDArray[np.float64]:
    """Training FLOPs delivered by ``gpu_hours`` of ``gpu`` at model FLOPs utilisation ``mfu``."""
    hours = np.asarray(gpu_hours, dtype=float)
    if not np.all(np.isfinite(hours)) or np.any(hours <= 0):
        raise InputError(f"{field}: {hours.tolist()} must be positive numbers of GPU-hours")
    if not 0 < mfu <= 1:
        raise InputError(f"--mfu: {mfu} must be in (0, 1], the fraction of peak FLOP/s achieved")
    return np.asarray(hours * 3600.0 * peak_flops(gpu) * mfu)


def flops_to_gpu_hours(compute_flops: ArrayLike, gpu: str, mfu: float) -> NDArray[np.float64]:
    """GPU-hours of ``gpu`` needed for ``compute_flops`` at utilisation ``mfu``."""
    return np.asarray(np.asarray(compute_flops, dtype=float) / (3600.0 * peak_flops(gpu) * mfu))
