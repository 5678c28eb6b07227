"""Gradient clipping: global norm, value, and AGC checked against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.clipping import agc_, clip_gradients, unitwise_norm
from trainer.diagnostics import grad_norms


def param(weight: list[list[float]], grad: list[list[float]]) -> nn.Parameter:
    p = nn.Parameter(torch.tensor(weight))
    p.grad = torch.tensor(grad)
    return p


def test_agc_matches_a_hand_computation() -> None:
    # rows are units. Row 0: ||W|| = 5, ||G|| = 1 -> ratio 0.2 > 0.1: scaled to 0.1 * 5 = 0.5.
    # Row 1: ||W|| = 10, ||G|| = 0.5 -> ratio 0.05: untouched.
    # Row 2: ||W|| = 0 -> floor eps = 1e-3; ||G|| = 1 -> scaled to 0.1 * 1e-3.
    p = param(
        [[3.0, 4.0], [6.0, 8.0], [0.0, 0.0]],
        [[0.6, 0.8], [0.3, 0.4], [1.0, 0.0]],
    )
    assert bool(agc_([p], clip=0.1, eps=1e-3)) is True
    assert p.grad is not None
    expected = torch.tensor([[0.3, 0.4], [0.3, 0.4], [1e-4, 0.0]])
    torch.testing.assert_close(p.grad, expected)


def test_agc_leaves_small_gradients_alone() -> None:
    p = param([[3.0, 4.0]], [[0.03, 0.04]])
    assert bool(agc_([p], clip=0.1)) is False
    assert p.grad is not None
    torch.testing.assert_close(p.grad, torch.tensor([[0.03, 0.04]]))


def test_unitwise_norm_is_per_output_unit() -> None:
    kernel = torch.ones(4, 3, 2, 2)  # conv: out, in, kh, kw
    assert unitwise_norm(kernel).shape == (4, 1, 1, 1)
    assert unitwise_norm(kernel).flatten().tolist() == pytest.approx([math.sqrt(12)] * 4)
    assert unitwise_norm(torch.tensor([3.0, 4.0])).item() == 5.0


def test_norm_clipping_matches_torch_and_reports_firing() -> None:
    p = param([[0.0, 0.0]], [[3.0, 4.0]])
    total, _ = grad_norms([p])
    assert total.item() == 5.0
    assert bool(clip_gradients([p], "norm", total, max_norm=1.0)) is True
    assert p.grad is not None
    torch.testing.assert_close(p.grad, torch.tensor([[0.6, 0.8]]), atol=1e-6, rtol=1e-5)
    q = param([[0.0, 0.0]], [[0.3, 0.4]])
    assert bool(clip_gradients([q], "norm", grad_norms([q])[0], max_norm=1.0)) is False


def test_value_clipping_clamps_elements() -> None:
    p = param([[0.0, 0.0]], [[3.0, -0.5]])
    assert bool(clip_gradients([p], "value", grad_norms([p])[0], value=1.0)) is True
    assert p.grad is not None
    assert p.grad.tolist() == [[1.0, -0.5]]
    assert bool(clip_gradients([p], "none", torch.tensor(10.0))) is False
