"""PyTorch trainer: models, optimisers, schedules, precision, diagnostics, checkpoints.

>>> from trainer import TrainConfig, train  # doctest: +SKIP
>>> result = train(TrainConfig(steps=100), out_dir="runs/train/demo")  # doctest: +SKIP
>>> result.final_val_loss  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trainer.errors import ConfigError

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


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
