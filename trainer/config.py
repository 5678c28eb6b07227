"""`TrainConfig`: everything one training run needs, validated, loaded from YAML with overrides.

One pydantic model per concern (clipping, early stopping, diagnostics, tracking) plus the model,
data, optimiser and schedule configs of their own modules. Unknown keys are errors everywhere.

Context length: ``model.block_size`` (GPT) and ``data.block_size`` are one number. Set either;
the other follows. Setting both to different values is an error.

`load_config(path, overrides)` reads YAML and applies ``a.b.c=value`` overrides (values parsed as
YAML, so ``3e-4``, ``true``, ``[8, 16]`` and ``null`` work); every mistake, pydantic's included,
becomes one `ConfigError` line naming the field.

>>> config = TrainConfig.model_validate({"steps": 10, "data": {"block_size": 64}})
>>> config.model.block_size
64
"""

from __future__ import annotations

import hashlib
import json
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trainer.data import DataConfig
from trainer.distributed import DistributedConfig
from trainer.errors import ConfigError
from trainer.models import CNNConfig, GPTConfig, MLPConfig, ModelConfig
from trainer.optim import OptimizerConfig
from trainer.parametrization import ParametrizationConfig, check_parametrization
from trainer.profiling import ProfileConfig
from trainer.schedules import ScheduleConfig

__all__ = [
    "ClipConfig",
    "DiagnosticsConfig",
    "EarlyStoppingConfig",
    "TrackingConfig",
    "TrainConfig",
    "config_hash",
    "first_difference",
    "load_config",
    "parse_config",
    "trajectory_fields",
]

Precision = Literal["fp32", "bf16", "fp16", "fp8"]
Device = Literal["auto", "cpu", "cuda"]
MODEL_KINDS: dict[str, type[BaseModel]] = {"gpt": GPTConfig, "mlp": MLPConfig, "cnn": CNNConfig}
_EXPONENT_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
# sub-configs whose own checks write the whole line, field path first
SELF_NAMING = ("model.", "data.", "optimizer.", "schedule.", "parametrization.", "diagnostics.")

# Fields that cannot change what a run computes: they may differ when a run is resumed.
OPERATIONAL_FIELDS = (
    "log_every",
    "checkpoint_every",
    "checkpoint_at",
    "keep_checkpoints",
    "diagnostics",
    "tracking",
    "data.cache_dir",
    "distributed",  # N ranks compute the single-process trajectory (same global batch)
    "profile",
    "nonfinite_check",  # when the host reads loss and gradient norm, not what they are
)


class ClipConfig(BaseModel):
    """Gradient clipping, applied after unscaling and before the optimiser step."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["none", "norm", "value", "agc"] = Field(
        default="norm",
        description="none; norm: rescale so the global L2 norm is at most max_norm; value: clamp "
        "each element to [-value, value]; agc: adaptive unit-wise clipping (Brock et al. 2021).",
    )
    max_norm: float = Field(
        default=1.0, gt=0, description="mode norm: largest global gradient L2 norm."
    )
    value: float = Field(default=1.0, gt=0, description="mode value: largest |gradient element|.")
    agc_clip: float = Field(
        default=0.01,
        gt=0,
        description="mode agc: largest ratio ||grad unit|| / max(||weight unit||, agc_eps).",
    )
    agc_eps: float = Field(
        default=1e-3, gt=0, description="mode agc: floor on unit weight norms (paper: 1e-3)."
    )


class EarlyStoppingConfig(BaseModel):
    """Stop when the validation loss stops improving. Off unless `patience` is set."""

    model_config = ConfigDict(extra="forbid")

    patience: int | None = Field(
        default=None,
        ge=1,
        description="Evaluations without improvement before stopping; None disables.",
    )
    min_delta: float = Field(
        default=0.0,
        ge=0,
        description="An evaluation improves only if it beats the best val loss by more than this.",
    )


class DiagnosticsConfig(BaseModel):
    """What the loop measures besides the loss, on logging steps only (see trainer.diagnostics)."""

    model_config = ConfigDict(extra="forbid")

    every: int | None = Field(
        default=None,
        ge=1,
        description="Steps between per-layer diagnostics; None: every logging step (log_every). "
        "Taken only on logging steps, so it is rounded up to a multiple of log_every.",
    )
    per_layer: bool = Field(
        default=True,
        description="Per-parameter gradient norms, update/weight ratios and weight norms.",
    )
    activations: bool = Field(
        default=True,
        description="Activation mean/std and dead-unit fraction per block (forward hooks); "
        "skipped when compile is on.",
    )
    gns: bool = Field(
        default=False,
        description="Gradient noise scale B_simple (McCandlish et al. 2018) from two batch sizes "
        "every step (trainer.noise_scale): the micro-batches and the accumulated gradient, or "
        "under DDP each rank's gradient and the all-reduced one; needs grad_accum_steps >= 2 "
        "or more than one DDP process.",
    )
    gns_ema: float = Field(
        default=0.95,
        gt=0,
        lt=1,
        description="Decay of the moving averages of |G|^2 and tr(Sigma) behind B_simple.",
    )
    peak_flops: float | None = Field(
        default=None,
        gt=0,
        description="Peak FLOP/s of the device for MFU; None: a table for known GPUs, a "
        "measured matmul rate on CPU.",
    )


class TrackingConfig(BaseModel):
    """Where the run's parameters and metrics go (metrics.jsonl is always written)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="Log to MLflow besides metrics.jsonl.")
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else "
        "sqlite:///runs/mlflow.db under the working directory.",
    )
    experiment: str = Field(default="scaleplan", description="MLflow experiment name.")
    run_name: str | None = Field(
        default=None, description="MLflow run name; None: the output folder's name."
    )


