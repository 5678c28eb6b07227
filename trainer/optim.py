"""One factory for every optimiser, and the parameter-group surgery behind it.

`param_groups` splits a model's parameters into named groups (decay / no-decay, and for Muon the
hidden matrices); it is the one extension point for muP (per-group LR scale), weight-decay rules
and hybrid optimisers. `build_optimizer` turns a validated `OptimizerConfig` into one
`torch.optim.Optimizer`; adding an optimiser is one builder plus one line in `_SPECS`.

Where each optimiser comes from:

- torch.optim: sgd, momentum, nesterov (SGD), adagrad, rmsprop, adam, adamw, amsgrad (Adam/AdamW
  with amsgrad=True), nadam, radam, adafactor, muon (torch Muon on hidden 2-D matrices + AdamW on
  everything else, joined by `HybridOptimizer`).
- pytorch_optimizer: lars (LARS), lamb (Lamb), lion (Lion), sophia (SophiaH), shampoo (Shampoo),
  soap (SOAP).

Sophia-H estimates the Hessian diagonal from the autograd graph of the gradient: the training loop
must call `loss.backward(create_graph=needs_create_graph(optimizer))`.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    >>> opt = build_optimizer(model, OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.1))
    >>> [(g["name"], g["weight_decay"]) for g in opt.param_groups]
    [('decay', 0.1), ('no_decay', 0.0)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Annotated, Any, Literal, get_args

import pytorch_optimizer
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from trainer.errors import ConfigError, component_config_error

__all__ = [
    "OPTIMIZER_NAMES",
    "HybridOptimizer",
    "OptimizerConfig",
    "build_optimizer",
    "embedding_ids",
    "goes_to_muon",
    "needs_create_graph",
    "param_groups",
]

OptimizerName = Literal[
    "sgd",
    "momentum",
    "nesterov",
    "adagrad",
    "rmsprop",
    "adam",
    "adamw",
    "amsgrad",
    "nadam",
    "radam",
    "adafactor",
    "muon",
    "lars",
    "lamb",
    "lion",
    "sophia",
    "shampoo",
    "soap",
]
OPTIMIZER_NAMES: tuple[str, ...] = get_args(OptimizerName)
WeightDecayMode = Literal["decoupled", "l2"]
NoDecayRule = Literal["bias", "norm", "embedding", "1d"]
Implementation = Literal["auto", "for_loop", "foreach", "fused"]
LrScale = Callable[[str, nn.Parameter], float]
ParamGroup = dict[str, Any]
DEFAULT_NO_DECAY: tuple[NoDecayRule, ...] = ("bias", "norm", "embedding")
UnitFloat = Annotated[float, Field(ge=0.0, lt=1.0)]


class OptimizerConfig(BaseModel):
    """Which optimiser, its hyperparameters, and which parameters get weight decay.

    Fields left at None take the optimiser's published default (e.g. betas (0.9, 0.99) for Lion,
    (0.96, 0.99) for Sophia, (0.9, 0.999) for Adam).
    """

    model_config = ConfigDict(extra="forbid")

    name: OptimizerName = Field("adamw", description="Optimiser name.")
    lr: float = Field(
        1e-3, gt=0.0, allow_inf_nan=False, description="Peak learning rate (schedules scale it)."
    )
    weight_decay: float = Field(
        0.0, ge=0.0, allow_inf_nan=False, description="Weight-decay coefficient; 0 disables."
    )
    weight_decay_mode: WeightDecayMode | None = Field(
        None,
        description="'l2' adds wd*param to the gradient; 'decoupled' shrinks param by lr*wd "
        "(Loshchilov & Hutter); None = the optimiser's convention (adamw: decoupled, adam: l2).",
    )
    no_decay_on: list[NoDecayRule] = Field(
        default_factory=lambda: list(DEFAULT_NO_DECAY),
        description="Parameters that never get weight decay: biases, weights of *Norm modules, "
        "nn.Embedding weights, any 1-D parameter.",
    )
    betas: tuple[UnitFloat, UnitFloat] | None = Field(
        None,
        description="Moment decay rates (Adam family, Lion, Lamb, Sophia, SOAP; rmsprop: alpha).",
    )
    eps: float | None = Field(
        None, gt=0.0, description="Denominator epsilon (adafactor: the squared-gradient eps1)."
    )
    momentum: UnitFloat | None = Field(
        None, description="Momentum for momentum, nesterov, rmsprop, lars, shampoo (default 0.9/0)."
    )
    implementation: Implementation = Field(
        "auto",
        description="torch kernel choice: auto, for_loop, foreach or fused (where supported).",
    )
    muon_momentum: UnitFloat = Field(0.95, description="Muon: momentum of the matrix updates.")
    muon_nesterov: bool = Field(True, description="Muon: Nesterov momentum.")
    muon_ns_steps: int = Field(5, ge=1, lt=100, description="Muon: Newton-Schulz iterations.")
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = Field(
        "match_rms_adamw",
        description="Muon: per-matrix LR scaling; 'match_rms_adamw' lets Muon share AdamW's lr.",
    )
    muon_adamw_lr: float | None = Field(
        None, gt=0.0, description="Muon: lr of the AdamW part (non-matrices); None = same as lr."
    )
    muon_exclude: list[str] = Field(
        default_factory=lambda: ["*lm_head*", "*readout*", "*classifier*"],
        description="Muon: name patterns (fnmatch) of 2-D weights that go to AdamW (the readout).",
    )
    sophia_rho: float = Field(
        0.01, gt=0.0, description="Sophia: per-coordinate clip of m/h (pytorch_optimizer's p)."
    )
    sophia_update_period: int = Field(
        10, ge=1, description="Sophia: steps between Hutchinson Hessian estimates."
    )
    precondition_every: int | None = Field(
        None, ge=1, description="Shampoo/SOAP: steps between preconditioner updates (1 / 10)."
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise component_config_error(exc, "optimizer", type(self)) from None


# ---------------------------------------------------------------------------------------------
# Parameter groups


def param_groups(
    model: nn.Module,
    config: OptimizerConfig,
    lr_scale: LrScale | None = None,
    *,
    independent_wd: bool = False,
) -> list[ParamGroup]:
    """Split trainable parameters into deterministic, named groups for `config`.

    Roles, in this order: "muon" (Muon only: 2-D hidden matrices), "decay", "no_decay" (see
    `config.no_decay_on`). Parameters of one role are split further by `lr_scale(name, param)`,
    the muP hook: each group's "lr" is its base lr times "lr_scale", applied once here, so a
    schedule multiplies every group by the same factor. With `independent_wd` a group's weight
    decay is divided by its scale, so that lr x weight_decay does not change (muP's independent
    convention). Groups keep model order, carry "name", "lr", "lr_scale", "weight_decay" and
    "param_names", and empty groups are dropped.
    """
    embeddings = embedding_ids(model)
    adamw_lr = (config.muon_adamw_lr or config.lr) if config.name == "muon" else config.lr
    groups: dict[tuple[str, float], ParamGroup] = {}
    for name, param, module in _named_parameters_with_module(model):
        is_embedding = id(param) in embeddings
        role = _role(name, param, module, config, is_embedding)
        scale = 1.0 if lr_scale is None else float(lr_scale(name, param))
        if not (math.isfinite(scale) and scale > 0.0):
            raise ConfigError(f"lr_scale: {scale!r} for {name!r} is not allowed: must be > 0")
        group = groups.setdefault(
            (role, scale),
            {
                "name": role,
                "params": [],
                "param_names": [],
                "lr": (config.lr if role == "muon" else adamw_lr) * scale,
                "lr_scale": scale,
                "weight_decay": 0.0
                if role == "no_decay"
                else config.weight_decay / (scale if independent_wd else 1.0),
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise ConfigError("model: has no trainable parameters (all have requires_grad=False)")
    role_order = ("muon", "decay", "no_decay")
    # dicts keep insertion (model) order; a stable sort by role keeps it within a role.
    return sorted(groups.values(), key=lambda group: role_order.index(group["name"]))


def _named_parameters_with_module(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Module]]:
    """Trainable parameters in `model.named_parameters()` order, each with its owning module."""
    seen: set[int] = set()  # tied weights appear once, under their first name
    found = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            found.append((f"{module_name}.{param_name}".lstrip("."), param, module))
    return found


def embedding_ids(model: nn.Module) -> set[int]:
    """ids of the weights of `model`'s embedding tables."""
    return {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, nn.Embedding | nn.EmbeddingBag)
    }


