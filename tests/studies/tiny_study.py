"""The seconds-long trainer config the study tests sweep over: a 1-layer byte GPT, MLflow off."""

from __future__ import annotations

from typing import Any

TINY_BASE: dict[str, Any] = {
    "seed": 0,
    "steps": 20,
    "log_every": 5,
    "eval_every": 5,
    "eval_batches": 2,
    "checkpoint_every": 0,
    "model": {"kind": "gpt", "n_layer": 1, "n_head": 2, "d_model": 16},
    "data": {"kind": "stdlib", "block_size": 32, "batch_size": 4, "max_bytes": 200_000},
    "optimizer": {"name": "adamw", "lr": 3e-3, "betas": [0.9, 0.95]},
    "schedule": {"name": "cosine", "warmup_steps": 2},
    "diagnostics": {"per_layer": False, "activations": False},
    "tracking": {"enabled": False},
}
