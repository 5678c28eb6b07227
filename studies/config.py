"""`StudyConfig`: the schema of a sweep's study file (read by `studies.study_file`, turned into
trainer configs by `studies.trainer_config`).

A study file names a base trainer config and the inline overrides applied to it, a search space
whose keys are dotted trainer config keys, the stages (sampler, trials, budget, pruner, how a
stage's space is narrowed from the one before), the objective, the backend and where results go::

    name: quickstart
    base: gpt-tiny.yaml                 # trainer YAML, relative to this file's folder
    overrides: {eval_every: 25, schedule.warmup_steps: null}
    space:
      optimizer.lr: {low: 1.0e-4, high: 3.0e-2, log: true}
      optimizer.betas.1: {low: 0.9, high: 0.999}         # element 1 of the betas tuple
      optimizer.name: {type: categorical, choices: [adamw, momentum]}
      optimizer.momentum: {low: 0.8, high: 0.99, condition: {optimizer.name: momentum}}
    stages:
      - {name: coarse, sampler: sobol, trials: 16, budget: {steps: 150}, pruner: asha}
      - name: fine
        sampler: tpe
        trials: 8
        budget: {tokens: 800000}
        narrow: {top_k: 4, widen: 2.0}
    objective: val_loss

Addressing: a key is a dotted path into `TrainConfig` (``optimizer.lr``); a numeric last segment
is an element of a tuple or list field (``optimizer.betas.1`` is beta2; the base config must set
the whole tuple). Dots, not brackets, so the key is also a valid MLflow parameter name.

Conditions: ``condition: {optimizer.name: momentum}`` makes a parameter active only when that
categorical parameter takes that value (or one of a list of values); an inactive parameter is not
sampled and the trial keeps the base config's value.

Every mistake, pydantic's included, becomes one `StudyError` line naming the field.
"""

from __future__ import annotations

import json
import math
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from studies.backends import BACKENDS, RDB_SCHEMES, backend_info
from studies.errors import StudyError

if TYPE_CHECKING:
    pass

__all__ = [
    "BudgetSpec",
    "HorizonSpec",
    "Limits",
    "NarrowSpec",
    "ObjectiveSpec",
    "ParamSpec",
    "PrunerSpec",
    "RayOptions",
    "StageSpec",
    "StudyConfig",
    "condition_order",
    "declared_limits",
    "mask_password",
    "read_yaml",
    "unwrap_optional",
    "validate_study",
    "yaml_numbers",
]

Choice = str | int | float | bool | None
ParamType = Literal["float", "int", "categorical"]
SamplerName = Literal["sobol", "random", "tpe", "gp", "cmaes"]
PrunerName = Literal["asha", "hyperband", "median", "pbt", "none"]
MetricName = Literal["val_loss", "best_val_loss", "val_accuracy", "objective"]
Direction = Literal["minimize", "maximize"]
# metric -> the direction that improves it
METRIC_DIRECTIONS: dict[str, Direction] = {
    "val_loss": "minimize",
    "best_val_loss": "minimize",
    "val_accuracy": "maximize",
}
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
TRACKING_SCHEMES = ("http", "https", "file", "databricks", "databricks-uc", *RDB_SCHEMES)
_EXPONENT_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


# ---------------------------------------------------------------------------------------------
# The specs


