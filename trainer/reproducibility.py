"""What a run needs to be repeated: seeds, deterministic kernels, RNG states, provenance.

`run_provenance` is what ``run.json`` records: the git commit of the scaleplan checkout (None
outside a git repository), package versions, the config hash and the data fingerprint. RNG
states are converted to plain tensors, lists and numbers (`rng_state`), so a checkpoint loads
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "deterministic_algorithms",
    "git_commit",
    "package_versions",
    "rng_state",
    "run_provenance",
    "seed_everything",
    "set_rng_state",
]

SOURCE_ROOT = Path(__file__).resolve().parents[1]
# cuBLAS needs a fixed workspace for deterministic matmuls (CUDA docs, "Results reproducibility")
CUBLAS_WORKSPACE = ":4096:8"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (dropout draws from torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every CUDA device too


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Deterministic kernels (and cuDNN flags) for the duration of a run, restored afterwards."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]


def rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors, lists and numbers (safe for weights_only loading)."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(python_state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["position"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def git_commit(path: Path = SOURCE_ROOT) -> str | None:
    """HEAD's commit hash of the repository holding `path`, or None (no git, no repo, no commit)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},  # read only: never touch the index
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def package_versions() -> dict[str, str | None]:
    """Versions of the packages a result depends on (None when one is not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("scaleplan", "torch", "numpy", "pydantic"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def run_provenance(config_hash: str, data_fingerprint: str, device: torch.device) -> dict[str, Any]:
    """The reproducibility block of run.json."""
    return {
        "git_commit": git_commit(),
        "packages": package_versions(),
        "config_hash": config_hash,
        "data_fingerprint": data_fingerprint,
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        )
        or platform.machine(),
        "platform": platform.platform(),
        "command": sys.argv,
    }
