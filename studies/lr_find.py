"""The learning-rate range test: one short run whose LR grows exponentially, read for a peak LR.

Smith 2017 ("Cyclical Learning Rates for Training Neural Networks", sec. 3.3) and fastai's
`lr_find`: from the config's initialisation, update s uses lr_s = min · (max/min)^(s/(n−1));
the training loss of each step is smoothed by a bias-corrected moving average (β = 0.98), and
the run stops once the smoothed loss passes `stop_factor` times its best, or goes non-finite.

The curve is read after the run, smoothed without lag (a centred mean over a tenth of its
points), up to the end of its first descent: where the loss first climbs back by a tenth of
what it had dropped (a run with clipping may recover from that instability and dip again at a
higher lr, which is no peak to train at):

- ``suggested_lr``: the lr at which 95% of the smoothed loss's drop (from its start to its
  minimum) is done. Smith's advice for the upper bound of a cycle: where the loss stops falling
  (past it more lr buys little descent, and the curve nears the cliff);
- ``steepest``: where the smoothed loss falls fastest against log lr (fastai's "steep"; the
  first and last few points left out);
- ``minimum_tenth``: a tenth of the lr at the descent's minimum (fastai's older rule).

The test runs `trainer.train` on the config with these changes only: `optimizer.lr` = min,
schedule `exponential` (no warm-up) with gamma = (max/min)^(1/(n−1)), `steps` = n, a record
every step, evaluation only at the end, per-layer diagnostics and MLflow off.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from studies.errors import StudyError

__all__ = [
    "LRFindResult",
    "RangeTest",
    "lr_find",
    "one_cycle_config",
    "plot_range_test",
    "range_test_overrides",
    "resolve_around",
]

SMOOTHING = 0.98  # fastai's β
STOP_FACTOR = 4.0  # fastai's: stop once the smoothed loss is 4x its best
SKIP_START, SKIP_END = 10, 5  # points left out of the steepest-descent reading (fastai's)
CENTRED_WINDOW = 0.1  # the readings' smoothing: a centred mean over a tenth of the points
DESCENT_FRACTION = 0.95  # the suggestion: where 95% of the loss's drop is done
RISE_FRACTION = 0.1  # the descent ends once the loss climbs back a tenth of its drop so far,
DESCENT_STARTED = (
    0.2  # counted once a fifth of the whole drop is done (noise on the plateau is no end)
)


@dataclass
class RangeTest:
    """The exponential LR sweep and its reading, independent of what is trained.

    Feed it ``record(loss)`` after each update at ``lr(s)``; it says when to stop.

    >>> test = RangeTest(1e-4, 1.0, 50)
    >>> round(test.lr(0), 6), round(test.lr(49), 6)
    (0.0001, 1.0)
    """

    min_lr: float
    max_lr: float
    steps: int
    smoothing: float = SMOOTHING
    stop_factor: float = STOP_FACTOR
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stopped: str | None = None
    _average: float = 0.0

    def __post_init__(self) -> None:
        check_range(self.min_lr, self.max_lr, self.steps)

    @property
    def gamma(self) -> float:
        """The factor per step."""
        return float((self.max_lr / self.min_lr) ** (1.0 / (self.steps - 1)))

    def lr(self, step: int) -> float:
        return float(self.min_lr * self.gamma**step)

    def record(self, loss: float) -> bool:
        """The loss of the next update; True once the test should stop."""
        s = len(self.losses)
        self.lrs.append(self.lr(s))
        self.losses.append(loss)
        if not math.isfinite(loss):
            self.stopped = f"loss {loss} at lr {self.lr(s):.3g}"
            self.smoothed.append(math.nan)
            return True
        self._average = self.smoothing * self._average + (1 - self.smoothing) * loss
        smooth = self._average / (1 - self.smoothing ** (s + 1))
        self.smoothed.append(smooth)
        best = min(v for v in self.smoothed if math.isfinite(v))
        if s > SKIP_START and smooth > self.stop_factor * best:
            self.stopped = (
                f"smoothed loss {smooth:.3g} > {self.stop_factor:g}x its best {best:.3g} "
                f"at lr {self.lr(s):.3g}"
            )
            return True
        return False

    def suggestions(self) -> dict[str, float]:
        """The readings of the curve up to where it stopped (see the module docstring)."""
        keep = np.isfinite(np.array(self.losses))
        lrs = np.array(self.lrs)[keep]
        if len(lrs) < SKIP_START + SKIP_END + 3:
            raise StudyError(
                f"lr-find: the loss diverged after {len(lrs)} steps (at lr {self.lrs[-1]:.3g}), "
                f"too few to read; lower --min (now {self.min_lr:g}) or raise --steps"
            )
        smooth = self.read_curve()
        start = float(smooth[:SKIP_START].mean())
        # the descent ends where the loss first climbs back by a tenth of what it had dropped:
        # past that instability a run with clipping may recover and dip again at a higher lr,
        # which is no peak to train at
        floor = np.minimum.accumulate(smooth)
        dropped = np.maximum(start - floor, 0)
        rising = np.flatnonzero(
            (smooth > floor + RISE_FRACTION * dropped)
            & (dropped >= DESCENT_STARTED * (start - float(smooth.min())))
        )
        rising = rising[rising > SKIP_START]
        if len(rising):
            smooth, lrs = smooth[: rising[0]], lrs[: rising[0]]
        lowest = int(np.argmin(smooth))
        drop = start - float(smooth[lowest])
        if drop <= 0:
            raise StudyError(
                f"lr-find: the loss never fell below its start ({start:.4g}) between lr "
                f"{self.min_lr:g} and {lrs[-1]:.3g}; raise --max or --steps"
            )
        done = np.flatnonzero(smooth[: lowest + 1] <= start - DESCENT_FRACTION * drop)[0]
        slope = np.gradient(smooth, np.log(lrs))
        window = slice(SKIP_START, max(len(lrs) - SKIP_END, SKIP_START + 1))
        return {
            "suggested_lr": float(lrs[done]),
            "steepest": float(lrs[window][int(np.argmin(slope[window]))]),
            "minimum_tenth": float(lrs[lowest]) / 10,
        }

    def read_curve(self) -> np.ndarray:
        """The finite losses, smoothed without lag, as the readings see them."""
        losses = np.array(self.losses)
        losses = losses[np.isfinite(losses)]
        return centred_mean(losses, max(3, round(CENTRED_WINDOW * len(losses))))

    def curve(self) -> list[dict[str, float]]:
        return [
            {"lr": lr, "loss": loss, "smoothed": smooth}
            for lr, loss, smooth in zip(self.lrs, self.losses, self.smoothed, strict=True)
        ]


def centred_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each value and its neighbours, `window` points in all (fewer at the ends): a
    smoothing without the moving average's lag, for reading a finished curve."""
    half = window // 2
    sums = np.concatenate([[0.0], np.cumsum(values)])
    index = np.arange(len(values))
    low, high = np.maximum(index - half, 0), np.minimum(index + half + 1, len(values))
    return (sums[high] - sums[low]) / (high - low)


