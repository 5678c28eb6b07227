"""Numeric precision of the training step: autocast, loss scaling, fp8 matmuls.

- ``fp32``: nothing changes.
- ``bf16``: forward under `torch.autocast(dtype=bfloat16)`, on CPU or GPU; weights, gradients
  and optimiser state stay fp32. bfloat16 has fp32's range, so no loss scaling is needed.
- ``fp16``: autocast to float16 plus a `torch.amp.GradScaler` (Micikevicius et al. 2018, "Mixed
  Precision Training"): the loss is multiplied before backward so small gradients do not
  underflow, gradients are unscaled before clipping, and a step whose gradients overflowed is
  skipped while the scale shrinks. The scaler's state is checkpointed. CUDA only.
- ``fp8``: torchao's float8 training (`convert_to_float8_training`: nn.Linear matmuls in float8
  with dynamic scaling) under bf16 autocast. CUDA with compute capability >= 8.9 and the
  `torchao` package; no fallback of our own on `torch._scaled_mm`.

Every check runs at start-up (`check_precision`) and fails as one ConfigError line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.errors import ConfigError

__all__ = ["Precision", "build_precision", "check_precision", "resolve_device"]

FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with float8 tensor cores


def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is a ConfigError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device: 'cuda' but torch sees no CUDA GPU on this machine; use device: auto or cpu"
        )
    return torch.device(device)


def check_precision(mode: str, device: torch.device) -> None:
    """Raise a one-line ConfigError when `mode` cannot run on `device`."""
    if mode in ("fp16", "fp8") and device.type != "cuda":
        raise ConfigError(
            f"precision: '{mode}' needs a CUDA GPU; this run is on {device.type}; "
            "use bf16 or fp32 on CPU"
        )
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"precision: 'bf16' is not supported by {torch.cuda.get_device_name(device)}; "
            "use fp16 or fp32"
        )
    if mode == "fp8":
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            raise ConfigError(
                f"precision: 'fp8' needs compute capability >= 8.9 (Ada, Hopper or newer); "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}; "
                "use bf16"
            )
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError(
                "precision: 'fp8' needs the torchao package"
                " (`pip install 'scaleplan[fp8]'`); use bf16"
            )


@dataclass
class Precision:
    """How the loop runs forward, backward and the optimiser step at one precision."""

    mode: str
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None: no autocast
    scaler: torch.amp.GradScaler | None

    @property
    def scales_loss(self) -> bool:
        """True when overflowing gradients are expected now and then (fp16 loss scaling)."""
        return self.scaler is not None

    def prepare(self, model: nn.Module) -> nn.Module:
        """Swap in fp8 linear layers (fp8 only); call before torch.compile."""
        if self.mode != "fp8":
            return model
        from torchao.float8 import convert_to_float8_training

        # float8 matmuls need dimensions divisible by 16; other layers stay as they are
        def divisible(module: nn.Module, _: str) -> bool:
            return isinstance(module, nn.Linear) and all(
                dim % 16 == 0 for dim in module.weight.shape
            )

        result: nn.Module = convert_to_float8_training(model, module_filter_fn=divisible)
        return result

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Context for the forward pass and the loss."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, create_graph: bool = False) -> None:
        """Backward of `loss` (scaled first under fp16); create_graph for Sophia's Hessian."""
        with warnings.catch_warnings():
            # the grad <-> graph cycle torch warns of is broken each step: the loop zeroes
            # gradients with set_to_none
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            (loss if self.scaler is None else self.scaler.scale(loss)).backward(
                create_graph=create_graph
            )

    def loss_scale(self) -> float:
        """The factor the loss is multiplied by before backward: fp16's scale, else 1."""
        return 1.0 if self.scaler is None else float(self.scaler.get_scale())

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true size, before norms and clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimiser step; False when fp16 loss scaling skipped it (gradient overflow)."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale  # the scale only shrinks after an overflow

    def skip(self) -> None:
        """Leave this step's update out; the scaler still closes its bookkeeping for the step."""
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else dict(self.scaler.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def build_precision(mode: str, device: torch.device) -> Precision:
    """Check `mode` against `device` and build its `Precision`."""
    check_precision(mode, device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
    scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
    return Precision(mode=mode, device=device, dtype=dtype[mode], scaler=scaler)
