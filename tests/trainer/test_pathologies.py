"""Pathology checks on synthetic metrics.jsonl files: each named with its step range, none on a
healthy run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainer.errors import ConfigError
from trainer.pathologies import Finding, diagnose, diagnose_run

N = 600  # logged records; one every LOG_EVERY steps
LOG_EVERY = 10
EVAL_EVERY = 50  # records
LAYERS = ("h.0.attn.weight", "h.0.mlp.weight", "h.1.attn.weight", "h.1.mlp.weight")
BLOCKS = ("blocks.0", "blocks.1", "blocks.2", "blocks.3")
GELUS = ("blocks.0.mlp.gelu", "blocks.1.mlp.gelu")


def healthy(seed: int = 0) -> dict[str, np.ndarray]:
    """Per-record metrics of a run with nothing wrong: warm-up + cosine, noisy falling loss."""
    rng = np.random.default_rng(seed)
    i = np.arange(N)
    lr = np.where(
        i < 30, 1e-3 * (i + 1) / 30, 1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * i / N)))
    )
    series: dict[str, np.ndarray] = {
        "loss": 1.5 + 3.5 * np.exp(-i / 80) + rng.normal(0, 0.03, N),
        "lr": lr,
        "grad_norm": np.exp(rng.normal(0, 0.2, N)),
    }
    series["clipped"] = (series["grad_norm"] > 2.0).astype(float)
    for layer in LAYERS:
        series[f"update_ratio/{layer}"] = lr * np.exp(rng.normal(0, 0.3, N))
        series[f"weight_norm/{layer}"] = 10 + i / N
    for k, block in enumerate(BLOCKS):
        series[f"act_std/{block}"] = (1 + k) * (1 + i / N) * np.exp(rng.normal(0, 0.05, N))
        series[f"act_mean/{block}"] = rng.normal(0, 0.01, N)
    for gelu in GELUS:
        series[f"dead_frac/{gelu}"] = np.clip(0.05 + rng.normal(0, 0.01, N), 0, 1)
    return series


def records(series: dict[str, np.ndarray], val_offset: np.ndarray | None = None) -> list[dict]:
    """Training records plus an eval record every EVAL_EVERY records (val = clean loss + gap)."""
    out: list[dict[str, Any]] = []
    clean = 1.5 + 3.5 * np.exp(-np.arange(N) / 80)
    offset = np.full(N, 0.02) if val_offset is None else val_offset
    for r in range(N):
        record: dict[str, Any] = {"step": r * LOG_EVERY}
        for key, values in series.items():
            value = float(values[r])
            record[key] = value if math.isfinite(value) else None
        out.append(record)
        if r % EVAL_EVERY == EVAL_EVERY - 1:
            since = series["loss"][r - EVAL_EVERY + 1 : r + 1]
            out.append(
                {
                    "step": r * LOG_EVERY,
                    "val_loss": float(clean[r] + offset[r]),
                    "train_loss_avg": float(np.mean(since)),
                }
            )
    return out


def only(findings: list[Finding], pathology: str) -> Finding:
    matching = [f for f in findings if f.pathology == pathology]
    assert len(matching) == 1, [f.to_dict() for f in findings]
    return matching[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_run_has_no_findings(seed: int) -> None:
    assert diagnose(records(healthy(seed))) == []


def test_recovered_loss_spike() -> None:
    series = healthy()
    series["loss"][300:305] += 2.0
    finding = only(diagnose(records(series)), "loss spike")
    assert finding.steps == (3000, 3040)
    assert finding.severity == "warning"
    assert "recovered at step 3050" in finding.detail


def test_loss_that_climbs_and_stays_is_divergence() -> None:
    series = healthy()
    series["loss"][400:] = 5.0 + np.random.default_rng(5).normal(0, 0.05, N - 400)
    findings = diagnose(records(series))
    finding = only(findings, "divergence")
    assert finding.steps == (4000, 5990)
    assert finding.severity == "error"
    assert not [f for f in findings if f.pathology == "loss spike"]  # no double report


def test_non_finite_loss_is_divergence() -> None:
    series = healthy()
    series["loss"][450:] = np.nan
    finding = only(diagnose(records(series)), "divergence")
    assert finding.steps == (4500, 5990)
    assert "non-finite from step 4500" in finding.detail


def test_isolated_non_finite_loss_is_a_warning() -> None:
    series = healthy()
    series["loss"][[200, 260]] = np.inf
    finding = only(diagnose(records(series)), "non-finite loss")
    assert finding.steps == (2000, 2600) and finding.severity == "warning"


def test_cumulative_clip_rate_without_per_step_flags() -> None:
    series = healthy()
    del series["clipped"]
    series["clip_rate"] = np.linspace(0.0, 0.3, N)
    finding = only(diagnose(records(series)), "frequent gradient clipping")
    assert finding.steps == (0, 5990) and "30% of all steps clipped" in finding.detail


def test_frequent_clipping_after_warmup() -> None:
    series = healthy()
    rng = np.random.default_rng(3)
    series["clipped"][200:400] = (rng.random(200) < 0.4).astype(float)
    finding = only(diagnose(records(series)), "frequent gradient clipping")
    first, last = finding.steps
    # the rolling 50-record window reaches 10% a few records inside the stretch
    assert 2000 <= first <= 2100 and 3900 <= last <= 4000
    assert "median pre-clip grad norm" in finding.detail
    assert "clipping fires above about" in finding.detail


def test_clipping_during_warmup_only_is_fine() -> None:
    series = healthy()
    series["clipped"][:25] = 1.0
    assert diagnose(records(series)) == []


def test_update_ratio_out_of_band_names_the_layers() -> None:
    series = healthy()
    series["update_ratio/h.1.attn.weight"] *= 200  # ~0.2 at peak LR
    series["update_ratio/h.0.mlp.weight"] /= 100  # ~1e-5
    findings = [f for f in diagnose(records(series)) if f.pathology.startswith("update/weight")]
    assert len(findings) == 2
    high = next(f for f in findings if "above" in f.detail)
    low = next(f for f in findings if "below" in f.detail)
    assert high.layers == ("h.1.attn.weight",) and low.layers == ("h.0.mlp.weight",)
    assert high.severity == "error"  # 20x above the default 1e-2 edge; 10x is an error
    wide = [
        f
        for f in diagnose(records(series), update_ratio_band=(1e-4, 5e-2))
        if f.pathology.startswith("update/weight") and "above" in f.detail
    ]
    assert [f.severity for f in wide] == ["warning"]  # 4x above a 5e-2 edge
    # judged while lr >= half its peak: from the end of warm-up into the cosine decay
    assert 140 <= high.steps[0] <= 300 and 3000 <= high.steps[1] <= 3400


def test_dead_units() -> None:
    series = healthy()
    series["dead_frac/blocks.1.mlp.gelu"][250:] = 0.7
    finding = only(diagnose(records(series)), "dead units")
    assert finding.steps == (2500, 5990)
    assert finding.layers == ("blocks.1.mlp.gelu",)
    assert finding.severity == "warning"


def test_brief_dead_blip_is_not_sustained() -> None:
    series = healthy()
    series["dead_frac/blocks.0.mlp.gelu"][100:110] = 0.8  # 10 of 600 records
    assert diagnose(records(series)) == []


def test_exploding_and_vanishing_activations() -> None:
    series = healthy()
    i = np.arange(N - 300)
    series["act_std/blocks.3"][300:] *= 10 ** (4 * i / len(i))  # x10^4 by the end
    series["act_std/blocks.2"][300:] *= 10 ** (-4 * i / len(i))
    findings = diagnose(records(series))
    exploding = only(findings, "exploding activations")
    assert exploding.layers == ("blocks.3",) and exploding.severity == "error"
    assert 3000 <= exploding.steps[0] <= 3900 and exploding.steps[1] == 5990
    vanishing = only(findings, "vanishing activations")
    assert vanishing.layers == ("blocks.2",)
    assert 3000 <= vanishing.steps[0] <= 3900 and vanishing.steps[1] == 5990


def test_non_finite_activations_explode() -> None:
    series = healthy()
    series["act_std/blocks.1"][500:] = np.inf
    finding = only(diagnose(records(series)), "exploding activations")
    assert finding.steps == (5000, 5990) and finding.severity == "error"


def test_validation_rising_while_training_falls() -> None:
    offset = np.full(N, 0.02)
    offset[300:] += np.linspace(0, 0.8, N - 300)  # val turns up after record ~300
    finding = only(diagnose(records(healthy(), val_offset=offset)), "overfitting")
    assert finding.steps[1] == 5990
    assert 2490 <= finding.steps[0] <= 3490
    assert f"stop early at step {finding.steps[0]}" in finding.fix


def test_growing_train_validation_gap() -> None:
    offset = np.full(N, 0.02)
    offset[100:250] += np.linspace(0, 0.2, 150)  # the gap opens while both losses fall
    offset[250:] += 0.2
    clean = 1.5 + 3.5 * np.exp(-np.arange(N) / 80)
    assert np.all(np.diff(clean + offset) <= 0)
    findings = diagnose(records(healthy(), val_offset=offset))
    finding = only(findings, "growing train/validation gap")
    assert finding.steps[1] == 5990 and 990 <= finding.steps[0] <= 1990
    assert not [f for f in findings if f.pathology == "overfitting"]


def test_train_average_falls_back_to_mean_loss() -> None:
    offset = np.full(N, 0.02)
    offset[300:] += np.linspace(0, 0.8, N - 300)
    recs = [
        {k: v for k, v in r.items() if k != "train_loss_avg"} for r in records(healthy(), offset)
    ]
    assert only(diagnose(recs), "overfitting").steps[1] == 5990


def test_run_dir_with_partial_last_line(tmp_path: Path) -> None:
    series = healthy()
    series["loss"][300:305] += 2.0
    lines = [json.dumps(r) for r in records(series)[:400]]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3300, "loss": 2.')
    n_records, findings = diagnose_run(tmp_path)
    assert n_records == 400
    assert only(findings, "loss spike").steps == (3000, 3040)


def test_missing_run_dir_and_metrics_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such run directory"):
        diagnose_run(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        diagnose_run(tmp_path)


def test_short_or_sparse_runs_do_not_crash() -> None:
    assert diagnose([]) == []
    assert diagnose([{"step": 0, "loss": 5.0}, {"step": 1, "tokens_per_s": 10.0}]) == []
    assert diagnose([{"step": s, "val_loss": 2.0} for s in range(5)]) == []


def test_finding_dict_shape() -> None:
    finding = Finding("dead units", "warning", (1, 2), "d", "f", ("a",))
    assert finding.to_dict() == {
        "pathology": "dead units",
        "severity": "warning",
        "steps": [1, 2],
        "detail": "d",
        "layers": ["a"],
        "fix": "f",
    }
    assert "layers" not in Finding("x", "error", (0, 0), "d", "f").to_dict()
