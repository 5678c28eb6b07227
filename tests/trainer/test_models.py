"""Models: exact sizes and FLOPs, shapes, causality, initialisation, checkpointing."""

from __future__ import annotations

import math
from typing import Literal

import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from trainer.errors import ConfigError
from trainer.models import (
    CNN,
    GPT,
    MLP,
    CNNConfig,
    GPTConfig,
    MLPConfig,
    Model,
    ModelConfig,
    build_model,
)
from trainer.models.init import InitScheme, fan_in

VOCAB = 256


def for_digits(config: GPTConfig | MLPConfig | CNNConfig, seed: int | None = None) -> Model:
    return build_model(config, input_shape=(1, 8, 8), num_classes=10, seed=seed)


def small_gpt(seed: int = 0, **overrides: object) -> GPT:
    fields: dict[str, object] = {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 16}
    fields.update(overrides)
    model = build_model(GPTConfig.model_validate(fields), vocab_size=VOCAB, seed=seed)
    assert isinstance(model, GPT)
    return model


def gpt_param_formula(
    d: int, layers: int, vocab: int, block: int, bias: bool, tied: bool, learned: bool
) -> tuple[int, int]:
    """(all, non-embedding) parameters of a pre-norm LayerNorm GPT, counted by hand."""
    b = 1 if bias else 0
    norm = d + b * d  # LayerNorm gain (+ shift)
    attention = (3 * d * d + b * 3 * d) + (d * d + b * d)  # c_attn, c_proj
    feed_forward = (d * 4 * d + b * 4 * d) + (4 * d * d + b * d)  # c_fc, c_proj
    blocks = layers * (2 * norm + attention + feed_forward)
    non_embedding = blocks + norm  # + final norm
    embeddings = vocab * d + (block * d if learned else 0) + (0 if tied else vocab * d)
    return non_embedding + embeddings, non_embedding


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_gpt_param_count_matches_hand_formula(bias: bool, tied: bool, position: str) -> None:
    model = small_gpt(bias=bias, tie_embeddings=tied, position=position)
    total, non_embedding = gpt_param_formula(32, 2, VOCAB, 16, bias, tied, position == "learned")
    assert model.num_params() == total
    assert model.num_params(include_embeddings=False) == non_embedding


def test_gpt_param_count_rmsnorm_and_post_norm() -> None:
    # RMSNorm has a gain only; post-norm has no final norm
    model = small_gpt(norm="rmsnorm", norm_position="post", bias=False)
    _, non_embedding_layernorm = gpt_param_formula(32, 2, VOCAB, 16, False, True, True)
    assert model.num_params(include_embeddings=False) == non_embedding_layernorm - 32


def test_flops_per_token_is_6n_plus_attention_term() -> None:
    model = small_gpt()
    n = model.num_params(include_embeddings=False)
    assert model.flops_per_token() == 6 * n + 12 * 2 * 32 * 16
    assert model.flops_per_token(seq_len=8) == 6 * n + 12 * 2 * 32 * 8


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_gpt_forward_shapes_and_loss(norm: str, norm_position: str, position: str) -> None:
    model = small_gpt(norm=norm, norm_position=norm_position, position=position)
    idx = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, VOCAB)
    assert loss is not None and loss.shape == ()
    assert abs(loss.item() - math.log(VOCAB)) < 1.5  # near-uniform at initialisation
    shorter, no_loss = model(idx[:, :5])
    assert shorter.shape == (3, 5, VOCAB) and no_loss is None


def test_label_smoothing_changes_the_loss() -> None:
    model = small_gpt()
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    _, plain = model(idx, idx)
    _, smoothed = model(idx, idx, label_smoothing=0.1)
    assert plain is not None and smoothed is not None
    assert not torch.isclose(plain, smoothed)