class TrainConfig(BaseModel):
    """One training run: model, data, optimiser, schedule and the loop's own switches."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(default=0, description="Seeds the weights, the data stream and dropout.")
    steps: int = Field(default=1000, ge=1, description="Optimiser updates to run.")
    checkpoint_every: int = Field(
        default=1000,
        ge=0,
        description="Steps between checkpoints; 0: only at the end (one is always written there).",
    )
    eval_every: int = Field(
        default=100,
        ge=0,
        description="Steps between validation passes (also at step 0 and at the end); "
        "0: only at the end.",
    )
    eval_batches: int | None = Field(
        default=20,
        ge=1,
        description="Validation batches per evaluation (a fixed set); None: the whole split.",
    )
    log_every: int = Field(default=10, ge=1, description="Steps between metric records.")
    checkpoint_at: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        description="Steps after which a checkpoint is also written (branch points: a WSD "
        "cool-down continues from one); keep_checkpoints counts them too.",
    )
    keep_checkpoints: int = Field(
        default=3, ge=1, description="Newest checkpoints kept; older ones are deleted."
    )
    grad_accum_steps: int = Field(
        default=1,
        ge=1,
        description="Micro-batches per optimiser step; each micro-batch has data.batch_size rows.",
    )
    clip: ClipConfig = Field(default_factory=ClipConfig, description="Gradient clipping.")
    precision: Precision = Field(
        default="fp32",
        description="fp32; bf16 autocast (CPU or GPU); fp16 autocast + loss scaling (CUDA); "
        "fp8 matmuls through torchao (CUDA, compute capability >= 8.9).",
    )
    compile: bool = Field(default=False, description="Wrap the model in torch.compile.")
    deterministic: bool = Field(
        default=False,
        description="torch.use_deterministic_algorithms(True) and deterministic cuDNN: "
        "bit-identical reruns at some speed cost.",
    )
    device: Device = Field(default="auto", description="auto: CUDA when available, else CPU.")
    nonfinite: Literal["stop", "skip"] = Field(
        default="stop",
        description="On a NaN/inf loss or gradient: stop the run, or skip that update and go on.",
    )
    nonfinite_check: Literal["auto", "step", "log"] = Field(
        default="auto",
        description="step: read the loss and gradient norm on the host every step and act "
        "before the update; log: keep them on the device and read them on logging steps only "
        "(no per-step host sync: a non-finite update is found at the next record, and the run "
        "stops there); auto: log on CUDA unless nonfinite is skip, else step.",
    )
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=1, description="Cross-entropy label smoothing."
    )
    early_stopping: EarlyStoppingConfig = Field(
        default_factory=EarlyStoppingConfig, description="Stop on a validation-loss plateau."
    )
    model: ModelConfig = Field(default_factory=GPTConfig, description="Model (by `kind`).")
    parametrization: ParametrizationConfig = Field(
        default_factory=ParametrizationConfig,
        description="sp or mup: how init, multipliers and per-group LRs scale with width/depth.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Data source and batches.")
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig, description="Optimiser and weight decay."
    )
    schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig, description="Learning-rate schedule."
    )
    diagnostics: DiagnosticsConfig = Field(
        default_factory=DiagnosticsConfig, description="Diagnostics on logging steps."
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="DDP or FSDP2 over the processes torchrun starts (trainer.distributed).",
    )
    profile: ProfileConfig = Field(
        default_factory=ProfileConfig,
        description="A torch.profiler trace of a few steps and their time split "
        "(trainer.profiling).",
    )

    def __init__(self, **data: Any) -> None:
        # keyword construction from Python gets the same one-line errors as YAML does
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc) from None

    @model_validator(mode="before")
    @classmethod
    def _default_model_kind(cls, data: Any) -> Any:
        # `model: {d_model: 64}` means a GPT: the union's tag may be left out
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, dict) and "kind" not in model:
            data = {**data, "model": {"kind": "gpt", **model}}
        return data

    @model_validator(mode="after")
    def _one_block_size(self) -> TrainConfig:
        if not isinstance(self.model, GPTConfig):
            return self
        model_set = "block_size" in self.model.model_fields_set
        data_set = "block_size" in self.data.model_fields_set
        if model_set and data_set and self.model.block_size != self.data.block_size:
            raise ValueError(
                f"model.block_size: {self.model.block_size} differs from data.block_size "
                f"{self.data.block_size}; set one of them (the other follows)"
            )
        if model_set:
            self.data = self.data.model_copy(update={"block_size": self.model.block_size})
        else:
            self.model = self.model.model_copy(update={"block_size": self.data.block_size})
        return self

    @model_validator(mode="after")
    def _skip_needs_host_check(self) -> TrainConfig:
        if self.nonfinite == "skip" and self.nonfinite_check == "log":
            raise ValueError(
                "nonfinite_check: 'log' finds a non-finite update only at the next record, "
                "so it cannot skip it; with nonfinite: skip use nonfinite_check: step or auto"
            )
        return self

    @model_validator(mode="after")
    def _parametrization_fits(self) -> TrainConfig:
        check_parametrization(self.parametrization, self.model, self.optimizer)
        return self

    def host_checks(self, device_type: str) -> bool:
        """Whether the loop reads loss and gradient norm on the host every step."""
        if self.nonfinite_check == "auto":
            return device_type != "cuda" or self.nonfinite == "skip"
        return self.nonfinite_check == "step"

    @property
    def diagnostics_every(self) -> int:
        """Steps between diagnostics: a multiple of log_every."""
        every = self.diagnostics.every or self.log_every
        return -(-every // self.log_every) * self.log_every


# ---------------------------------------------------------------------------------------------
# Hashing and comparing resolved configs


def canonical_json(config: TrainConfig) -> str:
    return json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def config_hash(config: TrainConfig) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of the resolved config."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def trajectory_fields(config: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """The resolved config (or its JSON dump), flattened to dotted keys, less
    `OPERATIONAL_FIELDS`: what must match for a checkpoint to be resumed under it."""
    dump = config.model_dump(mode="json") if isinstance(config, TrainConfig) else config
    flat = _flatten(dump)
    return {
        key: value
        for key, value in flat.items()
        if not any(key == op or key.startswith(op + ".") for op in OPERATIONAL_FIELDS)
    }


def first_difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """First dotted key (in `current`'s order, then `saved`'s) whose values differ."""
    for key in [*current, *(k for k in saved if k not in current)]:
        if saved.get(key, "<missing>") != current.get(key, "<missing>"):
            return key
    return None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML file, apply ``dotted.key=value`` overrides, validate: a `TrainConfig`."""
    raw = read_yaml_mapping(Path(path), "config")
    return parse_config(apply_overrides(raw, overrides))


