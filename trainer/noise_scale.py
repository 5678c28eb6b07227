"""The gradient noise scale, measured online from the gradients the loop computes anyway.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", arXiv:1812.06162, App. A):
with |G_small|² and |G_big|² the squared norms of gradients over B_small and B_big examples,

    |G|²   ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small)
    tr(Σ)  ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

are unbiased for the true gradient's squared norm and the trace of the per-example gradient
covariance. Each is smoothed by its own exponential moving average (bias-corrected, as Adam's
moments), and the simple noise scale is the ratio of the averages: B_simple = tr(Σ) / |G|².
Beyond it, a larger batch buys little: the critical batch size B_crit ≈ B_noise (their eq. 2.8).

Two ways to get the small batches. With one process, they are the micro-batches of gradient
accumulation (each one's gradient is the difference of the accumulated gradient before and
after it; their squared norms are averaged) and the big batch is the accumulated gradient of
the step. Under DDP with several ranks, the small batch is each rank's own gradient (over its
rows of every micro-batch), read by a DDP communication hook from the gradient buckets just
before the all-reduce, its squared norm averaged over ranks; the big batch is the all-reduced
gradient. Norms are taken after the fp16 loss scale is divided out and before clipping.

Metrics, on logging steps: ``gns/b_simple`` (examples), ``gns/b_simple_tokens``,
``gns/grad_sq`` (|G|²), ``gns/trace`` (tr Σ), ``gns/batch`` (examples per step, B_big).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from trainer.distributed import World, all_mean

__all__ = ["GradientNoiseScale", "noise_scale_parts"]


def noise_scale_parts(
    small_sq: float, big_sq: float, b_small: float, b_big: float
) -> tuple[float, float]:
    """(|G|², tr Σ) from one pair of squared gradient norms (McCandlish et al. 2018, App. A)."""
    if not 0 < b_small < b_big:
        raise ValueError(f"batch sizes: need 0 < b_small < b_big, got {b_small}, {b_big}")
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


class GradientNoiseScale:
    """B_simple from micro-batch (or per-rank) and accumulated gradients, as a loop hook.

    Per step: ``start(loss_scale)``, then ``after_micro_batch(m)`` after each micro-batch's
    backward (the loop's `forward_backward` calls it), then ``update(big_grad_norm)`` with the
    accumulated gradient's norm (unscaled, before clipping). ``metrics()`` reads the averages.
    With a `world` of several ranks, the per-rank gradients are the small batches instead:
    ``ddp_comm_hook`` goes to `DistributedDataParallel.register_comm_hook`, and
    after_micro_batch does nothing. `micro_batch` counts the rows of one micro-batch over all
    ranks.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        *,
        micro_batch: int,
        accum_steps: int,
        tokens_per_example: int = 1,
        ema: float = 0.95,
        world: World | None = None,
    ) -> None:
        self.world = world or World()
        self.per_rank = self.world.distributed
        if accum_steps < 2 and not self.per_rank:
            raise ValueError(
                "the gradient noise scale needs two batch sizes: accum_steps >= 2 or ranks >= 2"
            )
        self.params = list(params)
        self.b_big = float(micro_batch * accum_steps)
        self.b_small = self.b_big / self.world.size if self.per_rank else float(micro_batch)
        self.accum_steps = accum_steps
        self.tokens_per_example = tokens_per_example
        self.beta = ema
        self._previous: list[torch.Tensor] | None = None
        self._small_sum: torch.Tensor | None = None
        self._count = 0
        self._inv_scale_sq = 1.0
        self._grad_sq_ema = 0.0
        self._trace_ema = 0.0
        self._weight = 0.0  # 1 - beta^t: the EMAs' bias correction

    def start(self, loss_scale: float = 1.0) -> None:
        self._small_sum, self._count = None, 0
        self._inv_scale_sq = 1.0 / (loss_scale * loss_scale)

    def after_micro_batch(self, m: int) -> None:
        """The squared norm of micro-batch m's own gradient, kept on the device (no sync)."""
        if self.per_rank:
            return
        grads = [
            p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.params
        ]
        last = m == self.accum_steps - 1
        if m == 0:
            own = grads
        else:
            assert self._previous is not None, "after_micro_batch(0) comes first"
            own = list(torch._foreach_sub(grads, self._previous))
        squared = torch.stack([n.float() for n in torch._foreach_norm(own)]).square().sum()
        self._small_sum = squared if self._small_sum is None else self._small_sum + squared
        self._count += 1
        if not last:
            if self._previous is None:
                self._previous = [g.detach().clone() for g in grads]
            else:
                torch._foreach_copy_(self._previous, grads)

    def ddp_comm_hook(
        self, process_group: dist.ProcessGroup | None, bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        """DDP communication hook: add this rank's bucket to its squared gradient norm, then
        all-reduce and average the bucket as DDP's default hook does."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        squared = bucket.buffer().detach().float().square().sum()
        self._small_sum = squared if self._small_sum is None else self._small_sum + squared
        self._count = self.accum_steps
        return allreduce_hook(process_group, bucket)  # type: ignore[arg-type]

    def update(self, big_grad_norm: float) -> None:
        """Fold this step's pair into the averages; a step with non-finite norms is left out."""
        if self._small_sum is None or self._count != self.accum_steps:
            return
        if self.per_rank:  # each rank's gradient of its own mean loss; the mean over ranks
            small_sq = all_mean(self._small_sum, self.world).item() * self._inv_scale_sq
        else:  # each micro-batch's loss was divided by accum_steps: its gradient is k times this
            k_sq = float(self.accum_steps) ** 2
            small_sq = self._small_sum.item() / self._count * k_sq * self._inv_scale_sq
        big_sq = big_grad_norm * big_grad_norm
        if not (math.isfinite(small_sq) and math.isfinite(big_sq)):
            return
        grad_sq, trace = noise_scale_parts(small_sq, big_sq, self.b_small, self.b_big)
        self._grad_sq_ema = self.beta * self._grad_sq_ema + (1 - self.beta) * grad_sq
        self._trace_ema = self.beta * self._trace_ema + (1 - self.beta) * trace
        self._weight = self.beta * self._weight + (1 - self.beta)

    @property
    def b_simple(self) -> float:
        """tr Σ / |G|² of the averages, in examples; NaN before the first step or while the
        averaged |G|² is not positive (the noise swamps the signal)."""
        if self._weight == 0 or self._grad_sq_ema <= 0:
            return math.nan
        return self._trace_ema / self._grad_sq_ema

    def metrics(self) -> dict[str, float]:
        if self._weight == 0:
            return {}
        b_simple = self.b_simple
        return {
            "gns/b_simple": b_simple,
            "gns/b_simple_tokens": b_simple * self.tokens_per_example,
            "gns/grad_sq": self._grad_sq_ema / self._weight,
            "gns/trace": self._trace_ema / self._weight,
            "gns/batch": self.b_big,
        }


# DDP checks a communication hook's annotations as objects; `from __future__ import
# annotations` left them as strings
GradientNoiseScale.ddp_comm_hook.__annotations__.update(
    bucket=dist.GradBucket,
    process_group=dist.ProcessGroup | None,
    **{"return": torch.futures.Future[torch.Tensor]},
)
