"""The transfer check: does the best learning rate stay put as the model widens (or deepens)?

Tensor Programs V, Fig. 1 (Yang et al. 2022): sweep the learning rate at several widths under SP
and under muP and plot loss against log2 LR, one curve per width. Under SP the optimum drifts
(left, as width grows); under muP it should not. Here the sweep is one study on the studies
engine: a stage per (parametrization, width), each overriding ``model.d_model`` (``n_layer``
with ``depths``) and ``parametrization.name``, each with ``trials`` quasi-random (Sobol) learning
rates over the same log range and the same step budget. The study file is written beside the
results (``DIR/transfer-check.yaml``), so ``scaleplan sweep`` can rerun or resume it.

Each width's optimal log2 LR is the vertex of a parabola through its best trial and up to two
trials on each side (the best trial's own LR when the curve is not convex there); ``drift`` is
max - min over the widths. An optimum at the edge of the range is flagged: widen the range.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studies.errors import StudyError

__all__ = ["TransferCheck", "optimal_log2_lr", "plot_transfer", "transfer_study_file"]

PARAMETRIZATIONS = ("sp", "mup")
LABELS = {"sp": "SP", "mup": "muP"}


def transfer_study_file(
    base: Path,
    *,
    name: str,
    widths: Sequence[int],
    depths: Sequence[int] = (),
    optimizer: str | None = None,
    trials: int = 8,
    steps: int = 150,
    log2_lr: tuple[float, float] = (-13.0, -4.0),
    seed: int = 0,
) -> dict[str, Any]:
    """The study (as a study file's mapping) that sweeps the LR at each width (or depth, at the
    smallest width, when `depths` is given) under SP and muP; muP's base: the smallest."""
    axis, values = ("depth", sorted(set(depths))) if depths else ("width", sorted(set(widths)))
    if len(values) < 2:
        raise StudyError(f"--{axis}s: {values}; expected two or more different {axis}s")
    if any(v < 1 for v in values):
        raise StudyError(f"--{axis}s: {values}; expected positive {axis}s")
    low, high = log2_lr
    if not low < high:
        raise StudyError(f"--log2-lr: {low:g} {high:g}; expected LOW < HIGH")
    overrides: dict[str, Any] = {
        "model.tie_embeddings": False,  # muP needs its own readout; SP gets the same model
        "parametrization.base_width": min(widths),
        "eval_every": 0,
        "checkpoint_every": 0,
    }
    if depths:
        overrides["model.d_model"] = min(widths)
        overrides["parametrization.base_depth"] = values[0]
    if optimizer is not None:
        overrides["optimizer.name"] = optimizer
    key = "model.n_layer" if depths else "model.d_model"
    stages = [
        {
            "name": f"{p}-{axis[0]}{v}",
            "sampler": "sobol",
            "trials": trials,
            "budget": {"steps": steps},
            "pruner": "none",
            "seed": seed,  # every stage the same learning rates
            "overrides": {key: v, "parametrization.name": p},
        }
        for p in PARAMETRIZATIONS
        for v in values
    ]
    return {
        "name": name,
        "base": str(base),
        "overrides": overrides,
        "space": {"optimizer.lr": {"low": 2.0**low, "high": 2.0**high, "log": True}},
        "stages": stages,
        "objective": {"metric": "val_loss"},
        "seed": seed,
    }


def optimal_log2_lr(points: Sequence[tuple[float, float]]) -> tuple[float, bool]:
    """(the optimal log2 LR, whether it sits at the edge of the points tried) from
    (log2 lr, loss) points: the vertex of a least-squares parabola through the best point and
    up to two neighbours on each side, kept inside them; the best point when not convex."""
    import numpy as np

    finite = sorted((x, y) for x, y in points if math.isfinite(y))
    if not finite:
        raise StudyError("no trial finished: no optimum to fit")
    best = min(range(len(finite)), key=lambda i: finite[i][1])
    edge = best in (0, len(finite) - 1)
    near = finite[max(0, best - 2) : best + 3]
    if len(near) < 3:
        return finite[best][0], edge
    xs = np.array([x for x, _ in near])
    ys = np.array([y for _, y in near])
    a, b, _ = np.polyfit(xs, ys, 2)
    if a <= 0:
        return finite[best][0], edge
    return float(np.clip(-b / (2 * a), xs.min(), xs.max())), edge


