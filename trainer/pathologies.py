"""Training pathologies read off a run's metrics.jsonl: what went wrong, when, and the usual fix.

The checks are the ones the practitioners' guides teach (Karpathy, "A Recipe for Training Neural
Networks", 2019; Google's Deep Learning Tuning Playbook, 2023; the OPT-175B logbook and the
PaLM paper on loss spikes). Each reads the metric names that `trainer.diagnostics` documents and
returns `Finding`s with the step range they cover. Every threshold is a named constant below with
the reason for its value; a check whose metrics are absent finds nothing.

Adding a check is one function `(Metrics) -> list[Finding]` and one line in `CHECKS`.

Example:
    >>> records = [{"step": s, "loss": 2.0 - s / 1000} for s in range(100)]
    >>> diagnose(records)
    []
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from trainer.errors import ConfigError
from trainer.tracking import METRICS_FILE, read_metrics

__all__ = ["CHECKS", "Finding", "Metrics", "diagnose", "diagnose_run"]

Severity = Literal["info", "warning", "error"]

# Loss spikes: loss above the trailing median by K robust standard deviations (1.4826 * MAD) of
# the SPIKE_WINDOW records before it (fewer in short runs: a fifth of them, at least 10). K = 6
# is far outside Gaussian step-to-step noise; SPIKE_MIN_RISE stops a smooth curve (MAD ~ 0)
# from flagging wiggles; a single heavy-tailed batch must clear twice the rise.
SPIKE_WINDOW = 50
SPIKE_K = 6.0
SPIKE_MIN_RISE = 0.05  # fraction of the trailing median
SPIKE_ONE_RECORD = 2.0  # a spike that is over by the next record must rise twice as far
# Divergence: the smoothed loss climbs back by half the progress made (or by a quarter of the
# loss itself, whichever is more) above its running minimum and is still there at the end.
DIVERGENCE_SMOOTH = 5
DIVERGENCE_GIVE_BACK = 0.5
DIVERGENCE_MIN_RISE = 0.25
DIVERGENCE_MIN_RECORDS = 3
# Clipping: the Tuning Playbook clips at a norm that fires on a small minority of steps; above
# 10% clipping is the optimiser's step size, not the outlier guard it is meant to be.
CLIP_RATE_MAX = 0.10
CLIP_WINDOW = 50
# Update/weight ratio ||dW|| / ||W|| per step: about 1e-3 is the rule of thumb (Karpathy,
# CS231n) and 1e-4..1e-2 the usual band, the default here. Adam moves each weight by about lr, so
# the ratio is about lr / rms(W): small models with small weights sit above 1e-2 at healthy LRs
# (measured on a byte GPT, d=64, AdamW: 2.5e-2 at a good LR of 3e-3, 1.6e-2 at 1e-3), so the band
# is an option (`scaleplan diagnose --update-ratio-band 1e-4 5e-2`). A layer flagged far outside
# it is off by a factor, not a hair.
UPDATE_RATIO_BAND = (1e-4, 1e-2)
UPDATE_RATIO_LR_FRACTION = 0.5  # judge only while lr >= half its peak (warm-up and decay tails
# are meant to move slowly)
# Dead units: more than half of a nonlinearity's units pass no gradient, for a sustained stretch.
DEAD_FRAC_MAX = 0.5
DEAD_FRAC_ERROR = 0.9
SUSTAINED_FRACTION = 0.1  # a stretch is sustained when it spans >= 10% of the records (>= 3)
# Activations: block-output std two orders of magnitude above its first record or below its
# peak, or beyond an absolute bound no normalised network should reach. Measured here (byte GPT,
# d=64, 2 layers, AdamW + cosine): the residual stream grows x25-30 from init at a good LR
# (3e-3) and x240-440 at 10x and 30x that LR.
ACT_STD_GROWTH = 100.0
ACT_STD_MAX = 1e3
ACT_STD_COLLAPSE = 1e-2
EDGE_FRACTION = 0.1  # "early" and "late" are the first and last 10% of records (>= 3)
# Generalisation: validation above its best by 2% (val rising), or a train/val gap of 5% of the
# validation loss that keeps growing; both need 2 evaluations past the turning point.
VAL_RISE = 0.02
GAP_GROWTH = 0.05
MIN_EVALS_AFTER = 2
# Batch against the noise scale: judged on the last quarter of the B_simple records; "far" is
# a factor of 2 either way: with S = S_min(1 + B_noise/B) and E = E_min(1 + B/B_noise)
# (McCandlish et al. 2018, eq. 2.11), half B_noise takes 3x the fewest steps, twice it 3x the
# fewest examples.
NOISE_SCALE_TAIL = 0.25
BATCH_FAR = 2.0


@dataclass(frozen=True)
class Finding:
    """One pathology over a step range, with what to try."""

    pathology: str
    severity: Severity
    steps: tuple[int, int]
    detail: str
    fix: str
    layers: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "pathology": self.pathology,
            "severity": self.severity,
            "steps": list(self.steps),
            "detail": self.detail,
        }
        if self.layers:
            out["layers"] = list(self.layers)
        out["fix"] = self.fix
        return out


@dataclass(frozen=True)
class Series:
    """One metric over steps, sorted, one value per step; NaN where the file had null."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)

    def finite(self) -> Series:
        keep = np.isfinite(self.values)
        return Series(self.steps[keep], self.values[keep])

    def between(self, first: int, last: int) -> Series:
        keep = (self.steps >= first) & (self.steps <= last)
        return Series(self.steps[keep], self.values[keep])


