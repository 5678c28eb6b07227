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

Under several processes (DDP, FSDP2) a checkpoint is a folder ``step_XXXXXXX.dcp/`` written
with PyTorch's distributed checkpointing (`torch.distributed.checkpoint`): ``model`` and
``optimizer`` as every rank's shards (FQN-keyed, from `get_state_dict`), and the rest (loop,
schedule, RNG, config) in ``trainer.pt`` beside them, written by rank 0. It is written into a
temporary folder that rank 0 renames once every rank is done. Either kind resumes under any
number of processes: DCP reshards on load, and a single file's full state is sharded by
`set_state_dict` (`load_model_and_optimizer`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import tempfile
import warnings
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
    "load_model_and_optimizer",
    "save_checkpoint",
    "save_sharded_checkpoint",
]

CHECKPOINT_FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)\.(pt|dcp)$")
SHARDED_META = "trainer.pt"  # in a step_XXXXXXX.dcp folder: everything but model and optimizer
REQUIRED_KEYS = ("format", "step", "model", "optimizer", "scheduler", "rng", "loop", "config")
SHARDED_KEYS = ("model", "optimizer")  # in the DCP shards of a sharded checkpoint
# what a run continued from a checkpoint under a new config may change: the values its
# optimiser param groups and schedule are rebuilt from (dotted prefixes of TrainConfig keys)
HYPERPARAMETER_FIELDS = ("optimizer", "schedule", "clip", "label_smoothing", "early_stopping")
# ... except these, which decide what the optimiser state is and which parameters it covers
STATE_FIELDS = ("optimizer.name", "optimizer.no_decay_on", "optimizer.muon_exclude")
# A continuation may also train to another horizon and evaluate at other steps (a WSD
# cool-down branched off a stable run: its schedule decays over its own steps)
HORIZON_FIELDS = ("steps", "eval_every")


def checkpoint_path(run_dir: Path, step: int, sharded: bool = False) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step_{step:07d}.{'dcp' if sharded else 'pt'}"


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
    _prune(run_dir, keep)
    return path


def _prune(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(old) if old.is_dir() else old.unlink()


def save_sharded_checkpoint(
    run_dir: Path,
    state: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    keep: int,
    *,
    main: bool,
) -> Path:
    """Every rank calls this (a collective): the model's and optimiser's shards through
    `torch.distributed.checkpoint`, `state` (the rest) from rank 0 (`main`); see the module
    docstring."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = checkpoint_path(run_dir, int(state["step"]), sharded=True)
    temp = path.with_name(f".{path.name}.tmp")
    if main:
        shutil.rmtree(temp, ignore_errors=True)  # left by a killed job
        temp.mkdir(parents=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=temp)
    if main:
        with (temp / SHARDED_META).open("wb") as file:
            torch.save({"format": CHECKPOINT_FORMAT, "sharded": True, **state}, file)
            file.flush()
            os.fsync(file.fileno())
        if path.exists():  # the same step saved twice (a callback's save, then the loop's)
            shutil.rmtree(path)
        os.replace(temp, path)
        _prune(run_dir, keep)
    dist.barrier()
    return path


def load_model_and_optimizer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    saved: dict[str, Any],
    path: Path,
    *,
    sharded_params: bool,
) -> None:
    """Put a checkpoint's weights and optimiser state into `model` and `optimizer`, under any
    number of processes. A sharded checkpoint is read through DCP (resharded to this job); a
    single file's full state goes in as is, or, when the parameters are FSDP2 shards
    (`sharded_params`), through `set_state_dict`, the native optimiser state renamed to the
    parameters' names first. Raises what the load raises (the caller names the checkpoint)."""
    if not saved.get("sharded") and not sharded_params:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    model_state, optimizer_state = get_state_dict(model, optimizer)
    if saved.get("sharded"):
        # in place: the shards this job's layout asks for, from whatever layout wrote them
        with warnings.catch_warnings():  # one process reading shards is what we mean
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
        set_state_dict(
            model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state
        )
        return
    set_state_dict(
        model,
        optimizer,
        model_state_dict=saved["model"],
        optim_state_dict=_named_optimizer_state(saved["optimizer"], optimizer_state),
        options=StateDictOptions(full_state_dict=True),
    )


def _named_optimizer_state(native: dict[str, Any], named: dict[str, Any]) -> dict[str, Any]:
    """A native optimiser state dict (parameters by index) keyed by parameter names instead,
    read position by position from `named` (`get_state_dict`'s view of the same optimiser)."""
    indices = [i for group in native["param_groups"] for i in group["params"]]
    names = [n for group in named["param_groups"] for n in group["params"]]
    if len(indices) != len(names):
        raise ValueError(f"{len(indices)} parameters in the checkpoint, {len(names)} now")
    name_of = dict(zip(indices, names, strict=True))
    return {
        "state": {name_of[i]: value for i, value in native["state"].items()},
        "param_groups": [
            {**group, "params": [name_of[i] for i in group["params"]]}
            for group in native["param_groups"]
        ],
    }


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; anything unreadable is a one-line ConfigError.

    For a sharded checkpoint (a folder) this is its ``trainer.pt``: everything but the model
    and optimiser, which `load_model_and_optimizer` reads from the shards."""
    sharded = path.is_dir()
    try:
        state = torch.load(
            path / SHARDED_META if sharded else path, map_location=map_location, weights_only=True
        )
    except FileNotFoundError:
        raise ConfigError(f"checkpoint '{path}' does not exist") from None
    except Exception as error:  # truncated zip, bad pickle, foreign object: all one answer
        raise ConfigError(
            f"checkpoint '{path}' is unreadable ({_why(error)}); delete it to resume from an "
            "earlier one, or start a new run"
        ) from None
    required = [key for key in REQUIRED_KEYS if not (sharded and key in SHARDED_KEYS)]
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
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
    hyperparameters (`is_hyperparameter`) and the horizon (`HORIZON_FIELDS`), so that its
    weights and moments can go on under it."""
    saved, current = trajectory_fields(state["config"]), trajectory_fields(config)

    def fixed(key: str) -> bool:
        return not is_hyperparameter(key) and key not in HORIZON_FIELDS

    field = first_difference(
        {key: value for key, value in saved.items() if fixed(key)},
        {key: value for key, value in current.items() if fixed(key)},
    )
    if field is None:
        return
    raise ConfigError(
        f"start_from: checkpoint '{path}' cannot continue under this config: field {field} "
        f"differs (checkpoint: {saved.get(field)!r}, now: {current.get(field)!r}); only "
        f"hyperparameters ({', '.join(HYPERPARAMETER_FIELDS)}; not {', '.join(STATE_FIELDS)}) "
        f"and the horizon ({', '.join(HORIZON_FIELDS)}) may change"
    )
