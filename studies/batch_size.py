"""The critical batch size, measured on the user's model: a study with a stage per batch size.

Each stage trains the same number of examples at one batch size B (so ``steps = examples / B``,
with a floor of steps for the largest batches, which would otherwise stop before the loss the
small ones reach), with the learning rate scaled from the config's by a rule (``linear``:
Goyal et al. 2017, for SGD; ``sqrt``: Malladi et al. 2022, for Adam) or ``tuned``: a few
learning rates per batch (Sobol over a log range 4x either side of the sqrt rule's; the trial
that reaches the target first counts). The schedule is constant after the config's warm-up
(the same steps for every batch size): a decaying schedule would make the steps to a loss
depend on the horizon. Every evaluation is kept, and the steps S to the target loss are read
off each curve (linear between evaluations); E = B·S. McCandlish et al.'s trade-off
(S/S_min − 1)(E/E_min − 1) = 1 through the points gives B_crit = E_min/S_min
(`planner.batch.fit_tradeoff`, with a bootstrap interval).

Beside it, the online estimate: every trainer trial measures the gradient noise scale
(`diagnostics.gns`, two micro-batches per step) and B_simple is read at the step where the run
crossed the target: McCandlish's B_crit ≈ B_noise, for which B_simple stands in.

A callable objective (``objective.callable``) runs the same study on anything: it gets
``trial.budget = {steps, batch_size, eval_every, lr}`` (``lr`` left out under ``tuned``, where
it is the searched ``optimizer.lr``), reports its loss with ``trial.report(step, loss)`` at each
evaluation, and may write ``metrics.jsonl`` records with ``step`` and ``gns/b_simple`` into
``trial.out_dir``, as the trainer does, for the online estimate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from studies.errors import StudyError

__all__ = [
    "LR_RULES",
    "BatchPoint",
    "CriticalBatch",
    "batch_size_study_file",
    "critical_batch",
    "plot_critical_batch",
    "scaled_lr",
    "steps_to_target",
]

LrRule = Literal["linear", "sqrt", "tuned"]
LR_RULES: tuple[LrRule, ...] = ("linear", "sqrt", "tuned")
EVALS_PER_RUN = 20  # evaluations along each run: the resolution of the steps-to-target reading
TUNED_SPREAD = 4.0  # tuned: each batch's LR range spans this factor either side of the sqrt rule
GNS_ACCUM = 2  # micro-batches per step for the online noise scale
DEFAULT_TARGET_FRACTION = 0.9  # default target: this far from the first loss to the worst best


def scaled_lr(lr: float, batch: int, base_batch: int, rule: LrRule) -> float:
    """The config's `lr` (tuned at `base_batch`) carried to `batch`: linear, or square root
    (also the centre of the tuned range)."""
    ratio = batch / base_batch
    return lr * ratio if rule == "linear" else lr * math.sqrt(ratio)


def check_batches(batches: Sequence[int]) -> list[int]:
    values = sorted(set(batches))
    if len(values) < 3:
        raise StudyError(
            f"--batches: {','.join(map(str, values)) or 'none'}; the trade-off fit needs at "
            "least 3 different batch sizes (e.g. 8,16,32,64,128)"
        )
    if values[0] < 1:
        raise StudyError(f"--batches: {values[0]}; batch sizes are examples per step, >= 1")
    return values


def batch_size_study_file(
    base: Path | None,
    *,
    batches: Sequence[int],
    lr_rule: LrRule,
    base_lr: float,
    base_batch: int,
    examples: int,
    min_steps: int = 1,
    warmup_steps: int = 0,
    trials: int = 6,
    gns: bool = True,
    evals: int = EVALS_PER_RUN,
    callable_name: str | None = None,
    name: str = "batch-size",
    seed: int = 0,
) -> dict[str, Any]:
    """The study (as a study file's mapping): a stage per batch size, each training `examples`
    examples (see the module docstring). `base` is the trainer config; with `callable_name`
    the objective is that callable instead."""
    values = check_batches(batches)
    if lr_rule not in LR_RULES:
        raise StudyError(f"--lr-rule: {lr_rule}; expected one of {', '.join(LR_RULES)}")
    if examples < values[-1]:
        raise StudyError(
            f"--examples: {examples}; expected at least the largest batch ({values[-1]}): "
            "each batch size trains that many examples"
        )
    stages: list[dict[str, Any]] = []
    for batch in values:
        steps = max(1, min_steps, math.ceil(examples / batch))
        every = max(1, steps // evals)
        lr = scaled_lr(base_lr, batch, base_batch, lr_rule)
        stage: dict[str, Any] = {
            "name": f"b{batch}",
            "sampler": "sobol" if lr_rule == "tuned" else "random",
            "trials": trials if lr_rule == "tuned" else 1,
            "pruner": "none",
            "seed": seed,  # tuned: the same learning-rate multipliers at every batch size
        }
        if callable_name is not None:
            budget: dict[str, Any] = {"steps": steps, "batch_size": batch, "eval_every": every}
            if lr_rule != "tuned":
                budget["lr"] = lr
            stage["budget"] = budget
        else:
            stage["budget"] = {"steps": steps}
            accum = GNS_ACCUM if gns and batch % GNS_ACCUM == 0 else 1
            overrides: dict[str, Any] = {
                "data.batch_size": batch // accum,
                "grad_accum_steps": accum,
                "diagnostics.gns": accum > 1,
                "eval_every": every,
                "log_every": every,
            }
            if lr_rule != "tuned":
                overrides["optimizer.lr"] = lr
            stage["overrides"] = overrides
        if lr_rule == "tuned":  # each batch size its own range, around the sqrt rule's LR
            stage["space"] = {"optimizer.lr": _tuned_range(base_lr, batch, base_batch)}
        stages.append(stage)
    if lr_rule == "tuned":
        space: dict[str, Any] = {"optimizer.lr": _tuned_range(base_lr, values[0], base_batch)}
    else:
        space = {"seed": {"choices": [seed]}}  # nothing to search: one run per batch size
    raw: dict[str, Any] = {"name": name, "space": space, "stages": stages, "seed": seed}
    if callable_name is not None:
        raw["objective"] = {"callable": callable_name, "direction": "minimize"}
    else:
        raw["base"] = str(base)
        raw["objective"] = {"metric": "val_loss"}
        raw["overrides"] = {
            "schedule.name": "constant",
            "schedule.warmup_steps": warmup_steps,
            "schedule.warmup_fraction": None,
            "checkpoint_every": 0,
            "early_stopping.patience": None,
            "diagnostics.per_layer": False,
            "diagnostics.activations": False,
        }
    return raw


def _tuned_range(base_lr: float, batch: int, base_batch: int) -> dict[str, Any]:
    centre = scaled_lr(base_lr, batch, base_batch, "sqrt")
    return {"low": centre / TUNED_SPREAD, "high": centre * TUNED_SPREAD, "log": True}


def steps_to_target(curve: Sequence[tuple[int, float]], target: float) -> float | None:
    """The first step at which the curve reaches `target`, linear between its points; None if
    it never does."""
    previous: tuple[int, float] | None = None
    for step, value in curve:
        if math.isfinite(value) and value <= target:
            if previous is None or not math.isfinite(previous[1]):
                return float(step)
            s0, v0 = previous
            return s0 + (step - s0) * (v0 - target) / (v0 - value) if v0 != value else float(step)
        previous = (step, value)
    return None


@dataclass(frozen=True)
class BatchPoint:
    """One batch size's best run: the steps and examples it took to the target."""

    batch: int
    lr: float | None
    steps: float | None  # to the target; None: never reached
    best_loss: float | None
    trial: int | None
    b_simple: float | None  # online, at the crossing
    out_dir: str | None

    @property
    def examples(self) -> float | None:
        return None if self.steps is None else self.steps * self.batch

    def to_dict(self, tokens_per_example: int) -> dict[str, Any]:
        examples = self.examples
        return {
            "batch": self.batch,
            "lr": self.lr,
            "steps_to_target": self.steps,
            "examples_to_target": examples,
            "tokens_to_target": None if examples is None else examples * tokens_per_example,
            "best_loss": self.best_loss,
            "b_simple": self.b_simple,
            "trial": self.trial,
            "out_dir": self.out_dir,
        }


@dataclass(frozen=True)
class CriticalBatch:
    """The study's answer: the fit, the points behind it and the online estimate."""

    fit: Any  # planner.batch.TradeoffFit
    points: list[BatchPoint]
    target_loss: float
    lr_rule: str
    tokens_per_example: int

    @property
    def b_simple(self) -> float | None:
        values = [p.b_simple for p in self.points if p.b_simple is not None and p.steps]
        return float(np.median(values)) if values else None

    def to_dict(self, plot: Path | None = None) -> dict[str, Any]:
        t = self.tokens_per_example
        b_simple = self.b_simple
        return {
            **self.fit.to_dict(),
            "b_crit_tokens": self.fit.b_crit * t,
            "b_simple": b_simple,
            "b_simple_tokens": None if b_simple is None else b_simple * t,
            "target_loss": self.target_loss,
            "lr_rule": self.lr_rule,
            "tokens_per_example": t,
            "batches": [p.to_dict(t) for p in self.points],
            "plot": None if plot is None else str(plot),
        }


def critical_batch(
    reports: Sequence[Any],
    *,
    target_loss: float | None = None,
    lr_rule: str = "sqrt",
    tokens_per_example: int = 1,
    level: float = 0.8,
) -> CriticalBatch:
    """B_crit from the stage reports of a study `batch_size_study_file` wrote (one stage per
    batch size, named ``b<batch>``). Without `target_loss`: 90% of the way from the first
    evaluation's loss to the highest of the batch sizes' best losses (every batch size reaches
    it before its plateau)."""
    from planner.batch import fit_tradeoff
    from planner.errors import InputError

    runs = {}
    for report in reports:
        batch = int(report.name.lstrip("b"))
        curves = [
            (t, list(t["intermediate"]))
            for t in report.trials
            if t["state"] == "complete" and t["intermediate"]
        ]
        runs[batch] = curves
    if not any(runs.values()):
        raise StudyError("no trial completed; their reasons: scaleplan study show")
    best = {b: min(_best(c) for _, c in curves) for b, curves in runs.items() if curves}
    if target_loss is None:
        # most of the way down to the highest best loss: a small batch's best is its noise
        # floor under a constant LR, which it only grazes in its last steps
        start = float(np.median([c[0][1] for curves in runs.values() for _, c in curves]))
        target = start - DEFAULT_TARGET_FRACTION * (start - max(best.values()))
    else:
        target = target_loss
    points = []
    for batch, curves in sorted(runs.items()):
        reached: list[tuple[float, Mapping[str, Any]]] = []
        for t, c in curves:
            crossing = steps_to_target(c, target)
            if crossing is not None:
                reached.append((crossing, t))
        steps: float | None = None
        trial: Mapping[str, Any] | None = None
        if reached:
            steps, trial = min(reached, key=lambda pair: pair[0])
        elif curves:
            trial = min(curves, key=lambda tc: _best(tc[1]))[0]
        points.append(
            BatchPoint(
                batch=batch,
                lr=_lr(trial),
                steps=steps,
                best_loss=best.get(batch),
                trial=None if trial is None else int(trial["number"]),
                b_simple=_b_simple_at(trial, steps) if steps is not None else None,
                out_dir=None if trial is None else trial.get("out_dir"),
            )
        )
    hit = [p for p in points if p.steps is not None]
    hit_steps = [p.steps for p in hit if p.steps is not None]
    if len(hit) < 3:
        closest = ", ".join(
            f"batch {p.batch} {p.best_loss:.4g}"
            for p in sorted(points, key=lambda p: p.best_loss or math.inf)
            if p.best_loss is not None
        )
        which = ", ".join(str(p.batch) for p in hit) or "none"
        raise StudyError(
            f"--target-loss: {target:.4g} was reached at {len(hit)} batch size(s) ({which}); "
            f"the fit needs 3. Closest (best loss per batch): {closest}; raise the target or "
            "train more examples (--examples)"
        )
    try:
        fit = fit_tradeoff([p.batch for p in hit], hit_steps, level=level)
    except InputError as error:
        raise StudyError(f"batch-size: {error}") from None
    return CriticalBatch(fit, points, target, lr_rule, tokens_per_example)


def _best(curve: Sequence[tuple[int, float]]) -> float:
    finite = [v for _, v in curve if math.isfinite(v)]
    return min(finite) if finite else math.inf


def _lr(trial: Mapping[str, Any] | None) -> float | None:
    if trial is None:
        return None
    value = trial["params"].get("optimizer.lr")
    if value is not None:
        return float(value)
    budget_lr = trial.get("budget", {}).get("lr")
    if budget_lr is not None:
        return float(budget_lr)
    config = Path(trial["out_dir"] or "") / "config.yaml" if trial.get("out_dir") else None
    if config is not None and config.is_file():
        import yaml

        return float(yaml.safe_load(config.read_text())["optimizer"]["lr"])
    return None


def _b_simple_at(trial: Mapping[str, Any] | None, step: float) -> float | None:
    """The online B_simple logged nearest to `step` in the trial's metrics.jsonl."""
    if trial is None or not trial.get("out_dir"):
        return None
    path = Path(trial["out_dir"]) / "metrics.jsonl"
    if not path.is_file():
        return None
    found: list[tuple[float, float]] = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        value = record.get("gns/b_simple")
        if isinstance(value, int | float) and math.isfinite(value) and value > 0:
            found.append((abs(record["step"] - step), float(value)))
    return min(found)[1] if found else None


def plot_critical_batch(result: CriticalBatch, path: Path) -> Path:
    """Steps against examples to the target, one point per batch size, with McCandlish's
    fitted hyperbola and B_crit marked (their Fig. 3)."""
    from matplotlib.figure import Figure

    from trainer.tracking import save_png

    fit = result.fit
    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.subplots()
    hit = [(p.batch, p.steps * p.batch, p.steps) for p in result.points if p.steps is not None]
    ax.plot([e for _, e, _ in hit], [s for _, _, s in hit], "o", color="C0", label="measured")
    for batch, examples, steps in hit:
        ax.annotate(
            f"B={batch}", (examples, steps), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    batches = np.geomspace(min(b for b, _, _ in hit) / 2, max(b for b, _, _ in hit) * 2, 200)
    ax.plot(
        fit.e_min * (1 + batches / fit.b_crit),
        fit.s_min * (1 + fit.b_crit / batches),
        color="C1",
        label=f"(S/S_min-1)(E/E_min-1)=1, B_crit {fit.b_crit:.3g}",
    )
    ax.plot([2 * fit.e_min], [2 * fit.s_min], "*", ms=12, color="C3", label="B = B_crit")
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(NullFormatter())  # the log axes' minor labels overlap
    ax.set_xlabel("examples to target E")
    ax.set_ylabel("steps to target S")
    title = f"Critical batch at loss {result.target_loss:.3g}"
    if result.b_simple is not None:
        title += f" (online B_simple {result.b_simple:.3g})"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
