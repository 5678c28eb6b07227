"""A noisy quadratic model as a batch-size study's callable objective: least squares on
Gaussian inputs x ~ N(0, H) with targets y = x·w* (McCandlish et al. 2018, sec. 2.2, on
quadratic models; Ma, Bassily & Belkin 2018 on this one). The loss is the quadratic
½ (w − w*)ᵀ H (w − w*), its only noise that of sampling examples, so per-example gradients
have Σ = (dᵀHd) H + H d dᵀ H (Isserlis) and B_simple = tr Σ / |Hd|² is known in closed form.

Curvatures span a factor of 5 (H = diag(linspace(1, 0.2))): enough steps at every batch size
for the trade-off to show, and a mild enough spread that B_simple, which ignores curvature,
stands in for McCandlish's B_noise = tr(HΣ)/(GᵀHG).

SGD runs through the trainer's own `forward_backward` with two micro-batches per step and
the online `GradientNoiseScale` reads every step, as in a training run; its B_simple goes to
metrics.jsonl in the trial's folder, where the study reads it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import nn

DIM = 64
CURVATURE = torch.linspace(1.0, 0.1, DIM)  # H
START = 1.0  # w − w* starts at START in every coordinate


class LeastSquares(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.d = nn.Parameter(torch.full((DIM,), START))  # w − w*

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = x @ self.d  # prediction − target, for targets y = x·w*
        return residual, 0.5 * residual.square().mean()

    def loss(self) -> float:
        return float(0.5 * torch.sum(CURVATURE * self.d.detach() ** 2))


def nqm(params: dict[str, Any], trial: Any) -> float:
    """SGD at trial.budget's batch size and steps; reports the exact loss every eval_every."""
    from trainer.loop import forward_backward
    from trainer.noise_scale import GradientNoiseScale
    from trainer.precision import build_precision

    budget = trial.budget
    batch, steps, every = budget["batch_size"], budget["steps"], budget["eval_every"]
    lr = float(params.get("optimizer.lr", budget.get("lr", 0.0)))
    generator = torch.Generator().manual_seed(trial.seed * 1000 + trial.number)
    model = LeastSquares()
    precision = build_precision("fp32", torch.device("cpu"))
    accum = 2 if batch % 2 == 0 else 1
    noise = (
        GradientNoiseScale([model.d], micro_batch=batch // 2, accum_steps=2, ema=0.9)
        if accum == 2
        else None
    )
    records = []
    trial.report(0, model.loss())
    for step in range(1, steps + 1):
        micro = (
            (torch.randn(batch // accum, DIM, generator=generator) * CURVATURE.sqrt(), None)
            for _ in range(accum)
        )
        if noise is not None:
            noise.start()
        forward_backward(
            model,
            micro,
            accum,
            precision,
            after_micro_batch=noise.after_micro_batch if noise is not None else None,
        )
        assert model.d.grad is not None
        if noise is not None:
            noise.update(float(model.d.grad.norm()))
        with torch.no_grad():
            model.d -= lr * model.d.grad
        model.d.grad = None
        loss = model.loss()
        if not math.isfinite(loss) or loss > 1e6:
            raise FloatingPointError(f"diverged at step {step} (lr {lr:.3g})")
        if step % every == 0 or step == steps:
            records.append({"step": step, "loss": loss, **(noise.metrics() if noise else {})})
            if trial.report(step, loss):
                break
    (trial.out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return model.loss()


def analytic_b_simple(d: torch.Tensor) -> float:
    """tr Σ / |G|² at w − w* = d."""
    hd = CURVATURE * d
    return float(((d @ hd) * CURVATURE.sum() + hd @ hd) / (hd @ hd))
