"""A launchable compute-optimal recipe: the law's N and D made into a model shape, a batch, a
schedule and a trainer config, with the GPU time and the memory and parallelism plan.

- N and D, the loss and its interval: `planner.allocate.compute_optimal` (the law's).
- The shape: `planner.shape.shape_for` (non-embedding N; a law counting all parameters has the
  embedding of the shape it gets taken out first; a ladder's law, N = FLOPs per token / 6,
  gets the shape whose `flop_params` is nearest).
- Peak LR and batch: a hyperparameter law in C (DeepSeek LLM's, or one fitted to your tuned
  runs), bounded by a measured B_crit carried to the predicted loss when given, as
  `compute_optimal` gives them; the batch in whole sequences.
- Schedule: warm-up over 2% of the steps, at most DeepSeek LLM's 2000, then cosine decay to 10%
  of the peak over the whole run (Hoffmann et al. 2022, sec. 3 and Fig. A1: a cosine cycle as
  long as the run, decaying 10x; a longer cycle costs loss).
- GPU-hours: C / (peak FLOP/s x MFU) on the named GPU.
- The plan: `planner.memory.plan_splits` on the shape at the recipe's batch.
"""

from __future__ import annotations

import math
from typing import Any

from planner.allocate import compute_optimal
from planner.batch import MeasuredBatch
from planner.errors import InputError
from planner.hardware import peak_flops
from planner.hparams import DEEPSEEK2024, HparamLaw
from planner.laws import FLOPS_PER_PARAM_TOKEN
from planner.memory import AUTOCAST, StateBytes, Transformer, plan_splits, suggest_split
from planner.published import Law
from planner.shape import flop_params, shape_for, shape_for_flop_params

WARMUP_FRACTION, MAX_WARMUP = 0.02, 2000
MIN_LR_RATIO = 0.1


def _shape(law: Law, n_params: float, seq_len: int, vocab_size: int) -> Transformer:
    if law.n_counts == "non-embedding":
        return shape_for(n_params, seq_len=seq_len, vocab_size=vocab_size)
    if law.n_counts == "flops":  # a ladder's law: N is FLOPs per token / 6
        return shape_for_flop_params(n_params, seq_len=seq_len, vocab_size=vocab_size)
    target = n_params  # total: take the embedding of the shape out, a few times over
    shape = shape_for(target, seq_len=seq_len, vocab_size=vocab_size)
    for _ in range(5):
        embedding = (vocab_size + seq_len) * shape.d_model
        if n_params - embedding < 12 * 16**2:
            raise InputError(
                f"--compute: the law's N ({n_params:.3g} parameters) is mostly embedding at "
                f"vocabulary {vocab_size}; raise the budget or lower --vocab-size"
            )
        shape = shape_for(n_params - embedding, seq_len=seq_len, vocab_size=vocab_size)
    return shape


