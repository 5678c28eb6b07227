"""Optimiser factory: every optimiser trains and resumes exactly; groups, weight decay, errors."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.optim import (
    OPTIMIZER_NAMES,
    HybridOptimizer,
    OptimizerConfig,
    build_optimizer,
    needs_create_graph,
    param_groups,
)

# Sophia-H's Hessian needs backward(create_graph=True), which warns about a reference cycle.
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")

LossFn = Callable[[nn.Module], torch.Tensor]


class TinyLM(nn.Module):
    """Stand-in language model: embedding -> linear -> layernorm -> linear readout."""

    def __init__(self, vocab: int = 64, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.readout = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.readout(self.norm(torch.relu(self.hidden(self.embed(tokens)))))


def quadratic_problem(seed: int = 0) -> tuple[nn.Module, LossFn]:
    """Least squares through two linear maps; input scales 1..10 give a Hessian condition ~100."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 8, generator=generator) * torch.logspace(0, 1, 8)
    targets = inputs @ torch.randn(8, 8, generator=generator).T
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))
    return model, lambda m: nn.functional.mse_loss(m(inputs), targets)


def language_problem(seed: int = 0) -> tuple[nn.Module, LossFn]:
    """Next-token prediction on a fixed random byte sequence (vocabulary 64)."""
    tokens = torch.randint(0, 64, (257,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)
    model = TinyLM()
    return model, lambda m: nn.functional.cross_entropy(m(tokens[:-1]), tokens[1:])


# name -> (lr on the quadratic, lr on the language model), each picked from a 10x grid.
CONFORMANCE_LR: dict[str, tuple[float, float]] = {
    "sgd": (0.01, 0.3),
    "momentum": (0.001, 0.3),
    "nesterov": (0.001, 0.3),
    "adagrad": (0.1, 0.03),
    "rmsprop": (0.01, 0.01),
    "adam": (0.1, 0.03),
    "adamw": (0.1, 0.03),
    "amsgrad": (0.1, 0.03),
    "nadam": (0.1, 0.03),
    "radam": (0.03, 0.03),
    "adafactor": (0.1, 0.03),
    "muon": (0.1, 0.03),
    "lars": (3.0, 3.0),
    "lamb": (0.1, 0.03),
    "lion": (0.01, 0.01),
    "sophia": (1.0, 1.0),
    "shampoo": (0.1, 0.3),
    "soap": (0.1, 0.03),
}
# Short Hessian period so resumption crosses a Sophia-H Hessian update.
EXTRA: dict[str, dict[str, object]] = {"sophia": {"sophia_update_period": 2}}


def train(model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, steps: int) -> None:
    create_graph = needs_create_graph(optimizer)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model).backward(create_graph=create_graph)
        optimizer.step()


def test_every_optimiser_has_a_conformance_entry() -> None:
    assert set(CONFORMANCE_LR) == set(OPTIMIZER_NAMES)


@pytest.mark.parametrize("name", sorted(CONFORMANCE_LR))
def test_conformance_trains_and_resumes_bit_identically(name: str) -> None:
    quadratic_lr, language_lr = CONFORMANCE_LR[name]

    # (a) ill-conditioned quadratic: at least 10x lower loss in 100 steps
    model, loss_fn = quadratic_problem()
    config = OptimizerConfig(name=name, lr=quadratic_lr, **EXTRA.get(name, {}))
    before = loss_fn(model).item()
    train(model, loss_fn, build_optimizer(model, config), steps=100)
    assert loss_fn(model).item() < 0.1 * before

    # (b) tiny language model: loss (ln 64 = 4.16 at start) at least 40% lower in 60 steps
    model, loss_fn = language_problem()
    config = OptimizerConfig(name=name, lr=language_lr, weight_decay=0.01, **EXTRA.get(name, {}))
    before = loss_fn(model).item()
    train(model, loss_fn, build_optimizer(model, config), steps=60)
    assert loss_fn(model).item() < 0.6 * before

    # (c) 3 steps, save, rebuild, load, 3 more == 6 uninterrupted steps, bit for bit
    model, loss_fn = language_problem()
    train(model, loss_fn, build_optimizer(model, config), steps=6)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    model, loss_fn = language_problem()
    optimizer = build_optimizer(model, config)
    train(model, loss_fn, optimizer, steps=3)
    buffer = io.BytesIO()
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),  # Sophia-H draws Hutchinson probes from it
    }
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    model, loss_fn = language_problem(seed=1)  # different init: the checkpoint must restore it
    model.load_state_dict(loaded["model"])
    optimizer = build_optimizer(model, config)
    optimizer.load_state_dict(loaded["optimizer"])
    torch.set_rng_state(loaded["rng"])
    train(model, loss_fn, optimizer, steps=3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, uninterrupted[key]), key


