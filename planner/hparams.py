"""Compute-optimal learning rate and batch size as power laws in training compute."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

HPARAMS_CITATION = "DeepSeek-AI 2024, DeepSeek LLM, arXiv:2401.02954, eq. 1 (AdamW, multi-step LR)"


def optimal_learning_rate(compute_flops: ArrayLike) -> NDArray[np.float64]:
    """Peak LR for AdamW pre-training at compute C: 0.3118 C^-0.1250 (DeepSeek LLM, eq. 1)."""
    return np.asarray(0.3118 * np.asarray(compute_flops, dtype=float) ** -0.1250)


def optimal_batch_tokens(compute_flops: ArrayLike) -> NDArray[np.float64]:
    """Batch size in tokens at compute C: 0.2920 C^0.3271 (DeepSeek LLM, eq. 1)."""
    return np.asarray(0.2920 * np.asarray(compute_flops, dtype=float) ** 0.3271)
