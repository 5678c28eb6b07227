"""What practitioners read besides the loss, measured cheaply and only on logging steps.

Metric names are a contract with `scaleplan diagnose` (flat keys, one record per logging step):

- every logging step: ``step``, ``tokens``, ``loss``, ``lr`` (first group), ``lr/<group>``,
  ``grad_norm`` (global L2 norm before clipping), ``clipped`` (0/1), ``clip_rate`` (fraction of
  steps so far on which clipping fired), ``tokens_per_s``, ``mfu``, ``skipped_steps``;
- diagnostics steps (every `diagnostics.every` steps, a multiple of log_every), per weight
  matrix / conv kernel / embedding table (parameters with 2 or more dims, named as in
  ``model.named_parameters()``): ``grad_norm/<name>`` (before clipping), ``update_ratio/<name>``
  = ||W_after - W_before|| / ||W_before|| for this step's update, ``weight_norm/<name>``;
  and per block, from forward hooks on the step's first micro-batch: ``act_mean/<module>``,
  ``act_std/<module>`` of each block's output (GPT ``blocks.{i}``: the residual stream; MLP
  ``input_layer`` / ``hidden_layers.{i}``; CNN ``stages.{i}``), and ``dead_frac/<module>`` for
  each nonlinearity (``blocks.{i}.mlp.gelu``, ``input_layer.act``, ``stages.{i}.act``, ...);
- evaluation steps: ``val_loss``, ``train_loss_avg`` (mean training loss since the previous
  evaluation), and ``val_accuracy`` for classifiers.

Dead unit: a unit (feature, or conv channel) whose nonlinearity passes no gradient for any
input in the batch: ReLU input <= 0; GELU or SiLU input < -3 (slope there is below 0.012);
tanh |input| > 3 (saturated, slope below 0.01). ``dead_frac`` is the fraction of such units.

MFU = flops_per_token * tokens_per_s / peak FLOP/s (Chowdhery et al. 2022, PaLM, appendix B).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from trainer.models.cnn import ConvStage
from trainer.models.gpt import GPT, Block
from trainer.models.mlp import DenseLayer

__all__ = [
    "PEAK_FLOPS",
    "ActivationProbe",
    "WeightSnapshot",
    "flops_per_token",
    "grad_norms",
    "peak_flops",
]

# Dense bf16 tensor-core peaks from the vendor data sheets (no 2:4 sparsity), FLOP/s.
PEAK_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}
DEAD_BELOW = {nn.ReLU: 0.0, nn.GELU: -3.0, nn.SiLU: -3.0}
SATURATED_ABOVE = {nn.Tanh: 3.0}
CPU_MATMUL_SIZE = 512


# ---------------------------------------------------------------------------------------------
# Gradient and weight norms


def grad_norms(params: Sequence[nn.Parameter]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Global L2 norm of the gradients and each parameter's own (zeros where grad is None)."""
    grads = [p.grad if p.grad is not None else p.new_zeros(()) for p in params]
    norms = l2_norms(grads)
    return torch.linalg.vector_norm(norms), list(norms.unbind())


