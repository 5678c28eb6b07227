"""Parametrizations: standard (SP) and the Maximal Update Parametrization (muP) with depth scaling.

muP (Yang et al. 2022, "Tensor Programs V", Table 8, the form the `mup` package implements) keeps
a narrow proxy's optimal learning rate and initialisation optimal as the width grows. With the
width multiplier ``m = width / base_width`` and each parameter's role from the model's
`parameter_roles()` (trainer.models.init):

============  =========================  ===================  ============  ==============
role          init (``normal``)          forward multiplier   Adam-type LR  SGD LR
============  =========================  ===================  ============  ==============
input         unchanged                  1                    x 1           x m
hidden        std x m^-1/2               1                    x 1/m         x 1
readout       zero (``readout_init``)    1/m                  x 1           x m
vector        unchanged                  1                    x 1           x m (width-sized)
============  =========================  ===================  ============  ==============

The readout's start (``readout_init``): ``zero`` (default; Tensor Programs V, D.2) or ``tp5``,
its weights as built, so that through the 1/m multiplier their variance is the paper's ~
1/fan_in^2 (the ``mup`` package's MuReadout) and the initial logits shrink as m^-1/2 (the
coordinate check flags that at step 1, before any update). On the transfer check's 150-step GPT
at 8x the base width ``tp5`` ended 0.31 nats below ``zero`` at the same optimum (BENCHMARKS.md,
"muP: the readout's start"). How fast the readout moves against the rest is a hyperparameter of
the base width: ``model.output_multiplier`` (alpha_output, Tensor Programs V section 3) multiplies
the logits at every width and under SP too, and muP's 1/m comes on top of it.

The readout's multiplier scales its input, not its bias (as the `mup` package's MuReadout does: a
bias divided by m would vanish with width; the coordinate check caught this). Attention logits
are scaled by ``sqrt(base_head_dim) / head_dim`` (1/head_dim up to a constant
that makes it 1/sqrt(head_dim) at the base width). The fan-in schemes (``he``, ``lecun``,
``xavier``, ``orthogonal``) already give hidden weights variance ~ 1/fan_in and leave them as
they are; their embedding tables (whose fan-in is the width) are scaled back to the base width's
std. Muon's hidden matrices follow the spectral condition of Yang, Simon and Bernstein 2023 ("A
Spectral Condition for Feature Learning", condition 1): the update's spectral norm ~
sqrt(fan_out / fan_in), so each matrix's LR is scaled to cancel torch Muon's own shape
adjustment relative to the base shape; its other parameters follow the Adam rules.

Weight decay (``weight_decay``): ``independent`` (default) divides a group's decay by its LR
scale so that lr x wd, the shrink per step, does not change with width (Wortsman et al. 2023,
"Small-scale proxies for large-scale Transformer training instabilities", section 3.2.2);
``coupled`` leaves the coefficient alone, so torch's decoupled decay shrinks with the LR rule.

Depth (``base_depth``): each residual branch is multiplied by ``(base_depth / depth)^alpha``,
alpha 0.5 (depth-muP: Yang et al. 2023, "Tensor Programs VI"; Bordelon et al. 2023) or 1
(CompleteP: Dey et al. 2025, "Don't be lazy", Table 1), and with an Adam-type optimiser the hidden
matrices' LR by ``(depth / base_depth)^(alpha - 1)``; the GPT's depth-dependent residual init
(std / sqrt(2 n_layer)) is held at its base-depth value. Depth rules are given for Adam-type
optimisers only.

Everything here sets optimiser groups and plain float attributes of modules (multipliers), never
attributes on tensors, so it survives FSDP2, torch.compile, state_dict and pickling. At
``width == base_width`` and ``depth == base_depth`` muP builds the same network as SP (with
``readout_init: zero`` the same as SP with ``model.zero_init_readout: true``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainer.models import GPT, MLP, GPTConfig, MLPConfig
from trainer.models.init import Role
from trainer.optim import embedding_ids, goes_to_muon

if TYPE_CHECKING:
    from trainer.optim import OptimizerConfig

__all__ = [
    "ADAM_TYPE",
    "SGD_TYPE",
    "ParametrizationConfig",
    "Parametrized",
    "check_parametrization",
    "parametrize",
    "width_and_depth",
]

ADAM_TYPE = ("adam", "adamw", "amsgrad", "nadam", "radam", "adagrad", "rmsprop", "lion", "sophia")
SGD_TYPE = ("sgd", "momentum", "nesterov")
ParametrizationName = Literal["sp", "mup"]


class ParametrizationConfig(BaseModel):
    """How initialisation, multipliers and per-group learning rates scale with width and depth."""

    model_config = ConfigDict(extra="forbid")

    name: ParametrizationName = Field(
        default="sp", description="sp: standard (as built); mup: Maximal Update Parametrization."
    )
    base_width: int | None = Field(
        default=None,
        ge=1,
        description="mup: the width whose hyperparameters are tuned (GPT d_model, MLP width); "
        "at this width muP equals SP.",
    )
    base_depth: int | None = Field(
        default=None,
        ge=1,
        description="mup: the depth (GPT n_layer, MLP depth) for depth scaling; None: no "
        "depth scaling.",
    )
    depth_alpha: float = Field(
        default=1.0,
        ge=0.5,
        le=1.0,
        description="Residual branches x (base_depth/depth)^alpha: 0.5 depth-muP, 1 CompleteP.",
    )
    readout_init: Literal["zero", "tp5"] = Field(
        default="zero",
        description="mup: the readout's start: zero (Tensor Programs V, D.2) or tp5 (as built; "
        "through the 1/m multiplier its variance ~ 1/fan_in^2).",
    )
    weight_decay: Literal["independent", "coupled"] = Field(
        default="independent",
        description="independent: lr x wd held across widths (wd divided by the LR scale); "
        "coupled: wd unchanged.",
    )


@dataclass(frozen=True)
class Parametrized:
    """What `parametrize` did: the multipliers and the LR scale of every parameter."""

    name: str
    width_mult: float
    depth_mult: float
    lr_scales: dict[str, float]  # parameter name -> its LR multiplier
    independent_wd: bool

    def lr_scale(self, name: str, param: nn.Parameter) -> float:
        """The `trainer.optim.param_groups` hook."""
        return self.lr_scales.get(name, 1.0)


def width_and_depth(model: GPTConfig | MLPConfig) -> tuple[int, int, str, str]:
    """(width, depth, their config fields): GPT d_model and n_layer, MLP width and depth."""
    if isinstance(model, GPTConfig):
        return model.d_model, model.n_layer, "model.d_model", "model.n_layer"
    return model.width, model.depth, "model.width", "model.depth"


def check_parametrization(
    config: ParametrizationConfig, model: BaseModel, optimizer: OptimizerConfig
) -> None:
    """Raise ValueError naming the field when `config` cannot apply to this model/optimiser."""
    if config.name == "sp":
        return
    if not isinstance(model, GPTConfig | MLPConfig):
        kind = getattr(model, "kind", type(model).__name__)
        raise ValueError(
            f"parametrization.name: mup has rules for model.kind gpt and mlp, not {kind}; use sp"
        )
    if config.base_width is None:
        raise ValueError(
            "parametrization.base_width: missing; mup needs the width its hyperparameters "
            "were tuned at (e.g. 64)"
        )
    width, depth, width_field, depth_field = width_and_depth(model)
    if config.base_width > width:
        raise ValueError(
            f"parametrization.base_width: {config.base_width} is larger than {width_field} "
            f"{width}; expected at most {width} (tune the narrow model, widen the target)"
        )
    if isinstance(model, GPTConfig):
        if config.base_width % model.n_head != 0:
            raise ValueError(
                f"parametrization.base_width: {config.base_width} is not divisible by "
                f"model.n_head {model.n_head}; expected a multiple of {model.n_head}"
            )
        if model.tie_embeddings:
            raise ValueError(
                "parametrization.name: mup needs a readout of its own (its output multiplier "
                "1/m would scale the tied embeddings too); set model.tie_embeddings: false"
            )
    name = optimizer.name
    if name not in (*ADAM_TYPE, *SGD_TYPE, "muon"):
        raise ValueError(
            f"parametrization.name: mup has no rules for optimizer.name {name}; use one of "
            f"{', '.join((*ADAM_TYPE, *SGD_TYPE, 'muon'))}, or sp"
        )
    if config.base_depth is not None:
        if config.base_depth > depth:
            raise ValueError(
                f"parametrization.base_depth: {config.base_depth} is larger than {depth_field} "
                f"{depth}; expected at most {depth}"
            )
        if name not in ADAM_TYPE:
            raise ValueError(
                f"parametrization.base_depth: depth rules are given for Adam-type optimisers "
                f"({', '.join(ADAM_TYPE)}), not optimizer.name {name}; leave base_depth unset"
            )
        if isinstance(model, MLPConfig) and not model.residual:
            raise ValueError(
                "parametrization.base_depth: depth scaling multiplies residual branches and "
                "this MLP has none; set model.residual: true or leave base_depth unset"
            )


def parametrize(
    model: nn.Module, config: ParametrizationConfig, optimizer: OptimizerConfig
) -> Parametrized:
    """Apply `config` to a freshly initialised `model` in place (init, multipliers) and return
    the per-parameter LR scales for its optimiser. SP changes nothing."""
    if config.name == "sp" or not isinstance(model, GPT | MLP):
        return Parametrized("sp", 1.0, 1.0, {}, independent_wd=False)
    model_config = model.config
    assert config.base_width is not None  # check_parametrization ran with the config
    width, depth, _, _ = width_and_depth(model_config)
    m = width / config.base_width
    depth_mult = depth / config.base_depth if config.base_depth is not None else 1.0
    roles = model.parameter_roles()
    params = dict(model.named_parameters())
    readout_prefix = "lm_head." if isinstance(model, GPT) else "readout."

    fan_in_scheme = model_config.init != "normal"
    embeddings = embedding_ids(model)
    with torch.no_grad():
        for name, role in roles.items():
            param = params[name]
            if role == "hidden" and not fan_in_scheme:
                param.mul_(m**-0.5)
            elif role == "input" and fan_in_scheme and id(param) in embeddings:
                param.mul_(m**0.5)  # a table's fan-in is the width: std 1/sqrt(width) -> base's
            elif role == "readout" and config.readout_init == "zero":
                param.zero_()
        if isinstance(model, GPT) and not fan_in_scheme and depth_mult != 1.0:
            for name in model.residual_projections():  # std/sqrt(2L) -> std/sqrt(2 L_base)
                params[name].mul_(math.sqrt(depth_mult))
    model.logit_multiplier = model_config.output_multiplier / m
    branch = depth_mult**-config.depth_alpha
    if isinstance(model, GPT):
        n_head = model.config.n_head
        head_dim, base_head_dim = model.config.d_model // n_head, config.base_width // n_head
        # 1/head_dim, made 1/sqrt(head_dim) at the base width (None there: SDPA's own)
        scale = None if head_dim == base_head_dim else math.sqrt(base_head_dim) / head_dim
        for block in model.blocks:
            block.attn.scale = scale  # type: ignore[union-attr]
            block.residual_multiplier = branch
    else:
        model.residual_multiplier = branch

    scale_of = _lr_rule(optimizer, m, depth_mult ** (config.depth_alpha - 1.0), embeddings)
    lr_scales: dict[str, float] = {}
    for name, role in roles.items():
        scales_with_width = not (role == "vector" and name.startswith(readout_prefix))
        lr_scales[name] = scale_of(name, role, params[name], scales_with_width, m)
    return Parametrized(
        "mup", m, depth_mult, lr_scales, independent_wd=config.weight_decay == "independent"
    )


LrRule = Callable[[str, Role, nn.Parameter, bool, float], float]


def _lr_rule(optimizer: OptimizerConfig, m: float, depth_lr: float, embeddings: set[int]) -> LrRule:
    """name, role, param, whether a vector is width-sized, m -> that parameter's LR scale."""
    if optimizer.name in SGD_TYPE:

        def sgd(name: str, role: Role, param: nn.Parameter, wide: bool, m: float) -> float:
            if role == "hidden":
                return 1.0
            return m if wide else 1.0  # input, readout and width-sized vectors: x fan_out/in

        return sgd

    def adam(name: str, role: Role, param: nn.Parameter, wide: bool, m: float) -> float:
        return depth_lr / m if role == "hidden" else 1.0

    if optimizer.name != "muon":
        return adam

    def muon(name: str, role: Role, param: nn.Parameter, wide: bool, m: float) -> float:
        if not goes_to_muon(name, param, optimizer, id(param) in embeddings):
            return adam(name, role, param, wide, m)
        fan_out, fan_in = param.shape[0], param.shape[1]
        base_out = fan_out / m if role in ("hidden", "input") else fan_out
        base_in = fan_in / m if role in ("hidden", "readout") else fan_in

        def target(out: float, inn: float) -> float:  # spectral norm of the update wanted
            return math.sqrt(out / inn) / _muon_adjustment(optimizer, out, inn)

        return target(fan_out, fan_in) / target(base_out, base_in)

    return muon


def _muon_adjustment(optimizer: OptimizerConfig, rows: float, cols: float) -> float:
    """torch.optim.Muon's own per-matrix LR factor (torch/optim/_muon.py, `_adjust_lr`)."""
    if optimizer.muon_adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))