def check_range(min_lr: float, max_lr: float, steps: int) -> None:
    if not (math.isfinite(min_lr) and math.isfinite(max_lr)) or not 0 < min_lr < max_lr:
        raise StudyError(
            f"--min / --max: {min_lr:g} / {max_lr:g}; the range test sweeps from --min up to "
            "--max: expected 0 < min < max"
        )
    if steps < SKIP_START + SKIP_END + 5:
        raise StudyError(
            f"--steps: {steps}; expected at least {SKIP_START + SKIP_END + 5} (the reading "
            f"skips the first {SKIP_START} and last {SKIP_END})"
        )


def range_test_overrides(test: RangeTest) -> dict[str, Any]:
    """The config changes, as dotted keys, that make a training run the range test (see the
    module docstring); the schedule is replaced whole."""
    return {
        "steps": test.steps,
        "log_every": 1,
        "eval_every": 0,
        "checkpoint_every": 0,
        "keep_checkpoints": 1,
        "early_stopping.patience": None,
        "nonfinite": "stop",
        "optimizer.lr": test.min_lr,
        "schedule": {"name": "exponential", "gamma": test.gamma, "warmup_steps": 0},
        "diagnostics.per_layer": False,
        "diagnostics.activations": False,
        "diagnostics.gns": False,
        "tracking.enabled": False,
    }


@dataclass(frozen=True)
class LRFindResult:
    suggestions: dict[str, float]
    test: RangeTest
    out_dir: Path
    plot: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.suggestions,
            "min_lr": self.test.min_lr,
            "max_lr": self.test.max_lr,
            "steps_run": len(self.test.losses),
            "stopped": self.test.stopped or "reached --max",
            "plot": str(self.plot),
            "out_dir": str(self.out_dir),
            "curve": self.test.curve(),
        }


