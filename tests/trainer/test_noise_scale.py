"""The online gradient noise scale against the analytic one, and its place in the loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.errors import ConfigError
from trainer.loop import forward_backward, train
from trainer.noise_scale import GradientNoiseScale, noise_scale_parts
from trainer.pathologies import diagnose
from trainer.precision import build_precision

DIM, NOISE_STD = 10, 1.0


class LinearRegression(nn.Module):
    """y ≈ w·x with loss ½·mean((w·x − y)²), called as the trainer's models are."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prediction = x @ self.w
        return prediction, 0.5 * (prediction - y).square().mean()


def analytic_b_simple(d: torch.Tensor) -> float:
    """x ~ N(0, I), y = x·w* + ε, ε ~ N(0, σ²), d = w − w*: the per-example gradient is
    x(x·d − ε), so G = d and Σ = (|d|² + σ²)I + d dᵀ (Isserlis): tr Σ / |G|² in closed form."""
    d_sq = float(d.square().sum())
    return (DIM * (d_sq + NOISE_STD**2) + d_sq) / d_sq


def batches(generator: torch.Generator, w_star: torch.Tensor, rows: int, count: int):
    for _ in range(count):
        x = torch.randn(rows, DIM, generator=generator)
        y = x @ w_star + NOISE_STD * torch.randn(rows, generator=generator)
        yield x, y


def test_parts_are_unbiased_on_exact_expectations() -> None:
    # E|G_B|² = |G|² + tr Σ / B: feed the expectations, get the two parts back exactly
    grad_sq, trace = 4.0, 120.0
    small, big = grad_sq + trace / 8, grad_sq + trace / 64
    assert noise_scale_parts(small, big, 8, 64) == pytest.approx((grad_sq, trace))
    with pytest.raises(ValueError, match="b_small < b_big"):
        noise_scale_parts(small, big, 64, 8)


def test_online_estimate_matches_the_analytic_noise_scale_along_training() -> None:
    generator = torch.Generator().manual_seed(0)
    w_star = torch.randn(DIM, generator=generator)
    model = LinearRegression(w_star + 3.0 * torch.randn(DIM, generator=generator) / DIM**0.5)
    precision = build_precision("fp32", torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    micro, accum = 16, 8
    checked = []
    for point in range(4):  # several points of training: SGD steps between them
        estimator = GradientNoiseScale(
            list(model.parameters()), micro_batch=micro, accum_steps=accum, ema=0.996
        )
        for _ in range(800):  # the estimate at this point, weights held still
            estimator.start()
            forward_backward(
                model,
                batches(generator, w_star, micro, accum),
                accum,
                precision,
                after_micro_batch=estimator.after_micro_batch,
            )
            estimator.update(float(model.w.grad.norm()))
            model.zero_grad(set_to_none=True)
        expected = analytic_b_simple(model.w.detach() - w_star)
        checked.append((expected, estimator.b_simple))
        for _ in range(8 * (point + 1)):
            forward_backward(model, batches(generator, w_star, 32, 1), 1, precision)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    expected_values = [e for e, _ in checked]
    assert expected_values[-1] > 2 * expected_values[0]  # the noise scale grows as |G| falls
    for expected, measured in checked:
        assert measured == pytest.approx(expected, rel=0.10), checked


def test_gns_in_the_loop_logs_b_simple_in_examples_and_tokens(tmp_path) -> None:
    config = TrainConfig(
        steps=20,
        grad_accum_steps=2,
        log_every=10,
        eval_every=0,
        model={"n_layer": 1, "d_model": 32, "n_head": 2},
        data={"batch_size": 4, "block_size": 16},
        diagnostics={"gns": True, "per_layer": False, "activations": False},
        tracking={"enabled": False},
    )
    train(config, out_dir=tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "gns/b_simple" in r][-1]
    assert last["gns/batch"] == 8
    assert math.isfinite(last["gns/trace"]) and last["gns/trace"] > 0
    if math.isfinite(last["gns/b_simple"]):
        assert last["gns/b_simple_tokens"] == pytest.approx(16 * last["gns/b_simple"])


def test_gns_without_accumulation_says_how_to_enable_it(tmp_path) -> None:
    config = TrainConfig(diagnostics={"gns": True}, tracking={"enabled": False})
    with pytest.raises(
        ConfigError,
        match=r"^diagnostics.gns: true needs two batch sizes.*"
        r"grad_accum_steps >= 2.*or run on several DDP processes",
    ):
        train(config, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize(
    ("b_simple", "pathology", "says"),
    [
        (520.0, "batch below the noise scale", "batch 64 is 8.1x below B_simple ≈ 520"),
        (16.0, "batch above the noise scale", "batch 64 is 4x above B_simple ≈ 16"),
        (100.0, "batch near the noise scale", "within 2x of B_simple ≈ 100"),
    ],
)
def test_diagnose_places_the_batch_against_the_late_noise_scale(
    b_simple: float, pathology: str, says: str
) -> None:
    # the noise scale grows through training: the verdict reads the last quarter of records
    records = [
        {
            "step": step,
            "loss": 3.0 - step / 1000,
            "gns/b_simple": b_simple * min(1.0, step / 600),
            "gns/b_simple_tokens": 128 * b_simple * min(1.0, step / 600),
            "gns/batch": 64.0,
        }
        for step in range(10, 1010, 10)
    ]
    (finding,) = [f for f in diagnose(records) if f.pathology.startswith("batch")]
    assert finding.pathology == pathology
    assert says in finding.detail
    assert f"({128 * b_simple:.3g} tokens)" in finding.detail
    assert finding.steps == (760, 1000)
