"""A scaling ladder: GPTs of several sizes trained at several compute budgets, on the user's own
data and architecture, into a runs table that `scaleplan fit` reads.

Sizes are non-embedding parameter counts; each becomes a GPT shape (`planner.shape`) at the
base config's sequence length. The N the table records (``params``) is FLOP-equivalent: the
trainer's FLOPs per token of that shape over 6, attention's scores and values included
(Kaplan et al. 2020, Table 1; ``planner.shape.flop_params``), so that a budget C buys
D = C / (6 N) tokens, rounded to whole steps of the base config's batch, and 6 N D is what the
run costs. The LM head's FLOPs are left out, as Kaplan et al. do; Porian et al. 2024
(arXiv:2406.19146) count them, and for a byte-level model they are small beside attention at
context 128 (d x 256 against 2 L d x 128). ``params_non_embedding`` is beside it. Two designs:

- ``isoflop`` (Hoffmann et al. 2022, Approach 2): every size at every budget, a run each, its
  cosine schedule as long as the run. A budget needs at least 3 sizes that fit it (``min_steps``
  steps or more) for its parabola.
- ``wsd`` (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
  Durations", arXiv:2405.18392): per size one warmup-stable-decay run as long as the largest
  budget, whose stable phase is checkpointed where each smaller budget's cool-down must start;
  each of those budgets is a short run continuing from that checkpoint with the cool-down
  (``decay_fraction`` of its steps, ``decay_shape``). The stable phase is shared, so the points
  of all budgets cost little more than the largest one's run: the ladder reports the FLOPs
  saved against the IsoFLOP grid for the same points.

With ``lrs`` every point trains at each learning rate and the lowest loss is the point's.

Every run is a trial of a study the ladder writes (``<out>/ladder-study.yaml``): one stage per
run, so the studies engine runs them in order, resumes the ladder after a kill (finished runs
stay), and puts every run in MLflow under one parent run. ``runs.csv`` (a row per point:
design, size, budget, ``params``, ``tokens``, ``flops``, ``lr``, ``loss``) and ``curves.csv``
(its validation curve: step, tokens, loss) are what `scaleplan fit` and the approaches read.

Then the extrapolation check (`plan_check`): Approach 3 fitted on the points below the largest
budget, the run it calls compute-optimal at the largest budget trained (study
``<name>-check``), its loss against the prediction and the prediction's interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from studies.errors import StudyError, first_error

FLOPS_PER_PARAM_TOKEN = 6.0
Design = Literal["isoflop", "wsd"]
MIN_SIZES_PER_BUDGET = 3  # a parabola needs three points


class LadderSpec(BaseModel):
    """A ladder file (``studies/configs/ladder.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="ladder", pattern=r"^[A-Za-z0-9._-]+$", description="Study name.")
    base: str = Field(description="The trainer config (relative to the ladder file).")
    sizes: list[float] = Field(
        min_length=2, description="Non-embedding parameter counts, one GPT shape each."
    )
    budgets: list[float] = Field(min_length=2, description="Compute budgets, 6ND FLOPs.")
    designs: list[Design] = Field(
        default=["isoflop", "wsd"], min_length=1, description="Which designs."
    )
    decay_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="wsd: the cool-down's share of a budget's steps."
    )
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = Field(
        default="1-sqrt", description="wsd: the cool-down's shape (Hägele et al.: 1-sqrt)."
    )
    min_steps: int = Field(default=20, ge=2, description="A run needs at least this many steps.")
    max_tokens_per_param: float = Field(
        default=250.0,
        gt=0,
        description="Points whose D / N is above this are left out: far past the optimum "
        "(about 20 tokens per parameter), they cost the most and inform the parabola least.",
    )
    evals: int = Field(default=8, ge=1, description="Validation passes along each run.")
    lrs: list[float] | None = Field(
        default=None,
        min_length=2,
        description="Train every point (and the check's run) at each of these optimizer.lr "
        "values and keep the lowest loss: the optimal LR moves with size and horizon, and a "
        "law fitted to mistuned runs fits the mistuning. None: the base config's LR.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Dotted trainer keys applied to every run."
    )
    check: bool = Field(
        default=True,
        description="After the ladder: fit Approach 3 on the runs below the largest budget, "
        "train the compute-optimal run it predicts at the largest budget, report the error.",
    )
    fit_design: Design | None = Field(
        default=None,
        description="The design whose final losses Approaches 2 and 3, the check and the "
        "tuned optima (hparams.csv) read, and whose schedule the check's run trains (None: "
        "isoflop when the ladder has it, else wsd).",
    )

    @model_validator(mode="after")
    def _fit_design_is_trained(self) -> LadderSpec:
        if self.fit_design is not None and self.fit_design not in self.designs:
            raise ValueError(
                f"fit_design: {self.fit_design!r} is not one of the ladder's designs "
                f"{self.designs}; name one of them"
            )
        return self

    @field_validator("sizes", "budgets", "lrs")
    @classmethod
    def _positive_ascending(cls, values: list[float] | None) -> list[float] | None:
        if values is None:
            return None
        if any(not math.isfinite(v) or v <= 0 for v in values):
            raise ValueError("expected positive numbers")
        if sorted(set(values)) != list(values):
            raise ValueError("expected distinct numbers in ascending order")
        return values


