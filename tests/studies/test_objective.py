"""One trial as data: `run_trial` completes, prunes when `report` says so, and turns every
failure (an exception, out of memory, a diverging loss) into a failed outcome with a one-line
reason instead of raising."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_study import TINY_BASE

from studies.config import StudyConfig
from studies.objective import OUT_OF_MEMORY, TrialOutcome, run_trial
from studies.study_file import load_study


def tiny_study(tmp_path: Path, **fields: Any) -> StudyConfig:
    """A seconds-long one-stage study over a 1-layer byte GPT, MLflow off."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(TINY_BASE))
    study: dict[str, Any] = {
        "name": "tiny",
        "base": "base.yaml",
        "space": {"optimizer.lr": {"low": 1e-4, "high": 3e-2, "log": True}},
        "stages": [{"name": "coarse", "sampler": "random", "trials": 3, "budget": {"steps": 20}}],
    }
    study.update(fields)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return load_study(path)


def trial(study: StudyConfig, tmp_path: Path, lr: float = 3e-3, **kwargs: Any) -> TrialOutcome:
    return run_trial(
        study,
        study.stages[0],
        {"optimizer.lr": lr},
        trial_id="coarse-0",
        runs_dir=tmp_path / "runs",
        **kwargs,
    )


def test_a_trial_completes_with_its_objective_and_curve(tmp_path: Path) -> None:
    study = tiny_study(tmp_path)
    reported: list[tuple[int, float]] = []
    outcome = trial(study, tmp_path, report=lambda step, value: reported.append((step, value)))
    assert outcome.state == "complete" and outcome.reason is None
    assert outcome.value is not None and 3.0 < outcome.value < 6.0  # ln 256 = 5.55 untrained
    assert outcome.steps == 20
    assert [step for step, _ in outcome.intermediate] == [5, 10, 15, 20]
    assert reported == outcome.intermediate
    assert outcome.intermediate[-1][1] == outcome.value
    assert outcome.tokens == 20 * 4 * 32
    assert outcome.params_count is not None and outcome.params_count > 0
    assert outcome.out_dir == str((tmp_path / "runs" / "tiny" / "trials" / "coarse-0").absolute())
    assert (Path(outcome.out_dir) / "result.json").exists()
    assert outcome.run_id is None  # MLflow off


def test_report_returning_true_prunes_at_that_evaluation(tmp_path: Path) -> None:
    outcome = trial(tiny_study(tmp_path), tmp_path, report=lambda step, value: step >= 10)
    assert outcome.state == "pruned" and outcome.value is None
    assert outcome.steps == 10
    assert outcome.reason is not None and outcome.reason.startswith("pruned at step 10")
    assert [step for step, _ in outcome.intermediate] == [5, 10]


def test_an_exception_is_a_failed_trial_with_its_type_and_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("the data loader broke\nsecond line")

    monkeypatch.setattr("trainer.loop.train", broken)
    outcome = trial(tiny_study(tmp_path), tmp_path)
    assert outcome.state == "failed" and outcome.value is None
    assert outcome.reason == "ValueError: the data loader broke"


def test_an_exception_inside_report_fails_the_trial(tmp_path: Path) -> None:
    def report(step: int, value: float) -> bool:
        raise ConnectionError("storage went away")

    outcome = trial(tiny_study(tmp_path), tmp_path, report=report)
    assert outcome.state == "failed"
    assert outcome.reason == "ConnectionError: storage went away"


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
        MemoryError(),
    ],
    ids=["cuda-oom", "runtime-oom", "host-oom"],
)
def test_out_of_memory_is_failed_with_that_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    def oom(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr("trainer.loop.train", oom)
    outcome = trial(tiny_study(tmp_path), tmp_path)
    assert outcome.state == "failed" and outcome.reason == OUT_OF_MEMORY


def test_a_diverging_loss_is_failed_with_the_step(tmp_path: Path) -> None:
    outcome = trial(tiny_study(tmp_path), tmp_path, lr=1e9)
    assert outcome.state == "failed" and outcome.value is None
    assert outcome.reason is not None
    assert outcome.reason.startswith("diverged: non-finite ")
    assert outcome.reason.endswith(f"at step {outcome.steps}")


def test_a_non_finite_validation_loss_is_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer import loop

    real = loop._evaluate

    def nan_evaluate(parts: Any, batches: Any) -> dict[str, float]:
        metrics = real(parts, batches)
        return {**metrics, "val_loss": float("nan")} if parts.state.step >= 10 else metrics

    monkeypatch.setattr(loop, "_evaluate", nan_evaluate)
    outcome = trial(tiny_study(tmp_path), tmp_path)
    assert outcome.state == "failed"
    assert outcome.reason == "diverged: non-finite val_loss at step 10"


def test_keyboard_interrupt_is_not_swallowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("trainer.loop.train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trial(tiny_study(tmp_path), tmp_path)


def test_an_earlier_attempts_folder_is_replaced(tmp_path: Path) -> None:
    study = tiny_study(tmp_path)
    first = trial(study, tmp_path)
    (Path(first.out_dir) / "stale.txt").write_text("left over")
    second = trial(study, tmp_path)
    assert second.state == "complete" and second.out_dir == first.out_dir
    assert not (Path(second.out_dir) / "stale.txt").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_cuda_out_of_memory_is_failed_and_the_next_trial_runs(tmp_path: Path) -> None:
    overrides = {
        "device": "cuda",
        "model.d_model": 2048,
        "model.n_head": 16,
        "data.block_size": 2048,
        "data.batch_size": 4096,  # attention scores alone: 4096 x 16 x 2048^2 floats
    }
    study = tiny_study(tmp_path, overrides=overrides)
    outcome = trial(study, tmp_path)
    assert outcome.state == "failed" and outcome.reason == OUT_OF_MEMORY
    small = tiny_study(tmp_path, overrides={"device": "cuda"})
    assert trial(small, tmp_path).state == "complete"  # the memory was given back