def l2_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each tensor's L2 norm, as one float vector. FSDP2's tensors are shards (DTensors):
    each rank squares its shards and one all-reduce adds them up, so every rank gets the
    whole norms."""
    if not any(hasattr(t, "to_local") for t in tensors):
        return torch.stack([n.float() for n in torch._foreach_norm(list(tensors))])
    import torch.distributed as dist

    from trainer.distributed import local_tensor

    local = [local_tensor(t) for t in tensors]
    squares = torch.stack([n.float() for n in torch._foreach_norm(local)]).square()
    dist.all_reduce(squares, op=dist.ReduceOp.SUM)
    return squares.sqrt()


class WeightSnapshot:
    """The weight matrices before one optimiser step, for update/weight ratios after it."""

    def __init__(self, named: Sequence[tuple[str, nn.Parameter]]) -> None:
        self.named = [(name, p) for name, p in named if p.ndim >= 2]
        self.before = [p.detach().clone() for _, p in self.named]

    def metrics(self) -> dict[str, float]:
        """``update_ratio/<name>`` and ``weight_norm/<name>`` for every matrix."""
        out: dict[str, float] = {}
        if not self.named:
            return out
        after = [p.detach() for _, p in self.named]
        deltas = torch._foreach_sub(after, self.before)
        update = l2_norms(deltas).tolist()
        old = l2_norms(self.before).tolist()
        new = l2_norms(after).tolist()
        for (name, _), d, w0, w1 in zip(self.named, update, old, new, strict=True):
            out[f"update_ratio/{name}"] = d / w0 if w0 > 0 else math.inf
            out[f"weight_norm/{name}"] = w1
        return out


def per_layer_grad_norms(
    named: Sequence[tuple[str, nn.Parameter]], norms: Sequence[torch.Tensor]
) -> dict[str, float]:
    """``grad_norm/<name>`` for every parameter with two or more dims."""
    picked = [(name, norm) for (name, p), norm in zip(named, norms, strict=True) if p.ndim >= 2]
    if not picked:
        return {}
    values = torch.stack([norm.float() for _, norm in picked]).tolist()
    return {f"grad_norm/{name}": v for (name, _), v in zip(picked, values, strict=True)}


# ---------------------------------------------------------------------------------------------
# Activations


def probed_modules(model: nn.Module) -> tuple[list[str], list[str]]:
    """(blocks whose outputs are summarised, nonlinearities whose inputs are checked for death)."""
    blocks = [
        name for name, m in model.named_modules() if isinstance(m, Block | DenseLayer | ConvStage)
    ]
    kinds = (*DEAD_BELOW, *SATURATED_ABOVE)
    activations = [name for name, m in model.named_modules() if isinstance(m, kinds)]
    return blocks, activations


class ActivationProbe:
    """Forward hooks, attached for one forward pass only: ``with probe.attached(): model(x)``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks, self.activations = probed_modules(model)
        self._stats: dict[str, torch.Tensor] = {}

    @contextmanager
    def attached(self) -> Iterator[None]:
        modules = dict(self.model.named_modules())
        handles = [
            modules[name].register_forward_hook(self._block_hook(name)) for name in self.blocks
        ]
        handles += [
            modules[name].register_forward_hook(self._activation_hook(name, modules[name]))
            for name in self.activations
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _block_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            std, mean = torch.std_mean(output.detach().float())
            self._stats[f"act_mean/{name}"] = mean
            self._stats[f"act_std/{name}"] = std

        return hook

    def _activation_hook(self, name: str, module: nn.Module) -> Any:
        def hook(module_: nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
            self._stats[f"dead_frac/{name}"] = dead_fraction(module, inputs[0].detach())

        return hook

    def metrics(self) -> dict[str, float]:
        """The statistics of the last probed forward pass, as floats; clears them."""
        if not self._stats:
            return {}
        names = list(self._stats)
        values = torch.stack([self._stats[n].float() for n in names]).tolist()
        self._stats.clear()
        return dict(zip(names, values, strict=True))


def dead_fraction(activation: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Fraction of units (last dim; channels for 4-D conv maps) dead for the whole batch."""
    units = x.transpose(1, -1) if x.ndim == 4 else x  # (B, C, H, W) -> channels last
    units = units.reshape(-1, units.shape[-1]).float()
    kind = type(activation)
    if kind in SATURATED_ABOVE:
        alive = (units.abs() <= SATURATED_ABOVE[kind]).any(dim=0)
    else:
        alive = (units > DEAD_BELOW.get(kind, 0.0)).any(dim=0)
    return 1.0 - alive.float().mean()


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU


def flops_per_token(model: nn.Module, example: torch.Tensor, seq_len: int | None = None) -> float:
    """Training FLOPs per token (GPT) or per example (MLP, CNN).

    GPT: its own 6N + attention count (Kaplan et al. 2020; PaLM appendix B). Other models: an
    estimate, 6 FLOPs per multiply-accumulate of every Linear and Conv layer on one example
    (2 per MAC forward, twice that backward), counted with forward hooks on `example[:1]`;
    normalisation, pooling and activations are left out.
    """
    if isinstance(model, GPT):
        return model.flops_per_token(seq_len)
    macs = 0

    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            kernel = math.prod(module.kernel_size)
            macs += output.numel() * (module.in_channels // module.groups) * kernel

    handles = [m.register_forward_hook(count) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return 6.0 * macs


def peak_flops(device: torch.device, override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for MFU.

    CUDA: the `PEAK_FLOPS` table by device name (bf16 dense), else a measured matmul rate.
    CPU: a measured fp32 matmul rate, once per process.
    """
    if override is not None:
        return override, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name.upper():
                return value, f"table ({key})"
        return measured_matmul_flops(str(device)), "measured (bf16 matmul)"
    return measured_matmul_flops("cpu"), "measured (fp32 matmul)"


@functools.cache
def measured_matmul_flops(device: str) -> float:
    """Best of a few square matmuls: the FLOP/s this device sustains on dense work."""
    n = CPU_MATMUL_SIZE if device == "cpu" else 8192
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    generator = torch.Generator(device).manual_seed(0)  # leaves the global RNG alone
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    best = math.inf
    for _ in range(5):
        if device != "cpu":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best