def goes_to_muon(
    name: str, param: nn.Parameter, config: OptimizerConfig, is_embedding: bool
) -> bool:
    """Whether Muon updates this parameter: 2-D hidden matrices only; embeddings and the
    readout (`config.muon_exclude`) go to AdamW (Jordan 2024)."""
    return (
        config.name == "muon"
        and param.ndim == 2
        and not is_embedding
        and not any(fnmatch(name, pattern) for pattern in config.muon_exclude)
    )


def _role(
    name: str, param: nn.Parameter, module: nn.Module, config: OptimizerConfig, is_embedding: bool
) -> str:
    rules = set(config.no_decay_on)
    no_decay = (
        ("bias" in rules and name.rsplit(".", 1)[-1] == "bias")
        or ("norm" in rules and "norm" in type(module).__name__.lower())
        or ("embedding" in rules and is_embedding)
        or ("1d" in rules and param.ndim < 2)
    )
    if goes_to_muon(name, param, config, is_embedding):
        return "muon"
    return "no_decay" if no_decay else "decay"


# ---------------------------------------------------------------------------------------------
# Hybrid optimiser (Muon + AdamW)


class HybridOptimizer(torch.optim.Optimizer):
    """Several optimisers over disjoint parameters, stepped, scheduled and saved as one.

    `param_groups` is the concatenation of the children's group dicts (the same objects), so an
    LR scheduler built on this object drives every child. Per-parameter state lives in the
    children: `hybrid.optimizers[i].state`.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        super().__init__([g for opt in self.optimizers for g in opt.param_groups], defaults={})

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(
                f"state_dict holds {len(saved)} optimisers, expected {len(self.optimizers)}"
            )
        for optimizer, optimizer_state in zip(self.optimizers, saved, strict=True):
            optimizer.load_state_dict(optimizer_state)
        # Loading replaces each child's group dicts: point ours (and any scheduler) at the new ones.
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]


def needs_create_graph(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the loop must call `loss.backward(create_graph=True)` (Sophia-H's Hessian)."""
    if isinstance(optimizer, HybridOptimizer):
        return any(needs_create_graph(child) for child in optimizer.optimizers)
    return isinstance(optimizer, pytorch_optimizer.SophiaH)


