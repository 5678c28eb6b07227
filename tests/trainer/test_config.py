"""TrainConfig: YAML plus dotted overrides, one block size, one-line errors naming the field,
a stable hash, and the shipped example configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from trainer.config import (
    TrainConfig,
    apply_overrides,
    config_hash,
    first_difference,
    load_config,
    parse_config,
    trajectory_fields,
)
from trainer.errors import ConfigError
from trainer.models import CNNConfig, GPTConfig, MLPConfig

CONFIGS = Path(__file__).resolve().parents[2] / "studies" / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_with_dotted_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "steps: 10\noptimizer:\n  name: adamw\n  lr: 1.0e-3\n")
    config = load_config(
        path, ["optimizer.lr=3e-4", "model.n_layer=3", "clip.mode=agc", "tracking.run_name="]
    )
    assert config.steps == 10
    assert config.optimizer.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string; we read a number
    assert isinstance(config.model, GPTConfig) and config.model.n_layer == 3
    assert config.clip.mode == "agc" and config.tracking.run_name is None


def test_an_override_can_switch_the_model_kind(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  kind: gpt\n  n_layer: 2\ndata:\n  kind: digits\n")
    config = load_config(path, ["model={kind: mlp}", "model.width=16"])
    assert isinstance(config.model, MLPConfig) and config.model.width == 16


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_layers=3", "--set model.n_layers: unknown key 'n_layers' in model; allowed:"),
        ("stepz=3", "--set stepz: unknown key 'stepz' in the top level"),
        ("clip.mode.x=1", "--set clip.mode.x: 'clip.mode' has no sub-keys"),
        ("no-equals-sign", "--set: 'no-equals-sign' is not of the form dotted.key=value"),
    ],
)
def test_unknown_override_keys_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [override])
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"stepz": 3}, "stepz: unknown field; allowed: seed, steps"),
        ({"steps": 0}, "steps: input should be greater than or equal to 1 (got 0)"),
        ({"steps": "abc"}, "steps: input should be a valid integer"),
        ({"precision": "fp4"}, "precision: 'fp4' is not one of: fp32, bf16, fp16, fp8"),
        ({"clip": {"mode": "x"}}, "clip.mode: 'x' is not one of: none, norm, value, agc"),
        ({"optimizer": {"name": "adamx"}}, "optimizer.name: 'adamx' is not one of: sgd"),
        ({"optimizer": {"lr": -1}}, "optimizer.lr: -1 is not allowed"),
        ({"model": {"kind": "rnn"}}, "model.kind: 'rnn' is not one of: gpt, mlp, cnn"),
        ({"model": {"n_layers": 2}}, "model.n_layers: unknown field; allowed: init"),
        ({"model": {"kind": "cnn", "depth": 2}}, "model.depth: unknown field; allowed: init"),
        ({"model": {"n_head": 3}}, "model.n_head: 3 does not divide model.d_model 128"),
        ({"data": {"kind": "text"}}, "data.path: missing; data.kind 'text' needs a path"),
        (
            {"model": {"block_size": 64}, "data": {"block_size": 32}},
            "model.block_size: 64 differs from data.block_size 32",
        ),
    ],
)
def test_validation_errors_are_one_line_naming_the_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text


def test_keyword_construction_raises_config_error_too() -> None:
    with pytest.raises(ConfigError, match=r"^steps: input should be greater than or equal to 1"):
        TrainConfig(steps=0)


def test_file_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config: '.*missing.yaml' does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is not valid YAML at line 2"):
        load_config(write(tmp_path, "steps: 1\n  bad: [\n"))
    with pytest.raises(ConfigError, match="holds a list; expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_block_size_is_one_number() -> None:
    from_data = parse_config({"data": {"block_size": 64}}).model
    assert isinstance(from_data, GPTConfig) and from_data.block_size == 64
    config = parse_config({"model": {"block_size": 32}})
    assert config.data.block_size == 32
    both = parse_config({"model": {"block_size": 48}, "data": {"block_size": 48}})
    assert isinstance(both.model, GPTConfig)
    assert both.model.block_size == both.data.block_size == 48
    # the resolved config reloads unchanged
    again = parse_config(config.model_dump(mode="json"))
    assert config_hash(again) == config_hash(config)


def test_model_kind_defaults_to_gpt() -> None:
    assert isinstance(parse_config({"model": {"d_model": 64}}).model, GPTConfig)


def test_config_hash_is_canonical_and_sensitive() -> None:
    a = parse_config({"steps": 10, "seed": 1})
    b = parse_config({"seed": 1, "steps": 10})
    assert config_hash(a) == config_hash(b) and len(config_hash(a)) == 64
    assert config_hash(parse_config({"steps": 11, "seed": 1})) != config_hash(a)


def test_trajectory_fields_leave_out_operational_ones() -> None:
    base = parse_config({})
    logged = parse_config({"log_every": 3, "tracking": {"enabled": False}})
    assert first_difference(trajectory_fields(base), trajectory_fields(logged)) is None
    changed = parse_config({"optimizer": {"lr": 0.1}, "seed": 5})
    assert first_difference(trajectory_fields(base), trajectory_fields(changed)) == "seed"


def test_diagnostics_every_rounds_up_to_logging_steps() -> None:
    assert parse_config({"log_every": 10}).diagnostics_every == 10
    assert parse_config({"log_every": 10, "diagnostics": {"every": 25}}).diagnostics_every == 30


def test_every_field_is_documented() -> None:
    seen: set[type[BaseModel]] = set()
    stack: list[type[BaseModel]] = [TrainConfig, GPTConfig, MLPConfig, CNNConfig]
    while stack:
        model = stack.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                stack.append(annotation)
    assert len(seen) == 14  # TrainConfig, its 10 sub-configs and the 3 model configs


@pytest.mark.parametrize("name", ["gpt-tiny.yaml", "digits-cnn.yaml"])
def test_shipped_configs_load(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.steps >= 100