@dataclass(frozen=True)
class Rung:
    """One size: its GPT shape, the trainer's count of its non-embedding parameters, and its
    FLOP-equivalent parameter count: the trainer's FLOPs per token over 6, attention included,
    so that 6 N D is what a run costs."""

    index: int
    target: float
    n_layer: int
    d_model: int
    n_head: int
    n_params: int  # non-embedding
    flop_params: float


@dataclass(frozen=True)
class Run:
    """One run of the ladder: a stage of its study."""

    design: Design
    role: str  # isoflop, stable (wsd: the long run), cooldown (wsd: a branch)
    size: int
    budget: int  # index into the ladder's budgets
    budget_flops: float
    steps: int
    stage: str
    start_step: int = 0  # cooldown: where it branches off the stable run
    decay_steps: int = 0  # wsd: the cool-down's length
    lr: float | None = None  # optimizer.lr (a ladder with lrs); None: the base config's

    @property
    def trained_steps(self) -> int:
        """Steps this run itself trains (a cool-down starts at its branch point)."""
        return self.steps - self.start_step


@dataclass(frozen=True)
class Plan:
    spec: LadderSpec
    rungs: list[Rung]
    runs: list[Run]
    tokens_per_step: int
    left_out: list[str]  # (size, budget) points no run can hold, and why
    config: Any  # the base TrainConfig with the ladder's overrides (shapes for more rungs)

    def flops(self, run: Run) -> float:
        return FLOPS_PER_PARAM_TOKEN * self.rungs[run.size].flop_params * self.tokens(run)

    def tokens(self, run: Run) -> int:
        return run.trained_steps * self.tokens_per_step

    def cost(self, design: Design) -> float:
        """6ND FLOPs the design trains, over all its runs."""
        return sum(self.flops(run) for run in self.runs if run.design == design)

    def points(self, design: Design) -> set[tuple[int, int]]:
        """(size, budget) of each run's final model (a stable run's is the largest budget)."""
        return {(r.size, r.budget) for r in self.runs if r.design == design}


def load_ladder(path: Path, overrides: Sequence[str] = ()) -> tuple[LadderSpec, Path]:
    """The ladder file with ``--set`` items applied, and its base config's absolute path."""
    from studies.config import read_yaml
    from studies.study_file import apply_set

    raw = read_yaml(path, "ladder")
    for item in overrides:
        apply_set(raw, item)
    try:
        spec = LadderSpec.model_validate(raw)
    except ValidationError as error:
        raise first_error(error, "ladder", f" (in {path})") from None
    base = Path(spec.base)
    base = base if base.is_absolute() else (path.parent / base).absolute()
    if not base.is_file():
        raise StudyError(f"base: '{spec.base}' is not a file (relative to {path})")
    return spec, base


