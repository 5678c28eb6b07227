"""A multilayer perceptron classifier: the smallest model whose width and depth a study can vary.

Parameter names: ``input_layer.linear`` (input role), ``hidden_layers.{i}.linear`` (hidden),
``readout`` (readout). ``MLP.logit_multiplier`` (on the readout's input, so not on its bias) and
``MLP.residual_multiplier`` (each skip branch's output x this) are forward multipliers for muP
and depth scaling (1.0 in SP).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn

from trainer.models.init import InitFields, Role, init_model_, roles_by_name

Activation = Literal["relu", "gelu", "tanh", "silu"]
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


class MLPConfig(InitFields):
    """Fully connected classifier on flattened inputs."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["mlp"] = Field(
        default="mlp", description="Model family: a multilayer perceptron."
    )
    input_dim: int | None = Field(
        default=None,
        ge=1,
        description="Input features; None takes them from the data (e.g. 64 for 8x8).",
    )
    output_dim: int | None = Field(
        default=None, ge=1, description="Number of classes; None takes it from the data."
    )
    depth: int = Field(
        default=2, ge=1, description="Number of hidden layers (the readout not counted)."
    )
    width: int = Field(default=128, ge=1, description="Units in each hidden layer.")
    activation: Activation = Field(
        default="relu", description="Nonlinearity after each hidden layer."
    )
    norm: Literal["batchnorm", "layernorm", "none"] = Field(
        default="none",
        description="Normalisation between each hidden linear map and its nonlinearity.",
    )
    residual: bool = Field(
        default=False, description="Add a skip connection around each width-to-width hidden layer."
    )
    dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Dropout after each hidden layer."
    )


class DenseLayer(nn.Module):
    """linear -> norm -> activation -> dropout."""

    def __init__(self, fan_in: int, config: MLPConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(fan_in, config.width)
        self.norm: nn.Module = nn.Identity()
        if config.norm == "batchnorm":
            self.norm = nn.BatchNorm1d(config.width)
        elif config.norm == "layernorm":
            self.norm = nn.LayerNorm(config.width)
        self.act = ACTIVATIONS[config.activation]()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.act(self.norm(self.linear(x))))


class MLP(nn.Module):
    """``forward(x, targets) -> (logits, loss)`` for inputs of any shape (B, ...), flattened.

    >>> model = MLP(MLPConfig(input_dim=64, output_dim=10, width=32))
    >>> tuple(model(torch.zeros(4, 1, 8, 8))[0].shape)
    (4, 10)
    """

    def __init__(self, config: MLPConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if config.input_dim is None or config.output_dim is None:
            raise ValueError("MLPConfig needs input_dim and output_dim; use build_model")
        self.config = config
        self.logit_multiplier = config.output_multiplier
        self.residual_multiplier = 1.0
        self.input_layer = DenseLayer(config.input_dim, config)
        self.hidden_layers = nn.ModuleList(
            DenseLayer(config.width, config) for _ in range(config.depth - 1)
        )
        self.readout = nn.Linear(config.width, config.output_dim)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise all weights from the config's scheme (see trainer.models.init)."""
        init_model_(
            self,
            self.parameter_roles(),
            scheme=self.config.init,
            std=self.config.init_std,
            zero_init_readout=self.config.zero_init_readout,
            generator=generator,
        )

    def parameter_roles(self) -> dict[str, Role]:
        """Role of every parameter (input, hidden, readout, vector), keyed by name."""
        return roles_by_name(self, input_prefixes=("input_layer.",), readout_prefixes=("readout.",))

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count; without embeddings leaves out the input layer's weight."""
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.input_layer.linear.weight.numel()
        return n

    def forward(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, classes); mean cross-entropy against class ids (B,) when given."""
        h = self.input_layer(x.flatten(1))
        for layer in self.hidden_layers:
            if not self.config.residual:
                h = layer(h)
            elif self.residual_multiplier == 1.0:
                h = h + layer(h)
            else:
                h = h + self.residual_multiplier * layer(h)
        if self.logit_multiplier != 1.0:  # on the readout's input: its bias is not scaled
            h = h * self.logit_multiplier
        logits = self.readout(h)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