# ---------------------------------------------------------------------------------------------
# Factory

Builder = Callable[[list[ParamGroup], OptimizerConfig, bool], torch.optim.Optimizer]


@dataclass(frozen=True)
class _Spec:
    """How to build one optimiser and which weight-decay modes it implements itself."""

    build: Builder  # (groups, config, decoupled) -> optimiser
    default_mode: WeightDecayMode
    native_modes: tuple[WeightDecayMode, ...]
    kernels: tuple[Implementation, ...] = ()  # "foreach"/"fused" switches it accepts


def _betas(config: OptimizerConfig, default: tuple[float, float]) -> tuple[float, float]:
    return config.betas or default


def _sgd(momentum: float, nesterov: bool = False) -> Builder:
    def build(groups: list[ParamGroup], config: OptimizerConfig, _: bool) -> torch.optim.Optimizer:
        mu = momentum if config.momentum is None or momentum == 0.0 else config.momentum
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=mu, nesterov=nesterov, **_kernel(config)
        )

    return build


def _adam(amsgrad: bool) -> Builder:
    def build(
        groups: list[ParamGroup], config: OptimizerConfig, decoupled: bool
    ) -> torch.optim.Optimizer:
        adam = torch.optim.AdamW if decoupled else torch.optim.Adam
        betas = _betas(config, (0.9, 0.999))
        eps = config.eps or 1e-8
        return adam(groups, lr=config.lr, betas=betas, eps=eps, amsgrad=amsgrad, **_kernel(config))

    return build


def _decoupled_flag(optimizer: type[torch.optim.Optimizer]) -> Builder:
    """NAdam and RAdam: Adam's arguments, with decoupled decay as a constructor flag."""

    def build(
        groups: list[ParamGroup], config: OptimizerConfig, decoupled: bool
    ) -> torch.optim.Optimizer:
        return optimizer(
            groups,  # type: ignore[call-arg]
            lr=config.lr,
            betas=_betas(config, (0.9, 0.999)),
            eps=config.eps or 1e-8,
            decoupled_weight_decay=decoupled,
            **_kernel(config),
        )

    return build


