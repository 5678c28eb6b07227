"""The one exception type for user mistakes in planner inputs."""

from __future__ import annotations


class InputError(ValueError):
    """A user mistake: unreadable file, missing column, non-positive value, unknown law.

    The message is one line naming the file, column or field, the value and what is expected;
    the CLI prints it and exits with status 2, without a traceback.
    """
