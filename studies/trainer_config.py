"""The trainer side of a study: which trainer keys exist and their hard limits, and a trial's
`TrainConfig` (base + study overrides + the stage's overrides + sampled params + the budget).

A key is a dotted path into `TrainConfig` (``optimizer.lr``); a numeric last segment is an
element of a tuple or list field (``optimizer.betas.1``). Values go through the trainer's own
override mechanism, so a trial's config is exactly what ``scaleplan train --set`` would build.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, get_args, get_origin

from pydantic import BaseModel

from studies.config import Limits, unwrap_optional
from studies.errors import StudyError

if TYPE_CHECKING:
    from studies.config import BudgetSpec, ParamSpec, StageSpec, StudyConfig
    from trainer.config import TrainConfig

__all__ = [
    "budget_steps",
    "check_trainer_keys",
    "space_limits",
    "tokens_per_step",
    "trainer_keys",
    "trial_config",
]


def _model_kind(raw: Mapping[str, Any]) -> str:
    model = raw.get("model")
    return str(model.get("kind", "gpt")) if isinstance(model, dict) else "gpt"


def _field_tree(kind: str) -> dict[str, tuple[Any, list[Any]]]:
    """Every dotted trainer key -> (its annotation, its constraint metadata); tuple elements
    appear as ``key.0``, ``key.1``; a list field's elements as ``key.*``."""
    from trainer.config import MODEL_KINDS, TrainConfig

    tree: dict[str, tuple[Any, list[Any]]] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            key = f"{prefix}{name}"
            annotation = unwrap_optional(info.annotation)
            tree[key] = (annotation, list(info.metadata))
            if name == "model" and model is TrainConfig:
                walk(MODEL_KINDS.get(kind, MODEL_KINDS["gpt"]), key + ".")
            elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, key + ".")
            elif get_origin(annotation) in (tuple, list):
                args = get_args(annotation)
                if get_origin(annotation) is tuple and Ellipsis not in args:
                    items = [(str(i), arg) for i, arg in enumerate(args)]
                else:
                    items = [("*", args[0] if args else Any)]
                for index, arg in items:
                    metadata: list[Any] = []
                    if get_origin(arg) is Annotated:
                        for extra in get_args(arg)[1:]:
                            metadata.extend(getattr(extra, "metadata", [extra]))
                        arg = get_args(arg)[0]
                    tree[f"{key}.{index}"] = (arg, metadata)

    walk(TrainConfig, "")
    return tree


def trainer_keys(kind: str = "gpt") -> list[str]:
    """Every dotted key of `TrainConfig` for a model kind (tuple elements as ``key.0``)."""
    return [key for key in _field_tree(kind) if not key.endswith(".*")]


def _lookup(tree: Mapping[str, Any], key: str) -> Any:
    if key in tree:
        return tree[key]
    prefix, _, last = key.rpartition(".")
    return tree.get(f"{prefix}.*") if last.isdigit() else None


def _check_key(tree: Mapping[str, Any], key: str, field: str) -> None:
    if _lookup(tree, key) is not None:
        return
    keys = [k for k in tree if not k.endswith(".*")]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise StudyError(f"{field}: not a trainer config key{hint}")


def space_limits(study: StudyConfig) -> dict[str, Limits]:
    """Each numeric search parameter's hard trainer bounds, e.g. optimizer.lr: (0, None, open)."""
    tree = _field_tree(_model_kind(_resolved_raw(study, {})))
    limits: dict[str, Limits] = {}
    for name, spec in study.space.items():
        if spec.type == "categorical":
            continue
        found = _lookup(tree, name)
        low: float | None = None
        high: float | None = None
        low_open = high_open = False
        for item in found[1] if found else []:
            if getattr(item, "gt", None) is not None:
                low, low_open = float(item.gt), True
            if getattr(item, "ge", None) is not None:
                low, low_open = float(item.ge), False
            if getattr(item, "lt", None) is not None:
                high, high_open = float(item.lt), True
            if getattr(item, "le", None) is not None:
                high, high_open = float(item.le), False
        limits[name] = Limits(low, high, low_open, high_open)
    return limits


def with_values(raw: Mapping[str, Any], values: Mapping[str, Any], field: str) -> dict[str, Any]:
    """`raw` with dotted keys set through the trainer's own override mechanism; a numeric last
    segment replaces one element of the tuple or list already there."""
    from trainer.config import apply_overrides

    result: dict[str, Any] = json.loads(json.dumps(raw, default=str))
    plain: dict[str, Any] = {}
    for key, value in values.items():
        prefix, _, last = key.rpartition(".")
        if not (prefix and last.isdigit()):
            plain[key] = value
            continue
        node: Any = result
        for part in prefix.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        current = plain.get(prefix, node)
        if not isinstance(current, list | tuple) or int(last) >= len(current):
            size = len(current) if isinstance(current, list | tuple) else 0
            raise StudyError(
                f"{field}.{key}: {prefix} has {size or 'no'} elements in the base config; set "
                f"the whole {prefix} there or in overrides, then search one element"
            )
        items = list(current)
        items[int(last)] = value
        plain[prefix] = items
    items_text = [f"{key}={json.dumps(value, default=str)}" for key, value in plain.items()]
    return apply_overrides(result, items_text)


