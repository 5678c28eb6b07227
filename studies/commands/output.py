"""How commands print: rich tables for people, JSON for programs, numbers in readable units."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

_SUFFIXES = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k"))


def count(value: float | None) -> str:
    """A parameter or token count: 40.4B, 2.38T, 812M."""
    if value is None or not math.isfinite(value):
        return "-"
    for scale, suffix in _SUFFIXES:
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def sci(value: float | None) -> str:
    """FLOPs and other wide-ranging numbers: 5.76e+23."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.3g}"


def fixed(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def with_band(row: dict[str, Any], key: str, fmt: Any) -> str:
    """'value [low – high]' when the row has a band for ``key``."""
    text = fmt(row.get(key))
    if row.get(f"{key}_low") is not None and row.get(f"{key}_high") is not None:
        text += f" [{fmt(row[f'{key}_low'])}–{fmt(row[f'{key}_high'])}]"
    return text


def print_json(payload: Any) -> None:
    json.dump(json_ready(payload), sys.stdout, indent=2, allow_nan=False)
    sys.stdout.write("\n")


def json_ready(value: Any) -> Any:
    """JSON has no NaN or infinity: null instead; arrays as lists, paths and the like as text."""
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): json_ready(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if value is not None and not isinstance(value, str | int | float | bool):
        return str(value)
    return value


def metric(value: float | None) -> str:
    """An objective value in a table: 4 decimals, '-' when missing or not finite."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def param(value: Any) -> str:
    """A hyperparameter value in a table."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def print_table(
    title: str | None, columns: Sequence[str], rows: Sequence[Sequence[str]], caption: str = ""
) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Text, not markup: bands like "[2.5B–3.1B]" must print as they are.
    table = Table(
        title=Text(title) if title else None,
        caption=Text(caption) if caption else None,
        title_justify="left",
        caption_justify="left",
    )
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    Console(width=max(Console().width, 120)).print(table)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def trial_labels(trials: Sequence[Mapping[str, Any]]) -> tuple[str, list[str]]:
    """(``stage fine`` or ``stages coarse, fine``, a label per trial): the trial number alone
    when the trials share a stage, else ``<stage>-<number>`` (its folder's name)."""
    stages = list(dict.fromkeys(str(t["stage"]) for t in trials))
    if len(stages) == 1:
        return f"stage {stages[0]}", [str(t["number"]) for t in trials]
    return f"stages {', '.join(stages)}", [f"{t['stage']}-{t['number']}" for t in trials]
