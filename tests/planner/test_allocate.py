"""Compute-optimal and inference-aware allocation, and GPU-hours conversion."""

from __future__ import annotations

import numpy as np
import pytest

from planner.allocate import (
    chinchilla_tokens_for,
    compute_optimal,
    inference_budget_optimal,
    inference_optimal,
)
from planner.errors import InputError
from planner.hardware import flops_to_gpu_hours, gpu_hours_to_flops
from planner.hparams import optimal_batch_tokens, optimal_learning_rate
from planner.published import published_law


def test_sardana_example_13b_becomes_7b_on_1_3t_tokens() -> None:
    # Sardana et al. 2024, sec. 3: a Chinchilla-optimal 13B model, 2T inference tokens ->
    # a ~7B model trained on ~1.3T tokens, ~16% fewer lifetime FLOPs.
    law = published_law("hoffmann2022")
    tokens = chinchilla_tokens_for(law, 13e9)
    target = float(law.surface.loss(law.params, 13e9, tokens))  # type: ignore[union-attr]
    result = inference_optimal(law, target, 2e12)
    assert result["n_params"] == pytest.approx(7.1e9, rel=0.02)
    assert result["n_tokens"] == pytest.approx(1.3e12, rel=0.02)
    assert result["total_flops_saving"] == pytest.approx(0.16, abs=0.01)
    assert result["chinchilla_optimal"]["n_params"] == pytest.approx(13e9, rel=1e-4)
    assert result["total_flops"] == pytest.approx(result["train_flops"] + result["inference_flops"])


def test_budget_form_is_the_inverse_of_the_loss_form() -> None:
    law = published_law("hoffmann2022")
    forward = inference_optimal(law, 2.1, 5e11)
    inverse = inference_budget_optimal(law, forward["total_flops"], 5e11)
    assert inverse["loss"] == pytest.approx(2.1, abs=1e-6)
    assert inverse["n_params"] == pytest.approx(forward["n_params"], rel=1e-3)


def test_no_inference_means_chinchilla_optimal() -> None:
    law = published_law("epoch2024")
    result = inference_optimal(law, 2.2, 1.0)  # one token served: negligible
    row = compute_optimal(law, [result["train_flops"]])[0]
    assert result["n_params"] == pytest.approx(row["n_params"], rel=1e-3)


def test_unreachable_loss_and_allocation_laws_are_rejected() -> None:
    with pytest.raises(InputError, match="not reachable"):
        inference_optimal(published_law("hoffmann2022"), 1.5, 1e12)
    with pytest.raises(InputError, match="allocation rule without a loss surface"):
        inference_optimal(published_law("hoffmann2022-approach1"), 2.0, 1e12)


def test_bands_come_from_bootstrap_samples_and_bracket_the_estimate() -> None:
    law = published_law("hoffmann2022").model_copy(
        update={
            "bootstrap": [
                [1.69, 406.4, 410.7, a, b] for a, b in [(0.33, 0.28), (0.34, 0.29), (0.35, 0.27)]
            ]
        }
    )
    row = compute_optimal(law, [1e22], level=0.8)[0]
    for key in ("n_params", "n_tokens", "loss"):
        assert row[f"{key}_low"] <= row[f"{key}_high"]
    assert "n_params_low" not in compute_optimal(published_law("hoffmann2022"), [1e22])[0]


def test_bad_compute_is_rejected_with_the_field_name() -> None:
    for bad in ([0.0], [-1e21], [float("nan")], []):
        with pytest.raises(InputError, match="--compute"):
            compute_optimal(published_law("hoffmann2022"), bad)


def test_gpu_hours_round_trip_and_h100_peak() -> None:
    flops = gpu_hours_to_flops([1.0], "h100", 0.5)
    assert float(flops[0]) == pytest.approx(3600 * 989.4e12 * 0.5)
    assert float(flops_to_gpu_hours(flops, "h100", 0.5)[0]) == pytest.approx(1.0)
    with pytest.raises(InputError, match="--gpu: 'h900'"):
        gpu_hours_to_flops([1.0], "h900", 0.4)
    with pytest.raises(InputError, match="--mfu"):
        gpu_hours_to_flops([1.0], "h100", 1.5)


def test_deepseek_hyperparameter_laws_match_their_7b_run() -> None:
    # DeepSeek LLM 7B: ~2T tokens at ~8.3e22 FLOPs used peak LR 4.2e-4 and a 9.4M-token batch.
    compute = 8.3e22
    assert float(optimal_learning_rate(compute)) == pytest.approx(4.2e-4, rel=0.05)
    assert float(optimal_batch_tokens(compute)) == pytest.approx(9.4e6, rel=0.05)
    assert np.all(np.diff(optimal_learning_rate([1e18, 1e20, 1e22])) < 0)
