"""The one exception type for user mistakes in a study file or its `--set` overrides."""

from __future__ import annotations

from typing import Any

from trainer.errors import ConfigError

__all__ = ["StudyError", "first_error"]


class StudyError(ConfigError):
    """A user mistake in a study: bad field, empty range, unknown sampler, unknown trainer key.

    The message is one line naming the field, the value and what is allowed, e.g.
    ``space.optimizer.lrr: not a trainer config key (did you mean optimizer.lr?)``. It is a
    `ValueError` and, through `trainer.errors.ConfigError`, one the CLI already turns into that
    line and exit status 2 without a traceback.
    """


def first_error(exc: Any, what: str, suffix: str = "") -> StudyError:
    """A pydantic ValidationError as one StudyError line: the first error's field path (`what`
    when it has none) and message, then `suffix`."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or what
    return StudyError(f"{where}: {error['msg']}{suffix}")
