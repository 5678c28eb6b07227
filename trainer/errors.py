"""The one exception type for user mistakes in trainer configuration and inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A user mistake: bad config value, missing file, incompatible options.

    The message is one line naming the field (or file), the value and what is allowed;
    the CLI prints it and exits with status 2, without a traceback.
    """


def component_config_error(
    exc: ValidationError, section: str, model: type[BaseModel]
) -> ConfigError:
    """One line naming the field, the bad value and what is allowed, from pydantic's first error."""
    error = exc.errors()[0]
    field = ".".join([section, *(str(part) for part in error["loc"])])
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx", {})
    if kind == "extra_forbidden":
        return ConfigError(f"{field}: unknown field; allowed: {', '.join(model.model_fields)}")
    if kind == "literal_error":
        allowed = ctx["expected"].replace("'", "").replace(" or ", ", ")
        return ConfigError(f"{field}: {value!r} is not one of: {allowed}")
    if kind == "value_error" and not error["loc"]:
        # Cross-field checks put the field name first in their message.
        return ConfigError(f"{section}.{ctx['error']}")
    message = str(ctx["error"]) if kind == "value_error" else error["msg"]
    return ConfigError(f"{field}: {value!r} is not allowed: {message[0].lower()}{message[1:]}")