def read_yaml_mapping(
    path: Path, field: str, error: type[ConfigError] = ConfigError
) -> dict[str, Any]:
    """A YAML file holding a mapping, or ``error`` naming ``field``, the file and the problem."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(f"{field}: '{path}' does not exist; expected a YAML file") from None
    except OSError as exc:
        raise error(f"{field}: '{path}' cannot be read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise error(f"{field}: '{path}' is not valid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise error(f"{field}: '{path}' holds a {type(raw).__name__}; expected a mapping of fields")
    return raw


def parse_config(raw: dict[str, Any]) -> TrainConfig:
    """Validate a plain dict; a mistake becomes one ConfigError line naming the field."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise config_error(exc) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of `raw` with each ``a.b.c=value`` set; unknown keys are errors naming them."""
    result: dict[str, Any] = json.loads(json.dumps(raw, default=str))  # deep copy of plain data
    parsed = []
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set: '{override}' is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: '{text}' is not a valid YAML value") from None
        if isinstance(value, str) and _EXPONENT_NUMBER.match(value):
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        parts = key.strip().split(".")
        parsed.append(parts)
        node = result
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    for parts in parsed:  # checked after all are applied: model.kind may pick the fields
        _check_key(parts, result)
    return result


def _check_key(parts: list[str], raw: dict[str, Any]) -> None:
    model: type[BaseModel] = TrainConfig
    node: Any = raw
    for depth, part in enumerate(parts):
        if part not in model.model_fields:
            where = ".".join(parts[:depth]) or "the top level"
            allowed = ", ".join(model.model_fields)
            raise ConfigError(
                f"--set {'.'.join(parts)}: unknown key '{part}' in {where}; allowed: {allowed}"
            )
        node = node.get(part) if isinstance(node, dict) else None
        if depth == len(parts) - 1:
            return
        sub = _submodel(model.model_fields[part].annotation, node)
        if sub is None:
            raise ConfigError(
                f"--set {'.'.join(parts)}: '{'.'.join(parts[: depth + 1])}' has no sub-keys"
            )
        model = sub


