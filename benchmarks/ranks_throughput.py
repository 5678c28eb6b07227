"""Tokens/s of one process against two ranks (DDP, FSDP2) on the same global batch, on CPU.

Each run is a real `scaleplan train` (``--nproc 2`` for the ranks, gloo), the same config
and global batch (gpt-tiny's shape: 2 layers, width 128, block 128, batch 16). tokens/s is
the trainer's own ``tokens_per_s`` metric (global tokens over the wall time between two
records), its median over the records after the first `--warmup` steps. The variants run in
alternation, `--repeats` times; printed are the medians and the ratios to one process with all
cores' threads (torch's default) and to one process with one thread (each rank has one).

    python benchmarks/ranks_throughput.py               # about 4 minutes on 2 CPU cores
    python benchmarks/ranks_throughput.py --repeats 5 --steps 80
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {  # name: (processes, OMP threads per process, --set overrides)
    "1 process, all threads": (1, os.cpu_count() or 1, []),
    "1 process, 1 thread": (1, 1, []),
    "2 ranks DDP, 1 thread each": (2, 1, ["distributed.strategy=ddp"]),
    "2 ranks FSDP2, 1 thread each": (2, 1, ["distributed.strategy=fsdp"]),
}


def config(steps: int) -> dict:
    return {
        "steps": steps,
        "log_every": 10,
        "eval_every": 0,
        "eval_batches": 2,
        "checkpoint_every": 0,
        "model": {"n_layer": 2, "n_head": 4, "d_model": 128},
        "data": {"block_size": 128, "batch_size": 16},
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "diagnostics": {"per_layer": False, "activations": False},
        "tracking": {"enabled": False},
    }


def tokens_per_s(path: Path, nproc: int, threads: int, overrides: list[str], warmup: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "studies.cli", "train", str(path), "--json"]
        command += ["--out", f"{out}/run", "--nproc", str(nproc)]
        command += ["--set", *overrides] if overrides else []
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(command, check=True, capture_output=True, env=env, cwd=ROOT)
        lines = Path(f"{out}/run/metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
    return statistics.median(
        r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > warmup
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternating repetitions")
    parser.add_argument("--steps", type=int, default=60, help="steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="records after this step count")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.yaml"
        path.write_text(yaml.safe_dump(config(args.steps)))
        measured: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.repeats):
            for name, (nproc, threads, overrides) in VARIANTS.items():
                measured[name].append(tokens_per_s(path, nproc, threads, overrides, args.warmup))
    medians = {name: statistics.median(values) for name, values in measured.items()}
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"date: {dt.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}; GPT d_model 128, 2 layers, block 128, global batch 16; "
        f"{args.steps} steps, {args.repeats} alternating repeats"
    )
    all_threads, one_thread = medians["1 process, all threads"], medians["1 process, 1 thread"]
    for name, value in medians.items():
        print(
            f"{name:30s} {value:9.0f} tok/s   x{value / all_threads:.2f} of all-threads, "
            f"x{value / one_thread:.2f} of 1 thread   all: {[round(v) for v in measured[name]]}"
        )


if __name__ == "__main__":
    main()
