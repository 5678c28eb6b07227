"""The callable objective the backend contract suite runs (`test_backend_contract.py`): cheap,
deterministic, with a learning curve for the pruners, and regions that fail in each way a
user's function can: an exception, NaN, a value that is not a number."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def bowl(params: dict[str, Any], trial: Any) -> Any:
    """(x - 0.3)^2 + (y - 0.6)^2, approached over ``budget.steps`` reported steps."""
    x, y = float(params["x"]), float(params["y"])
    if x > 0.9:
        raise ValueError(f"x {x:.3f} is past the cliff")
    if x < 0.05:
        return float("nan")
    if y > 0.95:
        return "not a number"
    final = (x - 0.3) ** 2 + (y - 0.6) ** 2
    steps = int(trial.budget.get("steps", 1))
    for step in range(1, steps + 1):
        if trial.report(step, final + 1.0 / step):
            return final + 1.0 / step
    if os.environ.get("CONTRACT_SLEEP_S"):
        time.sleep(float(os.environ["CONTRACT_SLEEP_S"]))
        finished = Path(os.environ["CONTRACT_FINISHED_FILE"])
        with finished.open("a") as file:
            file.write(f"{trial.stage}-{trial.number}\n")
    return final