def _submodel(annotation: Any, node: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds; for the model union, the one its `kind` names."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is Annotated:
        return _submodel(get_args(annotation)[0], node)
    if get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in get_args(annotation) if isinstance(a, type)]
        if any(m in MODEL_KINDS.values() for m in models):
            kind = node.get("kind", "gpt") if isinstance(node, dict) else "gpt"
            return MODEL_KINDS.get(str(kind), GPTConfig)
        return next((m for m in models if issubclass(m, BaseModel)), None)
    return None


def config_error(exc: ValidationError) -> ConfigError:
    """pydantic's first error as one line: ``field.path: message (got VALUE)``."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    if len(loc) >= 2 and loc[0] == "model" and loc[1] in MODEL_KINDS:
        loc.pop(1)  # the union's tag is not part of the path a user writes
    field = ".".join(loc) or "config"
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx", {})
    if kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
        # the sub-configs' own checks already name their field: keep their line as it is
        if isinstance(ctx.get("error"), ConfigError) or message.startswith(SELF_NAMING):
            return ConfigError(message)
        return ConfigError(f"{field}: {message} (got {_short(value)})")
    if kind == "extra_forbidden":
        owner = _owner(loc[:-1], exc)
        allowed = f"; allowed: {', '.join(owner.model_fields)}" if owner else ""
        return ConfigError(f"{field}: unknown field{allowed} (got {_short(value)})")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = ctx.get("tag", "none")
        return ConfigError(f"{field}.kind: '{tag}' is not one of: {', '.join(MODEL_KINDS)}")
    if kind == "literal_error":
        allowed = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return ConfigError(f"{field}: {_short(value)} is not one of: {allowed}")
    message = error["msg"]
    return ConfigError(f"{field}: {message[0].lower()}{message[1:]} (got {_short(value)})")


def _owner(loc: list[str], exc: ValidationError) -> type[BaseModel] | None:
    model: type[BaseModel] = TrainConfig
    for part in loc:
        if part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        if part == "model":
            errors = exc.errors()[0]["loc"]
            kind = str(errors[1]) if len(errors) > 1 else "gpt"
            sub: type[BaseModel] | None = MODEL_KINDS.get(kind, GPTConfig)
        else:
            sub = _submodel(annotation, None)
        if sub is None:
            return None
        model = sub
    return model


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