def test_default_groups_exclude_biases_norms_and_embeddings_from_decay() -> None:
    groups = param_groups(TinyLM(), OptimizerConfig(weight_decay=0.1))
    assert [(g["name"], g["weight_decay"], g["param_names"]) for g in groups] == [
        ("decay", 0.1, ["hidden.weight", "readout.weight"]),
        (
            "no_decay",
            0.0,
            ["embed.weight", "hidden.bias", "norm.weight", "norm.bias", "readout.bias"],
        ),
    ]


def test_no_decay_rules_are_configurable() -> None:
    config = OptimizerConfig(weight_decay=0.1, no_decay_on=["1d"])
    names = {g["name"]: g["param_names"] for g in param_groups(TinyLM(), config)}
    assert names["decay"] == ["embed.weight", "hidden.weight", "readout.weight"]


def test_muon_groups_hidden_matrices_only_and_shares_lr_by_default() -> None:
    config = OptimizerConfig(name="muon", lr=0.02, weight_decay=0.1)
    groups = param_groups(TinyLM(), config)
    assert [(g["name"], g["lr"], g["param_names"]) for g in groups] == [
        ("muon", 0.02, ["hidden.weight"]),
        ("decay", 0.02, ["readout.weight"]),  # the readout goes to AdamW (muon_exclude)
        (
            "no_decay",
            0.02,
            ["embed.weight", "hidden.bias", "norm.weight", "norm.bias", "readout.bias"],
        ),
    ]
    optimizer = build_optimizer(TinyLM(), config.model_copy(update={"muon_adamw_lr": 0.001}))
    assert isinstance(optimizer, HybridOptimizer)
    assert [type(child).__name__ for child in optimizer.optimizers] == ["Muon", "AdamW"]
    assert [g["lr"] for g in optimizer.param_groups] == [0.02, 0.001, 0.001]


def test_lr_scale_splits_groups_and_scales_their_lr() -> None:
    def half_for_readout(name: str, _: nn.Parameter) -> float:
        return 0.5 if name.startswith("readout") else 1.0

    groups = param_groups(TinyLM(), OptimizerConfig(lr=0.1), lr_scale=half_for_readout)
    summary = [(g["name"], g["lr_scale"], g["lr"], g["param_names"]) for g in groups]
    assert summary == [
        ("decay", 1.0, 0.1, ["hidden.weight"]),
        ("decay", 0.5, 0.05, ["readout.weight"]),
        ("no_decay", 1.0, 0.1, ["embed.weight", "hidden.bias", "norm.weight", "norm.bias"]),
        ("no_decay", 0.5, 0.05, ["readout.bias"]),
    ]


def test_groups_skip_frozen_parameters_and_dedupe_tied_weights() -> None:
    model = TinyLM(vocab=32, width=32)
    model.readout.weight = model.embed.weight  # tied readout: one parameter, an embedding
    model.norm.requires_grad_(False)
    names = [n for g in param_groups(model, OptimizerConfig()) for n in g["param_names"]]
    assert names == ["hidden.weight", "embed.weight", "hidden.bias", "readout.bias"]


def one_weight(value: float) -> nn.Linear:
    layer = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        layer.weight.fill_(value)
    return layer


def one_step(name: str, mode: str, weight: float, grad: float, lr: float, decay: float) -> float:
    """Weight after one step on loss = grad * w, so that dloss/dw = grad."""
    layer = one_weight(weight)
    config = OptimizerConfig(name=name, lr=lr, weight_decay=decay, weight_decay_mode=mode)
    optimizer = build_optimizer(layer, config)
    (grad * layer.weight).sum().backward()
    optimizer.step()
    return layer.weight.item()


W, G, LR, WD = 2.0, 0.5, 0.1, 0.3


@pytest.mark.parametrize(
    ("name", "mode", "expected"),
    [
        # SGD, L2: w - lr * (g + wd * w)
        ("sgd", "l2", W - LR * (G + WD * W)),
        # SGD, decoupled (SGDW, Loshchilov & Hutter 2019 Alg. 1): w * (1 - lr * wd) - lr * g
        ("sgd", "decoupled", W * (1 - LR * WD) - LR * G),
        # Adam's first step is lr * g' / (|g'| + eps) with g' the gradient it sees.
        ("adam", "l2", W - LR * (G + WD * W) / (abs(G + WD * W) + 1e-8)),
        ("adam", "decoupled", W * (1 - LR * WD) - LR * G / (abs(G) + 1e-8)),
    ],
)
def test_l2_and_decoupled_weight_decay_follow_their_formulas(
    name: str, mode: str, expected: float
) -> None:
    assert one_step(name, mode, W, G, LR, WD) == pytest.approx(expected, rel=1e-12)


