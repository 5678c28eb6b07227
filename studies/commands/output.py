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


def duration(seconds: float | None) -> str:
    """Wall time: 0.41 s, 38 s, 2 min 4 s, 3 h 12 min."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 10:
        return f"{seconds:.2g} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


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


def budget(stage: Mapping[str, Any]) -> str:
    """A stage's budget in a table: ``120`` (steps), ``97 (2e+11 FLOPs)``, ``390 (800k
    tokens)``, ``epochs=12`` (a callable's own keys)."""
    written, steps = dict(stage.get("budget") or {}), stage.get("budget_steps")
    if written in ({}, {"steps": steps}):
        return str(steps)
    if steps and list(written) == ["flops"]:
        return f"{steps} ({sci(written['flops'])} FLOPs)"
    if steps and list(written) == ["tokens"]:
        return f"{steps} ({count(written['tokens'])} tokens)"
    return settings(written)


def settings(values: Mapping[str, Any]) -> str:
    """``model.d_model=32, data.block_size=64``."""
    return ", ".join(f"{key}={param(value)}" for key, value in values.items())


def stage_rows(stages: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]], str]:
    """(columns, rows, caption) of a stage table, from `StageReport.to_dict` mappings: what
    each stage ran, how its trials ended, its best, and what it cost."""
    columns = ["stage", "sampler", "pruner", "budget", "trials", "complete", "pruned"]
    columns += ["failed", "best", "FLOPs/trial", "FLOPs", "wall"]
    rows = [
        [
            stage["name"],
            stage["sampler"],
            stage["pruner"],
            budget(stage),
            f"{stage['n_finished']}/{stage['requested']}",
            str(stage["n_complete"]),
            str(stage["n_pruned"]),
            str(stage["n_failed"]),
            metric(stage["best_value"]),
            sci(stage["cost_per_trial"]["flops"]),
            sci(stage["cost"]["flops"]),
            duration(stage["cost"]["seconds"]),
        ]
        for stage in stages
    ]
    proxies = [f"{s['name']}: {settings(s['overrides'])}" for s in stages if s.get("overrides")]
    caption = "proxy stages (trained with other settings than the last stage): " if proxies else ""
    return columns, rows, caption + "; ".join(proxies)


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
        min_width=len(title) if title else None,  # a title wider than the table stays one line
    )
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    Console(width=max(Console().width, 140)).print(table)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def trial_labels(trials: Sequence[Mapping[str, Any]]) -> tuple[str, list[str]]:
    """(``stage fine`` or ``stages coarse, fine``, a label per trial): the trial number alone
    when the trials share a stage, else ``<stage>-<number>`` (its folder's name)."""
    stages = list(dict.fromkeys(str(t["stage"]) for t in trials))
    if len(stages) == 1:
        return f"stage {stages[0]}", [str(t["number"]) for t in trials]
    return f"stages {', '.join(stages)}", [f"{t['stage']}-{t['number']}" for t in trials]