def test_sequence_longer_than_block_size_names_the_fields() -> None:
    with pytest.raises(ConfigError, match="model.block_size"):
        small_gpt()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("position", ["learned", "rotary"])
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_gpt_is_causal(position: str, norm_position: str) -> None:
    model = small_gpt(position=position, norm_position=norm_position).eval()
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % VOCAB
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_gpt_trains(position: str) -> None:
    model = small_gpt(position=position)
    # a repeating sequence is learnable only by attending to earlier positions
    pattern = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(1))
    tokens = pattern.repeat(1, 4)[:, :17]
    x, y = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        _, loss = model(x, y)
        assert loss is not None
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_rotary_positions_use_relative_offsets() -> None:
    # RoPE: the score between q at position m and k at position n depends only on m - n
    from trainer.models.gpt import apply_rotary, rotary_tables

    cos, sin = rotary_tables(8, 16)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> torch.Tensor:
        return (apply_rotary(q, cos[m], sin[m]) * apply_rotary(k, cos[n], sin[n])).sum()

    torch.testing.assert_close(score(5, 2), score(12, 9))


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for flag in (False, True):
        model = small_gpt(seed=3, activation_checkpointing=flag, dropout=0.1)
        torch.manual_seed(7)  # the same dropout masks; checkpointing replays the RNG state
        _, loss = model(idx, idx)
        assert loss is not None
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", "none"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "silu"])
def test_mlp_forward_shapes(
    norm: Literal["batchnorm", "layernorm", "none"],
    residual: bool,
    activation: Literal["relu", "gelu", "tanh", "silu"],
) -> None:
    config = MLPConfig(depth=3, width=16, norm=norm, residual=residual, activation=activation)
    model = for_digits(config)
    assert isinstance(model, MLP)
    logits, loss = model(torch.rand(5, 1, 8, 8), torch.arange(5))
    assert logits.shape == (5, 10) and loss is not None and torch.isfinite(loss)


def test_mlp_param_count() -> None:
    model = for_digits(MLPConfig(depth=3, width=16))
    expected = (64 * 16 + 16) + 2 * (16 * 16 + 16) + (16 * 10 + 10)
    assert model.num_params() == expected
    assert model.num_params(include_embeddings=False) == expected - 64 * 16


@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm", "none"])
def test_cnn_forward_shapes(norm: Literal["batchnorm", "groupnorm", "none"]) -> None:
    model = for_digits(CNNConfig(channels=[8, 16, 24], norm=norm, dropout=0.1))
    assert isinstance(model, CNN)
    logits, loss = model(torch.rand(5, 1, 8, 8), torch.arange(5))
    assert logits.shape == (5, 10) and loss is not None and torch.isfinite(loss)
    assert model.num_params() < 10_000  # small enough for a CPU study


def test_model_config_is_discriminated_by_kind() -> None:
    adapter: TypeAdapter[GPTConfig | MLPConfig | CNNConfig] = TypeAdapter(ModelConfig)
    assert isinstance(adapter.validate_python({"kind": "cnn", "channels": [4]}), CNNConfig)
    assert isinstance(adapter.validate_python({"kind": "gpt"}), GPTConfig)
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "gpt", "n_layers": 2})  # unknown keys are errors


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        ({"d_model": 30, "n_head": 4}, "model.n_head"),
        ({"d_model": 12, "n_head": 4, "position": "rotary"}, "model.n_head"),
        ({"tie_embeddings": True, "zero_init_readout": True}, "model.zero_init_readout"),
    ],
)
def test_gpt_config_errors_name_the_field(fields: dict[str, object], field_name: str) -> None:
    with pytest.raises(ValidationError, match=field_name):
        GPTConfig.model_validate(fields)


def test_build_model_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="model.kind"):
        build_model(GPTConfig(), input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ConfigError, match="model.kind"):
        build_model(MLPConfig(), vocab_size=256)
    with pytest.raises(ConfigError, match="model.input_dim: 32"):
        for_digits(MLPConfig(input_dim=32))