def test_weight_decay_mode_defaults_to_the_optimisers_convention() -> None:
    adam = build_optimizer(one_weight(W), OptimizerConfig(name="adam", weight_decay=WD))
    adamw = build_optimizer(one_weight(W), OptimizerConfig(name="adamw", weight_decay=WD))
    assert type(adam) is torch.optim.Adam and type(adamw) is torch.optim.AdamW
    assert adam.param_groups[0]["weight_decay_mode"] == "l2"
    assert adamw.param_groups[0]["weight_decay_mode"] == "decoupled"


def test_manual_l2_decay_equals_the_penalty_in_the_loss() -> None:
    # Adafactor has only decoupled decay in torch: L2 comes from our step pre-hook, which must
    # equal adding wd/2 * ||w||^2 to the loss.
    model, loss_fn = quadratic_problem()
    optimizer = build_optimizer(
        model, OptimizerConfig(name="adafactor", lr=0.01, weight_decay=WD, weight_decay_mode="l2")
    )
    train(model, loss_fn, optimizer, steps=3)

    reference, loss_fn = quadratic_problem()
    optimizer = build_optimizer(reference, OptimizerConfig(name="adafactor", lr=0.01))
    weights = [p for p in reference.parameters() if p.ndim == 2]  # the decayed ones

    def penalised(m: nn.Module) -> torch.Tensor:
        return loss_fn(m) + WD / 2 * sum((w**2).sum() for w in weights)

    train(reference, penalised, optimizer, steps=3)
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_lion_steps_match_the_published_rule() -> None:
    # Chen et al. 2023, Alg. 2: c = b1 m + (1-b1) g; w -= lr (sign(c) + wd w); m = b2 m + (1-b2) g
    b1, b2, lr, wd = 0.9, 0.99, 0.1, 0.3
    layer = one_weight(W)
    config = OptimizerConfig(name="lion", lr=lr, betas=(b1, b2), weight_decay=wd)
    optimizer = build_optimizer(layer, config)
    w, m = W, 0.0
    for grad in (0.5, -2.0):
        optimizer.zero_grad()
        (grad * layer.weight).sum().backward()
        optimizer.step()
        c = b1 * m + (1 - b1) * grad
        w, m = w - lr * ((c > 0) - (c < 0) + wd * w), b2 * m + (1 - b2) * grad
        assert layer.weight.item() == pytest.approx(w, rel=1e-12)


def test_only_sophia_needs_create_graph() -> None:
    model = TinyLM()
    assert needs_create_graph(build_optimizer(model, OptimizerConfig(name="sophia")))
    assert not needs_create_graph(build_optimizer(model, OptimizerConfig(name="adamw")))
    assert not needs_create_graph(build_optimizer(model, OptimizerConfig(name="muon")))


def test_sophia_without_create_graph_names_the_fix() -> None:
    model, loss_fn = language_problem()
    optimizer = build_optimizer(model, OptimizerConfig(name="sophia"))
    loss_fn(model).backward()
    with pytest.raises(RuntimeError, match="create_graph=needs_create_graph"):
        optimizer.step()


def test_fused_and_foreach_reach_torch() -> None:
    fused = build_optimizer(TinyLM(), OptimizerConfig(name="adamw", implementation="fused"))
    looped = build_optimizer(TinyLM(), OptimizerConfig(name="sgd", implementation="for_loop"))
    assert fused.param_groups[0]["fused"] is True
    assert looped.param_groups[0]["foreach"] is False


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as error:
        OptimizerConfig(name="adamx")
    message = str(error.value)
    assert message.startswith("optimizer.name: 'adamx' is not one of: sgd, momentum,")
    assert all(name in message for name in CONFORMANCE_LR)
    assert "\n" not in message


def test_muon_without_matrices_says_so() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(ConfigError, match="'muon' needs 2-D weight matrices.*use adamw"):
        build_optimizer(model, OptimizerConfig(name="muon"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lr": -0.1}, "optimizer.lr: -0.1 is not allowed: input should be greater than 0"),
        (
            {"weight_decay_mode": "l1"},
            "optimizer.weight_decay_mode: 'l1' is not one of: decoupled, l2",
        ),
        ({"no_decay_on": ["bias", "gain"]}, "optimizer.no_decay_on.1: 'gain' is not one of:"),
        ({"betas": (0.9, 1.5)}, "optimizer.betas.1: 1.5 is not allowed"),
        ({"momentum_": 0.9}, "optimizer.momentum_: unknown field; allowed: name, lr,"),
    ],
)
def test_config_mistakes_are_one_line_config_errors(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        OptimizerConfig(**fields)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_unsupported_kernel_names_where_it_is_supported() -> None:
    with pytest.raises(
        ConfigError, match="optimizer.implementation: 'fused' is not supported by 'lion'"
    ):
        build_optimizer(TinyLM(), OptimizerConfig(name="lion", implementation="fused"))
