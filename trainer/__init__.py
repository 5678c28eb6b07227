"""PyTorch trainer: models, optimisers, schedules, precision, diagnostics, checkpoints."""

from __future__ import annotations

from trainer.errors import ConfigError

__all__ = ["ConfigError"]
