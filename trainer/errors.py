"""The one exception type for user mistakes in trainer configuration and inputs."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake: bad config value, missing file, incompatible options.

    The message is one line naming the field (or file), the value and what is allowed;
    the CLI prints it and exits with status 2, without a traceback.
    """
