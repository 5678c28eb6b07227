"""Diagnostics: dead units by their documented definition, activation probes that detach,
update/weight ratios, FLOP estimates and the peak-FLOP/s table behind MFU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.diagnostics import (
    PEAK_FLOPS,
    ActivationProbe,
    WeightSnapshot,
    dead_fraction,
    flops_per_token,
    grad_norms,
    peak_flops,
    per_layer_grad_norms,
)
from trainer.models import GPT, CNNConfig, GPTConfig, MLPConfig, build_model


def test_dead_relu_units_are_never_positive_in_the_batch() -> None:
    # unit 0 fires once, unit 1 never (0 counts as dead), unit 2 always
    x = torch.tensor([[1.0, 0.0, 2.0], [-1.0, -3.0, 1.0]])
    assert dead_fraction(nn.ReLU(), x).item() == pytest.approx(1 / 3)


def test_dead_gelu_units_sit_below_minus_three() -> None:
    x = torch.tensor([[-3.5, -2.0], [-4.0, -5.0]])  # unit 0 always < -3, unit 1 once above
    assert dead_fraction(nn.GELU(), x).item() == pytest.approx(0.5)


def test_saturated_tanh_units_count_as_dead() -> None:
    x = torch.tensor([[4.0, 0.5], [-5.0, 4.0]])
    assert dead_fraction(nn.Tanh(), x).item() == pytest.approx(0.5)


def test_dead_conv_channels_are_per_channel() -> None:
    x = torch.ones(2, 3, 4, 4)
    x[:, 1] = -1.0  # channel 1 never fires
    assert dead_fraction(nn.ReLU(), x).item() == pytest.approx(1 / 3)


def test_activation_probe_reports_blocks_and_removes_its_hooks() -> None:
    model = build_model(MLPConfig(width=16, depth=2), input_shape=(1, 8, 8), num_classes=10)
    probe = ActivationProbe(model)
    with probe.attached():
        model(torch.randn(5, 1, 8, 8))
    metrics = probe.metrics()
    assert set(metrics) == {
        "act_mean/input_layer",
        "act_std/input_layer",
        "act_mean/hidden_layers.0",
        "act_std/hidden_layers.0",
        "dead_frac/input_layer.act",
        "dead_frac/hidden_layers.0.act",
    }
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k.startswith("dead_frac"))
    model(torch.randn(5, 1, 8, 8))  # hooks are gone: nothing new is recorded
    assert probe.metrics() == {}
    assert all(not m._forward_hooks for m in model.modules())


def test_gpt_probe_covers_every_block() -> None:
    model = build_model(GPTConfig(n_layer=3, d_model=16, n_head=2, block_size=8), vocab_size=32)
    probe = ActivationProbe(model)
    assert probe.blocks == ["blocks.0", "blocks.1", "blocks.2"]
    assert probe.activations == [f"blocks.{i}.mlp.gelu" for i in range(3)]


def test_grad_norms_match_torch_and_name_matrices_only() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model(torch.randn(6, 3)).pow(2).sum().backward()
    named = list(model.named_parameters())
    total, per_param = grad_norms([p for _, p in named])
    expected = torch.nn.utils.get_total_norm([p.grad for _, p in named if p.grad is not None])
    torch.testing.assert_close(total, expected)
    layers = per_layer_grad_norms(named, per_param)
    assert set(layers) == {"grad_norm/0.weight", "grad_norm/1.weight"}
    first = model[0]
    assert isinstance(first, nn.Linear) and first.weight.grad is not None
    assert layers["grad_norm/0.weight"] == pytest.approx(first.weight.grad.norm().item())


def test_update_ratio_is_update_norm_over_weight_norm() -> None:
    weight = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    snapshot = WeightSnapshot([("w", weight)])
    with torch.no_grad():
        weight.add_(torch.tensor([[0.3, 0.4]]))  # an update of norm 0.5 on a weight of norm 5
    metrics = snapshot.metrics()
    assert metrics["update_ratio/w"] == pytest.approx(0.1)
    assert metrics["weight_norm/w"] == pytest.approx(5.5)


def test_flops_per_token_gpt_and_estimates_for_mlp_and_cnn() -> None:
    gpt = build_model(GPTConfig(n_layer=2, d_model=32, n_head=2, block_size=16), vocab_size=256)
    assert isinstance(gpt, GPT)
    assert flops_per_token(gpt, torch.zeros(1, 16, dtype=torch.long)) == gpt.flops_per_token()
    mlp = build_model(MLPConfig(width=32, depth=2), input_shape=(1, 8, 8), num_classes=10)
    assert flops_per_token(mlp, torch.zeros(4, 1, 8, 8)) == 6 * (64 * 32 + 32 * 32 + 32 * 10)
    cnn = build_model(CNNConfig(channels=[4, 8]), input_shape=(1, 8, 8), num_classes=10)
    # conv 1->4 at 8x8, conv 4->8 at 4x4 (after a pool), each 3x3; readout 8->10
    macs = 4 * 8 * 8 * 1 * 9 + 8 * 4 * 4 * 4 * 9 + 8 * 10
    assert flops_per_token(cnn, torch.zeros(4, 1, 8, 8)) == 6 * macs


def test_peak_flops_table_override_and_cpu_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    assert peak_flops(torch.device("cpu"), 1e12) == (1e12, "config")
    measured, source = peak_flops(torch.device("cpu"))
    assert 1e8 < measured < 1e14 and source.startswith("measured")
    state = torch.get_rng_state()
    peak_flops(torch.device("cpu"))
    assert torch.equal(state, torch.get_rng_state())  # the benchmark leaves the RNG alone
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda")) == (PEAK_FLOPS["H100"], "table (H100)")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    assert peak_flops(torch.device("cuda"))[0] == 312e12
    assert math.isclose(PEAK_FLOPS["H200"], 989.4e12)