def plan_ladder(spec: LadderSpec, base_raw: Mapping[str, Any]) -> Plan:
    """The shapes and the runs, or one line saying what cannot be run (nothing is trained)."""
    from planner.errors import InputError
    from planner.shape import shape_for
    from studies.trainer_config import tokens_per_step, with_values
    from trainer.config import parse_config

    config = parse_config(with_values(base_raw, spec.overrides, "overrides"))
    if config.model.kind != "gpt":
        raise StudyError(f"base: model.kind {config.model.kind!r}; a ladder trains GPTs")
    per_step = tokens_per_step(config)
    rungs = []
    for index, target in enumerate(spec.sizes):
        try:
            shape = shape_for(target, seq_len=config.data.block_size)
        except InputError as error:
            raise StudyError(f"sizes[{index}]: {error}") from None
        rungs.append(_rung(index, target, shape, config))
    if len({r.n_params for r in rungs}) < len(rungs):
        raise StudyError(
            f"sizes: {spec.sizes} give the same GPT shape twice; space them further apart"
        )
    runs: list[Run] = []
    left_out: list[str] = []
    steps = {
        (r.index, b): round(c / (FLOPS_PER_PARAM_TOKEN * r.flop_params * per_step))
        for r in rungs
        for b, c in enumerate(spec.budgets)
    }
    why: dict[tuple[int, int], str] = {}
    for r in rungs:
        for b in range(len(spec.budgets)):
            count, ratio = steps[(r.index, b)], steps[(r.index, b)] * per_step / r.flop_params
            if count < spec.min_steps:
                why[(r.index, b)] = f"{count} steps (min_steps {spec.min_steps})"
            elif ratio > spec.max_tokens_per_param:
                why[(r.index, b)] = (
                    f"{ratio:.0f} tokens per parameter (max_tokens_per_param "
                    f"{spec.max_tokens_per_param:g})"
                )
    fits = {key: key not in why for key in steps}
    for b, budget in enumerate(spec.budgets):
        sizes = [r.index for r in rungs if fits[(r.index, b)]]
        for r in rungs:
            if not fits[(r.index, b)]:
                left_out.append(f"size {r.n_params:,} at {budget:.3g} FLOPs: {why[(r.index, b)]}")
        if "isoflop" in spec.designs and len(sizes) < MIN_SIZES_PER_BUDGET:
            raise StudyError(
                f"budgets[{b}]: {budget:.3g} FLOPs holds {len(sizes)} of the sizes (at least "
                f"min_steps {spec.min_steps} steps, at most max_tokens_per_param "
                f"{spec.max_tokens_per_param:g}; a parabola needs {MIN_SIZES_PER_BUDGET}); "
                "choose sizes around this budget's optimum"
            )
        if "isoflop" in spec.designs:
            runs += [
                Run("isoflop", "isoflop", s, b, budget, steps[(s, b)], f"iso-n{s}-c{b}")
                for s in sizes
            ]
    if "wsd" in spec.designs:
        runs += _wsd_runs(spec, rungs, steps, fits)
    plan = Plan(spec, rungs, with_lrs(runs, spec.lrs), per_step, left_out, config)
    if spec.check:
        _check_inputs(plan)
    return plan


def with_lrs(runs: Sequence[Run], lrs: Sequence[float] | None) -> list[Run]:
    """Each run once per learning rate (stage ``<stage>-lr<j>``), or as it is without `lrs`."""
    if not lrs:
        return list(runs)
    return [replace(r, stage=f"{r.stage}-lr{j}", lr=lr) for r in runs for j, lr in enumerate(lrs)]


def _wsd_runs(
    spec: LadderSpec,
    rungs: list[Rung],
    steps: Mapping[tuple[int, int], int],
    fits: Mapping[tuple[int, int], bool],
) -> list[Run]:
    """Per size: the stable run to the largest budget it fits, and a cool-down per smaller
    budget, branching at (1 - decay_fraction) of that budget's steps."""
    runs: list[Run] = []
    for r in rungs:
        budgets = [b for b in range(len(spec.budgets)) if fits[(r.index, b)]]
        if len(budgets) < 2:
            continue  # one budget: nothing to share
        *smaller, largest = budgets
        total = steps[(r.index, largest)]
        decay = max(1, round(spec.decay_fraction * total))
        runs.append(
            Run("wsd", "stable", r.index, largest, spec.budgets[largest], total,
                f"wsd-n{r.index}", 0, decay)
        )  # fmt: skip
        for b in smaller:
            length = steps[(r.index, b)]
            cool = max(1, round(spec.decay_fraction * length))
            runs.append(
                Run("wsd", "cooldown", r.index, b, spec.budgets[b], length,
                    f"wsd-n{r.index}-c{b}", length - cool, cool)
            )  # fmt: skip
    return runs


CHECK_MIN_RUNS = 5  # Approach 3 has five coefficients


