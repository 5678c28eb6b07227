"""benchmarks/gpu_figures.py, the script a lent GPU machine runs, runs its whole plan on CPU
(--smoke: a tiny model; the CUDA-only modes are recorded as skipped)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_smoke_plan_records_every_figure(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_figures.py"), "--smoke"]
    command += ["--out", str(tmp_path), "--modes", "bf16,fp16,bf16 eager"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {
        row.get("mode", "header"): row
        for row in map(json.loads, (tmp_path / "figures.jsonl").read_text().splitlines())
    }
    assert rows["header"]["torch"] == __import__("torch").__version__
    assert rows["fp16"] == {"mode": "fp16", "skipped": "needs CUDA"}
    assert rows["bf16"]["steps"] == 20 and rows["bf16"]["tokens_per_s"] > 0
    assert rows["bf16 eager"]["within_tolerance"] is True  # the same run: gap 0
    assert rows["deterministic bf16, two runs"]["identical"] is True
    assert rows["profile (bf16, steps 8-10)"]["profile"]["steps"] == 3
    assert "| bf16 eager |" in done.stdout
