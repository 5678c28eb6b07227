"""Models the trainer can train, each selected by the ``kind`` of its config.

Every model shares one interface:

- ``forward(x, targets=None, *, label_smoothing=0.0) -> (logits, loss or None)``;
- ``num_params(include_embeddings=True) -> int`` (exact; tied weights count once);
- ``parameter_roles() -> dict[name, "input" | "hidden" | "readout" | "vector"]`` for muP and
  per-group optimiser settings (see trainer.models.init);
- ``logit_multiplier`` (and on the GPT ``embedding_multiplier`` and each ``attn.scale``):
  forward multipliers that are neutral until trainer.parametrization sets them.

>>> from trainer.models import GPTConfig, build_model
>>> model = build_model(GPTConfig(n_layer=2, d_model=64, n_head=2), vocab_size=256)
>>> model.num_params()
131392
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from trainer.errors import ConfigError
from trainer.models.cnn import CNN, CNNConfig
from trainer.models.gpt import GPT, GPTConfig
from trainer.models.init import InitScheme, Role
from trainer.models.mlp import MLP, MLPConfig

ModelConfig = Annotated[GPTConfig | MLPConfig | CNNConfig, Field(discriminator="kind")]
Model = GPT | MLP | CNN

__all__ = [
    "CNN",
    "CNNConfig",
    "GPT",
    "GPTConfig",
    "InitScheme",
    "MLP",
    "MLPConfig",
    "Model",
    "ModelConfig",
    "Role",
    "build_model",
]


def build_model(
    config: GPTConfig | MLPConfig | CNNConfig,
    *,
    vocab_size: int | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    seed: int | None = None,
) -> Model:
    """Build the model that `config` describes, sized for the data.

    Pass the data's dimensions straight from the DataSource (attributes of the same names; the
    ones a model does not use are ignored): a GPT needs `vocab_size`; an MLP and a CNN need
    `input_shape` (C, H, W or features) and `num_classes`. With `seed`, the initial weights
    depend on nothing else (not on torch's global random state).
    """
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    if isinstance(config, GPTConfig):
        if vocab_size is None:
            raise ConfigError(
                "model.kind: 'gpt' needs token data with a vocabulary; "
                "expected data.kind stdlib, text or bin"
            )
        return GPT(config, vocab_size, generator)
    if input_shape is None or num_classes is None:
        raise ConfigError(
            f"model.kind: {config.kind!r} needs labelled inputs; expected data.kind 'digits'"
        )
    if isinstance(config, MLPConfig):
        features = math.prod(input_shape)
        _check_matches("model.input_dim", config.input_dim, features, "input features")
        _check_matches("model.output_dim", config.output_dim, num_classes, "classes")
        sized = config.model_copy(update={"input_dim": features, "output_dim": num_classes})
        return MLP(sized, generator)
    if len(input_shape) != 3:
        raise ConfigError(
            f"model.kind: 'cnn' needs images (channels, height, width); the data gives "
            f"input shape {tuple(input_shape)}"
        )
    channels, height, width = input_shape
    return CNN(config, (channels, height, width), num_classes, generator)


def _check_matches(field: str, configured: int | None, from_data: int, what: str) -> None:
    if configured is not None and configured != from_data:
        raise ConfigError(
            f"{field}: {configured} does not match the data's {from_data} {what}; "
            f"expected {from_data} or leave it unset"
        )
