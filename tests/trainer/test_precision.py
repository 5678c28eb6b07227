"""Precision modes: bf16 autocast on CPU, refusals without CUDA, fp16 loss scaling on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.precision import build_precision, check_precision, resolve_device

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_fp32_changes_nothing() -> None:
    precision = build_precision("fp32", CPU)
    layer = nn.Linear(4, 4)
    with precision.autocast():
        assert layer(torch.ones(2, 4)).dtype == torch.float32
    assert precision.scaler is None and precision.state_dict() == {}


def test_bf16_autocasts_matmuls_on_cpu_and_keeps_fp32_weights() -> None:
    precision = build_precision("bf16", CPU)
    layer = nn.Linear(4, 4)
    with precision.autocast():
        out = layer(torch.ones(2, 4))
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    precision.backward(out.float().sum())
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("mode", ["fp16", "fp8"])
def test_gpu_only_modes_are_one_line_errors_on_cpu(mode: str) -> None:
    with pytest.raises(ConfigError, match=f"^precision: '{mode}' needs a CUDA GPU; .* bf16"):
        check_precision(mode, CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_device_without_a_gpu_is_an_error() -> None:
    with pytest.raises(ConfigError, match="device: 'cuda'"):
        resolve_device("cuda")
    assert resolve_device("auto") == CPU


@pytest.mark.gpu
@needs_cuda
def test_fp16_scaler_skips_overflowing_steps_and_round_trips() -> None:
    device = torch.device("cuda")
    precision = build_precision("fp16", device)
    layer = nn.Linear(8, 8).to(device)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    with precision.autocast():
        out = layer(torch.ones(2, 8, device=device))
    assert out.dtype == torch.float16
    precision.backward(out.float().sum() * float("inf"))
    precision.unscale_(optimizer)
    before = layer.weight.detach().clone()
    assert precision.step(optimizer) is False  # overflow: no update, smaller scale
    assert torch.equal(before, layer.weight.detach())
    state = precision.state_dict()
    other = build_precision("fp16", device)
    other.load_state_dict(state)
    assert other.state_dict()["scale"] == state["scale"]


@pytest.mark.gpu
@needs_cuda
def test_fp8_is_refused_or_runs_with_torchao() -> None:
    device = torch.device("cuda")
    try:
        precision = build_precision("fp8", device)
    except ConfigError as error:
        assert "fp8" in str(error)
        return
    model = precision.prepare(nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16)).to(device))
    with precision.autocast():
        out = model(torch.ones(16, 32, device=device))
    out.float().sum().backward()
