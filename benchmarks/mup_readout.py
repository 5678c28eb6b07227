"""How the readout's start and its output multiplier decide what muP gains from width, on the
transfer check's model (scaleplan transfer-check: a 2-layer byte-level GPT, 150 steps, batch
16 x 64 bytes of the default corpus).

Three measurements, each the final val loss of one run per learning rate:

- ``start``: muP at width 256 (base 32) with the readout started at zero or as built
  (``parametrization.readout_init: tp5``), output multiplier 1, beside SP at width 256 as built
  and with a zero readout: the four best losses over LRs 2^-12..2^-5.
- ``alpha``: the output multiplier (``model.output_multiplier``) at the base width 32, readout at
  zero (there SP and muP are one network): the best loss over LRs 2^-10..2^-5 for 1, 8, 32, 64.
  Seed 0, 150 steps.
- ``init``: the transfer task's model (``studies/configs/transfer-quickstart.yaml``, 300 steps,
  trained through the study as the search-efficiency benchmark retrains it, trainer seed 100,
  warm-up 0.15, weight decay 0.1, beta2 0.95): SP and muP at the target width 128 and muP at the
  proxy's 32, with the GPT's fixed init std 0.02 (``model.init: normal``) and with fan-in init
  (``lecun``, std 1/sqrt(fan_in)), over LRs 2^-10..2^-5.

    python benchmarks/mup_readout.py              # all three, about 10 minutes on 2 cores
    python benchmarks/mup_readout.py --only init
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import math
import platform
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import search_efficiency as se  # noqa: E402

from studies.commands.transfer_check import BASE  # noqa: E402
from trainer.config import parse_config  # noqa: E402
from trainer.loop import train  # noqa: E402

ALPHA_BASE = {"zero_init_readout": False, "output_multiplier": 1.0}  # the model as built


def loss(width: int, log2_lr: float, model: dict[str, Any], par: dict[str, Any] | None) -> float:
    raw: dict[str, Any] = copy.deepcopy(BASE)
    raw["tracking"] = {"enabled": False}
    raw["model"].update(d_model=width, init="normal", **model)  # as measured (the GPT's std 0.02)
    raw["optimizer"]["lr"] = 2.0**log2_lr
    if par is not None:
        raw["parametrization"] = {"name": "mup", "base_width": 32, **par}
    with tempfile.TemporaryDirectory() as folder:
        result = train(parse_config(raw), out_dir=folder)
    assert result.final_val_loss is not None
    return result.final_val_loss


def best(width: int, lrs: list[float], model: dict[str, Any], par: dict[str, Any] | None) -> str:
    return summary({x: loss(width, x, model, par) for x in lrs})


def summary(losses: dict[float, float]) -> str:
    """The best loss, its log2 LR, and the whole curve."""
    x = min(losses, key=losses.__getitem__)
    curve = " ".join(f"{k:+.0f}:{v:.3f}" for k, v in losses.items())
    return f"best {losses[x]:.3f} at 2^{x:+.0f}   ({curve})"


TASK = REPO / "studies" / "configs" / "transfer-quickstart.yaml"
TASK_PARAMS = {"schedule.warmup_fraction": 0.15, "optimizer.weight_decay": 0.1,
               "optimizer.betas.1": 0.95}  # fmt: skip


def task_loss(width: int, log2_lr: float, parametrization: str, init: str) -> float:
    """The transfer task's model at `width`, 300 steps, as the benchmark retrains it."""
    items = [
        f"overrides.parametrization.name={parametrization}",
        f"overrides.model.init={init}",
        f"overrides.model.d_model={width}",
    ]
    params = {"optimizer.lr": 2.0**log2_lr, **TASK_PARAMS}
    with tempfile.TemporaryDirectory() as folder:
        value = se._retrain(params, 100, 1, Path(folder), where=(TASK, items, 300))
    return math.inf if value is None else value


def task_best(width: int, lrs: list[float], parametrization: str, init: str) -> str:
    with ProcessPoolExecutor(2) as pool:  # two runs at once, one thread each
        n = len(lrs)
        values = pool.map(task_loss, [width] * n, lrs, [parametrization] * n, [init] * n)
        return summary(dict(zip(lrs, values, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("start", "alpha", "init"), help="one of the three")
    args = parser.parse_args(argv)
    print(f"# mup_readout.py, {dt.datetime.now():%Y-%m-%dT%H:%M:%S}, {platform.machine()}")
    if args.only in (None, "start"):
        lrs = [-12.0, -11.0, -10.0, -9.0, -7.0, -5.0]
        plain = dict(ALPHA_BASE)
        print("width 256, output multiplier 1:")
        print("  sp, readout as built     ", best(256, lrs, plain, None))
        zero = {**plain, "zero_init_readout": True}
        print("  sp, readout at zero      ", best(256, lrs, zero, None))
        print("  mup, readout_init zero   ", best(256, lrs, plain, {"readout_init": "zero"}))
        print("  mup, readout_init tp5    ", best(256, lrs, plain, {"readout_init": "tp5"}))
    if args.only in (None, "alpha"):
        lrs = [-10.0, -9.0, -8.0, -7.0, -6.0, -5.0]
        print("width 32 (the base), readout at zero:")
        for alpha in (1.0, 8.0, 32.0, 64.0):
            model = {"zero_init_readout": True, "output_multiplier": alpha}
            print(f"  output_multiplier {alpha:<4g}     ", best(32, lrs, model, None))
    if args.only in (None, "init"):
        lrs = [-10.0, -9.0, -8.0, -7.0, -6.0, -5.0]
        print("the transfer task's model, 300 steps, seed 100:")
        for init in ("normal", "lecun"):
            for width, par in ((128, "sp"), (128, "mup"), (32, "mup")):
                label = f"{par} width {width}, init {init}"
                print(f"  {label:26s}", task_best(width, lrs, par, init))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
