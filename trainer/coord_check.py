"""The coordinate check of muP: does the size of each layer's activations stay put as width grows?

Yang et al. 2022 ("Tensor Programs V", Fig. 5 and appendix D.1): train the same model at several
widths for a few steps with one learning rate, and record the mean absolute value of each layer
type's output ("coordinate size") at every step. Under muP every curve is flat in width; under
SP with Adam the hidden outputs and the logits grow with width after the first update, which is
why SP's optimal learning rate drifts.

Layer types: GPT ``embedding`` (token + position embedding, the residual stream's input), ``attn``
and ``mlp`` (each block's sublayer outputs, averaged over blocks), ``block`` (the residual stream
after each block) and ``logits``; MLP ``input`` (the first layer's output), ``hidden`` (the other
hidden layers) and ``logits``. Step 1 is the initial network; step t is after t - 1 updates.

>>> from trainer.config import TrainConfig
>>> config = TrainConfig.model_validate({"model": {"kind": "mlp", "depth": 2},
...                                      "data": {"kind": "digits", "batch_size": 16}})
>>> result = coord_check(config, widths=[16, 64], steps=2, seeds=1)
>>> sorted(result.coords["mup"])
['hidden', 'input', 'logits']
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import TrainConfig, parse_config
from trainer.data import build_data
from trainer.errors import ConfigError
from trainer.models import GPT, MLP, build_model
from trainer.optim import build_optimizer
from trainer.parametrization import parametrize

__all__ = ["CoordCheck", "coord_check", "plot_coord_check", "with_width"]

PARAMETRIZATIONS = ("sp", "mup")
LABELS = {"sp": "SP", "mup": "muP"}


@dataclass
class CoordCheck:
    """Mean |activation| per parametrization, layer type, step and width."""

    widths: list[int]
    steps: int
    lr: float
    # parametrization -> layer type -> [step][width index]
    coords: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)

    def spread(self, name: str, layer: str, step: int) -> float:
        """max / min over the widths (1 when all are zero; inf when only some are)."""
        values = [abs(v) for v in self.coords[name][layer][step]]
        high, low = max(values), min(values)
        if high <= 1e-12:
            return 1.0
        return math.inf if low <= 1e-12 else high / low

    def slope(self, name: str, layer: str, step: int) -> float:
        """Least-squares slope of log2 coordinate against log2 width (0: flat)."""
        points = [
            (math.log2(w), math.log2(v))
            for w, v in zip(self.widths, self.coords[name][layer][step], strict=True)
            if v > 1e-12
        ]
        if len(points) < 2:
            return 0.0
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        num = sum((x - mean_x) * (y - mean_y) for x, y in points)
        den = sum((x - mean_x) ** 2 for x, _ in points)
        return num / den

    def offending(self, name: str = "mup", tolerance: float = 1.5) -> list[str]:
        """Layer types whose coordinates change by more than `tolerance` across the widths at
        some step, e.g. ``logits (step 3: x4.1 from width 64 to 1024)``."""
        found = []
        for layer in self.coords.get(name, {}):
            worst = max(range(self.steps), key=lambda s: self.spread(name, layer, s))
            ratio = self.spread(name, layer, worst)
            if ratio > tolerance:
                row = self.coords[name][layer][worst]
                direction = "grows" if row[-1] > row[0] else "shrinks"
                found.append(
                    f"{layer} (step {worst + 1}: {direction} x{ratio:.3g} from width "
                    f"{self.widths[0]} to {self.widths[-1]})"
                )
        return found

    def to_dict(self) -> dict[str, Any]:
        return {
            "widths": self.widths,
            "steps": self.steps,
            "lr": self.lr,
            "coords": self.coords,
            "spread": {
                name: {
                    layer: [self.spread(name, layer, s) for s in range(self.steps)]
                    for layer in layers
                }
                for name, layers in self.coords.items()
            },
        }


def with_width(config: TrainConfig, width: int, name: str, base_width: int) -> TrainConfig:
    """`config` at `width` under parametrization `name` (muP's base: `base_width`); a GPT's
    readout is untied under both, so that the two differ only in the rules."""
    raw = config.model_dump(mode="json")
    model = raw["model"]
    if model["kind"] == "gpt":
        model["d_model"] = width
        model["tie_embeddings"] = False
    elif model["kind"] == "mlp":
        model["width"] = width
    else:
        raise ConfigError(f"--model: {model['kind']}; the coordinate check takes gpt or mlp")
    previous = raw.get("parametrization") or {}
    raw["parametrization"] = {**previous, "name": name, "base_width": base_width}
    if model["kind"] == "gpt":  # one block size: the model's follows the data's
        model.pop("block_size", None)
    try:
        return parse_config(raw)
    except ConfigError as error:
        raise ConfigError(f"--widths: width {width}: {error}") from None


def coord_check(
    config: TrainConfig,
    widths: Sequence[int],
    steps: int = 3,
    seeds: int = 3,
    parametrizations: Sequence[str] = PARAMETRIZATIONS,
    lr: float | None = None,
) -> CoordCheck:
    """Train `config`'s model at each width for `steps` forward passes (`steps` - 1 updates,
    constant LR `lr`, default the config's) under each parametrization, the muP base width the
    smallest width, and average the coordinate sizes over `seeds` initialisations."""
    widths = sorted(set(int(w) for w in widths))
    if len(widths) < 2 or widths[0] < 1:
        raise ConfigError(f"--widths: {widths}; expected two or more positive widths")
    if steps < 1 or seeds < 1:
        raise ConfigError(f"--steps / --seeds: {steps} / {seeds}; expected at least 1")
    rate = config.optimizer.lr if lr is None else lr
    if not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"--lr: {rate}; expected a positive number")
    sized = {
        (name, w): with_width(config, w, name, widths[0])
        for name in parametrizations
        for w in widths
    }
    result = CoordCheck(widths=widths, steps=steps, lr=rate)
    data = build_data(config.data, seed=config.seed)
    batches = [data.get_batch("train", step) for step in range(steps)]
    for name in parametrizations:
        per_width = []
        for w in widths:
            runs = [
                _coordinates(sized[name, w], batches, rate, config.seed + i) for i in range(seeds)
            ]
            per_width.append(
                {
                    layer: [sum(run[layer][s] for run in runs) / seeds for s in range(steps)]
                    for layer in runs[0]
                }
            )
        result.coords[name] = {
            layer: [[per_width[i][layer][s] for i in range(len(widths))] for s in range(steps)]
            for layer in per_width[0]
        }
    return result


def _coordinates(
    config: TrainConfig,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    seed: int,
) -> dict[str, list[float]]:
    """Mean |output| of each layer type at each of len(batches) forward passes."""
    torch.manual_seed(seed)
    data_dims = _data_dims(config)
    model = build_model(config.model, seed=seed, **data_dims)
    plan = parametrize(model, config.parametrization, config.optimizer)
    optimizer_config = config.optimizer.model_copy(update={"lr": lr})
    optimizer = build_optimizer(
        model, optimizer_config, plan.lr_scale, independent_wd=plan.independent_wd
    )
    coords: dict[str, list[float]] = {}
    for x, y in batches:
        with _recording(model) as seen:
            logits, loss = model(x, y)
        seen.setdefault("logits", []).append(logits.detach().abs().mean().item())
        for layer, values in seen.items():
            coords.setdefault(layer, []).append(sum(values) / len(values))
        assert loss is not None
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return coords


def _data_dims(config: TrainConfig) -> dict[str, Any]:
    data = _DATA_DIMS.get(config.data.kind)
    if data is None:
        source = build_data(config.data, seed=config.seed)
        data = {
            "vocab_size": source.vocab_size,
            "input_shape": source.input_shape,
            "num_classes": source.num_classes,
        }
        _DATA_DIMS[config.data.kind] = data
    return data


_DATA_DIMS: dict[str, dict[str, Any]] = {}


@contextmanager
def _recording(model: nn.Module) -> Iterator[dict[str, list[float]]]:
    """Forward hooks that collect each layer type's mean |output| for one forward pass."""
    seen: dict[str, list[float]] = {}
    targets: list[tuple[str, nn.Module]] = []
    if isinstance(model, GPT):
        targets.append(("embedding", model.drop))
        for block in model.blocks:
            targets += [("attn", block.attn), ("mlp", block.mlp), ("block", block)]  # type: ignore[list-item]
    elif isinstance(model, MLP):
        targets.append(("input", model.input_layer))
        targets += [("hidden", layer) for layer in model.hidden_layers]

    def hook(layer: str) -> Any:
        def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            seen.setdefault(layer, []).append(output.detach().abs().mean().item())

        return record

    handles = [module.register_forward_hook(hook(layer)) for layer, module in targets]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def plot_coord_check(result: CoordCheck, path: str | Path) -> Path:
    """One row per parametrization, one panel per step: mean |activation| of each layer type
    against width, both axes log (the muP paper's Fig. 5 view)."""
    from matplotlib.figure import Figure

    from trainer.tracking import save_png

    names = list(result.coords)
    fig = Figure(figsize=(3.2 * result.steps, 2.8 * len(names)))
    axes = fig.subplots(len(names), result.steps, squeeze=False)
    for row, name in enumerate(names):
        for step in range(result.steps):
            ax = axes[row][step]
            for layer, values in result.coords[name].items():
                # zeros (a zero-initialised readout) are not drawn on the log axis
                shown = [(w, v) for w, v in zip(result.widths, values[step], strict=True) if v > 0]
                ax.plot([w for w, _ in shown], [v for _, v in shown], marker="o", label=layer)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{LABELS.get(name, name)} step {step + 1}", fontsize=9)
            ax.set_xlabel("width", fontsize=8)
            if step == 0:
                ax.set_ylabel("mean |activation|", fontsize=8)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"coordinate check, lr {result.lr:g}", fontsize=10)
    fig.tight_layout()
    return save_png(fig, Path(path))
