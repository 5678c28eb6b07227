"""Weight initialisation shared by every model, and the parameter roles that muP needs.

Every model labels each parameter with a `Role`, in the vocabulary of muP (Yang et al. 2021,
"Tensor Programs V", Table 3):

- ``input``: weights that map a fixed-size input into the width (token and position embeddings,
  the first layer of the MLP and CNN);
- ``hidden``: weights whose fan-in and fan-out both grow with width (attention and MLP matrices);
- ``readout``: the last layer that maps the width to logits (``lm_head``, ``readout``);
- ``vector``: biases and normalisation gains.

With tied embeddings the GPT's one shared matrix is listed once, as ``input`` (``wte.weight``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn

InitScheme = Literal["normal", "xavier", "he", "lecun", "orthogonal"]
Role = Literal["input", "hidden", "readout", "vector"]

_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


class InitFields(BaseModel):
    """Initialisation fields that every model config carries."""

    init: InitScheme = Field(
        default="normal",
        description="Weight initialisation: normal = N(0, init_std); xavier, he (fan-in, ReLU "
        "gain), lecun (fan-in) and orthogonal use each weight's fan as torch.nn.init computes it.",
    )
    init_std: float = Field(
        default=0.02,
        gt=0,
        description="Standard deviation of the 'normal' scheme (GPT-2 uses 0.02).",
    )
    zero_init_readout: bool = Field(
        default=False,
        description="Start the readout (last layer) at zero, so initial logits are uniform.",
    )
    output_multiplier: float = Field(
        default=1.0,
        gt=0,
        description="Multiplies the logits (the readout's input): Tensor Programs V's "
        "alpha_output, tuned at the base width and carried over under muP.",
    )


def fan_in(weight: torch.Tensor) -> int:
    """Inputs feeding one output unit, as torch.nn.init counts them.

    Linear (out, in): in. Conv (out, in, k...): in * prod(k). Embedding (num, dim): dim.
    """
    receptive_field = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return int(weight.shape[1]) * receptive_field


def init_weight_(
    weight: torch.Tensor,
    scheme: InitScheme,
    std: float = 0.02,
    generator: torch.Generator | None = None,
) -> None:
    """Fill one weight matrix (or conv kernel, or embedding table) in place."""
    with torch.no_grad():
        if scheme == "normal":
            nn.init.normal_(weight, 0.0, std, generator=generator)
        elif scheme == "xavier":
            # Glorot & Bengio 2010: std = sqrt(2 / (fan_in + fan_out))
            nn.init.xavier_normal_(weight, generator=generator)
        elif scheme == "he":
            # He et al. 2015, eq. 10: std = sqrt(2 / fan_in)
            nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu", generator=generator)
        elif scheme == "lecun":
            # LeCun et al. 1998 ("Efficient BackProp"): std = sqrt(1 / fan_in)
            nn.init.normal_(weight, 0.0, 1.0 / math.sqrt(fan_in(weight)), generator=generator)
        elif scheme == "orthogonal":
            # Saxe et al. 2014: a (semi-)orthogonal matrix, rows flattened over the kernel
            nn.init.orthogonal_(weight, generator=generator)
        else:  # pragma: no cover - pydantic rejects anything else first
            raise ValueError(f"unknown init scheme {scheme!r}")


def roles_by_name(
    model: nn.Module, input_prefixes: Iterable[str], readout_prefixes: Iterable[str]
) -> dict[str, Role]:
    """Label parameters: 1-D ones are vectors; matrices are input/readout by name, else hidden."""
    inputs, readouts = tuple(input_prefixes), tuple(readout_prefixes)
    roles: dict[str, Role] = {}
    for name, param in model.named_parameters():
        if param.dim() < 2:
            roles[name] = "vector"
        elif name.startswith(inputs):
            roles[name] = "input"
        elif name.startswith(readouts):
            roles[name] = "readout"
        else:
            roles[name] = "hidden"
    return roles


def init_model_(
    model: nn.Module,
    roles: Mapping[str, Role],
    *,
    scheme: InitScheme,
    std: float = 0.02,
    zero_init_readout: bool = False,
    residual_projections: Iterable[str] = (),
    n_layer: int = 1,
    generator: torch.Generator | None = None,
) -> None:
    """Initialise every parameter of `model` in place; the result depends only on `generator`.

    Linear, Conv and Embedding weights follow `scheme`; biases are zero; normalisation gains one.
    With the 'normal' scheme, the weights named in `residual_projections` get std / sqrt(2 *
    n_layer), so the residual stream's variance does not grow with depth (Radford et al. 2019,
    GPT-2, section 2.3). Readout weights are zeroed last when `zero_init_readout` is set.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _WEIGHTED):
                init_weight_(module.weight, scheme, std, generator)
                bias = getattr(module, "bias", None)
                if bias is not None:
                    bias.zero_()
            elif isinstance(module, _NORMS):
                gain, shift = getattr(module, "weight", None), getattr(module, "bias", None)
                if gain is not None:
                    gain.fill_(1.0)
                if shift is not None:
                    shift.zero_()
        params = dict(model.named_parameters())
        if scheme == "normal":
            for name in residual_projections:
                nn.init.normal_(
                    params[name], 0.0, std / math.sqrt(2 * n_layer), generator=generator
                )
        if zero_init_readout:
            for name, role in roles.items():
                if role == "readout":
                    params[name].zero_()