class ParamSpec(BaseModel):
    """One searched trainer config key: a float or int range (optionally log), or choices."""

    model_config = ConfigDict(extra="forbid")

    type: ParamType = Field(
        default="float",
        description="float, int or categorical; left out: categorical when choices are given, "
        "else float.",
    )
    low: int | float | None = Field(default=None, description="Smallest value (float, int).")
    high: int | float | None = Field(
        default=None, description="Largest value, inclusive (float, int); above low."
    )
    log: bool = Field(
        default=False, description="Sample uniformly in log space (float, int); needs low > 0."
    )
    choices: list[Choice] | None = Field(
        default=None, description="The values to choose from (categorical); distinct scalars."
    )
    condition: dict[str, list[Choice]] | None = Field(
        default=None,
        description="Active only when each named categorical parameter takes this value (or "
        "one of a list); an inactive parameter is not sampled and keeps the base value.",
    )
    around: Literal["lr_find"] | None = Field(
        default=None,
        description="lr_find: the range is centred on the LR range test's suggestion for the "
        "first stage's trainer config (run once, before the first trial, and kept in the "
        "study's folder): [suggestion / factor, suggestion * factor], log. No low or high.",
    )
    factor: float | None = Field(
        default=None, gt=1, description="With around: how far the range reaches either side (10)."
    )

    @model_validator(mode="before")
    @classmethod
    def _infer_type_and_lists(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "type" not in data and data.get("choices") is not None:
            data["type"] = "categorical"
        condition = data.get("condition")
        if isinstance(condition, dict):
            data["condition"] = {
                key: value if isinstance(value, list) else [value]
                for key, value in condition.items()
            }
        return data

    @model_validator(mode="after")
    def _check_range(self) -> ParamSpec:
        # Messages start with the field's name: the error formatter prefixes the parameter's path.
        if self.factor is not None and self.around is None:
            raise ValueError("factor: only with around (the range's reach either side)")
        if self.around is not None:
            for field in ("low", "high", "choices"):
                if getattr(self, field) is not None:
                    raise ValueError(
                        f"{field}: not used with around: {self.around}, which sets the range "
                        "from the LR range test (factor sets its reach)"
                    )
            if self.type != "float":
                raise ValueError(f"around: {self.around} is for a float key, not {self.type}")
            self.log = True
        elif self.type == "categorical":
            for field in ("low", "high"):
                if getattr(self, field) is not None:
                    raise ValueError(f"{field}: not used by a categorical parameter (use choices)")
            if self.log:
                raise ValueError("log: not used by a categorical parameter")
            if not self.choices:
                raise ValueError("choices: missing or empty; a categorical parameter needs some")
            if len({json.dumps(c) for c in self.choices}) < len(self.choices):
                raise ValueError(
                    f"choices: {self.choices} has duplicates; expected distinct values"
                )
        else:
            if self.choices is not None:
                raise ValueError(f"choices: only for type categorical, not {self.type}")
            for field in ("low", "high"):
                value = getattr(self, field)
                if value is None:
                    raise ValueError(
                        f"{field}: missing; a {self.type} parameter needs low and high"
                    )
                if isinstance(value, bool) or not math.isfinite(value):
                    raise ValueError(f"{field}: {value!r} is not a finite number")
                if self.type == "int":
                    if float(value) != int(value):
                        raise ValueError(f"{field}: {value} is not an integer (type int)")
                    setattr(self, field, int(value))
                else:
                    setattr(self, field, float(value))
            assert self.low is not None and self.high is not None
            if self.low >= self.high:
                kind = "empty" if self.low == self.high else "inverted"
                raise ValueError(
                    f"high: {self.high} is not above low {self.low} (an {kind} range); "
                    "expected low < high"
                )
            if self.log and self.low <= 0:
                raise ValueError(f"low: {self.low} with log: true; a log-scale range needs low > 0")
        if self.condition is not None and not self.condition:
            raise ValueError("condition: empty; expected {parameter: value}")
        return self

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high) of a float or int parameter."""
        if self.low is None or self.high is None:
            if self.around is not None:
                raise TypeError(f"around: {self.around} sets the range when the sweep starts")
            raise TypeError("a categorical parameter has no bounds")
        return self.low, self.high

    def is_active(self, params: Mapping[str, Any]) -> bool:
        """Whether the condition holds for the parameters chosen so far."""
        if not self.condition:
            return True
        return all(
            name in params and params[name] in values for name, values in self.condition.items()
        )

    def contains(self, value: Any) -> bool:
        """Whether `value` lies in this parameter's range (or is one of its choices)."""
        if self.type == "categorical":
            return value in (self.choices or [])
        low, high = self.bounds
        if self.type == "int" and (isinstance(value, bool) or float(value) != int(value)):
            return False
        return low <= value <= high

    def describe(self) -> str:
        """A short human form: ``[0.0001, 0.03] log`` or ``{adamw, sgd}``."""
        if self.type == "categorical":
            return "{" + ", ".join(str(c) for c in self.choices or []) + "}"
        low, high = self.bounds
        return f"[{low:.4g}, {high:.4g}]" + (" log" if self.log else "")