@dataclass
class TransferCheck:
    """The LR curves and optima of a transfer check, per parametrization and width/depth."""

    axis: str  # "width" or "depth"
    # parametrization -> width (or depth) -> sorted (log2 lr, val loss) of its complete trials
    curves: dict[str, dict[int, list[tuple[float, float]]]] = field(default_factory=dict)

    @classmethod
    def from_reports(cls, reports: Sequence[Any], axis: str) -> TransferCheck:
        check = cls(axis=axis)
        for report in reports:
            name, _, value = report.name.partition("-")
            points = [
                (math.log2(float(t["params"]["optimizer.lr"])), float(t["value"]))
                for t in report.trials
                if t["state"] == "complete" and t["value"] is not None
            ]
            check.curves.setdefault(name, {})[int(value[1:])] = sorted(points)
        return check

    def optima(self, name: str) -> dict[int, tuple[float, bool]]:
        return {v: optimal_log2_lr(points) for v, points in self.curves[name].items() if points}

    def drift(self, name: str) -> float:
        xs = [x for x, _ in self.optima(name).values()]
        return max(xs) - min(xs) if xs else math.nan

    def to_dict(self, plot: Path | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {}
        for name in self.curves:
            optima = self.optima(name)
            payload[name] = {
                "optimal_log2_lr": {str(v): round(x, 4) for v, (x, _) in optima.items()},
                "drift": round(self.drift(name), 4),
                "at_edge": [str(v) for v, (_, edge) in optima.items() if edge],
                "best_loss": {
                    str(v): round(min(y for _, y in points), 4)
                    for v, points in self.curves[name].items()
                    if points
                },
            }
        payload["axis"] = self.axis
        payload["plot"] = None if plot is None else str(plot)
        return payload


def plot_transfer(check: TransferCheck, path: Path) -> Path:
    """Loss against log2 LR, one curve per width (or depth), SP beside muP; each optimum
    marked (Tensor Programs V, Fig. 1)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from trainer.tracking import save_png

    names = list(check.curves)
    fig = Figure(figsize=(5.2 * len(names), 3.8))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        values = sorted(check.curves[name])
        optima = check.optima(name)
        for i, value in enumerate(values):
            color = colormaps["viridis"](i / max(1, len(values) - 1))
            points = check.curves[name][value]
            ax.plot(
                [x for x, _ in points],
                [y for _, y in points],
                "o-",
                ms=3,
                color=color,
                label=f"{check.axis} {value}",
            )
            if value in optima:
                x, _ = optima[value]
                ax.axvline(x, color=color, lw=0.8, ls="--")
        ax.set_title(f"{LABELS.get(name, name)}: drift {check.drift(name):.2f} (log2 LR)")
        ax.set_xlabel("log2 learning rate")
        ax.set_ylabel("val loss")
        ax.legend(fontsize=7)
        losses = [y for points in check.curves[name].values() for _, y in points]
        if losses:  # the diverged end would squash the curves
            low = min(losses)
            ax.set_ylim(low - 0.05, min(max(losses), low + 1.5) + 0.05)
    fig.tight_layout()
    return save_png(fig, path)


def write_study_file(raw: Mapping[str, Any], path: Path) -> Path:
    """The study as YAML (atomically), rerunnable with ``scaleplan sweep``."""
    import yaml

    from trainer.tracking import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# written by scaleplan transfer-check\n" + yaml.safe_dump(dict(raw), sort_keys=False)
    write_text_atomic(path, text)
    return path


def write_json(payload: Mapping[str, Any], path: Path) -> None:
    from trainer.tracking import write_text_atomic

    write_text_atomic(path, json.dumps(dict(payload), indent=2) + "\n")