def _kernel(config: OptimizerConfig) -> dict[str, Any]:
    """torch's foreach/fused switches; validity is checked against `_Spec.kernels` up front."""
    return {
        "auto": {},
        "for_loop": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }[config.implementation]


def _muon(
    groups: list[ParamGroup], config: OptimizerConfig, decoupled: bool
) -> torch.optim.Optimizer:
    matrices = [g for g in groups if g["name"] == "muon"]
    others = [g for g in groups if g["name"] != "muon"]
    if not matrices:
        raise ConfigError(
            "optimizer.name: 'muon' needs 2-D weight matrices; this model has none "
            "(embeddings and muon_exclude matches go to AdamW) — use adamw"
        )
    muon = torch.optim.Muon(
        matrices,
        lr=config.lr,
        momentum=config.muon_momentum,
        nesterov=config.muon_nesterov,
        ns_steps=config.muon_ns_steps,
        adjust_lr_fn=config.muon_adjust_lr,
    )
    if not others:
        return HybridOptimizer([muon])
    return HybridOptimizer([muon, _adam(amsgrad=False)(others, config, decoupled)])


_SPECS: dict[str, _Spec] = {
    "sgd": _Spec(_sgd(0.0), "l2", ("l2",), ("foreach", "fused")),
    "momentum": _Spec(_sgd(0.9), "l2", ("l2",), ("foreach", "fused")),
    "nesterov": _Spec(_sgd(0.9, nesterov=True), "l2", ("l2",), ("foreach", "fused")),
    "adagrad": _Spec(
        lambda g, c, _: torch.optim.Adagrad(g, lr=c.lr, eps=c.eps or 1e-10, **_kernel(c)),
        "l2",
        ("l2",),
        ("foreach", "fused"),
    ),
    "rmsprop": _Spec(
        lambda g, c, _: torch.optim.RMSprop(
            g,
            lr=c.lr,
            alpha=_betas(c, (0.0, 0.99))[1],
            eps=c.eps or 1e-8,
            momentum=c.momentum or 0.0,
            **_kernel(c),
        ),
        "l2",
        ("l2",),
        ("foreach",),
    ),
    "adam": _Spec(_adam(amsgrad=False), "l2", ("l2", "decoupled"), ("foreach", "fused")),
    "adamw": _Spec(_adam(amsgrad=False), "decoupled", ("l2", "decoupled"), ("foreach", "fused")),
    "amsgrad": _Spec(_adam(amsgrad=True), "decoupled", ("l2", "decoupled"), ("foreach", "fused")),
    "nadam": _Spec(_decoupled_flag(torch.optim.NAdam), "l2", ("l2", "decoupled"), ("foreach",)),
    "radam": _Spec(_decoupled_flag(torch.optim.RAdam), "l2", ("l2", "decoupled"), ("foreach",)),
    "adafactor": _Spec(
        lambda g, c, _: torch.optim.Adafactor(g, lr=c.lr, eps=(c.eps, 1e-3), **_kernel(c)),
        "decoupled",
        ("decoupled",),
        ("foreach",),
    ),
    "muon": _Spec(_muon, "decoupled", ("decoupled",)),
    "lars": _Spec(
        lambda g, c, _: pytorch_optimizer.LARS(
            g, lr=c.lr, momentum=c.momentum if c.momentum is not None else 0.9, **_kernel(c)
        ),
        "l2",
        ("l2",),
        ("foreach",),
    ),
    "lamb": _Spec(
        lambda g, c, decoupled: pytorch_optimizer.Lamb(
            g,
            lr=c.lr,
            betas=_betas(c, (0.9, 0.999)),
            eps=c.eps or 1e-6,
            weight_decouple=decoupled,
            **_kernel(c),
        ),
        "decoupled",
        ("l2", "decoupled"),
        ("foreach",),
    ),
    "lion": _Spec(
        lambda g, c, decoupled: pytorch_optimizer.Lion(
            g, lr=c.lr, betas=_betas(c, (0.9, 0.99)), weight_decouple=decoupled, **_kernel(c)
        ),
        "decoupled",
        ("l2", "decoupled"),
        ("foreach",),
    ),
    "sophia": _Spec(
        lambda g, c, decoupled: pytorch_optimizer.SophiaH(
            g,
            lr=c.lr,
            betas=_betas(c, (0.96, 0.99)),
            eps=c.eps or 1e-12,
            weight_decouple=decoupled,
            p=c.sophia_rho,
            update_period=c.sophia_update_period,
            **_kernel(c),
        ),
        "decoupled",
        ("l2", "decoupled"),
        ("foreach",),
    ),
    "shampoo": _Spec(
        lambda g, c, decoupled: pytorch_optimizer.Shampoo(
            g,
            lr=c.lr,
            momentum=c.momentum or 0.0,
            weight_decouple=decoupled,
            preconditioning_compute_steps=c.precondition_every or 1,
        ),
        "l2",
        ("l2", "decoupled"),
    ),
    "soap": _Spec(
        lambda g, c, _: pytorch_optimizer.SOAP(
            g,
            lr=c.lr,
            betas=_betas(c, (0.95, 0.95)),
            eps=c.eps or 1e-8,
            precondition_frequency=c.precondition_every or 10,
        ),
        "decoupled",
        ("decoupled",),
    ),
}