@dataclass(frozen=True)
class Check:
    """The extrapolation check: Approach 3 (Hoffmann et al. 2022) fitted on one design's runs
    below the largest budget, and the run it calls compute-optimal at the largest budget, made
    from the GPT shape whose FLOP-equivalent N is nearest the law's N_opt."""

    design: Design
    fitted_runs: int
    law: dict[str, float]
    warnings: list[str]
    n_opt: float  # the law's compute-optimal N at the largest budget
    rung: Rung
    run: Run
    tokens: int
    predicted: float  # the law's loss at the run's own N and D
    interval: tuple[float, float]  # over the bootstrap refits
    level: float


def fitted_design(spec: LadderSpec) -> Design:
    if spec.fit_design is not None:
        return spec.fit_design
    return "isoflop" if "isoflop" in spec.designs else "wsd"


def _check_inputs(plan: Plan) -> None:
    """Before anything trains: the check's design has enough points (a point's LRs count
    once) below the largest budget for the law's five coefficients."""
    spec = plan.spec
    design = fitted_design(spec)
    below = {point for point in plan.points(design) if point[1] < len(spec.budgets) - 1}
    if len(below) < CHECK_MIN_RUNS:
        raise StudyError(
            f"check: {len(below)} {design} points below the largest budget "
            f"{spec.budgets[-1]:.3g} FLOPs; the parametric fit needs at least {CHECK_MIN_RUNS} "
            "(add sizes or budgets, or check: false)"
        )


def plan_check(
    plan: Plan, rows: Sequence[Mapping[str, Any]], *, bootstrap: int = 200, level: float = 0.95
) -> Check:
    """Fit the check's law on the finished `rows` below the largest budget and make its run
    (InputError, from the fit or the law, when there is no finite optimum to train)."""
    import numpy as np

    from planner.errors import InputError
    from planner.fit import fit_law
    from planner.laws import FORMS

    spec = plan.spec
    design = fitted_design(spec)
    largest = spec.budgets[-1]
    fitted = [r for r in rows if r["design"] == design and r["budget"] < largest]
    fit = fit_law(
        [r["params"] for r in fitted],
        [r["tokens"] for r in fitted],
        [r["loss"] for r in fitted],
        bootstrap=bootstrap,
        interval_level=level,
    )
    form = FORMS["chinchilla"]
    n_opt = _optimal_n(fit.params, largest)
    if n_opt is None:
        raise InputError(
            f"the law fitted below {largest:.3g} FLOPs has no finite compute-optimal N "
            f"(alpha {fit.params['alpha']:.3g}, beta {fit.params['beta']:.3g})"
        )
    rung = rung_near(plan, n_opt)
    steps = round(largest / (FLOPS_PER_PARAM_TOKEN * rung.flop_params * plan.tokens_per_step))
    if steps < spec.min_steps:
        raise InputError(
            f"the law's N_opt {n_opt:,.0f} trains {steps} steps at {largest:.3g} FLOPs "
            f"(min_steps {spec.min_steps})"
        )
    decay = max(1, round(spec.decay_fraction * steps)) if design == "wsd" else 0
    run = Run(design, "check", rung.index, len(spec.budgets) - 1, largest, steps, "check",
              0, decay)  # fmt: skip
    tokens = steps * plan.tokens_per_step
    predicted = float(form.loss(fit.params, rung.flop_params, tokens))
    interval = (predicted, predicted)
    if fit.bootstrap is not None and len(fit.bootstrap):
        names = list(fit.params)
        draws = [
            float(form.loss(dict(zip(names, row, strict=True)), rung.flop_params, tokens))
            for row in fit.bootstrap
        ]
        tail = 50.0 * (1.0 - level)
        low, high = np.nanpercentile(draws, [tail, 100.0 - tail])
        interval = (float(low), float(high))
    return Check(design, len(fitted), fit.params, fit.warnings, n_opt, rung, run, tokens,
                 predicted, interval, level)  # fmt: skip


def ladder_twin(plan: Plan, check: Check, rows: Sequence[Mapping[str, Any]]) -> dict | None:
    """The ladder's own finished row of the check's run, when the law's shape is one of the
    ladder's sizes and the ladder trained it at the largest budget under the same schedule
    (the check's run would be that run again: same config, same seed)."""
    rung = check.rung
    same = [r.index for r in plan.rungs if (r.n_layer, r.d_model, r.n_head) ==
            (rung.n_layer, rung.d_model, rung.n_head)]  # fmt: skip
    for row in rows:
        if (
            row["design"] == check.design
            and row["size"] in same
            and row["budget"] == check.run.budget_flops
            and row["steps"] == check.run.steps
        ):
            return dict(row)
    return None


