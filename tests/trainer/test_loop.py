"""The training loop: it learns, records the documented metrics, accumulates gradients exactly,
handles NaN, stops early or on a callback, and writes the documented run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.config import TrainConfig, parse_config
from trainer.data import DigitsData
from trainer.errors import ConfigError
from trainer.loop import RunResult, StepInfo, StopTraining, forward_backward, train
from trainer.models import GPTConfig, build_model
from trainer.precision import build_precision


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus-cache")


def tiny_gpt(cache: Path, **overrides: Any) -> TrainConfig:
    """A 35k-parameter GPT on the first 300 kB of the standard library, tracking off."""
    raw: dict[str, Any] = {
        "steps": 20,
        "log_every": 5,
        "eval_every": 10,
        "eval_batches": 2,
        "checkpoint_every": 0,
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32},
        "data": {"block_size": 64, "batch_size": 8, "max_bytes": 300_000, "cache_dir": str(cache)},
        "optimizer": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "tracking": {"enabled": False},
    }
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_config(raw)


def digits(**overrides: Any) -> TrainConfig:
    raw: dict[str, Any] = {
        "steps": 30,
        "log_every": 5,
        "eval_every": 10,
        "eval_batches": None,
        "checkpoint_every": 0,
        "model": {"kind": "mlp", "width": 32, "init": "he"},
        "data": {"kind": "digits", "batch_size": 32},
        "optimizer": {"lr": 1e-2},
        "tracking": {"enabled": False},
    }
    raw.update(overrides)
    return parse_config(raw)


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_gpt_learns_and_writes_the_run_folder(cache: Path, tmp_path: Path) -> None:
    result = train(tiny_gpt(cache), out_dir=tmp_path / "run")
    assert isinstance(result, RunResult)
    assert result.steps == 20 and result.tokens == 20 * 8 * 64
    assert [s for s, _ in result.val_curve] == [0, 10, 20]
    assert result.val_curve[0][1] > 5.0  # about ln 256 before training
    assert result.final_val_loss is not None and result.final_val_loss < result.val_curve[0][1] - 1
    assert result.best_val_loss == min(v for _, v in result.val_curve)
    assert result.flops == pytest.approx(result.flops_per_token * result.tokens)
    assert result.n_params > result.n_params_non_embedding > 0
    assert result.stopped_reason is None and result.skipped_steps == 0

    run = tmp_path / "run"
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "run.json", "metrics.jsonl", "result.json", "checkpoints"} <= names
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000020.pt"]
    saved = json.loads((run / "result.json").read_text())
    assert saved["final_val_loss"] == result.final_val_loss and saved["steps"] == 20
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "completed" and meta["n_params"] == result.n_params
    for key in ("git_commit", "packages", "config_hash", "data_fingerprint", "device"):
        assert key in meta
    assert meta["packages"]["torch"] == torch.__version__
    assert not list(run.rglob("*.tmp"))


def test_records_carry_the_documented_metric_names(cache: Path, tmp_path: Path) -> None:
    train(tiny_gpt(cache, steps=10), out_dir=tmp_path / "run")
    by_step = {r["step"]: r for r in records(tmp_path / "run")}
    assert set(by_step) == {0, 5, 10}
    assert set(by_step[0]) == {"step", "tokens", "val_loss"}
    logged = by_step[5]
    for key in (
        "tokens",
        "loss",
        "lr",
        "lr/decay",
        "lr/no_decay",
        "grad_norm",
        "clipped",
        "clip_rate",
        "tokens_per_s",
        "mfu",
        "skipped_steps",
        "grad_norm/blocks.0.attn.c_attn.weight",
        "update_ratio/blocks.1.mlp.c_fc.weight",
        "weight_norm/wte.weight",
        "act_mean/blocks.0",
        "act_std/blocks.1",
        "dead_frac/blocks.0.mlp.gelu",
    ):
        assert key in logged, key
    assert logged["tokens"] == 5 * 8 * 64
    assert 0 < logged["mfu"] < 1 and logged["tokens_per_s"] > 0
    assert "val_loss" in by_step[10] and "train_loss_avg" in by_step[10]
    assert "val_loss" not in logged


def test_diagnostics_only_every_k_steps(cache: Path, tmp_path: Path) -> None:
    config = tiny_gpt(cache, steps=10, log_every=2, diagnostics__every=4)
    train(config, out_dir=tmp_path / "run")
    with_layers = [r["step"] for r in records(tmp_path / "run") if "act_mean/blocks.0" in r]
    assert with_layers == [4, 8]


def test_gradient_accumulation_equals_the_large_batch() -> None:
    model = build_model(
        GPTConfig(n_layer=2, n_head=2, d_model=32, block_size=16), vocab_size=256, seed=0
    )
    generator = torch.Generator().manual_seed(0)
    micro = [
        (torch.randint(256, (4, 16), generator=generator),) * 2 for _ in range(3)
    ]  # (x, y) pairs; y = x is fine for a gradient check
    precision = build_precision("fp32", torch.device("cpu"))

    forward_backward(model, micro, 3, precision)
    accumulated = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    big = (torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))
    forward_backward(model, [big], 1, precision)
    large = [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(accumulated, large, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_micro_batch_m_of_step_s_is_get_batch_s_m(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int, int]] = []
    original = DigitsData.get_batch

    def spy(self: DigitsData, split: Any, step: int, *, rank: int = 0, micro: int = 0) -> Any:
        calls.append((split, step, micro))
        return original(self, split, step, rank=rank, micro=micro)

    monkeypatch.setattr(DigitsData, "get_batch", spy)
    result = train(digits(steps=3, grad_accum_steps=2), out_dir=tmp_path / "run")
    assert calls == [("train", s, m) for s in range(3) for m in range(2)]
    assert result.tokens == 3 * 2 * 32


def test_bf16_autocast_trains_on_cpu(cache: Path, tmp_path: Path) -> None:
    result = train(tiny_gpt(cache, precision="bf16"), out_dir=tmp_path / "run")
    assert result.final_val_loss is not None and math.isfinite(result.final_val_loss)
    assert result.final_val_loss < result.val_curve[0][1] - 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("precision", ["fp16", "fp8"])
def test_gpu_only_precisions_refuse_cpu_before_writing(
    cache: Path, tmp_path: Path, precision: str
) -> None:
    with pytest.raises(ConfigError, match=f"precision: '{precision}' needs a CUDA GPU"):
        train(tiny_gpt(cache, precision=precision), out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_trains_on_gpu(cache: Path, tmp_path: Path) -> None:
    result = train(tiny_gpt(cache, precision="fp16", device="cuda"), out_dir=tmp_path / "run")
    assert result.final_val_loss is not None and result.final_val_loss < result.val_curve[0][1]


def _nan_images_at(monkeypatch: pytest.MonkeyPatch, bad_steps: set[int]) -> None:
    original = DigitsData.get_batch

    def poisoned(self: DigitsData, split: Any, step: int, *, rank: int = 0, micro: int = 0) -> Any:
        x, y = original(self, split, step, rank=rank, micro=micro)
        if split == "train" and step in bad_steps:
            x = torch.full_like(x, math.nan)
        return x, y

    monkeypatch.setattr(DigitsData, "get_batch", poisoned)


def test_nonfinite_loss_stops_before_the_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_images_at(monkeypatch, {4})
    result = train(digits(steps=10), out_dir=tmp_path / "run")
    assert result.stopped_reason == "nonfinite" and result.steps == 4
    assert result.stop_message is not None and "step 4: loss is nan" in result.stop_message
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "stopped"


def test_nonfinite_skip_leaves_the_weights_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_images_at(monkeypatch, {2, 3})
    config = digits(steps=6, nonfinite="skip", log_every=1)
    result = train(config, out_dir=tmp_path / "run")
    assert result.stopped_reason is None and result.steps == 6 and result.skipped_steps == 2
    weights = torch.load(tmp_path / "run" / "checkpoints" / "step_0000006.pt", weights_only=True)[
        "model"
    ]
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [r["skipped_steps"] for r in records(tmp_path / "run") if "loss" in r] == [
        0,
        0,
        1,
        2,
        2,
        2,
    ]


def test_early_stopping_after_patience_evaluations(tmp_path: Path) -> None:
    # a learning rate this small cannot improve the val loss by min_delta
    config = digits(
        steps=100,
        eval_every=5,
        optimizer={"lr": 1e-9},
        early_stopping={"patience": 2, "min_delta": 0.1},
    )
    result = train(config, out_dir=tmp_path / "run")
    assert result.stopped_reason == "early_stopping"
    assert result.steps == 10  # evaluations at 0 (best), 5 and 10 (no improvement: 2 of 2)
    assert (tmp_path / "run" / "checkpoints" / "step_0000010.pt").exists()
    again = train(config, out_dir=tmp_path / "run", resume=True)  # a stopped run stays stopped
    assert again.steps == 10 and again.stopped_reason == "early_stopping"


def test_a_callback_sees_steps_and_can_stop_the_run(tmp_path: Path) -> None:
    seen: list[StepInfo] = []

    def prune(info: StepInfo) -> None:
        seen.append(info)
        if info.step == 10:
            raise StopTraining("pruned")

    result = train(digits(steps=30), [prune], out_dir=tmp_path / "run")
    assert [i.step for i in seen] == [5, 10]
    assert seen[1].val_loss is not None and seen[0].val_loss is None
    assert seen[1].metrics["val_loss"] == seen[1].val_loss
    assert result.stopped_reason == "pruned" and result.steps == 10


def test_classifier_reports_val_accuracy(tmp_path: Path) -> None:
    result = train(digits(steps=100, eval_every=50), out_dir=tmp_path / "run")
    assert result.final_val_accuracy is not None and result.final_val_accuracy > 0.8
    assert "val_accuracy" in records(tmp_path / "run")[-1]
    # an MLP's FLOPs: 6 per multiply-accumulate, 64*32 + 32*32 + 32*10 per image
    assert result.flops_per_token == 6 * (64 * 32 + 32 * 32 + 32 * 10)


def test_clip_rate_counts_steps_where_clipping_fired(tmp_path: Path) -> None:
    always = train(digits(steps=5, clip={"max_norm": 1e-6}), out_dir=tmp_path / "a")
    never = train(digits(steps=5, clip={"mode": "none"}), out_dir=tmp_path / "b")
    assert always.clip_rate == 1.0 and never.clip_rate == 0.0
    assert [r.get("clipped") for r in records(tmp_path / "a") if "loss" in r] == [1.0]


def test_activation_checkpointing_changes_nothing_but_memory(cache: Path, tmp_path: Path) -> None:
    plain = train(tiny_gpt(cache, steps=4), out_dir=tmp_path / "a")
    config = tiny_gpt(
        cache,
        steps=4,
        model={"n_layer": 2, "n_head": 2, "d_model": 32, "activation_checkpointing": True},
    )
    checkpointed = train(config, out_dir=tmp_path / "b")
    losses = [loss for _, loss in checkpointed.train_curve + checkpointed.val_curve]
    expected = [loss for _, loss in plain.train_curve + plain.val_curve]
    assert losses == pytest.approx(expected, rel=1e-5)


def test_same_seed_same_run(tmp_path: Path) -> None:
    first = train(digits(steps=8, deterministic=True), out_dir=tmp_path / "a")
    second = train(digits(steps=8, deterministic=True), out_dir=tmp_path / "b")
    assert first.train_curve == second.train_curve and first.val_curve == second.val_curve
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


def test_a_used_folder_is_not_overwritten(tmp_path: Path) -> None:
    train(digits(steps=2), out_dir=tmp_path / "run")
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(digits(steps=2), out_dir=tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


def test_missing_data_path_fails_before_writing(tmp_path: Path) -> None:
    config = digits(data={"kind": "text", "path": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="data.path"):
        train(config, out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_sophia_trains_a_gpt_through_its_attention(cache: Path, tmp_path: Path) -> None:
    # Sophia's Hessian differentiates the backward; the fused CPU attention kernel cannot be
    # differentiated twice, so the loop runs attention as plain ops for it
    config = tiny_gpt(cache, steps=6, optimizer__name="sophia", optimizer__sophia_update_period=2)
    result = train(config, out_dir=tmp_path / "run")
    assert result.steps == 6 and result.stopped_reason is None
    assert result.final_val_loss is not None and math.isfinite(result.final_val_loss)