def test_seeded_build_ignores_global_random_state() -> None:
    torch.manual_seed(0)
    first = small_gpt(seed=5)
    torch.manual_seed(1)
    second = small_gpt(seed=5)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def _expected_std(scheme: str, weight: torch.Tensor) -> float:
    fan_out = weight.shape[0]
    return {
        "normal": 0.02,
        "xavier": math.sqrt(2.0 / (fan_in(weight) + fan_out)),  # Glorot & Bengio 2010
        "he": math.sqrt(2.0 / fan_in(weight)),  # He et al. 2015
        "lecun": math.sqrt(1.0 / fan_in(weight)),  # LeCun et al. 1998
        "orthogonal": math.sqrt(1.0 / fan_in(weight)),  # unit-norm rows of length fan_in
    }[scheme]


@pytest.mark.parametrize("scheme", ["normal", "xavier", "he", "lecun", "orthogonal"])
def test_init_schemes_give_the_expected_std(scheme: InitScheme) -> None:
    model = for_digits(MLPConfig(depth=2, width=512, init=scheme), seed=0)
    params = dict(model.named_parameters())
    weight = params["hidden_layers.0.linear.weight"]  # 512 x 512
    assert weight.std().item() == pytest.approx(_expected_std(scheme, weight), rel=0.1)
    assert torch.count_nonzero(params["hidden_layers.0.linear.bias"]) == 0
    if scheme == "orthogonal":
        product = weight @ weight.T
        torch.testing.assert_close(product, torch.eye(512), atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheme", ["he", "lecun"])
def test_init_schemes_use_the_conv_fan_in(scheme: InitScheme) -> None:
    model = for_digits(CNNConfig(channels=[64, 64], init=scheme), seed=0)
    kernel = dict(model.named_parameters())["stages.1.conv.weight"]  # 64 * 3 * 3 inputs
    assert fan_in(kernel) == 576
    assert kernel.std().item() == pytest.approx(_expected_std(scheme, kernel), rel=0.1)


def test_gpt_residual_projections_are_scaled_by_depth() -> None:
    layers = 4
    model = small_gpt(n_layer=layers, d_model=128, n_head=4)
    params = dict(model.named_parameters())
    for i in range(layers):
        # GPT-2 (Radford et al. 2019): 0.02 / sqrt(2 * n_layer) on residual projections
        for name in (f"blocks.{i}.attn.c_proj.weight", f"blocks.{i}.mlp.c_proj.weight"):
            scaled = 0.02 / math.sqrt(2 * layers)
            assert params[name].std().item() == pytest.approx(scaled, rel=0.05)
        unscaled = params[f"blocks.{i}.attn.c_attn.weight"].std().item()
        assert unscaled == pytest.approx(0.02, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_zero_init_readout() -> None:
    gpt = small_gpt(tie_embeddings=False, zero_init_readout=True)
    assert torch.count_nonzero(gpt.lm_head.weight) == 0
    assert torch.count_nonzero(gpt.wte.weight) > 0
    mlp = for_digits(MLPConfig(zero_init_readout=True))
    cnn = for_digits(CNNConfig(zero_init_readout=True))
    for model in (mlp, cnn):
        assert isinstance(model, MLP | CNN)
        assert torch.count_nonzero(model.readout.weight) == 0
        logits, _ = model(torch.rand(3, 1, 8, 8))
        assert torch.count_nonzero(logits) == 0  # uniform predictions


def test_parameter_roles() -> None:
    tied = small_gpt().parameter_roles()
    assert tied["wte.weight"] == "input" and tied["wpe.weight"] == "input"
    assert "lm_head.weight" not in tied  # the shared matrix is listed once
    assert tied["blocks.0.attn.c_attn.weight"] == "hidden"
    assert tied["blocks.1.mlp.c_proj.weight"] == "hidden"
    assert tied["ln_f.weight"] == "vector"
    untied = small_gpt(tie_embeddings=False, bias=True).parameter_roles()
    assert untied["lm_head.weight"] == "readout"
    assert untied["blocks.0.attn.c_attn.bias"] == "vector"
    model = small_gpt()
    assert set(tied) == {name for name, _ in model.named_parameters()}
    cnn_roles = for_digits(CNNConfig(channels=[4, 8])).parameter_roles()
    assert cnn_roles["stages.0.conv.weight"] == "input"
    assert cnn_roles["stages.1.conv.weight"] == "hidden"
    assert cnn_roles["readout.weight"] == "readout"
