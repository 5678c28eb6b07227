"""The GPU figures of the distributed issue, in one prepared script for a lent GPU machine.

The ~124M GPT (12 layers, width 768, 12 heads, sequence 1024; GPT-2 small's shape, with
nanoGPT's padded vocabulary of 50304 so the embedding and head cost what they cost there) on
the default corpus (the standard library's sources, bytes as token ids, written as uint16
shards), trained by the real trainer (`trainer.loop.train`) in each mode:

- bf16 (autocast), fp16 (autocast + loss scaling) and fp8 (torchao float8 linears), all with
  `torch.compile`, on the same seed and batches; each mode's validation curve against bf16's
  (largest relative gap, and whether it is within `--tolerance`);
- bf16 with activation checkpointing (peak memory against bf16 without it) and bf16 eager
  (no compile);
- deterministic mode: two identical bf16 runs must give bit-identical loss curves;
- a profiled bf16 run: the step split, ``gpu_busy`` and ``host_syncs`` (cuda*Synchronize per
  step; the profiled steps are plain ones, so this should be 0);
- DDP over the GPUs present (``scaleplan train --nproc N``) when there are at least two.

tokens/s and MFU are the trainer's own metrics (global tokens over the wall time between two
records; MFU against the card's dense bf16 peak from trainer.diagnostics.PEAK_FLOPS), their
median over the records after the first `--warmup` steps; peak memory is
``torch.cuda.max_memory_allocated`` over the run. Each finished run appends one JSON line to
``<out>/figures.jsonl`` (so a run cut off by a time limit keeps what it measured), and the end
prints a Markdown table for BENCHMARKS.md.

On a lent machine (its torch has no pydantic, pytorch_optimizer or torchao: carry them as
wheels; see benchmarks/gpu_wheels.sh):

    python benchmarks/gpu_figures.py --out $OUT            # about 6 minutes on one H100

    python benchmarks/gpu_figures.py --smoke --out /tmp/g  # the same plan, tiny, on CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import parse_config  # noqa: E402
from trainer.data import DataConfig, build_data  # noqa: E402
from trainer.loop import train  # noqa: E402

GPT_124M = {"n_layer": 12, "n_head": 12, "d_model": 768, "dropout": 0.0}
SMOKE_GPT = {"n_layer": 2, "n_head": 2, "d_model": 64, "dropout": 0.0}

# name: (overrides of the base config, compared against bf16's curve?)
MODES: dict[str, tuple[dict[str, Any], bool]] = {
    "bf16": ({"precision": "bf16", "compile": True}, False),
    "fp16": ({"precision": "fp16", "compile": True}, True),
    "fp8": ({"precision": "fp8", "compile": True}, True),
    "bf16 + activation checkpointing": (
        {"precision": "bf16", "compile": True, "model": {"activation_checkpointing": True}},
        True,
    ),
    "bf16 eager": ({"precision": "bf16", "compile": False}, True),
}
CUDA_ONLY = ("fp16", "fp8")


def corpus_shards(folder: Path, cache: Path) -> Path:
    """The default corpus as nanoGPT-style uint16 token shards (train.bin, val.bin)."""
    data = build_data(DataConfig(kind="stdlib", cache_dir=cache))
    source = Path(data.meta["cache"])
    for split in ("train", "val"):
        tokens = np.fromfile(source / f"{split}.bin", dtype=np.uint8).astype(np.uint16)
        tokens.tofile(folder / f"{split}.bin")
    return folder


def base_config(args: argparse.Namespace, shards: Path) -> dict[str, Any]:
    smoke = args.smoke
    return {
        "seed": 0,
        "steps": args.steps,
        "log_every": 10,
        "eval_every": args.steps // 4,
        "eval_batches": 4,
        "checkpoint_every": 0,
        "clip": {"mode": "norm", "max_norm": 1.0},
        "model": {"kind": "gpt", **(SMOKE_GPT if smoke else GPT_124M)},
        "data": {
            "kind": "bin",
            "path": str(shards),
            "vocab_size": 512 if smoke else 50304,
            "block_size": 64 if smoke else 1024,
            "batch_size": 4 if smoke else args.batch_size,
        },
        "grad_accum_steps": 1,
        "optimizer": {"name": "adamw", "lr": 6e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "schedule": {"name": "cosine", "warmup_steps": max(2, args.steps // 10)},
        "diagnostics": {"per_layer": False, "activations": False},
        "tracking": {"enabled": False},
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) else value
    return out


def one_run(name: str, raw: dict[str, Any], out: Path, warmup: int) -> dict[str, Any]:
    """Train `raw` into out/<name>; its throughput, memory and curves."""
    cuda = raw["device"] == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    folder = out / "runs" / name.replace(" + ", "_").replace(" ", "_")
    start = time.perf_counter()
    result = train(parse_config(raw), out_dir=folder)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > warmup]
    return {
        "mode": name,
        "steps": result.steps,
        "stopped": result.stopped_reason,
        "wall_s": round(seconds, 1),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed) if timed else None,
        "mfu": statistics.median(r["mfu"] for r in timed) if timed else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "val_curve": result.val_curve,
        "train_curve": result.train_curve,
        "final_val_loss": result.final_val_loss,
        "profile": result.profile,
    }


def largest_gap(curve: list[list[float]], reference: list[list[float]]) -> float:
    """Largest relative gap between two validation curves at their common steps."""
    ref = dict((int(step), loss) for step, loss in reference)
    gaps = [abs(loss - ref[int(step)]) / ref[int(step)] for step, loss in curve if step in ref]
    return max(gaps) if gaps else float("nan")


def ddp_run(raw: dict[str, Any], out: Path, gpus: int) -> dict[str, Any]:
    """`scaleplan train --nproc gpus` (NCCL DDP) on the bf16 config; its tokens/s."""
    import yaml

    folder = out / f"ddp_{gpus}_gpus"
    config_path = out / "ddp.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "studies.cli", "train", str(config_path)]
    command += ["--nproc", str(gpus), "--out", str(folder)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 20]
    return {
        "mode": f"bf16 DDP over {gpus} GPUs",
        "rc": done.returncode,
        "wall_s": round(time.perf_counter() - start, 1),
        "tokens_per_s": statistics.median(timed) if timed else None,
        "error": done.stderr[-500:] if done.returncode else None,
    }


def record(out: Path, row: dict[str, Any]) -> None:
    with (out / "figures.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    shown = {k: v for k, v in row.items() if k not in ("val_curve", "train_curve")}
    print(json.dumps(shown), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="rows of 1024 tokens")
    parser.add_argument("--warmup", type=int, default=50, help="steps left out of tokens/s")
    parser.add_argument("--tolerance", type=float, default=0.02, help="relative, vs bf16")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, CPU is enough")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup = min(args.steps, 20), 5
    cuda = torch.cuda.is_available()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    record(
        args.out,
        {
            "machine": device,
            "torch": torch.__version__,
            "date": dt.date.today().isoformat(),
            "command": " ".join(sys.argv),
        },
    )
    with tempfile.TemporaryDirectory() as scratch:
        shards = corpus_shards(Path(scratch), Path(scratch) / "cache")
        base = base_config(args, shards)
        rows: dict[str, dict[str, Any]] = {}
        for name in args.modes.split(","):
            overrides, compared = MODES[name]
            if not cuda and name in CUDA_ONLY:
                record(args.out, {"mode": name, "skipped": "needs CUDA"})
                continue
            if not cuda:  # compile on CPU takes minutes for nothing this script measures
                overrides = {**overrides, "compile": False, "precision": "bf16"}
            try:
                row = one_run(name, merged(base, overrides), args.out, args.warmup)
            except Exception as error:  # one mode failing must not lose the others' figures
                row = {"mode": name, "error": f"{type(error).__name__}: {error}"[:500]}
            if compared and "bf16" in rows and "val_curve" in row:
                gap = largest_gap(row["val_curve"], rows["bf16"]["val_curve"])
                row["val_gap_vs_bf16"] = gap
                row["within_tolerance"] = gap <= args.tolerance
            rows[name] = row
            record(args.out, row)

        short = merged(base, {"steps": min(args.steps, 50), "eval_every": 0, "compile": False})
        pair = [
            one_run(f"deterministic {i}", {**short, "deterministic": True}, args.out, 0)
            for i in (1, 2)
        ]
        record(
            args.out,
            {
                "mode": "deterministic bf16, two runs",
                "identical": pair[0]["train_curve"] == pair[1]["train_curve"],
                "train_curve": pair[0]["train_curve"],
            },
        )
        profiled = {**short, "log_every": 25, "profile": {"enabled": True}}
        row = one_run("profiled", profiled, args.out, 0)
        record(args.out, {"mode": "profile (bf16, steps 8-10)", "profile": row["profile"]})

        gpus = torch.cuda.device_count() if cuda else 0
        if gpus >= 2:
            record(args.out, ddp_run(merged(base, MODES["bf16"][0]), args.out, gpus))
        else:
            record(args.out, {"mode": "DDP over GPUs", "skipped": f"{gpus} GPU(s) present"})
        print(table(rows))
    return 0


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| mode | tokens/s | MFU | peak memory (GiB) | final val loss | gap vs bf16 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error'][:80]} | | | | |")
            continue

        def fmt(value: Any, spec: str) -> str:
            return "—" if value is None else format(value, spec)

        lines.append(
            f"| {name} | {fmt(row['tokens_per_s'], ',.0f')} | {fmt(row['mfu'], '.1%')} | "
            f"{fmt(row['peak_memory_gib'], '.1f')} | {fmt(row['final_val_loss'], '.4f')} | "
            f"{fmt(row.get('val_gap_vs_bf16'), '.2%')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
