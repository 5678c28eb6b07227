"""PyTorch trainer: models, optimisers, schedules, precision, diagnostics, checkpoints.

>>> from trainer import TrainConfig, train  # doctest: +SKIP
>>> result = train(TrainConfig(steps=100), out_dir="runs/train/demo")  # doctest: +SKIP
>>> result.final_val_loss  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.errors import ConfigError
from trainer.exports import lazy_getattr

if TYPE_CHECKING:
    from trainer.config import TrainConfig, load_config
    from trainer.loop import RunResult, StepInfo, StopTraining, train

# Public names and the module that defines each; imported on first use, so that `import trainer`
# does not import torch.
_EXPORTS = {
    "TrainConfig": "trainer.config",
    "load_config": "trainer.config",
    "RunResult": "trainer.loop",
    "StepInfo": "trainer.loop",
    "StopTraining": "trainer.loop",
    "train": "trainer.loop",
}

__all__ = [
    "ConfigError",
    "RunResult",
    "StepInfo",
    "StopTraining",
    "TrainConfig",
    "load_config",
    "train",
]

__getattr__ = lazy_getattr("trainer", _EXPORTS)
