"""Checkpoints that continue a run exactly, written atomically, read back safely.

A checkpoint is one ``torch.save`` file, ``<run>/checkpoints/step_XXXXXXX.pt``, named by the
number of optimiser steps done. It holds plain tensors, dicts, lists and numbers only, so it is
read with ``torch.load(weights_only=True)`` (no code runs on load):

- ``model``, ``optimizer``, ``scheduler``, ``scaler`` (fp16 loss scale; empty otherwise);
- ``rng``: Python, NumPy, torch CPU and CUDA generator states (dropout draws from torch's);
- ``loop``: the loop's counters (step, tokens, clip count, skipped steps, best val loss,
  early-stopping patience, curves so far, wall time), see `trainer.loop.LoopState`;
- ``data_position``: the step; batches are a pure function of (seed, step), so it is enough;
- ``config`` and ``config_hash``: the resolved config it was written under. Resuming under a
  config whose trajectory fields differ is a ConfigError naming the first differing field.

Continuing a checkpoint under other hyperparameters (``train(start_from=...)``, how Population
Based Training hands one trial's state to another) may change only `HYPERPARAMETER_FIELDS`:
the values the optimiser's param groups and the schedule are rebuilt from. The model, data,
seed, budget and the optimiser itself (`STATE_FIELDS`) must match, or the weights and moments
would mean something else; `check_continuation` names the first field that does not.

Writes go to a temporary file in the same folder, then ``os.replace``: a crash leaves either
the old set of checkpoints or the new one, never a truncated ``step_*.pt``. Only the newest
``keep`` checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from trainer.config import TrainConfig, config_hash, first_difference, trajectory_fields
from trainer.errors import ConfigError

__all__ = [
    "CHECKPOINT_FORMAT",
    "HYPERPARAMETER_FIELDS",
    "STATE_FIELDS",
    "check_config",
    "check_continuation",
    "checkpoint_path",
    "is_hyperparameter",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)\.pt$")
REQUIRED_KEYS = ("format", "step", "model", "optimizer", "scheduler", "rng", "loop", "config")
# what a run continued from a checkpoint under a new config may change: the values its
# optimiser param groups and schedule are rebuilt from (dotted prefixes of TrainConfig keys)
HYPERPARAMETER_FIELDS = ("optimizer", "schedule", "clip", "label_smoothing", "early_stopping")
# ... except these, which decide what the optimiser state is and which parameters it covers
STATE_FIELDS = ("optimizer.name", "optimizer.no_decay_on", "optimizer.muon_exclude")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest (fewest steps) first; temporary files ignored."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(run_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as the checkpoint of step ``state["step"]``; prune to the newest `keep`."""
    path = checkpoint_path(run_dir, int(state["step"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; anything unreadable is a one-line ConfigError."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint '{path}' does not exist") from None
    except Exception as error:  # truncated zip, bad pickle, foreign object: all one answer
        raise ConfigError(
            f"checkpoint '{path}' is unreadable ({_why(error)}); delete it to resume from an "
            "earlier one, or start a new run"
        ) from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ConfigError(
            f"checkpoint '{path}' is not a scaleplan checkpoint (missing {', '.join(missing)})"
        )
    if state["format"] != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"checkpoint '{path}' has format {state['format']}; this version reads format "
            f"{CHECKPOINT_FORMAT}"
        )
    return dict(state)


def _why(error: Exception) -> str:
    """A short reason for a failed torch.load."""
    if isinstance(error, pickle.UnpicklingError):
        return "not a checkpoint of tensors and plain data"
    text = str(error).strip()
    if "zip archive" in text or isinstance(error, EOFError):
        return "truncated or corrupted file"
    first = text.split(". ")[0].splitlines()[0] if text else type(error).__name__
    return first if len(first) <= 100 else first[:97] + "..."


def check_config(state: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """ConfigError unless `config` would continue the run that wrote `state`."""
    if state.get("config_hash") == config_hash(config):
        return
    saved, current = trajectory_fields(state["config"]), trajectory_fields(config)
    field = first_difference(saved, current)
    if field is None:
        return  # only operational fields (logging, tracking, checkpoint cadence) changed
    raise ConfigError(
        f"checkpoint '{path}' was written by a different config: field {field} differs "
        f"(checkpoint: {saved.get(field)!r}, now: {current.get(field)!r}); resume with the "
        "original config or start a new --out"
    )


def is_hyperparameter(key: str) -> bool:
    """Whether dotted config key `key` may change when a run continues another's checkpoint."""

    def under(prefixes: tuple[str, ...]) -> bool:
        return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)

    return under(HYPERPARAMETER_FIELDS) and not under(STATE_FIELDS)


def check_continuation(state: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """ConfigError unless `config` differs from the one that wrote `state` only in
    hyperparameters (`is_hyperparameter`), so that its weights and moments can go on under it."""
    saved, current = trajectory_fields(state["config"]), trajectory_fields(config)
    field = first_difference(
        {key: value for key, value in saved.items() if not is_hyperparameter(key)},
        {key: value for key, value in current.items() if not is_hyperparameter(key)},
    )
    if field is None:
        return
    raise ConfigError(
        f"start_from: checkpoint '{path}' cannot continue under this config: field {field} "
        f"differs (checkpoint: {saved.get(field)!r}, now: {current.get(field)!r}); only "
        f"hyperparameters ({', '.join(HYPERPARAMETER_FIELDS)}; not {', '.join(STATE_FIELDS)}) "
        "may change"
    )