def check_plan(plan: Plan, check: Check) -> Plan:
    """The check as a ladder of its own (study ``<name>-check``: one stage, one run), so the
    study file, the engine and the runs table treat it as they treat the ladder's runs."""
    spec = plan.spec.model_copy(update={"name": f"{plan.spec.name}-check"})
    runs = with_lrs([check.run], spec.lrs)
    return replace(plan, spec=spec, rungs=[*plan.rungs, check.rung], runs=runs)


def check_result(check: Check, row: Mapping[str, Any] | None) -> dict[str, Any]:
    """The check's report: the law, its run, the prediction and (once trained) the error."""
    rung = check.rung
    result: dict[str, Any] = {
        "design": check.design,
        "fitted_runs": check.fitted_runs,
        "law": check.law,
        "warnings": check.warnings,
        "n_opt": check.n_opt,
        "shape": {"n_layer": rung.n_layer, "d_model": rung.d_model, "n_head": rung.n_head},
        "params": rung.flop_params,
        "tokens": check.tokens,
        "steps": check.run.steps,
        "budget": check.run.budget_flops,
        "predicted": check.predicted,
        "interval": list(check.interval),
        "level": check.level,
        "measured": None,
        "error": None,
        "covered": None,
    }
    if row is not None:
        measured = float(row["loss"])
        low, high = check.interval
        result.update(
            measured=measured,
            error=check.predicted / measured - 1.0,
            covered=bool(low <= measured <= high),
            run_id=row.get("run_id"),
            seconds=row.get("seconds"),
        )
    return result


def rung_near(plan: Plan, flop_params: float) -> Rung:
    """The GPT shape (planner.shape's family) whose FLOP-equivalent N is nearest `flop_params`,
    a rung after the ladder's own."""
    from planner.shape import shape_for_flop_params

    shape = shape_for_flop_params(flop_params, seq_len=plan.config.data.block_size)
    return _rung(len(plan.rungs), flop_params, shape, plan.config)


def _rung(index: int, target: float, shape: Any, config: Any) -> Rung:
    """Size `index` as `shape`, with the trainer's own counts: non-embedding parameters, and
    FLOPs per token over 6 (attention is a large share of a tiny model's compute: 2.3x the
    non-embedding count for one layer of width 16 at context 128)."""
    import torch

    from studies.trainer_config import tokens_per_step
    from trainer.models import build_model
    from trainer.rundir import flops_per_step

    layout = {"n_layer": shape.n_layer, "d_model": shape.d_model, "n_head": shape.n_head}
    config = config.model_copy(update={"model": config.model.model_copy(update=layout)})
    with torch.device("meta"):
        model = build_model(config.model, vocab_size=256)
    count = int(model.num_params(include_embeddings=False))
    flop_params = flops_per_step(config) / tokens_per_step(config) / FLOPS_PER_PARAM_TOKEN
    return Rung(index, target, shape.n_layer, shape.d_model, shape.n_head, count, flop_params)


