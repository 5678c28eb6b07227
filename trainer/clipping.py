"""Gradient clipping: global norm, element value, and adaptive gradient clipping (AGC).

Each clipper takes the gradients after unscaling and returns whether it changed them ("fired"),
as a boolean tensor on the gradients' device, so the step reads nothing on the host; the loop
logs that as ``clipped`` and the fraction of steps as ``clip_rate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["agc_", "clip_gradients", "unitwise_norm"]


def clip_gradients(
    params: Sequence[nn.Parameter],
    mode: str,
    total_norm: torch.Tensor,
    *,
    max_norm: float = 1.0,
    value: float = 1.0,
    agc_clip: float = 0.01,
    agc_eps: float = 1e-3,
) -> torch.Tensor:
    """Clip the gradients of `params` in place; a 0-dim bool tensor, true when clipping
    changed them.

    `total_norm` is the pre-clip global L2 norm, computed once by the loop (it is logged too).
    """
    if mode == "none":
        return torch.zeros((), dtype=torch.bool, device=total_norm.device)
    with_grad = [p for p in params if p.grad is not None]
    if mode == "norm":
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total_norm)
        return total_norm > max_norm
    if mode == "value":
        grads = [p.grad for p in with_grad if p.grad is not None]
        largest = torch.stack(torch._foreach_norm(grads, float("inf"))).max()
        torch.nn.utils.clip_grad_value_(with_grad, value)
        return largest > value
    if mode == "agc":
        return agc_(with_grad, agc_clip, agc_eps)
    raise ValueError(f"unknown clip mode {mode!r}")


def unitwise_norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output unit, broadcastable to `tensor`.

    A unit is a row of a matrix (torch's Linear and Embedding weights are (out, in)) or an
    output channel of a conv kernel (out, in, kh, kw); a vector or scalar is one unit.
    """
    if tensor.ndim <= 1:
        return tensor.norm(2)
    return tensor.norm(2, dim=tuple(range(1, tensor.ndim)), keepdim=True)


@torch.no_grad()
def agc_(params: Sequence[nn.Parameter], clip: float = 0.01, eps: float = 1e-3) -> torch.Tensor:
    """Adaptive gradient clipping, unit-wise (Brock et al. 2021, NFNets, eq. 3).

    For each unit i of each weight W with gradient G: if ||G_i|| / max(||W_i||, eps) > clip,
    G_i <- clip * max(||W_i||, eps) / ||G_i|| * G_i. Returns a 0-dim bool tensor, true when
    any unit was clipped.
    """
    fired = torch.zeros((), dtype=torch.bool, device=params[0].device if params else None)
    for param in params:
        if param.grad is None:
            continue
        weight_norm = unitwise_norm(param.detach()).clamp_min(eps)
        grad_norm = unitwise_norm(param.grad)
        max_norm = clip * weight_norm
        too_large = grad_norm > max_norm
        # 1e-6 keeps the division finite where a unit's gradient is exactly zero
        scale = torch.where(too_large, max_norm / grad_norm.clamp_min(1e-6), 1.0)
        param.grad.mul_(scale)
        fired = fired | too_large.any()
    return fired