class BudgetSpec(BaseModel):
    """How long each trial of a stage trains: optimiser steps, or tokens or training FLOPs
    converted to steps (the trainer objective). A callable objective gets the mapping as
    written, whatever its keys (``{epochs: 12}``, ``{fidelity: 0.25}``)."""

    model_config = ConfigDict(extra="allow")

    steps: int | None = Field(default=None, ge=1, description="Optimiser steps per trial.")
    tokens: int | None = Field(
        default=None,
        ge=1,
        description="Tokens per trial (examples for classifiers); steps = tokens // tokens per "
        "step (batch_size x block_size x grad_accum_steps).",
    )
    flops: float | None = Field(
        default=None,
        gt=0,
        description="Training FLOPs per trial; steps = flops // the trial's FLOPs per step "
        "(the trainer's own count: flops_per_token x tokens per step).",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"steps": data} if isinstance(data, int) and not isinstance(data, bool) else data

    def as_written(self) -> dict[str, Any]:
        """The budget as the study file gives it (keys left out stay out)."""
        return self.model_dump(mode="json", exclude_none=True)

    def check_for_trainer(self) -> None:
        """The trainer objective knows steps, tokens and FLOPs, exactly one of them."""
        for key in self.model_extra or {}:
            raise ValueError(
                f"{key}: not a budget the trainer objective knows; use steps, tokens or flops"
            )
        if [self.steps, self.tokens, self.flops].count(None) != 2:
            raise ValueError("steps: set exactly one of steps, tokens and flops")