class Metrics:
    """The records of metrics.jsonl as one `Series` per key.

    Records are merged by step (an eval record and a train record at one step both count) and a
    later record for the same step and key wins, as after a resume that did not truncate.
    """

    def __init__(self, records: Sequence[dict[str, Any]]) -> None:
        self.n_records = len(records)
        raw: dict[str, tuple[list[int], list[float]]] = {}
        for record in records:
            step = int(record["step"])
            for key, value in record.items():
                if key == "step" or isinstance(value, bool | str):
                    continue
                if value is not None and not isinstance(value, int | float):
                    continue
                steps, values = raw.setdefault(key, ([], []))
                steps.append(step)
                values.append(math.nan if value is None else float(value))
        self._series = {key: _dedupe(steps, values) for key, (steps, values) in raw.items()}
        all_steps = [int(r["step"]) for r in records]
        self.step_range = (min(all_steps), max(all_steps)) if all_steps else (0, 0)

    def get(self, key: str) -> Series | None:
        return self._series.get(key)

    def names(self, prefix: str) -> list[str]:
        """The names after `prefix/`, e.g. the layers that have `update_ratio/<layer>`."""
        start = f"{prefix}/"
        return sorted(key[len(start) :] for key in self._series if key.startswith(start))

    def lr(self) -> Series | None:
        """`lr`, else the first `lr/<group>`."""
        if (lr := self.get("lr")) is not None:
            return lr
        groups = self.names("lr")
        return self.get(f"lr/{groups[0]}") if groups else None


def _dedupe(steps: list[int], values: list[float]) -> Series:
    step_array = np.asarray(steps, dtype=np.int64)
    value_array = np.asarray(values, dtype=np.float64)
    order = np.argsort(step_array, kind="stable")
    step_array, value_array = step_array[order], value_array[order]
    # keep the last record of each step: unique on the reversed arrays finds last occurrences
    _, last_from_end = np.unique(step_array[::-1], return_index=True)
    keep = len(step_array) - 1 - last_from_end
    return Series(step_array[keep], value_array[keep])


# --- loss: divergence and spikes ---------------------------------------------------------------


