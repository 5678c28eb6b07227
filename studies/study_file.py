"""Reading a study file: its YAML, the ``--set`` overrides on it, validation, the trainer checks.

``--set`` addresses the study file, not the trainer: ``stages.coarse.trials=8`` (a stage by name
or index), ``space.optimizer.lr.high=1e-2``, ``space.optimizer.lr=null`` (drops the parameter),
``overrides.model.n_layer=4``, ``stages.proxy.overrides.model.d_model=64``, ``backend=ray``.
Values are YAML. Shorthands (``pruner: asha``, ``budget: 200``, ``objective: val_loss``) are
expanded first so that ``--set`` reaches their fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from studies.config import ParamSpec, StudyConfig, read_yaml, validate_study, yaml_numbers
from studies.errors import StudyError
from studies.trainer_config import check_trainer_keys

__all__ = ["apply_set", "load_study"]


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Read a study file, apply ``--set`` overrides, validate it and its trainer keys.

    Overrides address the study file: ``stages.coarse.trials=8`` (a stage by name or index),
    ``space.optimizer.lr.high=1e-2``, ``space.optimizer.lr=null`` (drops the parameter),
    ``overrides.model.n_layer=4``, ``backend=ray``. Values are YAML.
    """
    path = Path(path)
    raw = read_yaml(path, "study")
    raw = _normalise(raw)
    for item in overrides:
        apply_set(raw, item)
    raw.setdefault("name", path.stem)
    base = raw.get("base")
    if isinstance(base, str) and not base.strip():
        raise StudyError("base: empty; expected the trainer YAML's path (relative to the study)")
    if isinstance(base, str):
        raw["base"] = str((path.parent / base).absolute()) if not Path(base).is_absolute() else base
    for stage in raw.get("stages") or []:
        start = stage.get("start_from") if isinstance(stage, dict) else None
        if isinstance(start, str) and start.strip() and not Path(start).is_absolute():
            stage["start_from"] = str((path.parent / start).absolute())
    study = validate_study(raw, search_path=path.parent.absolute())
    if study.is_trainer:
        check_trainer_keys(study)
    return study


def _normalise(raw: dict[str, Any]) -> dict[str, Any]:
    """Expand shorthands (``pruner: asha``, ``budget: 200``, ``objective: val_loss``) so that
    ``--set`` can reach their fields."""
    if isinstance(raw.get("objective"), str):
        raw["objective"] = {"metric": raw["objective"]}
    for stage in raw.get("stages") or []:
        if not isinstance(stage, dict):
            continue
        if isinstance(stage.get("pruner"), str):
            stage["pruner"] = {"name": stage["pruner"]}
        budget = stage.get("budget")
        if isinstance(budget, int) and not isinstance(budget, bool):
            stage["budget"] = {"steps": budget}
    return raw


def _parse_value(key: str, text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise StudyError(f"--set {key}: '{text}' is not a valid YAML value") from None
    return yaml_numbers(value)


def apply_set(raw: dict[str, Any], item: str) -> None:
    """One ``--set dotted.key=value`` applied to a raw study mapping, in place."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise StudyError(f"--set: '{item}' is not of the form dotted.key=value")
    value = _parse_value(key, text)
    head, *rest = key.split(".")
    if head in ("space", "overrides") and not rest:
        raw[head] = value
    elif head == "space":
        _set_space(raw, key, rest, value)
    elif head == "overrides":
        overrides = raw.setdefault("overrides", {})
        if not isinstance(overrides, dict):
            raise StudyError(f"--set {key}: 'overrides' is not a mapping in the study file")
        overrides[".".join(rest)] = value
    elif head == "stages" and rest:
        stages = raw.get("stages")
        if not isinstance(stages, list):
            raise StudyError(f"--set {key}: the study file has no list of stages")
        names = [stage.get("name") if isinstance(stage, dict) else None for stage in stages]
        if rest[0].isdigit():
            index = int(rest[0])
        else:
            index = names.index(rest[0]) if rest[0] in names else -1
        if not 0 <= index < len(stages):
            known = ", ".join(str(n) for n in names)
            raise StudyError(f"--set {key}: no stage '{rest[0]}'; stages: {known} (or an index)")
        if len(rest) == 1:
            stages[index] = value
        elif rest[1] == "overrides" and len(rest) > 2:  # its keys are dotted trainer keys
            _set_nested(stages[index], ["overrides", ".".join(rest[2:])], value, key)
        else:
            _set_nested(stages[index], rest[1:], value, key)
    else:
        _set_nested(raw, [head, *rest], value, key)
    _normalise(raw)


def _set_space(raw: dict[str, Any], key: str, rest: list[str], value: Any) -> None:
    space = raw.setdefault("space", {})
    if not isinstance(space, dict):
        raise StudyError(f"--set {key}: 'space' is not a mapping in the study file")
    whole = ".".join(rest)
    param, field = ".".join(rest[:-1]), rest[-1]
    if param in space and field in ParamSpec.model_fields:
        if not isinstance(space[param], dict):
            space[param] = {}
        space[param][field] = value
    elif whole in space or isinstance(value, dict) or value is None:
        if value is None:
            space.pop(whole, None)  # `space.KEY=null` drops the parameter
        else:
            space[whole] = value
    elif param in space:
        allowed = ", ".join(ParamSpec.model_fields)
        raise StudyError(f"--set {key}: '{field}' is not a parameter field; allowed: {allowed}")
    else:
        raise StudyError(
            f"--set {key}: no parameter '{param or whole}' in space; parameters: {', '.join(space)}"
        )


def _set_nested(node: Any, parts: list[str], value: Any, key: str) -> None:
    for part in parts[:-1]:
        if not isinstance(node, dict):
            raise StudyError(f"--set {key}: '{part}' is inside a value that is not a mapping")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if not isinstance(node, dict):
        raise StudyError(f"--set {key}: '{parts[-1]}' is inside a value that is not a mapping")
    node[parts[-1]] = value
