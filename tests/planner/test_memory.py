"""The memory and parallelism plan against its sources' published numbers, and a GPT shape for
a parameter count against GPT-3's own shapes."""

from __future__ import annotations

import numpy as np
import pytest

from planner.errors import InputError
from planner.memory import (
    AUTOCAST,
    MIXED,
    Transformer,
    activation_bytes,
    allreduce_seconds,
    model_state_bytes,
    pipeline_bubble,
    plan_splits,
    suggest_split,
    zero_table,
)
from planner.shape import shape_for


def test_zero_figure_1_for_a_75b_model_on_64_gpus() -> None:
    # Rajbhandari et al. 2020, Fig. 1: Psi = 7.5B, N_d = 64, K = 12 (mixed-precision Adam)
    totals = [row["total"] for row in zero_table(7.5e9, 64, MIXED)]
    assert totals == pytest.approx([120.0, 31.4, 16.6, 1.9], abs=0.05)


def test_model_states_shard_what_each_stage_says() -> None:
    ddp = model_state_bytes(1000, 0, 4, AUTOCAST)
    assert (ddp["params"], ddp["grads"], ddp["optimizer"]) == (4000, 4000, 8000)
    assert model_state_bytes(1000, 1, 4, AUTOCAST)["optimizer"] == 2000
    assert model_state_bytes(1000, 2, 4, AUTOCAST)["grads"] == 1000
    assert model_state_bytes(1000, 3, 4, AUTOCAST)["total"] == 16000 / 4
    with pytest.raises(InputError, match="zero_stage: 4 is not one of 0, 1, 2, 3"):
        model_state_bytes(1000, 4, 4)


def test_activations_follow_korthikanti_et_al() -> None:
    # eq. 1 (no parallelism): s b h (34 + 5 a s / h) bytes per layer, 16-bit values
    shape = Transformer(n_layer=2, d_model=1024, n_head=16, seq_len=2048, vocab_size=50304)
    s, b, h, a = 2048, 4, 1024, 16
    eager = activation_bytes(shape, b, flash_attention=False)
    assert eager == pytest.approx(2 * s * b * h * (34 + 5 * a * s / h))
    assert activation_bytes(shape, b) == pytest.approx(2 * s * b * h * 34)  # no score matrix
    # eq. 5 (tensor + sequence parallel): both terms over t; full recomputation: 2 s b h
    assert activation_bytes(shape, b, tensor_parallel=8, flash_attention=False) == eager / 8
    assert activation_bytes(shape, b, checkpointing=True) == pytest.approx(2 * 2 * s * b * h)
    assert activation_bytes(shape, b, bytes_per_value=4) == 2 * activation_bytes(shape, b)


def test_bubble_and_allreduce() -> None:
    assert pipeline_bubble(8, 8) == pytest.approx(7 / 15)  # (p - 1) / (m + p - 1)
    assert pipeline_bubble(1, 8) == 0
    assert allreduce_seconds(1e9, 2, 1.0) == pytest.approx(1.0)  # 2 (N-1)/N of 1 GB at 1 GB/s
    assert allreduce_seconds(1e9, 1, 1.0) == 0


def test_a_7b_model_on_64_h100s_needs_zero_1_and_a_175b_one_model_parallelism() -> None:
    seven = shape_for(6.4e9, seq_len=2048)
    split = suggest_split(plan_splits(seven, gpus=64, batch_sequences=512), 64, "h100")
    assert (split.data, split.tensor, split.pipeline, split.zero_stage) == (64, 1, 1, 1)
    assert split.total_gb < 0.9 * 80 and not split.checkpointing
    assert split.allreduce_link == "network"  # 64 data-parallel ranks span 8 nodes
    big = shape_for(1.7e11, seq_len=2048)
    split = suggest_split(plan_splits(big, gpus=1024, batch_sequences=1536), 1024, "h100")
    assert split.fits and split.tensor * split.pipeline > 1


def test_a_model_that_fits_no_split_is_one_line() -> None:
    big = shape_for(1.7e11, seq_len=2048)
    with pytest.raises(InputError, match=r"^--gpus: the model fits no split of 2 h100 GPUs"):
        suggest_split(plan_splits(big, gpus=2, batch_sequences=16), 2, "h100")
    with pytest.raises(InputError, match=r"^--gpu: 'tpu-v9' has no memory figure"):
        plan_splits(big, gpus=8, gpu="tpu-v9", batch_sequences=16)


@pytest.mark.parametrize(
    ("n", "layers", "width", "heads"),
    [(85e6, 12, 768, 12), (6.4e9, 32, 4096, 32), (1.7e11, 96, 12288, 96)],
)
def test_shapes_of_gpt3_sizes(n: float, layers: int, width: int, heads: int) -> None:
    # Brown et al. 2020, Table 2.1 (GPT-3 Small, 6.7B, 175B), by non-embedding parameters
    shape = shape_for(n)
    assert (shape.n_layer, shape.d_model, shape.n_head) == (layers, width, heads)


def test_every_shape_is_near_its_count_and_in_kaplans_flat_region() -> None:
    for n in np.logspace(6, 11.3, 300):
        shape = shape_for(n)
        assert abs(shape.n_params_non_embedding / n - 1) < 0.09, n
        assert 32 <= shape.d_model / shape.n_layer <= 256, n
        assert shape.d_model % shape.n_head == 0
    with pytest.raises(InputError, match="below the smallest GPT"):
        shape_for(100)


def test_flop_params_is_the_trainer_s_flops_per_token_over_6() -> None:
    import torch

    from planner.shape import flop_params, shape_for_flop_params
    from trainer.models import build_model
    from trainer.models.gpt import GPTConfig

    for n_layer, d_model, seq_len in ((1, 32, 128), (2, 96, 128), (12, 768, 1024)):
        shape = Transformer(n_layer, d_model, d_model // 16, seq_len, 256)
        config = GPTConfig(n_layer=n_layer, d_model=d_model, n_head=d_model // 16,
                           block_size=seq_len)  # fmt: skip
        with torch.device("meta"):
            model = build_model(config, vocab_size=256)
        # norms and biases are all the planner leaves out
        assert flop_params(shape) == pytest.approx(model.flops_per_token(seq_len) / 6, rel=0.01)
    found = shape_for_flop_params(2.0e5, seq_len=128)
    assert 0.8 < flop_params(found) / 2.0e5 < 1.25
    with pytest.raises(InputError, match="FLOP-equivalent parameters is below"):
        shape_for_flop_params(100, seq_len=128)