def build_optimizer(
    model: nn.Module,
    config: OptimizerConfig,
    lr_scale: LrScale | None = None,
    *,
    independent_wd: bool = False,
) -> torch.optim.Optimizer:
    """Build the optimiser named by `config` over `param_groups(model, config, lr_scale,
    independent_wd=...)`.

    Weight decay in a mode the optimiser does not implement itself (e.g. decoupled SGD, L2
    Adafactor) is applied by a step pre-hook before the update, from the group's
    "manual_weight_decay" (its "weight_decay" is then 0). The hook ignores a `step(closure)`
    closure's fresh gradients, so closures are refused for such optimisers.
    """
    spec = _SPECS[config.name]
    if config.implementation in ("foreach", "fused") and config.implementation not in spec.kernels:
        supported = [name for name, s in _SPECS.items() if config.implementation in s.kernels]
        raise ConfigError(
            f"optimizer.implementation: {config.implementation!r} is not supported by "
            f"{config.name!r}; supported by: {', '.join(supported)}"
        )
    mode = config.weight_decay_mode or spec.default_mode
    groups = param_groups(model, config, lr_scale, independent_wd=independent_wd)
    manual = mode not in spec.native_modes
    for group in groups:
        group["weight_decay_mode"] = mode
        group["manual_weight_decay"] = group["weight_decay"] if manual else 0.0
        if manual:
            group["weight_decay"] = 0.0
    optimizer = spec.build(groups, config, mode == "decoupled")
    if needs_create_graph(optimizer):
        optimizer.register_step_pre_hook(_require_gradient_graph)
    if manual:
        children = optimizer.optimizers if isinstance(optimizer, HybridOptimizer) else [optimizer]
        for child in children:
            child.register_step_pre_hook(_manual_weight_decay)
    return optimizer


def _manual_weight_decay(
    optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Step pre-hook: weight decay for an optimiser lacking a native switch for the mode."""
    # args[0] is the optimiser itself; a closure comes next or as a keyword.
    if any(arg is not None for arg in args[1:]) or kwargs.get("closure") is not None:
        raise ValueError("step(closure) is not supported with manual weight decay; call step()")
    with torch.no_grad():
        for group in optimizer.param_groups:
            decay = group.get("manual_weight_decay", 0.0)
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params if p.grad is not None]
            if decay == 0.0 or not params:
                continue
            if group["weight_decay_mode"] == "decoupled":
                # Loshchilov & Hutter 2019, Alg. 1 line 9, scaled by lr as torch's AdamW does.
                torch._foreach_mul_(params, 1.0 - group["lr"] * decay)
            else:
                # L2 penalty wd/2 * ||p||^2 adds wd * p to the gradient.
                torch._foreach_add_(grads, params, alpha=decay)


def _require_gradient_graph(
    optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Step pre-hook for Sophia-H: turn autograd's cryptic error into the fix."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
    present = [grad for grad in grads if grad is not None]
    if present and not any(grad.requires_grad for grad in present):
        raise RuntimeError(
            "optimizer.name: 'sophia' estimates the Hessian from the gradient's graph; "
            "call loss.backward(create_graph=needs_create_graph(optimizer))"
        )