def lr_find(
    raw: Mapping[str, Any],
    *,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    steps: int = 100,
    out_dir: Path,
    config_hash: str | None = None,
) -> LRFindResult:
    """Run the range test on the trainer config `raw` (a mapping, as read from YAML) in
    `out_dir`: the run, ``lr_find.png`` and ``lr_find.json`` (with `config_hash`, when given,
    so that a study can tell its own result again)."""
    from trainer.config import parse_config
    from trainer.loop import StepInfo, StopTraining, train
    from trainer.tracking import json_safe, write_text_atomic

    test = RangeTest(min_lr, max_lr, steps)
    from studies.trainer_config import with_values

    config = parse_config(with_values(raw, range_test_overrides(test), "lr-find"))

    def feed(info: StepInfo) -> None:
        if test.record(info.train_loss):
            raise StopTraining("diverged")

    out_dir.mkdir(parents=True, exist_ok=True)
    run = out_dir / "run"
    if (run / "run.json").is_file():
        shutil.rmtree(run)  # a rerun replaces the earlier range test, a throwaway run
    result = train(config, [feed], out_dir=run)
    if result.stopped_reason == "nonfinite":
        test.record(math.nan)  # the loop stops before recording a non-finite step
    suggestions = test.suggestions()
    plot = plot_range_test(test, suggestions, out_dir / "lr_find.png")
    found = LRFindResult(suggestions, test, out_dir, plot)
    payload = found.to_dict() | ({"config_hash": config_hash} if config_hash else {})
    write_text_atomic(out_dir / "lr_find.json", json.dumps(json_safe(payload), indent=2))
    return found


def one_cycle_config(raw: Mapping[str, Any], peak_lr: float) -> dict[str, Any]:
    """`raw` with a one-cycle schedule (Smith & Topin 2019) peaking at `peak_lr`; the
    schedule's other knobs are torch's OneCycleLR defaults."""
    from studies.trainer_config import with_values

    overrides = {"optimizer.lr": peak_lr, "schedule": {"name": "one_cycle"}}
    return with_values(raw, overrides, "--write-config")


def plot_range_test(test: RangeTest, suggestions: Mapping[str, float], path: Path) -> Path:
    """Loss (raw and smoothed) against lr on a log axis, the two readings and the suggestion
    marked."""
    from matplotlib.figure import Figure

    from trainer.tracking import save_png

    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.subplots()
    finite = [lr for lr, loss in zip(test.lrs, test.losses, strict=True) if math.isfinite(loss)]
    smooth = test.read_curve()
    ax.plot(test.lrs, test.losses, color="0.75", lw=0.8, label="loss")
    ax.plot(finite, smooth, color="C0", lw=1.6, label="smoothed (centred)")
    marks: Sequence[tuple[str, str, str]] = (
        ("steepest", "C1", ":"),
        ("minimum_tenth", "C2", ":"),
        ("suggested_lr", "C3", "--"),
    )
    for key, colour, style in marks:
        ax.axvline(
            suggestions[key],
            color=colour,
            ls=style,
            lw=1.2,
            label=f"{key.replace('_', ' ')} {suggestions[key]:.2g}",
        )
    if len(smooth):
        low, start = float(smooth.min()), float(smooth[0])
        ax.set_ylim(low - 0.1 * (start - low + 1e-9), start + 0.5 * (start - low + 1e-9))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


# ---------------------------------------------------------------------------------------------
# A study's space centred on the range test: ``optimizer.lr: {around: lr_find, factor: 10}``

AROUND_FACTOR = 10.0  # the default reach either side of the suggestion


def resolve_around(study: Any, runs_dir: Path) -> Any:
    """`study` (a StudyConfig) with each ``around: lr_find`` range made concrete: the range
    test runs once on the first stage's trainer config, in ``runs_dir/<study>/lr-find/``; a
    rerun or resume of the study reads the result kept there (same config: same range)."""
    from studies.trainer_config import trial_config
    from trainer.config import config_hash

    around = {key: spec for key, spec in study.space.items() if spec.around is not None}
    if not around:
        return study
    for key in around:
        if not study.is_trainer:
            raise StudyError(
                f"space.{key}.around: lr_find runs the trainer's LR range test; a callable "
                "objective has none (give low and high)"
            )
        if key != "optimizer.lr":
            raise StudyError(
                f"space.{key}.around: lr_find suggests optimizer.lr; {key} needs low and high"
            )
    config = trial_config(study, {}, study.stages[0])
    digest = config_hash(config)
    out = Path(runs_dir) / study.name / "lr-find"
    kept = out / "lr_find.json"
    suggestion = None
    if kept.is_file():
        payload = json.loads(kept.read_text())
        if payload.get("config_hash") == digest:
            suggestion = float(payload["suggested_lr"])
    if suggestion is None:
        found = lr_find(config.model_dump(mode="json"), out_dir=out, config_hash=digest)
        suggestion = found.suggestions["suggested_lr"]
    space = dict(study.space)
    for key, spec in around.items():
        factor = spec.factor or AROUND_FACTOR
        # from here on a plain range: the storage and every stage see numbers
        space[key] = spec.model_copy(
            update={
                "low": suggestion / factor,
                "high": suggestion * factor,
                "log": True,
                "around": None,
                "factor": None,
            }
        )
    return study.model_copy(update={"space": space})
