"""muP and depth scaling (trainer.parametrization): equal to SP at the base width and depth, the
Tensor Programs V rules at other widths, the spectral rule for Muon, and one-line errors."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.config import TrainConfig, parse_config
from trainer.errors import ConfigError
from trainer.loop import train
from trainer.models import build_model
from trainer.optim import build_optimizer
from trainer.parametrization import Parametrized, parametrize


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus-cache")


def gpt(cache: Path | None = None, width: int = 32, **extra: Any) -> TrainConfig:
    raw: dict[str, Any] = {
        "steps": 6,
        "log_every": 1,
        "eval_every": 3,
        "eval_batches": 2,
        "checkpoint_every": 0,
        "model": {"n_layer": 2, "n_head": 2, "d_model": width, "tie_embeddings": False},
        "data": {"block_size": 32, "batch_size": 4, "max_bytes": 200_000},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.1},
        "tracking": {"enabled": False},
    }
    if cache is not None:
        raw["data"]["cache_dir"] = str(cache)
    for key, value in extra.items():
        section, _, field = key.partition("__")
        raw.setdefault(section, {})[field] = value
    return parse_config(raw)


def mlp(width: int = 32, **extra: Any) -> TrainConfig:
    raw: dict[str, Any] = {
        "steps": 6,
        "log_every": 1,
        "eval_every": 3,
        "checkpoint_every": 0,
        "model": {"kind": "mlp", "width": width, "depth": 3, "residual": True},
        "data": {"kind": "digits", "batch_size": 16},
        "optimizer": {"lr": 1e-2, "weight_decay": 0.1},
        "tracking": {"enabled": False},
    }
    for key, value in extra.items():
        section, _, field = key.partition("__")
        raw.setdefault(section, {})[field] = value
    return parse_config(raw)


def built(config: TrainConfig, vocab: int = 256) -> tuple[torch.nn.Module, Parametrized]:
    model = build_model(
        config.model, vocab_size=vocab, input_shape=(1, 8, 8), num_classes=10, seed=0
    )
    return model, parametrize(model, config.parametrization, config.optimizer)


def curves(config: TrainConfig, out: Path) -> list[float]:
    result = train(config, out_dir=out)
    return [loss for _, loss in result.train_curve + result.val_curve]


MUP = {"parametrization__name": "mup", "parametrization__base_width": 32}


@pytest.mark.parametrize("readout_init", ["tp5", "zero"])
def test_mup_at_the_base_width_trains_exactly_as_sp(
    cache: Path, tmp_path: Path, readout_init: str
) -> None:
    sp = gpt(cache, model__zero_init_readout=readout_init == "zero")
    mup = gpt(cache, **MUP, parametrization__readout_init=readout_init)
    assert curves(mup, tmp_path / "mup") == curves(sp, tmp_path / "sp")


def test_mup_at_the_base_width_and_depth_trains_the_mlp_exactly_as_sp(tmp_path: Path) -> None:
    sp = mlp(model__zero_init_readout=True)
    mup = mlp(**MUP, parametrization__base_depth=3)
    assert curves(mup, tmp_path / "mup") == curves(sp, tmp_path / "sp")


def test_adam_rules_at_four_times_the_base_width() -> None:
    sp_model, _ = built(gpt(width=128))
    model, plan = built(gpt(width=128, **MUP, parametrization__readout_init="tp5"))
    assert plan.width_mult == 4.0
    roles = model.parameter_roles()
    sp_params, params = dict(sp_model.named_parameters()), dict(model.named_parameters())
    for name, role in roles.items():
        ratio = params[name].std().item() / max(sp_params[name].std().item(), 1e-12)
        expected = {"hidden": 0.5, "input": 1.0, "readout": 1.0}.get(role)
        if expected is not None:  # init: hidden std x m^-1/2; readout (x 1/m in the forward) and
            # input unchanged
            assert ratio == pytest.approx(expected, rel=1e-5), name
    assert model.logit_multiplier == 0.25
    assert model.blocks[0].attn.scale == pytest.approx(math.sqrt(16) / 64)  # 1/head_dim form
    optimizer = build_optimizer(
        model, gpt(width=128, **MUP).optimizer, plan.lr_scale, independent_wd=plan.independent_wd
    )
    for group in optimizer.param_groups:
        kinds = {roles[name] for name in group["param_names"]}
        if kinds == {"hidden"}:
            assert group["lr"] == pytest.approx(3e-3 / 4)
            assert group["weight_decay"] == pytest.approx(0.1 * 4)  # lr x wd held
        else:
            assert group["lr"] == pytest.approx(3e-3) and "hidden" not in kinds


def test_fan_in_schemes_keep_the_base_widths_embedding_and_logit_scale() -> None:
    sp_model, _ = built(gpt(width=128, model__init="lecun"))
    model, _ = built(
        gpt(width=128, model__init="lecun", **MUP, parametrization__readout_init="tp5")
    )
    sp_params, params = dict(sp_model.named_parameters()), dict(model.named_parameters())
    for name, role in model.parameter_roles().items():
        expected = {"hidden": 1.0, "input": 2.0, "readout": 1.0}.get(role)
        if expected is not None:  # lecun hidden is already 1/fan_in; tables back to 1/sqrt(32)
            ratio = params[name].std().item() / sp_params[name].std().item()
            assert ratio == pytest.approx(expected, rel=1e-5), name
    assert params["wte.weight"].std().item() == pytest.approx(32**-0.5, rel=0.05)


def test_an_mlp_input_layer_as_wide_as_its_inputs_is_no_embedding_table() -> None:
    # digits have 64 features: at width 64 the input Linear is (64, 64), yet not a table
    sp_model, _ = built(mlp(width=64, model__init="lecun"))
    model, _ = built(mlp(width=64, model__init="lecun", **MUP))
    sp_params, params = dict(sp_model.named_parameters()), dict(model.named_parameters())
    for name, role in model.parameter_roles().items():
        if role in ("input", "hidden"):
            assert torch.equal(params[name], sp_params[name]), name


@pytest.mark.parametrize("readout_init", ["tp5", "zero"])
def test_the_readouts_start_sets_the_initial_logits(readout_init: str) -> None:
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    spread = {}
    for width in (32, 256):
        model, _ = built(gpt(width=width, **MUP, parametrization__readout_init=readout_init))
        with torch.no_grad():
            spread[width] = model(tokens)[0].std().item()
    if readout_init == "tp5":  # shrink as m^-1/2 (8x: 1/2.83)
        assert spread[256] == pytest.approx(spread[32] / 8**0.5, rel=0.15)
    else:
        assert spread[32] == spread[256] == 0.0


def test_coupled_weight_decay_leaves_the_coefficient() -> None:
    config = gpt(width=64, **MUP, parametrization__weight_decay="coupled")
    model, plan = built(config)
    groups = build_optimizer(
        model, config.optimizer, plan.lr_scale, independent_wd=plan.independent_wd
    ).param_groups
    assert {g["weight_decay"] for g in groups} <= {0.0, 0.1}


def test_sgd_rules_scale_input_readout_and_vectors_by_m() -> None:
    config = mlp(width=64, **MUP, optimizer__name="momentum")
    model, plan = built(config)
    scales = plan.lr_scales
    assert scales["hidden_layers.0.linear.weight"] == 1.0
    assert scales["input_layer.linear.weight"] == 2.0
    assert scales["readout.weight"] == 2.0
    assert scales["hidden_layers.0.linear.bias"] == 2.0  # width-sized
    assert scales["readout.bias"] == 1.0  # one per class: does not grow


@pytest.mark.parametrize(("adjust", "hidden"), [("original", 1.0), ("match_rms_adamw", 0.5)])
def test_muon_matrices_follow_the_spectral_condition(adjust: str, hidden: float) -> None:
    config = gpt(width=128, **MUP, optimizer__name="muon", optimizer__muon_adjust_lr=adjust)
    _, plan = built(config)
    # torch Muon multiplies by sqrt(max(1, out/in)) (original) or 0.2 sqrt(max(out, in)):
    # the spectral norm of the update must not change with width for a square-ish matrix
    assert plan.lr_scales["blocks.0.attn.c_proj.weight"] == pytest.approx(hidden)
    assert plan.lr_scales["lm_head.weight"] == 1.0  # AdamW part: Adam rules
    assert plan.lr_scales["wte.weight"] == 1.0


@pytest.mark.parametrize(("alpha", "branch", "lr"), [(1.0, 0.5, 1.0), (0.5, 2**-0.5, 2**-0.5)])
def test_depth_scaling_multiplies_branches_and_hidden_lr(
    alpha: float, branch: float, lr: float
) -> None:
    config = gpt(
        width=32,
        **MUP,
        parametrization__base_depth=2,
        parametrization__depth_alpha=alpha,
        model__n_layer=4,
    )
    sp_model, _ = built(gpt(width=32, model__n_layer=4))
    model, plan = built(config)
    assert [block.residual_multiplier for block in model.blocks] == [pytest.approx(branch)] * 4
    assert plan.lr_scales["blocks.3.mlp.c_fc.weight"] == pytest.approx(lr)
    # the residual projections keep the base depth's std / sqrt(2 * 2), not std / sqrt(2 * 4)
    name = "blocks.1.attn.c_proj.weight"
    ratio = (
        dict(model.named_parameters())[name].std() / dict(sp_model.named_parameters())[name].std()
    )
    assert ratio.item() == pytest.approx(math.sqrt(2), rel=1e-5)


def test_the_multipliers_survive_pickling_and_the_state_dict() -> None:
    model, _ = built(gpt(width=64, **MUP))
    x = torch.randint(0, 256, (2, 16))
    copy = pickle.loads(pickle.dumps(model))
    assert torch.equal(copy(x)[0], model(x)[0]) and copy.logit_multiplier == 0.5
    again, _ = built(gpt(width=64, **MUP))
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(x)[0], model(x)[0])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"parametrization__name": "mup"}, "parametrization.base_width: missing"),
        ({**MUP, "parametrization__base_width": 64}, "parametrization.base_width: 64 is larger"),
        ({**MUP, "parametrization__base_width": 31}, "not divisible by model.n_head 2"),
        ({**MUP, "model__tie_embeddings": True}, "set model.tie_embeddings: false"),
        ({**MUP, "optimizer__name": "lamb"}, "no rules for optimizer.name lamb"),
        ({**MUP, "parametrization__base_depth": 3}, "parametrization.base_depth: 3 is larger"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        gpt(**extra)
    assert "\n" not in str(caught.value)


def test_mup_on_a_cnn_or_an_mlp_without_skips_is_refused() -> None:
    with pytest.raises(ConfigError, match="mup has rules for model.kind gpt and mlp, not cnn"):
        parse_config(
            {
                "model": {"kind": "cnn"},
                "data": {"kind": "digits"},
                "parametrization": {"name": "mup", "base_width": 8},
            }
        )
    with pytest.raises(ConfigError, match="set model.residual: true"):
        mlp(**MUP, model__residual=False, parametrization__base_depth=2)