def study_file(plan: Plan, base: Path, runs_dir: Path) -> dict[str, Any]:
    """The study (a study file's mapping) that runs the ladder: a stage per run, in order, the
    stable wsd runs before their cool-downs."""
    from studies.objective import trial_path

    spec = plan.spec
    stages = []
    stable_dirs = {}
    for run in sorted(plan.runs, key=lambda r: r.role == "cooldown"):
        rung = plan.rungs[run.size]
        every = max(1, run.trained_steps // spec.evals)
        overrides: dict[str, Any] = {
            "model.n_layer": rung.n_layer,
            "model.d_model": rung.d_model,
            "model.n_head": rung.n_head,
            "eval_every": every,
            "log_every": every,
            "checkpoint_every": 0,
        }
        if run.lr is not None:
            overrides["optimizer.lr"] = run.lr
        stage: dict[str, Any] = {
            "name": run.stage,
            "sampler": "random",
            "trials": 1,
            "pruner": "none",
            "budget": {"steps": run.steps},
            "overrides": overrides,
        }
        if run.design == "wsd":
            overrides.update(
                {
                    "schedule.name": "wsd",
                    "schedule.decay_fraction": run.decay_steps / run.steps,
                    "schedule.decay_shape": spec.decay_shape,
                }
            )
        if run.role == "stable":
            branches = sorted(
                c.start_step
                for c in plan.runs
                if c.role == "cooldown" and c.size == run.size and c.lr == run.lr
            )
            overrides["checkpoint_at"] = branches
            overrides["keep_checkpoints"] = len(branches) + 1
            stable_dirs[run.size, run.lr] = trial_path(spec.name, f"{run.stage}-0", runs_dir)
        if run.role == "cooldown":
            folder = stable_dirs[run.size, run.lr] / "checkpoints"
            stage["start_from"] = str(folder / f"step_{run.start_step:07d}.pt")
        stages.append(stage)
    return {
        "name": spec.name,
        "base": str(base),
        "space": {"seed": {"choices": [0]}},  # nothing to search: one run per stage
        "stages": stages,
        "objective": {"metric": "val_loss"},
        "overrides": {
            **spec.overrides,
            "early_stopping.patience": None,
            "diagnostics.per_layer": False,
            "diagnostics.activations": False,
        },
    }


def runs_table(plan: Plan, reports: Sequence[Any]) -> tuple[list[dict[str, Any]], list[dict]]:
    """(a row per finished run, its validation curve's points) from the study's reports."""
    import json

    by_stage = {run.stage: run for run in plan.runs}
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    for report in reports:
        run = by_stage.get(report.name)
        if run is None:
            continue
        for trial in report.trials:
            if trial["state"] != "complete" or not trial.get("out_dir"):
                continue
            folder = Path(trial["out_dir"])
            result = json.loads((folder / "result.json").read_text())
            rung = plan.rungs[run.size]
            tokens = run.steps * plan.tokens_per_step  # a cool-down's tokens include the stable
            rows.append(
                {
                    "run": run.stage,
                    "design": run.design,
                    "role": run.role,
                    "size": run.size,
                    "n_layer": rung.n_layer,
                    "d_model": rung.d_model,
                    "params": round(rung.flop_params),
                    "params_non_embedding": rung.n_params,
                    "n_counts": "flops",  # params: FLOPs per token / 6 (`fit` records it)
                    "budget": run.budget_flops,
                    "tokens": tokens,
                    "flops": FLOPS_PER_PARAM_TOKEN * rung.flop_params * tokens,
                    "loss": result["final_val_loss"],
                    "lr": plan.config.optimizer.lr if run.lr is None else run.lr,
                    "steps": result["steps"],
                    "trained_flops": plan.flops(run),
                    "seconds": trial.get("seconds"),
                    "run_id": trial.get("run_id"),
                }
            )
            for step, loss in result["val_curve"]:
                curves.append(
                    {
                        "run": run.stage,
                        "design": run.design,
                        "params": round(rung.flop_params),
                        "step": step,
                        "tokens": step * plan.tokens_per_step,
                        "loss": loss,
                    }
                )
    return rows, curves


def best_of_lrs(
    rows: Sequence[Mapping[str, Any]], curves: Sequence[Mapping[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """Per point (design, role, size, budget) the run of the lowest loss over its learning
    rates, those runs' curves, and a line per point whose best LR is the grid's smallest or
    largest (the optimum may lie outside it)."""
    points: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        points.setdefault((row["design"], row["role"], row["size"], row["budget"]), []).append(row)
    best = [min(tried, key=lambda r: r["loss"]) for tried in points.values()]
    edges = []
    for tried, chosen in zip(points.values(), best, strict=True):
        lrs = sorted(r["lr"] for r in tried)
        if len(lrs) > 1 and chosen["lr"] in (lrs[0], lrs[-1]):
            edges.append(f"{chosen['run']}: best lr {chosen['lr']:g} is at the edge of {lrs}")
    kept = {row["run"] for row in best}
    return [dict(r) for r in best], [dict(c) for c in curves if c["run"] in kept], edges


def hparam_optima(
    plan: Plan, rows: Sequence[Mapping[str, Any]], design: Design
) -> list[dict[str, Any]]:
    """Per budget, the learning rate and batch of the design's lowest-loss run there: the
    table `scaleplan fit --approach hparams` fits eta_opt(C) and B_opt(C) to (DeepSeek-AI
    2024's form). Only the LR is tuned (``lrs``); the batch is the base config's."""
    best: dict[float, Mapping[str, Any]] = {}
    for row in rows:
        if row["design"] == design and row["loss"] <= best.get(row["budget"], row)["loss"]:
            best[row["budget"]] = row
    return [
        {
            "flops": budget,
            "lr": row["lr"],
            "batch_tokens": plan.tokens_per_step,
            "loss": row["loss"],
            "params": row["params"],
            "run": row["run"],
        }
        for budget, row in sorted(best.items())
    ]


def savings(plan: Plan) -> dict[str, Any] | None:
    """The wsd design's FLOPs against what the IsoFLOP grid would train for the same points
    (each wsd run ends in one; there a grid run trains all of that budget's steps)."""
    runs = [r for r in plan.runs if r.design == "wsd"]
    if not runs:
        return None
    iso = sum(
        FLOPS_PER_PARAM_TOKEN * plan.rungs[r.size].flop_params * r.steps * plan.tokens_per_step
        for r in runs
    )
    wsd = plan.cost("wsd")
    return {
        "points": len(plan.points("wsd")),
        "isoflop_flops": iso,
        "wsd_flops": wsd,
        "saved_fraction": 1.0 - wsd / iso if iso > 0 else None,
    }


def plan_dict(plan: Plan) -> dict[str, Any]:
    return {
        "rungs": [asdict(r) for r in plan.rungs],
        "runs": [
            {**asdict(r), "tokens": plan.tokens(r), "flops": plan.flops(r)} for r in plan.runs
        ],
        "tokens_per_step": plan.tokens_per_step,
        "left_out": plan.left_out,
        "savings": savings(plan),
    }


def three_approaches(
    runs_csv: Path,
    curves_csv: Path,
    *,
    at_flops: float,
    design: Design = "isoflop",
    bootstrap: int = 200,
) -> list[dict[str, Any]]:
    """Hoffmann et al.'s three approaches on a ladder's tables, side by side: the exponent a
    of N_opt ∝ C^a and N_opt at `at_flops`, or why an approach could not be fitted.
    Approach 1 reads every curve; 2 and 3 the final losses of `design`'s runs (a wsd
    cool-down's endpoint is a run of its budget, as an IsoFLOP grid's run is: Hägele et al.
    2024, sec. 4)."""

    from planner.envelope import fit_envelope, load_curves
    from planner.errors import InputError
    from planner.fit import fit_law
    from planner.isoflop import fit_isoflop
    from planner.runs import load_runs

    rows: list[dict[str, Any]] = []

    def attempt(approach: str, fit: Any) -> None:
        try:
            exponent, n_opt, note = fit()
            rows.append({"approach": approach, "a": exponent, "n_opt": n_opt, "note": note})
        except InputError as error:
            rows.append({"approach": approach, "a": None, "n_opt": None, "note": str(error)})

    def envelope() -> tuple[float, float | None, str]:
        result = fit_envelope(load_curves(curves_csv), bootstrap=bootstrap)
        n_opt = result.n_coefficient * at_flops**result.n_exponent
        return result.n_exponent, n_opt, _interval_note(result.n_exponent_interval)

    def isoflop() -> tuple[float, float | None, str]:
        result = fit_isoflop(load_runs(runs_csv, where={"design": design}), bootstrap=bootstrap)
        n_opt = result.n_coefficient * at_flops**result.n_exponent
        used = f"{len(result.used)} of {len(result.budgets)} budgets bracketed"
        return result.n_exponent, n_opt, f"{_interval_note(result.n_exponent_interval)}; {used}"

    def parametric() -> tuple[float, float | None, str]:
        runs = load_runs(runs_csv, where={"design": design})
        result = fit_law(runs.n_params, runs.n_tokens, runs.loss, bootstrap=0)
        params = result.params
        a = params["beta"] / (params["alpha"] + params["beta"])
        n_opt = _optimal_n(params, at_flops)
        note = "; ".join(result.warnings) or f"fitted on the {design} runs' final losses"
        if n_opt is None:
            note = (
                f"no finite N_opt (alpha {params['alpha']:.3g}, beta {params['beta']:.3g}); {note}"
            )
        return a, n_opt, note

    attempt("1: envelope of the curves", envelope)
    attempt("2: IsoFLOP parabolas", isoflop)
    attempt("3: parametric L(N, D)", parametric)
    return rows


def _optimal_n(params: Mapping[str, float], compute_flops: float) -> float | None:
    """Chinchilla's N_opt at `compute_flops`, or None where the law has no finite optimum (a
    negative exponent makes it complex or infinite)."""
    import numpy as np

    from planner.laws import FORMS

    with np.errstate(all="ignore"):
        optimum = np.asarray(FORMS["chinchilla"].optimal_n(params, compute_flops))
    if not np.isrealobj(optimum) or not np.isfinite(optimum) or optimum <= 0:
        return None
    return float(optimum)


def _interval_note(interval: tuple[float, float]) -> str:
    return f"a in [{interval[0]:.3f}, {interval[1]:.3f}]"


def run_ladder(
    plan: Plan,
    base: Path,
    out: Path,
    *,
    tracking_uri: str | None = None,
    by: str = "studies.ladder.run_ladder",
    runner: Any = None,
) -> dict[str, Any]:
    """Train `plan` (its study in `out`, resumable; MLflow unless `tracking_uri` is "none"),
    write runs.csv, curves.csv (and with ``lrs`` lr-sweep.csv, hparams.csv), fit the three
    approaches and run the extrapolation check: what ``ladder.json`` holds, with the rows.
    `runner(study, runs_dir, study_file)` runs a prepared study and returns its stage reports
    (default: `studies.sweep.run_sweep_reports` without a live view)."""
    from studies.sweep import NullView, prepare_study, run_sweep_reports
    from studies.transfer import write_json, write_study_file
    from trainer.tracking import write_text_atomic

    def quiet_runner(study: Any, runs_dir: Path, study_file: Path) -> list[Any]:
        return run_sweep_reports(study, runs_dir=runs_dir, view=NullView(), study_file=study_file)[
            1
        ]

    run_study = runner or quiet_runner

    def train(trained: Plan, name: str) -> list[Any]:
        path = write_study_file(study_file(trained, base, out), out / name, by=by)
        return list(run_study(prepare_study(path, tracking_uri=tracking_uri), out, path))

    spec = plan.spec
    out.mkdir(parents=True, exist_ok=True)  # every check before this wrote nothing
    rows, curves = runs_table(plan, train(plan, "ladder-study.yaml"))
    tables = {"lr-sweep.csv": rows} if spec.lrs else {}
    edges: list[str] = []
    if spec.lrs:  # a point is its best learning rate's run
        rows, curves, edges = best_of_lrs(rows, curves)
    tables.update({"runs.csv": rows, "curves.csv": curves})
    if spec.lrs:  # each budget's tuned optimum: what `fit --approach hparams` reads
        tables["hparams.csv"] = hparam_optima(plan, rows, fitted_design(spec))
    for name, table in tables.items():
        if table:
            write_text_atomic(out / name, csv_text(table))
    approaches = []
    if rows and curves:
        approaches = three_approaches(
            out / "runs.csv", out / "curves.csv", at_flops=spec.budgets[-1],
            design=fitted_design(spec),
        )  # fmt: skip
    check = None
    if spec.check and rows:
        check = _check(plan, rows, lambda checked: train(checked, "check-study.yaml"))
    payload = {
        **plan_dict(plan),
        "runs_table": str(out / "runs.csv"),
        "finished": len(rows),
        "lr_edges": edges,
        "approaches": approaches,
        "check": check,
    }
    write_json(payload, out / "ladder.json")
    return {**payload, "rows": rows}


def _check(plan: Plan, rows: list[dict[str, Any]], train: Any) -> dict[str, Any]:
    """The extrapolation check's report: planned from `rows`, found among them when the law's
    shape is a ladder size, else trained by `train(plan)`. A law with no finite optimum is
    reported, not trained."""
    from planner.errors import InputError

    try:
        check = plan_check(plan, rows)
    except InputError as error:
        return {"skipped": str(error)}
    twin = ladder_twin(plan, check, rows)
    if twin is not None:  # the law chose a ladder size: its run at this budget is the check
        return {**check_result(check, twin), "trained_by": twin["run"]}
    checked = check_plan(plan, check)
    trained, _ = runs_table(checked, train(checked))
    best = best_of_lrs(trained, [])[0] if trained else []
    return check_result(check, best[0] if best else None)


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
