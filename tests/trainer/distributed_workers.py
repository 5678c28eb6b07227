"""Scripts the distributed tests start under torchrun (``python -m torch.distributed.run``).

gns OUT.json: DDP over the ranks on linear regression with known Gaussian noise; the
per-rank gradient noise scale (each rank's gradient the small batch, the all-reduced one
the big batch, read by DDP's communication hook) against the analytic B_simple.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from test_noise_scale import LinearRegression, analytic_b_simple, batches  # beside this file
from torch import nn

from trainer.distributed import World, shard_rows
from trainer.loop import forward_backward
from trainer.noise_scale import GradientNoiseScale
from trainer.precision import build_precision

DIM = 10


def gns(out: str) -> None:
    dist.init_process_group("gloo")
    world = World(rank=dist.get_rank(), size=dist.get_world_size())
    generator = torch.Generator().manual_seed(0)  # the same stream on every rank
    w_star = torch.randn(DIM, generator=generator)
    raw = LinearRegression(w_star + 3.0 * torch.randn(DIM, generator=generator) / DIM**0.5)
    model = nn.parallel.DistributedDataParallel(raw)
    precision = build_precision("fp32", torch.device("cpu"))
    optimizer = torch.optim.SGD(raw.parameters(), lr=0.05)
    rows = 32  # the global batch; each rank's gradient covers rows / ranks of it
    checked = []
    for point in range(2):
        estimator = GradientNoiseScale(
            list(raw.parameters()), micro_batch=rows, accum_steps=1, ema=0.996, world=world
        )
        model.register_comm_hook(None, estimator.ddp_comm_hook)
        for _ in range(800):
            estimator.start()
            mine = (shard_rows(batch, world) for batch in batches(generator, w_star, rows, 1))
            forward_backward(model, mine, 1, precision)
            estimator.update(float(raw.w.grad.norm()))
            raw.zero_grad(set_to_none=True)
        checked.append([analytic_b_simple(raw.w.detach() - w_star), estimator.b_simple])
        model = nn.parallel.DistributedDataParallel(raw)  # a new hook for the next point
        for _ in range(16 * (point + 1)):
            mine = (shard_rows(batch, world) for batch in batches(generator, w_star, 32, 1))
            forward_backward(model, mine, 1, precision)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if world.main:
        with open(out, "w") as file:
            json.dump({"checked": checked, "b_small": estimator.b_small}, file)
    dist.destroy_process_group()


if __name__ == "__main__":
    {"gns": gns}[sys.argv[1]](*sys.argv[2:])
