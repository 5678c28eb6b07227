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

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studies.errors import StudyError
from studies.horizon import HorizonLaw, fit_horizon_law

__all__ = [
    "TransferCheck",
    "optimal_log2_lr",
    "plot_transfer",
    "transfer_config",
    "transfer_study_file",
]

PARAMETRIZATIONS = ("sp", "mup")
LABELS = {"sp": "SP", "mup": "muP"}


def transfer_study_file(
    base: Path,
    *,
    name: str,
    widths: Sequence[int],
    depths: Sequence[int] = (),
    horizons: Sequence[int] = (),
    optimizer: str | None = None,
    trials: int = 8,
    steps: int = 150,
    log2_lr: tuple[float, float] = (-13.0, -4.0),
    seed: int = 0,
) -> dict[str, Any]:
    """The study (as a study file's mapping) that sweeps the LR at each width (or depth, at the
    smallest width, when `depths` is given) under SP and muP; muP's base: the smallest. With
    `horizons`, it sweeps the LR at each step count instead, at the smallest width under muP
    (the proxy whose horizon law `transfer --steps` uses)."""
    if horizons:
        axis, values = "horizon", sorted(set(horizons))
    elif depths:
        axis, values = "depth", sorted(set(depths))
    else:
        axis, values = "width", sorted(set(widths))
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
    if axis != "width":
        overrides["model.d_model"] = min(widths)
    if axis == "depth":
        overrides["parametrization.base_depth"] = values[0]
    if optimizer is not None:
        overrides["optimizer.name"] = optimizer
    key = {"width": "model.d_model", "depth": "model.n_layer"}.get(axis)
    stages = [
        {
            "name": f"{p}-{axis[0]}{v}",
            "sampler": "sobol",
            "trials": trials,
            "budget": {"steps": v if axis == "horizon" else steps},
            "pruner": "none",
            "seed": seed,  # every stage the same learning rates
            "overrides": {"parametrization.name": p, **({key: v} if key else {})},
        }
        for p in (("mup",) if axis == "horizon" else PARAMETRIZATIONS)
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

    def horizon_law(self) -> HorizonLaw:
        """The horizon law through the optimal LR at each horizon (a horizon check's)."""
        return fit_horizon_law(
            [(steps, 2.0**x) for name in self.curves for steps, (x, _) in self.optima(name).items()]
        )

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
        if self.axis == "horizon":
            law = self.horizon_law()
            payload["horizon_law"] = {**law.to_dict(), "text": law.describe()}
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


def write_study_file(
    raw: Mapping[str, Any], path: Path, by: str = "scaleplan transfer-check"
) -> Path:
    """The study as YAML (atomically), rerunnable with ``scaleplan sweep``."""
    import yaml

    from trainer.tracking import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# written by {by}\n" + yaml.safe_dump(dict(raw), sort_keys=False)
    write_text_atomic(path, text)
    return path


def write_json(payload: Mapping[str, Any], path: Path) -> None:
    from trainer.tracking import write_text_atomic

    write_text_atomic(path, json.dumps(dict(payload), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Transfer a tuned proxy's config to the wide (deep, long) target


def transfer_config(
    raw: Mapping[str, Any],
    *,
    width: int | None = None,
    depth: int | None = None,
    steps: int | None = None,
    law: HorizonLaw | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The trainer config (a mapping) of the target, from the tuned proxy's `raw` config, and
    the notes on what transferred and what did not. Under muP (an SP proxy becomes muP's base)
    the tuned LR, init and multipliers carry over across width and depth unchanged: the
    parametrization rescales them per layer. A different horizon moves the LR along `law`
    and stretches the schedule's step counts; batch size and weight decay are the user's."""
    from trainer.config import parse_config
    from trainer.errors import ConfigError
    from trainer.models import GPTConfig, MLPConfig
    from trainer.parametrization import width_and_depth

    source = parse_config(copy.deepcopy(dict(raw)))
    target = copy.deepcopy(dict(raw))  # the user's own file, changed where the target differs
    section = target.setdefault
    model, opt = source.model.model_dump(), source.optimizer.model_dump()
    if not isinstance(source.model, GPTConfig | MLPConfig):
        kind = model["kind"]
        raise StudyError(f"--from: model.kind {kind}; transfer has muP rules for gpt and mlp")
    kind = model["kind"]
    _, _, width_field, depth_field = width_and_depth(source.model)
    width_key, depth_key = width_field.removeprefix("model."), depth_field.removeprefix("model.")
    notes: list[str] = []
    par = source.parametrization.model_dump()
    if par["name"] == "sp":
        if model.get("tie_embeddings"):
            raise StudyError(
                "--from: model.tie_embeddings is true; muP needs the proxy's own readout: "
                "tune it with model.tie_embeddings: false"
            )
        readout = "zero" if model.get("zero_init_readout") else "tp5"
        section("parametrization", {}).update(
            name="mup", base_width=model[width_key], readout_init=readout
        )
        par["base_width"] = model[width_key]
        notes.append(
            f"parametrization: sp proxy at {width_key} {model[width_key]} -> mup with that "
            f"base_width (readout_init {readout}): the same network at the proxy's width"
        )
    if width is not None:
        if width < par["base_width"]:
            raise StudyError(
                f"--width: {width} is below parametrization.base_width {par['base_width']}; "
                "expected the proxy's width or wider"
            )
        if kind == "gpt" and width % model["n_head"]:
            raise StudyError(
                f"--width: {width} is not divisible by model.n_head {model['n_head']}; expected "
                f"a multiple of {model['n_head']}"
            )
        notes.append(f"model.{width_key}: {model[width_key]} -> {width}")
        section("model", {})[width_key] = width
    if depth is not None:
        if par.get("base_depth") is None:
            section("parametrization", {})["base_depth"] = model[depth_key]
            notes.append(f"parametrization.base_depth: the proxy's {model[depth_key]}")
        notes.append(f"model.{depth_key}: {model[depth_key]} -> {depth}")
        section("model", {})[depth_key] = depth
    if steps is not None and steps != source.steps:
        if law is None:
            raise StudyError(
                f"--steps: {steps} differs from the proxy's {source.steps}, and the optimal "
                "LR moves with the horizon; give --horizon-b B (log lr* = a - b log T) or "
                "--horizon-from a transfer-check JSON with a horizon law"
            )
        for key in ("lr", "muon_adamw_lr"):
            if opt.get(key) is not None:
                moved = law.shift(opt[key], source.steps, steps)
                notes.append(
                    f"optimizer.{key}: {opt[key]:.4g} at {source.steps} steps -> "
                    f"{moved:.4g} at {steps} steps ({law.describe()})"
                )
                section("optimizer", {})[key] = float(f"{moved:.4g}")
        schedule = source.schedule.model_dump()
        stretched = _stretch_schedule(schedule, steps / source.steps, notes)
        section("schedule", {}).update(stretched)
        target["steps"] = steps
    notes.append(
        "carried over unchanged: the LR and its schedule's shape, the init scale and the "
        "multipliers (muP rescales them per layer)"
    )
    notes.append(
        f"not transferred: data.batch_size {source.data.batch_size} and the training "
        "length are the target's own (tune the batch with its own study)"
    )
    if par.get("weight_decay") == "coupled" and opt.get("weight_decay"):
        notes.append(
            "optimizer.weight_decay: coupled, so lr x wd shrinks with the hidden LR rule; "
            "weight_decay: independent holds it across widths"
        )
    try:
        parse_config(target)
    except ConfigError as error:
        raise StudyError(f"the transferred config: {error}") from None
    return target, notes


def _stretch_schedule(
    schedule: Mapping[str, Any], ratio: float, notes: list[str]
) -> dict[str, Any]:
    """The schedule's step counts x `ratio` (only those set), so that its shape over the run
    is the proxy's; fractions stay as they are."""
    changed: dict[str, Any] = {}
    for key in ("warmup_steps", "step_size", "restart_period", "inverse_sqrt_timescale"):
        if schedule.get(key):
            changed[key] = max(1, round(schedule[key] * ratio))
            notes.append(f"schedule.{key}: {schedule[key]} -> {changed[key]}")
    if schedule.get("milestones"):
        changed["milestones"] = [max(1, round(m * ratio)) for m in schedule["milestones"]]
        notes.append(f"schedule.milestones: {schedule['milestones']} -> {changed['milestones']}")
    return changed