class PrunerSpec(BaseModel):
    """Early stopping of unpromising trials on their intermediate validation metric."""

    model_config = ConfigDict(extra="forbid")

    name: PrunerName = Field(
        default="none",
        description="asha: asynchronous successive halving; hyperband; median: stop below the "
        "median of earlier trials at the same step; pbt: Population Based Training (backend "
        "ray): the worst trials continue from the best ones' checkpoints with perturbed "
        "hyperparameters; none.",
    )
    min_resource: int | None = Field(
        default=None,
        ge=1,
        description="Steps a trial always gets before it can be stopped (asha, hyperband: the "
        "first rung; median: warm-up steps; pbt: steps before the first exploit); None: the "
        "pruner's default.",
    )
    reduction_factor: int = Field(
        default=3, ge=2, description="asha, hyperband: 1/this of the trials go on at each rung."
    )
    startup_trials: int = Field(
        default=5, ge=0, description="median: trials that finish before any is stopped."
    )
    interval: int | None = Field(
        default=None,
        ge=1,
        description="pbt: steps between a trial's exploit/explore decisions, each at the first "
        "evaluation this many steps after the last (and a checkpoint there for others to copy); "
        "None: every evaluation (eval_every).",
    )
    quantile: float = Field(
        default=0.25,
        gt=0.0,
        le=0.5,
        description="pbt: the bottom fraction of the running trials that copy a trial of the "
        "top fraction (weights, optimiser state, step) and perturb its hyperparameters.",
    )
    resample_probability: float = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description="pbt: chance that a copied hyperparameter is drawn afresh from the space "
        "instead of perturbed (numbers x 0.8 or x 1.2, kept inside the range; choices: a "
        "neighbouring one).",
    )
    synchronous: bool = Field(
        default=True,
        description="pbt: decide for the whole population at once, when every running trial has "
        "reached the step (each waits, paused, for the others), so that losses are compared at "
        "equal steps; false: each trial on its own, against the others' latest results.",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class NarrowSpec(BaseModel):
    """How a stage's space is derived from the best trials of the stage before it."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(default=5, ge=1, description="Best earlier trials the new range spans.")
    quantiles: tuple[float, float] = Field(
        default=(0.0, 1.0),
        description="Quantiles of the top-k values (log space for log parameters) that become "
        "the new low and high; [0, 1] spans them all.",
    )
    widen: float = Field(
        default=2.0,
        ge=1.0,
        description="When the best sits at an edge of the old range, the new range is this many "
        "times wider, the extra past that edge (1: no widening).",
    )
    edge_margin: float = Field(
        default=0.05,
        ge=0.0,
        lt=0.5,
        description="'At an edge' means within this fraction of the old range's width.",
    )
    min_width: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="Narrowest new range, as a fraction of the old width, when the top-k agree.",
    )
    warm_start: bool = Field(
        default=True,
        description="Enqueue the top-k (those inside the new space) as the stage's first trials.",
    )
    bracket: bool = Field(
        default=False,
        description="Extend each end of a numeric range to the nearest value a trial outside "
        "the top-k (finished, pruned or failed) tried there, or to the old bound if none was "
        "tried past it, so an optimum between the top-k and its worse neighbours stays inside.",
    )

    @model_validator(mode="after")
    def _check_quantiles(self) -> NarrowSpec:
        low, high = self.quantiles
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"quantiles: {list(self.quantiles)}; expected 0 <= low < high <= 1")
        return self


class HorizonSpec(BaseModel):
    """Move a stage's range of one key (the LR) to its horizon: ``log lr* = a - b log T``
    (Bjorck et al. 2024), ``b`` given or fitted from the earlier stages' optima."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(default="optimizer.lr", description="The searched key moved (log range).")
    b: float | None = Field(
        default=None,
        description="The law's exponent; None: fitted from the optimum of each earlier stage, "
        "at two or more different horizons (steps).",
    )


class StageSpec(BaseModel):
    """One stage of a sweep: a sampler, a number of trials, a per-trial budget, a pruner, and
    optionally the trainer settings its trials change (a proxy stage)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="Stage name (letters, digits, . _ -).")
    sampler: SamplerName = Field(
        description="sobol or random (coarse: space-filling); tpe, gp or cmaes (fine: model-based)."
    )
    trials: int = Field(ge=1, description="Trials in this stage (pruned ones included).")
    budget: BudgetSpec = Field(
        description="Per-trial budget: {steps: N}, {tokens: N} or {flops: X} (the trainer); "
        "any mapping (a callable objective)."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted trainer keys -> values applied on top of the study's overrides for "
        "this stage's trials only (e.g. model.d_model: 64): a cheaper proxy of the target.",
    )
    pruner: PrunerSpec = Field(
        default_factory=PrunerSpec, description="Pruner: a name, or a mapping with its knobs."
    )
    start_from: str | None = Field(
        default=None,
        description="A trainer checkpoint every trial of this stage continues from, under its "
        "own config (weights, optimiser moments, step and curves; trainer.train(start_from=)): "
        "a cool-down branched off a stable run, a fine-tune. Relative to the study file.",
    )
    narrow: NarrowSpec | None = Field(
        default=None,
        description="Derive this stage's space from the previous stage's best trials; None: "
        "the previous stage's space unchanged. Not allowed on the first stage.",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=2**31 - 1,
        description="This stage's sampler seed; None: the study's seed + the stage's index. "
        "Stages with one seed and one space draw the same points (e.g. one LR grid per width).",
    )
    horizon: HorizonSpec | None = Field(
        default=None,
        description="Shift the range of horizon.key from the stage before's horizon to this "
        "one's along the horizon law (after narrowing). Not allowed on the first stage.",
    )
    space: dict[str, ParamSpec] = Field(
        default_factory=dict,
        description="This stage's own ranges for some of the study's searched keys, replacing "
        "what the stage would have had (e.g. a learning-rate range per batch size).",
    )


class ObjectiveSpec(BaseModel):
    """What a trial is scored by: a metric of the trainer, or a user's callable."""

    model_config = ConfigDict(extra="forbid")

    metric: MetricName = Field(
        default="val_loss",
        description="The trainer's metric: val_loss at the end of the budget; best_val_loss: "
        "the lowest seen; val_accuracy: at the end (classifiers). 'objective' for a callable.",
    )
    direction: Direction | None = Field(
        default=None,
        description="minimize or maximize; None: the metric's own direction (a callable: "
        "minimize).",
    )
    callable: str | None = Field(
        default=None,
        description="'package.module:function' called as function(params, trial) -> float "
        "instead of the trainer (no base then); a module beside the study file imports "
        "without being installed.",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"metric": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _direction(self) -> ObjectiveSpec:
        if self.callable is not None:
            if not self.callable.strip():
                raise ValueError("callable: empty; expected 'package.module:function'")
            if "metric" in self.model_fields_set and self.metric != "objective":
                raise ValueError(
                    f"metric: {self.metric} is a trainer metric; a callable objective returns "
                    "its own value (leave metric out)"
                )
            self.metric = "objective"
            self.direction = self.direction or "minimize"
            return self
        if self.metric == "objective":
            raise ValueError("metric: objective is the value of a callable; set callable too")
        expected = METRIC_DIRECTIONS[self.metric]
        if self.direction is None:
            self.direction = expected
        elif self.direction != expected:
            raise ValueError(
                f"direction: {self.metric} is improved by {expected}, not by "
                f"{self.direction}; leave direction out"
            )
        return self


class RayOptions(BaseModel):
    """Ray Tune settings (backend ray): what each trial reserves, and the local Ray's size."""

    model_config = ConfigDict(extra="forbid")

    cpus_per_trial: float = Field(
        default=1.0, gt=0, description="CPUs Ray reserves for each trial (fractions allowed)."
    )
    gpus_per_trial: float = Field(
        default=0.0,
        ge=0,
        description="GPUs each trial reserves; a fraction shares one GPU (0.5: two trials per "
        "GPU); above 1, a whole number.",
    )
    workers_per_trial: int = Field(
        default=1,
        ge=1,
        description="Training processes per trial: above 1, each trial is a Ray Train "
        "TorchTrainer of that many workers (DDP or FSDP2 by the trainer's distributed.strategy) "
        "inside the Tune experiment; cpus_per_trial and gpus_per_trial are then unused.",
    )
    cpus_per_worker: float = Field(
        default=1.0,
        gt=0,
        description="CPUs each Ray Train worker reserves (workers_per_trial > 1).",
    )
    gpus_per_worker: float = Field(
        default=0.0,
        ge=0,
        description="GPUs each Ray Train worker reserves (workers_per_trial > 1); above 0, the "
        "workers use NCCL, else gloo.",
    )
    num_cpus: int | None = Field(
        default=None,
        ge=1,
        description="CPUs of the local Ray the sweep starts; None: all of this machine's. Not "
        "used with --ray-address (the cluster has its own).",
    )
    num_gpus: int | None = Field(
        default=None,
        ge=0,
        description="GPUs of the local Ray the sweep starts; None: those it finds. Not used "
        "with --ray-address.",
    )

    @model_validator(mode="after")
    def _whole_gpus_above_one(self) -> RayOptions:
        if self.gpus_per_trial > 1 and not float(self.gpus_per_trial).is_integer():
            raise ValueError(
                f"gpus_per_trial: {self.gpus_per_trial} is above 1 but not a whole number; "
                "use a fraction below 1 or a whole number of GPUs"
            )
        return self


class StudyConfig(BaseModel):
    """A coarse-to-fine sweep over a trainer config."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Study name: its folder runs/<name>/ and its Optuna study / Tune experiment; "
        "default: the study file's name.",
    )
    base: Path | None = Field(
        default=None,
        description="Trainer YAML the trials start from (relative: to the study file's folder); "
        "none with a callable objective.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted trainer keys -> values applied to the base (e.g. eval_every: 25).",
    )
    space: dict[str, ParamSpec] = Field(
        min_length=1, description="Dotted trainer key -> its range or choices."
    )
    stages: list[StageSpec] = Field(min_length=1, description="Stages, run in order.")
    objective: ObjectiveSpec = Field(
        default_factory=ObjectiveSpec, description="The metric trials are scored by."
    )
    backend: str = Field(
        default="optuna",
        description="optuna: local or RDB storage; ray: Ray Tune (`studies.backends.BACKENDS`).",
    )
    storage: str | None = Field(
        default=None,
        description="optuna: a journal file path or an RDB URL (sqlite:///, postgresql://, "
        "mysql://); ray: a folder or s3:// / gs:// URI. None: under runs/<name>/.",
    )
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else "
        f"{DEFAULT_TRACKING_URI}.",
    )
    mlflow: bool = Field(
        default=True,
        description="Log the study and each trial to MLflow (false: no MLflow at all; "
        "--tracking-uri none).",
    )
    workers: int = Field(
        default=1, ge=1, description="Trials run at once (optuna: processes; ray: concurrent)."
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,  # NumPy's seeds stop at 2**32 - 1; stage i and its workers add to it
        description="Seeds the samplers (stage i uses seed + i).",
    )
    ray: RayOptions | None = Field(
        default=None,
        description="backend ray: resources per trial and the local Ray's size; None: "
        "defaults (1 CPU per trial, no GPU).",
    )

    _base_raw: dict[str, Any] | None = PrivateAttr(default=None)
    _search_path: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_study(self) -> StudyConfig:
        names = [stage.name for stage in self.stages]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise StudyError(f"stages.{i}.name: '{name}' is used twice; names must differ")
        if self.stages[0].narrow is not None:
            raise StudyError(
                f"stages.{names[0]}.narrow: stage '{names[0]}' is the first; there is no earlier "
                "stage to narrow from"
            )
        for i, stage in enumerate(self.stages):
            if stage.horizon is not None:
                self._check_horizon(i, stage.name, stage.horizon)
        if self.backend not in BACKENDS:
            raise StudyError(f"backend: '{self.backend}' is not one of: {', '.join(BACKENDS)}")
        pruners = backend_info(self.backend).pruners
        for stage in self.stages:
            if stage.pruner.name not in pruners:
                able = [b.name for b in BACKENDS.values() if stage.pruner.name in b.pruners]
                raise StudyError(
                    f"stages.{stage.name}.pruner.name: {stage.pruner.name} needs backend: "
                    f"{' or '.join(able)} (backend is {self.backend}); with {self.backend} use "
                    f"{', '.join(pruners[:-1])} or {pruners[-1]}"
                )
        self._check_objective()
        for stage in self.stages:
            for key in stage.space:
                if key not in self.space:
                    raise StudyError(
                        f"stages.{stage.name}.space.{key}: not searched by the study; a stage "
                        f"gives its own range only to keys of space ({', '.join(self.space)})"
                    )
            for key in stage.overrides:
                if key in self.space:
                    raise StudyError(
                        f"stages.{stage.name}.overrides.{key}: {key} is searched (space.{key}); "
                        "a key is either searched or overridden, not both"
                    )
        _check_conditions(self.space)
        condition_order(self.space)
        _check_location("storage", self.storage, _storage_schemes(self.backend))
        _check_location("tracking_uri", self.tracking_uri, TRACKING_SCHEMES)
        return self

    def _check_horizon(self, index: int, name: str, horizon: HorizonSpec) -> None:
        where = f"stages.{name}.horizon"
        if index == 0:
            raise StudyError(
                f"{where}: stage '{name}' is the first; no earlier horizon to move from"
            )
        spec = self.space.get(horizon.key)
        if spec is None or spec.type != "float" or not spec.log:
            raise StudyError(
                f"{where}.key: '{horizon.key}' is not a searched log-scale float "
                f"(space.{horizon.key} with log: true); the horizon law moves a learning rate"
            )
        if horizon.b is None and index < 2:
            raise StudyError(
                f"{where}.b: not given, and fitting it needs optima at two or more horizons: "
                f"stage '{name}' has one stage before it; give b or add a stage"
            )

    def _check_objective(self) -> None:
        """A trainer objective needs its base and trainer budgets; a callable neither."""
        if self.objective.callable is None:
            if self.base is None:
                raise StudyError(
                    "base: missing; expected the trainer YAML's path (relative to the study), "
                    "or objective.callable"
                )
            for stage in self.stages:
                try:
                    stage.budget.check_for_trainer()
                except ValueError as error:
                    raise StudyError(f"stages.{stage.name}.budget.{error}") from None
            return
        if self.base is not None:
            raise StudyError(
                f"objective.callable: '{self.objective.callable}' replaces the trainer; a study "
                "with a callable objective takes no base (remove base or objective.callable)"
            )
        if self.overrides:
            raise StudyError(
                "overrides: trainer config keys, but the objective is a callable "
                f"('{self.objective.callable}'); remove overrides"
            )
        for stage in self.stages:
            if stage.overrides:
                raise StudyError(
                    f"stages.{stage.name}.overrides: trainer config keys, but the objective is "
                    f"a callable ('{self.objective.callable}'); give the stage's fidelity in "
                    "its budget, which the callable gets"
                )
            if not stage.budget.as_written():
                raise StudyError(f"stages.{stage.name}.budget: empty; the callable gets it")
            if stage.pruner.name == "pbt":
                raise StudyError(
                    f"stages.{stage.name}.pruner.name: pbt continues trials from the trainer's "
                    "checkpoints; a callable objective has none"
                )
            if stage.start_from is not None:
                raise StudyError(
                    f"stages.{stage.name}.start_from: a trainer checkpoint, but the objective is "
                    f"a callable ('{self.objective.callable}'), which does not read one"
                )

    @property
    def is_trainer(self) -> bool:
        """Whether trials train the trainer's base config (else: a callable objective)."""
        return self.objective.callable is None

    @property
    def search_path(self) -> Path | None:
        """Where a callable objective's module may live besides sys.path (the study file's
        folder)."""
        return self._search_path

    def base_raw(self) -> dict[str, Any]:
        """The base trainer YAML as a plain dict (read once, kept with the study)."""
        if self.base is None:
            raise StudyError("base: none; the objective is a callable, not the trainer")
        if self._base_raw is None:
            self._base_raw = read_yaml(self.base, "base")
        return self._base_raw

    def resolved_storage(self, runs_dir: str | Path = "runs") -> str:
        """`storage`, or the default: runs/<name>/optuna.journal (optuna), runs/<name>/ray (ray)."""
        if self.storage is not None:
            return self.storage
        leaf = backend_info(self.backend).default_storage
        return str((Path(runs_dir) / self.name / leaf).absolute())

    def resolved_tracking_uri(self) -> str:
        """`tracking_uri`, else $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db."""
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _check_conditions(space: Mapping[str, ParamSpec]) -> None:
    for name, spec in space.items():
        for target, values in (spec.condition or {}).items():
            field = f"space.{name}.condition"
            if target == name:
                raise StudyError(f"{field}: '{name}' cannot depend on itself")
            if target not in space:
                raise StudyError(
                    f"{field}: '{target}' is not a parameter of the space; "
                    f"conditions name one of: {', '.join(space)}"
                )
            target_spec = space[target]
            if target_spec.type != "categorical":
                raise StudyError(
                    f"{field}: '{target}' is a {target_spec.type} parameter; a condition must "
                    "name a categorical one"
                )
            for value in values:
                if value not in (target_spec.choices or []):
                    raise StudyError(
                        f"{field}: {value!r} is not a choice of '{target}'; choices: "
                        f"{', '.join(str(c) for c in target_spec.choices or [])}"
                    )


def condition_order(space: Mapping[str, ParamSpec]) -> list[str]:
    """Parameter names, each after the parameters its condition names (else in file order)."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise StudyError(f"space.{name}.condition: conditions form a cycle through '{name}'")
        visiting.add(name)
        for target in space[name].condition or {}:
            if target in space:
                visit(target)
        visiting.discard(name)
        order.append(name)

    for name in space:
        visit(name)
    return order


def _storage_schemes(backend: str) -> tuple[str, ...]:
    return backend_info(backend).storage_schemes


def _check_location(field: str, value: str | None, schemes: tuple[str, ...]) -> None:
    """A URL's scheme must be one we know; a value without '://' is a local path."""
    if value is None:
        return
    if not value.strip():
        raise StudyError(f"{field}: empty; leave it out for the default")
    scheme, sep, _ = value.partition("://")
    if not sep:
        return
    if scheme.split("+")[0].lower() not in schemes:
        raise StudyError(
            f"{field}: '{mask_password(value)}' has scheme '{scheme}', not one of: "
            f"{', '.join(schemes)} (or a local path)"
        )


_PASSWORD = re.compile(r"(://[^/:@]*:)[^/]*@")


def mask_password(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``: how a storage
    or tracking URL is shown anywhere (messages, summaries, MLflow); paths pass unchanged."""
    return _PASSWORD.sub(r"\1***@", url)


# ---------------------------------------------------------------------------------------------
# A study from a mapping; reading YAML


def validate_study(raw: Mapping[str, Any], *, search_path: Path | None = None) -> StudyConfig:
    """A study from a mapping (a study file's, or one built in Python); StudyError on a
    mistake. `search_path`: where a callable objective's module may be found."""
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise _study_error(exc, raw) from None
    study._search_path = search_path
    return study


def read_yaml(path: Path, field: str) -> dict[str, Any]:
    from trainer.config import read_yaml_mapping

    return dict(yaml_numbers(read_yaml_mapping(path, field, StudyError)))


def yaml_numbers(tree: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as a string: make such strings floats, everywhere."""
    if isinstance(tree, dict):
        return {key: yaml_numbers(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [yaml_numbers(value) for value in tree]
    if isinstance(tree, str) and _EXPONENT_NUMBER.match(tree):
        return float(tree)
    return tree


# ---------------------------------------------------------------------------------------------
# pydantic's errors as one line


def _study_error(exc: ValidationError, raw: Mapping[str, Any]) -> StudyError:
    """pydantic's first error as one line: ``field.path: message (got VALUE)``; a stage is
    named as in ``--set`` (``stages.fine.trials``), not by its index."""
    error = exc.errors()[0]
    loc = [str(part) for part in _stage_names(list(error["loc"]), raw)]
    field = ".".join(loc) or "study"
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx", {})
    if kind == "value_error":
        cause = ctx.get("error")
        if isinstance(cause, StudyError):
            return StudyError(str(cause))
        message = str(cause or error["msg"])
        # sub-model checks start with their own field's name: join it to the path
        return StudyError(f"{field}.{message}" if loc else message)
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1])
        allowed = f"; allowed: {', '.join(owner.model_fields)}" if owner else ""
        return StudyError(f"{field}: unknown field{allowed}")
    if kind == "literal_error":
        allowed = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return StudyError(f"{field}: {_short(value)} is not one of: {allowed}")
    if kind == "missing":
        return StudyError(f"{field}: missing; required")
    message = error["msg"]
    return StudyError(f"{field}: {message[0].lower()}{message[1:]} (got {_short(value)})")


def _stage_names(loc: list[Any], raw: Mapping[str, Any]) -> list[Any]:
    """``stages, 1, ...`` -> ``stages, fine, ...`` when stage 1 has a name."""
    stages = raw.get("stages")
    if len(loc) > 1 and loc[0] == "stages" and isinstance(loc[1], int) and isinstance(stages, list):
        stage = stages[loc[1]] if loc[1] < len(stages) else None
        name = stage.get("name") if isinstance(stage, dict) else None
        if isinstance(name, str) and name:
            return [loc[0], name, *loc[2:]]
    return loc


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    """The model a pydantic error location points into (dict keys and list indices skipped)."""
    model: type[BaseModel] = StudyConfig
    annotation: Any = None
    for part in loc:
        if annotation is not None and get_origin(annotation) in (dict, list):
            annotation = get_args(annotation)[-1]  # a key or an index: step into the values
        else:
            if part not in model.model_fields:
                return None
            annotation = model.model_fields[part].annotation
        inner = unwrap_optional(annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            model, annotation = inner, None
    return model if annotation is None else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------
# A parameter's bounds: declared here, the trainer field's own in `studies.trainer_config`


@dataclass(frozen=True)
class Limits:
    """Bounds a parameter may not leave (a trainer field's pydantic constraints, or a callable's
    declared domain); None: unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: low itself is not allowed (gt), else ge
    high_open: bool = False


def unwrap_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X``; any other annotation unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def declared_limits(space: Mapping[str, ParamSpec]) -> dict[str, Limits]:
    """Each numeric parameter's range as declared: a callable objective's domain, which a
    narrowed stage may widen towards but never leave."""
    return {
        name: Limits(*spec.bounds) for name, spec in space.items() if spec.type != "categorical"
    }