def check_loss(metrics: Metrics) -> list[Finding]:
    """Divergence (non-finite, or far above the best loss at the end) and loss spikes."""
    loss = metrics.get("loss")
    if loss is None or len(loss) == 0:
        return []
    findings: list[Finding] = []
    diverged_at: int | None = None
    fix = (
        "lower the peak LR, lengthen warm-up, clip gradients (max_norm about 1), use bf16 rather"
        " than fp16, and resume from a checkpoint before the first step shown"
    )
    bad = ~np.isfinite(loss.values)
    finite_before = loss.finite()
    if bad[-1]:  # non-finite to the end: the run diverged (or stopped on it)
        first_bad = int(np.argmax(bad))
        diverged_at = int(loss.steps[first_bad])
        findings.append(
            Finding(
                "divergence",
                "error",
                (diverged_at, int(loss.steps[-1])),
                f"loss is non-finite from step {diverged_at} ({int(bad.sum())} of"
                f" {len(loss) - first_bad} records from there on)",
                fix,
            )
        )
        finite_before = Series(loss.steps[:first_bad], loss.values[:first_bad])
    elif bad.any():  # skipped updates (nonfinite: skip, or fp16 overflow) and training went on
        bad_steps = loss.steps[bad]
        findings.append(
            Finding(
                "non-finite loss",
                "warning",
                (int(bad_steps[0]), int(bad_steps[-1])),
                f"loss non-finite on {len(bad_steps)} records, finite again afterwards",
                "those updates were lost or skipped: " + fix,
            )
        )
    rising = _rising_loss(finite_before)
    if rising is not None and diverged_at is None:
        start, best, final = rising
        diverged_at = start
        findings.append(
            Finding(
                "divergence",
                "error",
                (start, int(finite_before.steps[-1])),
                f"loss rose from its best {best:.3g} to {final:.3g} at step {start} and stays"
                " there",
                fix,
            )
        )
    for spike in _spikes(loss.finite()):
        first, last, before, peak, recovered_at = spike
        if recovered_at is None and diverged_at is not None:
            continue  # the divergence finding covers it
        if recovered_at is not None:
            how = f"recovered at step {recovered_at}"
        else:
            how = "not recovered by the last step"
        findings.append(
            Finding(
                "loss spike",
                "warning" if recovered_at is not None else "error",
                (first, last),
                f"loss {before:.3g} -> {peak:.3g}, {how}",
                "lower the peak LR or lengthen warm-up; clip gradients; look at the batches"
                " at these steps (bad data); Adam: lower beta2 (0.95) or raise eps",
            )
        )
    return findings


def _rising_loss(loss: Series) -> tuple[int, float, float] | None:
    """(first step, best loss, final loss) when the smoothed loss ends far above its best."""
    n = len(loss)
    if n < max(DIVERGENCE_SMOOTH, DIVERGENCE_MIN_RECORDS) + 2:
        return None
    smooth = _trailing_median(loss.values, DIVERGENCE_SMOOTH)
    best = np.minimum.accumulate(smooth)
    start_loss = float(np.median(loss.values[:DIVERGENCE_SMOOTH]))
    progress = np.maximum(start_loss - best, 0.0)
    limit = best + np.maximum(DIVERGENCE_GIVE_BACK * progress, DIVERGENCE_MIN_RISE * np.abs(best))
    above = smooth > limit
    if not above[-1]:
        return None
    stretch = n - int(np.argmin(above[::-1])) if not above.all() else 0
    if n - stretch < DIVERGENCE_MIN_RECORDS:
        return None
    # the smoothed curve lags: the first raw record over the limit, a few records earlier
    lead = max(0, stretch - DIVERGENCE_SMOOTH + 1)
    first = lead + int(np.argmax(loss.values[lead:] > limit[lead:]))
    return int(loss.steps[first]), float(best[-1]), float(smooth[-1])