def make_recipe(
    law: Law,
    compute_flops: float,
    *,
    seq_len: int = 1024,
    vocab_size: int = 50304,
    level: float = 0.8,
    measured_batch: MeasuredBatch | None = None,
    gpu: str = "h100",
    mfu: float = 0.4,
    gpus: int | None = None,
    micro_batch: int = 1,
    precision: StateBytes = AUTOCAST,
    hparams: HparamLaw = DEEPSEEK2024,
) -> dict[str, Any]:
    """The recipe at `compute_flops` (see the module docstring), as one JSON-friendly dict."""
    if seq_len < 1 or vocab_size < 1:
        raise InputError(f"--seq-len {seq_len}, --vocab-size {vocab_size}: expected positive")
    if not 0 < mfu <= 1:
        raise InputError(f"--mfu: {mfu} must be in (0, 1]")
    (row,) = compute_optimal(
        law, [compute_flops], level=level, measured_batch=measured_batch, hparams=hparams
    )
    shape = _shape(law, row["n_params"], seq_len, vocab_size)
    # the shape hits the law's N only roughly: it trains the tokens that spend C at its own N
    # (counted as the law counts it), D = C / (6 N_shape)
    shape_n = {
        "flops": flop_params(shape),
        "non-embedding": shape.n_params_non_embedding,
        "total": shape.n_params,
    }[law.n_counts]
    shape_tokens = compute_flops / (FLOPS_PER_PARAM_TOKEN * shape_n)
    batch_sequences = max(1, round(row["batch_tokens"] / seq_len))
    tokens_per_step = batch_sequences * seq_len
    steps = max(1, math.ceil(shape_tokens / tokens_per_step))
    warmup = max(1, min(MAX_WARMUP, round(WARMUP_FRACTION * steps))) if steps > 1 else 0
    gpu_hours = compute_flops / (peak_flops(gpu) * mfu * 3600.0)
    recipe: dict[str, Any] = {
        **row,
        "shape": {
            "n_layer": shape.n_layer,
            "d_model": shape.d_model,
            "n_head": shape.n_head,
            "seq_len": seq_len,
            "vocab_size": vocab_size,
        },
        "shape_params_non_embedding": shape.n_params_non_embedding,
        "shape_params": shape.n_params,
        "shape_flop_params": flop_params(shape),
        "shape_tokens": shape_tokens,
        "batch_sequences": batch_sequences,
        "tokens_per_step": tokens_per_step,
        "steps": steps,
        "warmup_steps": warmup,
        "schedule": "cosine",
        "min_lr_ratio": MIN_LR_RATIO,
        "gpu": gpu,
        "mfu": mfu,
        "gpu_hours": gpu_hours,
    }
    if gpus is not None:
        splits = plan_splits(
            shape,
            gpus=gpus,
            gpu=gpu,
            batch_sequences=batch_sequences,
            micro_batch=micro_batch,
            precision=precision,
            mfu=mfu,
        )
        split = suggest_split(splits, gpus, gpu)
        recipe["gpus"] = gpus
        recipe["wall_clock_hours"] = gpu_hours / gpus
        recipe["split"] = split.to_dict()
        recipe["alternatives"] = [s.to_dict() for s in splits if s.fits][:6]
    return recipe


def trainer_config(recipe: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config `scaleplan train` runs as is: `base` (data, tracking, ...; default corpus when
    None) with the recipe's model, batch, steps, optimiser and schedule."""
    shape, steps = recipe["shape"], recipe["steps"]
    config = dict(base or {})
    data = {k: v for k, v in dict(config.get("data") or {}).items() if k != "block_size"}
    config.update(
        steps=steps,
        log_every=max(1, min(100, steps // 100)),
        eval_every=max(1, steps // 10),
        checkpoint_every=max(1, steps // 4),
        model={
            **{k: v for k, v in dict(config.get("model") or {}).items() if k != "block_size"},
            "kind": "gpt",
            "n_layer": shape["n_layer"],
            "d_model": shape["d_model"],
            "n_head": shape["n_head"],
        },
        data={**data, "block_size": shape["seq_len"], "batch_size": recipe["batch_sequences"]},
        optimizer={
            **dict(config.get("optimizer") or {"weight_decay": 0.1, "betas": [0.9, 0.95]}),
            "name": "adamw",
            "lr": float(f"{recipe['learning_rate']:.4g}"),
        },
        schedule={
            "name": "cosine",
            "warmup_steps": recipe["warmup_steps"],
            "min_lr_ratio": recipe["min_lr_ratio"],
        },
    )
    split = recipe.get("split")
    if split is not None and split["tensor"] * split["pipeline"] == 1 and split["data"] > 1:
        strategy = "ddp" if split["zero_stage"] == 0 else "fsdp"
        config["distributed"] = {**dict(config.get("distributed") or {}), "strategy": strategy}
        if split["checkpointing"]:
            config["model"]["activation_checkpointing"] = True
    return config