def _resolved_raw(
    study: StudyConfig, params: Mapping[str, Any], stage: StageSpec | None = None
) -> dict[str, Any]:
    """Base + study overrides + `stage`'s overrides + `params`, as a raw dict (not validated
    yet)."""
    from trainer.errors import ConfigError

    field = "overrides"
    try:
        raw = with_values(study.base_raw(), study.overrides, field)
        if stage is not None and stage.overrides:
            field = f"stages.{stage.name}.overrides"
            raw = with_values(raw, stage.overrides, field)
        field = "space"
        return with_values(raw, params, field) if params else raw
    except StudyError:
        raise
    except ConfigError as error:
        raise StudyError(f"{field}: {error}") from None


def check_trainer_keys(study: StudyConfig) -> None:
    """Every override and search key must be a trainer key, and every value at the ends of
    each range (each choice) must give a valid TrainConfig. Raises StudyError naming it."""
    from trainer.config import parse_config
    from trainer.errors import ConfigError

    base_name = study.base.name if study.base is not None else "(none)"
    try:
        parse_config(study.base_raw())
    except StudyError:
        raise
    except ConfigError as error:
        raise StudyError(f"base: {base_name}: {error}") from None
    kind = _model_kind({**study.base_raw(), **_nested(study.overrides)})
    tree = _field_tree(kind)
    for key in study.overrides:
        _check_key(tree, key, f"overrides.{key}")
    try:
        parse_config(_resolved_raw(study, {}))
    except ConfigError as error:
        raise StudyError(f"overrides: with base {base_name}: {error}") from None
    for name in study.space:
        _check_key(tree, name, f"space.{name}")
    ranges = [(f"space.{name}", name, spec) for name, spec in study.space.items()]
    ranges += [
        (f"stages.{stage.name}.space.{name}", name, spec)
        for stage in study.stages
        for name, spec in stage.space.items()
    ]
    for where, name, spec in ranges:
        if spec.around is not None:
            continue  # the range comes from the LR range test when the sweep starts
        # an active conditional parameter comes with its condition's values
        context = _condition_values(study.space, name)
        values = spec.choices if spec.type == "categorical" else list(spec.bounds)
        for value in values or []:
            try:
                parse_config(_resolved_raw(study, {**context, name: value}))
            except StudyError:
                raise
            except ConfigError as error:
                raise StudyError(
                    f"{where}: {value!r} is not a valid trainer value ({error})"
                ) from None
    for stage in study.stages:
        field = f"stages.{stage.name}.overrides"
        for key in stage.overrides:
            _check_key(tree, key, f"{field}.{key}")
        try:
            config = parse_config(_resolved_raw(study, {}, stage))
        except ConfigError as error:
            raise StudyError(f"{field}: with base {base_name}: {error}") from None
        try:
            budget_steps(config, stage.budget)
        except StudyError as error:
            raise StudyError(f"stages.{stage.name}.budget.{error}") from None


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Only what `_model_kind` needs: a flat ``model.kind`` override as a nested mapping."""
    return {"model": {"kind": flat["model.kind"]}} if "model.kind" in flat else {}


def _condition_values(space: Mapping[str, ParamSpec], name: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for target, allowed in (space[name].condition or {}).items():
        values.update(_condition_values(space, target))
        values[target] = allowed[0]
    return values


def tokens_per_step(config: TrainConfig) -> int:
    """Tokens one optimiser step consumes (examples for image classifiers)."""
    # the same count as trainer.data's tokens_per_batch, without opening the data
    per_batch = config.data.batch_size
    if config.data.kind != "digits":
        per_batch *= config.data.block_size
    return per_batch * config.grad_accum_steps


def budget_steps(config: TrainConfig, budget: BudgetSpec) -> int:
    """Optimiser steps a budget buys under `config`."""
    if budget.steps is not None:
        return budget.steps
    if budget.tokens is not None:
        per_step: float = tokens_per_step(config)
        key, value, unit = "tokens", float(budget.tokens), "tokens"
    else:
        from trainer.rundir import flops_per_step

        assert budget.flops is not None
        per_step = flops_per_step(config)
        key, value, unit = "flops", budget.flops, "FLOPs"
    if value < per_step:
        raise StudyError(
            f"{key}: {value:.4g} is less than one step ({per_step:.4g} {unit} per step); "
            "raise it or use steps"
        )
    return int(value // per_step)


def trial_config(study: StudyConfig, params: Mapping[str, Any], stage: StageSpec) -> TrainConfig:
    """The TrainConfig of one trial of `stage`: base + study overrides + the stage's overrides
    + sampled `params` + the stage's budget.

    Steps come from the budget (tokens or FLOPs divided by the trial's own tokens or FLOPs per
    step, so a searched batch or model size changes them). The study's tracking URI, when set,
    goes to `tracking`. The seed stays the base config's: every trial sees the same data order
    and initialisation.
    """
    from trainer.config import parse_config
    from trainer.errors import ConfigError

    budget = stage.budget
    try:
        config = parse_config(_resolved_raw(study, params, stage))
    except StudyError:
        raise
    except ConfigError as error:
        raise StudyError(f"space: {error}") from None
    # both updates are already valid values: no need to validate the whole config again
    update: dict[str, Any] = {"steps": budget_steps(config, budget)}
    if not study.mlflow:
        update["tracking"] = config.tracking.model_copy(update={"enabled": False})
    elif study.tracking_uri is not None:
        update["tracking"] = config.tracking.model_copy(update={"tracking_uri": study.tracking_uri})
    return config.model_copy(update=update)
