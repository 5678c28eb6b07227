"""The loop reads nothing on the host on a plain step (``nonfinite_check: log``): the loss,
gradient norm and clipping flag are summed on the device and read on recorded steps only.

On CPU nothing waits for a read, so the test counts them: every ``item``/``tolist``/
``bool``/``float``/``int`` of a tensor whose direct caller is trainer code. torch's own reads
(AdamW's step counter lives on the CPU even on a GPU) are not the loop's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import trainer
from tests.trainer.test_loop import _nan_images_at, digits, records
from trainer.config import parse_config
from trainer.errors import ConfigError
from trainer.loop import train

TRAINER = str(Path(trainer.__file__).parent)
READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Where trainer code read a tensor's value on the host, as 'file:line'."""
    seen: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *args: Any, _original: Any = original) -> Any:
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(TRAINER):
                seen.append(f"{Path(caller.co_filename).name}:{sys._getframe(1).f_lineno}")
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counting)
    yield seen


@pytest.mark.parametrize("check", ["log", "step"])
def test_plain_steps_read_nothing_on_the_host_with_log_checks(
    check: str, tmp_path: Path, host_reads: list[str]
) -> None:
    # two runs with the same two recorded steps; the second has twice the plain steps between
    counts = []
    for steps in (20, 40):
        config = digits(
            steps=steps, log_every=steps // 2, eval_every=steps // 2, nonfinite_check=check
        )
        host_reads.clear()
        train(config, out_dir=tmp_path / f"{check}-{steps}")
        counts.append(len(host_reads))
    if check == "log":
        assert counts[0] == counts[1], host_reads
    else:  # the host check reads loss and gradient norm every step: 20 more steps, 40 more reads
        assert counts[1] - counts[0] >= 40


def test_log_checks_record_what_step_checks_record(tmp_path: Path) -> None:
    keys = ("loss", "grad_norm", "clipped", "clip_rate", "train_loss_avg", "val_loss")
    runs = {}
    for check in ("step", "log"):
        config = digits(steps=30, clip={"max_norm": 1.0}, nonfinite_check=check)
        result = train(config, out_dir=tmp_path / check)
        runs[check] = (
            [{k: r[k] for k in keys if k in r} for r in records(tmp_path / check)],
            result.clip_rate,
            result.val_curve,
        )
    assert runs["log"] == runs["step"]
    assert 0 < runs["log"][1] < 1  # clipping fired on some steps only: the tally counted them


def test_a_nonfinite_update_is_found_at_the_next_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_images_at(monkeypatch, {6})
    config = digits(steps=20, log_every=5, checkpoint_every=3, nonfinite_check="log")
    result = train(config, out_dir=tmp_path / "run")
    # update 6 (0-based) is poisoned; the next read is the checkpoint after 9 updates
    assert result.stopped_reason == "nonfinite" and result.steps == 9
    assert result.stop_message is not None
    assert result.stop_message.startswith("step 6: loss is non-finite (found when step 9")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "stopped"
    # the checkpoint after 9 updates would hold NaN weights: not written; the one after 6 is finite
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved[-1] == "step_0000006.pt"
    weights = torch.load(tmp_path / "run" / "checkpoints" / saved[-1], weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights["model"].values())


def test_skipping_a_nonfinite_update_needs_the_host_check() -> None:
    with pytest.raises(ConfigError, match="nonfinite_check: 'log' finds a non-finite update"):
        parse_config({"nonfinite": "skip", "nonfinite_check": "log"})
    assert parse_config({"nonfinite": "skip"}).host_checks("cuda")
    assert not parse_config({}).host_checks("cuda") and parse_config({}).host_checks("cpu")
