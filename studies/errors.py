"""The one exception type for user mistakes in a study file or its `--set` overrides."""

from __future__ import annotations

from trainer.errors import ConfigError

__all__ = ["StudyError"]


class StudyError(ConfigError):
    """A user mistake in a study: bad field, empty range, unknown sampler, unknown trainer key.

    The message is one line naming the field, the value and what is allowed, e.g.
    ``space.optimizer.lrr: not a trainer config key (did you mean optimizer.lr?)``. It is a
    `ValueError` and, through `trainer.errors.ConfigError`, one the CLI already turns into that
    line and exit status 2 without a traceback.
    """