def _spikes(loss: Series) -> list[tuple[int, int, float, float, int | None]]:
    """(first, last, median before, peak, recovery step or None) for each spike."""
    n = len(loss)
    window = min(SPIKE_WINDOW, n // 5)
    if window < 10:
        return []
    windows = sliding_window_view(loss.values, window)[:-1]  # windows[i] ends before i + window
    median = np.median(windows, axis=1)
    rise = np.maximum(
        SPIKE_K * 1.4826 * np.median(np.abs(windows - median[:, None]), axis=1),
        SPIKE_MIN_RISE * np.abs(median),
    )
    values = loss.values[window:]
    spikes = []
    i = 0
    while i < len(values):
        if values[i] <= median[i] + rise[i]:
            i += 1
            continue
        frozen = median[i] + rise[i]  # the threshold before the spike, until back under it
        j = i
        while j < len(values) and values[j] > frozen:
            j += 1
        if j == i + 1 and j < len(values) and values[i] <= median[i] + SPIKE_ONE_RECORD * rise[i]:
            i = j + 1  # one noisy batch, not instability
            continue
        offset = window
        recovered = int(loss.steps[j + offset]) if j < len(values) else None
        spikes.append(
            (
                int(loss.steps[i + offset]),
                int(loss.steps[j - 1 + offset]),
                float(median[i]),
                float(values[i:j].max()),
                recovered,
            )
        )
        i = j + 1
    return spikes


# --- gradient clipping -----------------------------------------------------------------------


def check_clipping(metrics: Metrics) -> list[Finding]:
    """Clipping on more than 10% of steps after warm-up, over a window of CLIP_WINDOW records."""
    clipped = metrics.get("clipped")
    if clipped is None:
        return _check_cumulative_clip_rate(metrics)
    clipped = _after_warmup(clipped.finite(), metrics)
    n = len(clipped)
    if n < 5:
        return []
    window = min(CLIP_WINDOW, n)
    rates = sliding_window_view(clipped.values, window).mean(axis=1)
    flagged = np.flatnonzero(rates > CLIP_RATE_MAX)
    if not len(flagged):
        return []
    # the span of the flagged windows, trimmed to the clipped steps at its ends
    hits = np.flatnonzero(clipped.values[: int(flagged[-1]) + window] > 0)
    hits = hits[hits >= flagged[0]]
    first, last = int(hits[0]), int(hits[-1])
    span_rate = float(clipped.values[first : last + 1].mean())
    overall = float(clipped.values.mean())
    return [
        _clip_finding(
            metrics,
            (int(clipped.steps[first]), int(clipped.steps[last])),
            f"{span_rate:.0%} of logged steps clipped in this range"
            f" ({overall:.0%} after warm-up overall)",
        )
    ]


def _check_cumulative_clip_rate(metrics: Metrics) -> list[Finding]:
    """Without per-step `clipped`: the loop's `clip_rate` is the fraction of steps so far."""
    rate = metrics.get("clip_rate")
    if rate is None or len(rate.finite()) == 0:
        return []
    rate = rate.finite()
    if rate.values[-1] <= CLIP_RATE_MAX:
        return []
    steps = (int(rate.steps[0]), int(rate.steps[-1]))
    return [_clip_finding(metrics, steps, f"{rate.values[-1]:.0%} of all steps clipped")]


def _clip_finding(metrics: Metrics, steps: tuple[int, int], detail: str) -> Finding:
    grad_norm = metrics.get("grad_norm")
    clipped = metrics.get("clipped")
    if grad_norm is not None and len(grad_norm.finite().between(*steps)):
        norms = grad_norm.finite().between(*steps)
        detail += f"; median pre-clip grad norm {np.median(norms.values):.3g}"
        if clipped is not None:
            # the smallest norm that was clipped bounds max_norm from above
            fired = np.isin(norms.steps, clipped.steps[clipped.values > 0])
            if fired.any():
                detail += f", clipping fires above about {norms.values[fired].min():.3g}"
    return Finding(
        "frequent gradient clipping",
        "warning",
        steps,
        detail,
        "the LR is too high (lower it or lengthen warm-up), or max_norm is too low: when the"
        " typical grad norm is close to it, raise it (to ~2-3x the median) so that clipping only"
        " catches outliers",
    )


def _after_warmup(series: Series, metrics: Metrics) -> Series:
    lr = metrics.lr()
    if lr is None or not len(lr.finite()):
        return series
    lr = lr.finite()
    peak_step = int(lr.steps[int(np.argmax(lr.values >= 0.99 * lr.values.max()))])
    return series.between(peak_step, int(series.steps[-1]) if len(series) else peak_step)


# --- update / weight ratios ------------------------------------------------------------------


def check_update_ratios(
    metrics: Metrics, band: tuple[float, float] = UPDATE_RATIO_BAND
) -> list[Finding]:
    """Per layer: the median ||dW||/||W|| while lr >= half its peak, outside ``band``."""
    layers = [name for name in metrics.names("update_ratio") if not name.endswith(".bias")]
    if not layers:
        return []
    lr = metrics.lr()
    low, high = band
    too_high: list[tuple[str, float, Series]] = []
    too_low: list[tuple[str, float, Series]] = []
    for name in layers:
        ratio = metrics.get(f"update_ratio/{name}")
        assert ratio is not None
        ratio = _judged_steps(ratio.finite(), lr)
        if len(ratio) < 3:
            continue
        median = float(np.median(ratio.values))
        if median > high:
            too_high.append((name, median, Series(ratio.steps, ratio.values > high)))
        elif median < low:
            too_low.append((name, median, Series(ratio.steps, ratio.values < low)))
    findings = []
    groups: tuple[tuple[list[tuple[str, float, Series]], str, Severity, str], ...] = (
        (
            too_high,
            "above",
            "error" if any(m > 10 * high for _, m, _ in too_high) else "warning",
            "lower the LR of these layers (a parameter group with its own LR), or use muP so"
            " that hidden-layer LRs scale as 1/width; check that warm-up is long enough",
        ),
        (
            too_low,
            "below",
            "warning",
            "these layers barely move: raise their LR (per-group LR, or muP's multipliers),"
            " and check that weight decay or a frozen group is not holding them back",
        ),
    )
    for group, direction, severity, fix in groups:
        if not group:
            continue
        group.sort(key=lambda item: -abs(math.log10(max(item[1], 1e-30) / 1e-3)))
        out_steps = np.concatenate([s.steps[s.values.astype(bool)] for _, _, s in group])
        medians = ", ".join(f"{name} {median:.1e}" for name, median, _ in group[:3])
        findings.append(
            Finding(
                "update/weight ratio out of range",
                severity,
                (int(out_steps.min()), int(out_steps.max())),
                f"{len(group)} of {len(layers)} layers {direction} {low:.0e}..{high:.0e}"
                f" (median while lr >= {UPDATE_RATIO_LR_FRACTION:.0%} of peak): {medians}",
                fix,
                tuple(name for name, _, _ in group),
            )
        )
    return findings


def _judged_steps(series: Series, lr: Series | None) -> Series:
    """The records where lr >= half its peak; without lr, all but the first 10%."""
    if lr is not None and len(lr.finite()):
        lr = lr.finite()
        strong = lr.steps[lr.values >= UPDATE_RATIO_LR_FRACTION * lr.values.max()]
        keep = np.isin(series.steps, strong)
        if keep.any():
            return Series(series.steps[keep], series.values[keep])
        # diagnostics not logged on lr steps: judge the span where lr was high
        return series.between(int(strong.min()), int(strong.max()))
    skip = int(len(series) * EDGE_FRACTION)
    return Series(series.steps[skip:], series.values[skip:])


# --- dead units ------------------------------------------------------------------------------


def check_dead_units(metrics: Metrics) -> list[Finding]:
    """A nonlinearity with more than half its units dead for a sustained stretch."""
    hits: list[tuple[str, int, int, float]] = []
    for name in metrics.names("dead_frac"):
        dead = metrics.get(f"dead_frac/{name}")
        assert dead is not None
        dead = dead.finite()
        stretches = _sustained(dead.values > DEAD_FRAC_MAX)
        if stretches:
            first, last = stretches[0][0], stretches[-1][1]
            hits.append(
                (name, int(dead.steps[first]), int(dead.steps[last]), float(dead.values.max()))
            )
    if not hits:
        return []
    worst = max(h[3] for h in hits)
    return [
        Finding(
            "dead units",
            "error" if worst >= DEAD_FRAC_ERROR else "warning",
            (min(h[1] for h in hits), max(h[2] for h in hits)),
            f"{len(hits)} nonlinearities with > {DEAD_FRAC_MAX:.0%} of units passing no gradient"
            f" (worst {worst:.0%})",
            "lower the LR (large updates push units dead), use a smooth activation (GELU/SiLU)"
            " or a smaller init scale, and normalise the inputs of these layers",
            tuple(h[0] for h in hits),
        )
    ]


def _sustained(mask: np.ndarray) -> list[tuple[int, int]]:
    """Runs of True (first, last index) spanning >= 10% of the records and >= 3."""
    min_len = max(3, math.ceil(SUSTAINED_FRACTION * len(mask)))
    runs = []
    start: int | None = None
    for i, flag in enumerate([*mask.tolist(), False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if i - start >= min_len:
                runs.append((start, i - 1))
            start = None
    return runs


# --- activations -----------------------------------------------------------------------------


def check_activations(metrics: Metrics) -> list[Finding]:
    """Block-output std exploding (x100 from the start, > 1e3, or non-finite) or vanishing."""
    # (module, first step, last step, reference std, late std)
    exploding: list[tuple[str, int, int, float, float]] = []
    vanishing: list[tuple[str, int, int, float, float]] = []
    for name in metrics.names("act_std"):
        std = metrics.get(f"act_std/{name}")
        assert std is not None
        if len(std) < 6:
            continue
        edge = max(3, math.ceil(EDGE_FRACTION * len(std)))
        finite = std.values[np.isfinite(std.values)]
        # the first record is the network near its init; the explosion of a too-high LR is
        # often over within warm-up, so a median over early records would already include it
        start = float(finite[0]) if len(finite) else math.nan
        if not np.isfinite(std.values[-edge:]).all():
            first = int(std.steps[int(np.argmax(~np.isfinite(std.values)))])
            exploding.append((name, first, int(std.steps[-1]), start, math.inf))
            continue
        std = std.finite()
        late = float(np.median(std.values[-edge:]))
        smooth = _trailing_median(std.values, 3)
        peak_at = int(np.argmax(smooth))
        peak = float(smooth[peak_at])
        if late > ACT_STD_MAX or (start > 0 and late >= ACT_STD_GROWTH * start):
            bound = min(10 * start, ACT_STD_MAX) if start > 0 else ACT_STD_MAX
            first = int(std.steps[int(np.argmax(std.values > bound))])
            exploding.append((name, first, int(std.steps[-1]), start, late))
        elif peak > 0 and late <= ACT_STD_COLLAPSE * peak:
            falls = np.flatnonzero(std.values[peak_at:] < peak / 10)
            first = int(std.steps[peak_at + (int(falls[0]) if len(falls) else 0)])
            vanishing.append((name, first, int(std.steps[-1]), peak, late))
    findings = []
    if exploding:
        severe = any(late > ACT_STD_MAX for *_, late in exploding)
        findings.append(
            _activation_finding(
                "exploding activations",
                "error" if severe else "warning",
                exploding,
                f"activation std grew x{ACT_STD_GROWTH:.0f} or more, or past {ACT_STD_MAX:.0e}",
                "check norm placement (pre-LN), scale residual branches down (1/sqrt(2 * layers)"
                " on the output projections), use a smaller init scale, lower the LR",
            )
        )
    if vanishing:
        findings.append(
            _activation_finding(
                "vanishing activations",
                "warning",
                vanishing,
                f"activation std fell under {ACT_STD_COLLAPSE:.0%} of its peak",
                "check init scale (fan-in), norm placement and residual connections; too much"
                " weight decay or too high an LR can also collapse a layer",
            )
        )
    return findings


def _activation_finding(
    pathology: str,
    severity: Severity,
    hits: list[tuple[str, int, int, float, float]],
    what: str,
    fix: str,
) -> Finding:
    examples = ", ".join(f"{name} {ref:.3g} -> {late:.3g}" for name, _, _, ref, late in hits[:3])
    return Finding(
        pathology,
        severity,
        (min(h[1] for h in hits), max(h[2] for h in hits)),
        f"{len(hits)} modules: {what} ({examples})",
        fix,
        tuple(h[0] for h in hits),
    )


# --- generalisation --------------------------------------------------------------------------


def check_generalisation(metrics: Metrics) -> list[Finding]:
    """Validation loss rising while training loss falls, or a growing train/val gap."""
    val = metrics.get("val_loss")
    if val is None:
        return []
    val = val.finite()
    train = _train_at(metrics, val.steps)
    if train is None:
        return []
    keep = np.isfinite(train)
    steps, val_loss, train_loss = val.steps[keep], val.values[keep], train[keep]
    if len(steps) < 1 + MIN_EVALS_AFTER:
        return []
    fix = (
        "stop early at step {best} (best validation loss), or add data / regularise (weight"
        " decay, dropout, augmentation) / use a smaller model"
    )
    best = int(np.argmin(val_loss))
    rise = max(VAL_RISE * abs(val_loss[best]), 1e-3)
    after = val_loss[best + 1 :]
    if (
        len(after) >= MIN_EVALS_AFTER
        and (after[-MIN_EVALS_AFTER:] > val_loss[best] + rise).all()
        and train_loss[-1] < train_loss[best]
    ):
        return [
            Finding(
                "overfitting",
                "warning",
                (int(steps[best]), int(steps[-1])),
                f"validation loss rose {val_loss[best]:.3g} -> {val_loss[-1]:.3g} while training"
                f" loss fell {train_loss[best]:.3g} -> {train_loss[-1]:.3g}",
                fix.format(best=int(steps[best])),
            )
        ]
    # Early on the average training loss lags above validation (it fell during the interval),
    # so the gap is measured from zero or its smallest value, whichever is higher.
    gap = val_loss - train_loss
    baseline = max(float(gap.min()), 0.0)
    growth = max(GAP_GROWTH * abs(val_loss[-1]), 1e-3)
    wide = gap > baseline + growth / 2
    stretch = len(gap) - int(np.argmin(wide[::-1])) if not wide.all() else 0
    if len(gap) - stretch >= MIN_EVALS_AFTER and gap[-1] > baseline + growth:
        start = max(stretch - 1, 0)  # the last evaluation with the gap still small
        return [
            Finding(
                "growing train/validation gap",
                "warning",
                (int(steps[start]), int(steps[-1])),
                f"validation - training loss grew {gap[start]:.3g} -> {gap[-1]:.3g}",
                fix.format(best=int(steps[int(np.argmin(val_loss))])),
            )
        ]
    return []


def _train_at(metrics: Metrics, eval_steps: np.ndarray) -> np.ndarray | None:
    """Training loss at each eval step: `train_loss_avg`, else the mean `loss` since the
    previous evaluation."""
    avg = metrics.get("train_loss_avg")
    if avg is not None:
        lookup = dict(zip(avg.steps.tolist(), avg.values.tolist(), strict=True))
        return np.array([lookup.get(int(s), math.nan) for s in eval_steps])
    loss = metrics.get("loss")
    if loss is None:
        return None
    loss = loss.finite()
    out = []
    previous = -math.inf
    for step in eval_steps:
        window = loss.values[(loss.steps > previous) & (loss.steps <= step)]
        out.append(float(window.mean()) if len(window) else math.nan)
        previous = step
    return np.array(out)


# --- batch size against the gradient noise scale -----------------------------------------


def check_batch_size(metrics: Metrics) -> list[Finding]:
    """Where the batch sits against the online B_simple (`diagnostics.gns`), over the last
    NOISE_SCALE_TAIL of its records (the noise scale grows as the loss falls, and the late
    value is the one a longer run will see). Below B_simple steps fall almost in proportion
    to a larger batch; far above it they barely fall (McCandlish et al. 2018, eq. 2.11)."""
    b_simple, batch = metrics.get("gns/b_simple"), metrics.get("gns/batch")
    if b_simple is None or batch is None:
        return []
    b_simple = b_simple.finite()
    if len(b_simple) == 0:
        return []
    first = int(b_simple.steps[int(len(b_simple) * (1 - NOISE_SCALE_TAIL))])
    tail = b_simple.between(first, int(b_simple.steps[-1]))
    noise, size = float(np.median(tail.values)), float(batch.values[-1])
    if noise <= 0:
        return []
    steps = (int(tail.steps[0]), int(tail.steps[-1]))
    tokens = metrics.get("gns/b_simple_tokens")
    tokens = tokens.between(*steps).finite() if tokens is not None else None
    per_example = float(tokens.values[-1] / tail.values[-1]) if tokens and len(tokens) else 1.0
    in_tokens = f" ({noise * per_example:.3g} tokens)" if per_example > 1 else ""
    ratio = noise / size
    if ratio >= BATCH_FAR:
        return [
            Finding(
                "batch below the noise scale",
                "info",
                steps,
                f"batch {size:g} is {ratio:.2g}x below B_simple ≈ {noise:.3g}{in_tokens}: larger"
                " batches would parallelise almost perfectly (steps fall nearly in proportion)",
                "raise data.batch_size or grad_accum_steps toward B_simple to finish in fewer"
                " steps, scaling the lr with it (linear for SGD, square root for Adam);"
                " `scaleplan batch-size` measures the critical batch directly",
            )
        ]
    if ratio <= 1 / BATCH_FAR:
        return [
            Finding(
                "batch above the noise scale",
                "warning",
                steps,
                f"batch {size:g} is {1 / ratio:.2g}x above B_simple ≈ {noise:.3g}{in_tokens}:"
                " beyond the critical batch, more examples per step save few steps",
                "lower the batch toward B_simple and spend the examples on more steps, or"
                " accept the extra compute for the wall-clock gain",
            )
        ]
    return [
        Finding(
            "batch near the noise scale",
            "info",
            steps,
            f"batch {size:g} is within {BATCH_FAR:g}x of B_simple ≈ {noise:.3g}{in_tokens}:"
            " a balanced trade of steps against examples",
            "none needed",
        )
    ]


# --- shared ----------------------------------------------------------------------------------


def _trailing_median(values: np.ndarray, window: int) -> np.ndarray:
    """Median of each value and the window - 1 before it (fewer at the start)."""
    if len(values) == 0:
        return values
    padded = np.concatenate([np.full(window - 1, np.nan), values])
    return np.nanmedian(sliding_window_view(padded, window), axis=1)


Check = Callable[[Metrics], list[Finding]]

# name -> check; run in this order.
CHECKS: dict[str, Check] = {
    "loss": check_loss,
    "clipping": check_clipping,
    "update_ratios": check_update_ratios,
    "dead_units": check_dead_units,
    "activations": check_activations,
    "generalisation": check_generalisation,
    "batch_size": check_batch_size,
}


def diagnose(
    records: Sequence[dict[str, Any]], *, update_ratio_band: tuple[float, float] = UPDATE_RATIO_BAND
) -> list[Finding]:
    """Every finding of every check, in order of first step."""
    metrics = Metrics(records)
    findings = [
        finding
        for name, check in CHECKS.items()
        for finding in (
            check_update_ratios(metrics, update_ratio_band)
            if name == "update_ratios"
            else check(metrics)
        )
    ]
    return sorted(findings, key=lambda f: (f.steps[0], f.steps[1]))


def diagnose_run(
    run_dir: Path, *, update_ratio_band: tuple[float, float] = UPDATE_RATIO_BAND
) -> tuple[int, list[Finding]]:
    """(number of records, findings) for `run_dir/metrics.jsonl`, finished or still running."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {METRICS_FILE} in this directory (is it a run?)")
    records = read_metrics(path)
    return len(records), diagnose(records, update_ratio_band=update_ratio_band)
