"""A small convolutional classifier for tiny images such as scikit-learn's 8x8 digits.

Each stage is conv 3x3 -> norm -> activation, then a 2x2 max-pool while the image is larger
than 2x2; global average pooling and a linear readout follow. Parameter names:
``stages.0.conv`` (input role), ``stages.{i}.conv`` for i > 0 (hidden), ``readout`` (readout).
``CNN.logit_multiplier`` is a forward multiplier for muP (1.0 in SP).
"""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn

from trainer.models.init import InitFields, Role, init_model_, roles_by_name
from trainer.models.mlp import ACTIVATIONS, Activation


class CNNConfig(InitFields):
    """Convolutional classifier; input channels and classes come from the data."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["cnn"] = Field(
        default="cnn", description="Model family: a small convolutional network."
    )
    channels: list[int] = Field(
        default_factory=lambda: [16, 32],
        min_length=1,
        description="Output channels of each conv stage, in order.",
    )
    norm: Literal["batchnorm", "groupnorm", "none"] = Field(
        default="batchnorm",
        description="Normalisation after each conv; groupnorm uses gcd(channels, 8) groups.",
    )
    activation: Activation = Field(
        default="relu", description="Nonlinearity after each conv stage."
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout before the readout.")


class ConvStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, pool: bool, config: CNNConfig) -> None:
        super().__init__()
        # a bias before batch norm is cancelled by its mean subtraction
        self.conv = nn.Conv2d(
            in_channels, out_channels, 3, padding=1, bias=config.norm != "batchnorm"
        )
        self.norm: nn.Module = nn.Identity()
        if config.norm == "batchnorm":
            self.norm = nn.BatchNorm2d(out_channels)
        elif config.norm == "groupnorm":
            self.norm = nn.GroupNorm(math.gcd(out_channels, 8), out_channels)
        self.act = ACTIVATIONS[config.activation]()
        self.pool: nn.Module = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.norm(self.conv(x))))


class CNN(nn.Module):
    """``forward(x, targets) -> (logits, loss)`` for images (B, C, H, W).

    >>> model = CNN(CNNConfig(channels=[8, 16]), input_shape=(1, 8, 8), num_classes=10)
    >>> tuple(model(torch.zeros(4, 1, 8, 8))[0].shape)
    (4, 10)
    """

    def __init__(
        self,
        config: CNNConfig,
        input_shape: tuple[int, int, int],
        num_classes: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.logit_multiplier = config.output_multiplier
        stages = []
        in_channels, size = input_shape[0], min(input_shape[1:])
        for out_channels in config.channels:
            pool = size > 2
            stages.append(ConvStage(in_channels, out_channels, pool, config))
            in_channels, size = out_channels, size // 2 if pool else size
        self.stages = nn.ModuleList(stages)
        self.dropout = nn.Dropout(config.dropout)
        self.readout = nn.Linear(in_channels, num_classes)
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
        return roles_by_name(self, input_prefixes=("stages.0.",), readout_prefixes=("readout.",))

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count; without embeddings leaves out the first conv's kernel."""
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= cast(ConvStage, self.stages[0]).conv.weight.numel()
        return n

    def forward(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, classes); mean cross-entropy against class ids (B,) when given."""
        for stage in self.stages:
            x = stage(x)
        logits = self.readout(self.dropout(x.mean(dim=(2, 3))))  # global average pool
        if self.logit_multiplier != 1.0:
            logits = logits * self.logit_multiplier
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
