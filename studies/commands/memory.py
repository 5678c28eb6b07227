"""`scaleplan memory`: memory per GPU under DDP and ZeRO-1/2/3, activations, and every data x
tensor x pipeline split of the GPUs that fits, fastest first (planner.memory)."""

from __future__ import annotations

import argparse
from typing import Any

from studies.cli import number
from studies.commands import output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("the model (one of)")
    model.add_argument(
        "--params",
        type=number,
        metavar="N",
        help="parameters; a GPT shape is chosen for them (planner.shape) unless --shape is given",
    )
    model.add_argument("--shape", metavar="L,D,H", help="layers, width and heads, e.g. 32,4096,32")
    parser.add_argument("--gpus", type=int, required=True, metavar="N", help="GPUs in all")
    parser.add_argument("--gpu", default="h100", help="accelerator (default h100)")
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length (2048)")
    parser.add_argument("--vocab-size", type=int, default=50304, help="vocabulary (50304)")
    parser.add_argument(
        "--batch", type=int, default=512, metavar="SEQUENCES", help="global batch (512)"
    )
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    add_precision_option(parser, "mixed")
    parser.add_argument("--mfu", type=number, default=0.4, help="for step times (0.4)")
    parser.add_argument("--top", type=int, default=8, help="splits to list (8)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def add_precision_option(parser: Any, default: str) -> None:
    """``--precision mixed|autocast``: the model-state bytes per parameter (planner.memory)."""
    parser.add_argument(
        "--precision",
        choices=("mixed", "autocast"),
        default=default,
        help="model-state bytes: mixed (ZeRO's fp16 weights/grads + fp32 master and Adam, "
        "2+2+12) or autocast (fp32 weights/grads and Adam, 4+4+8: this project's trainer); "
        f"default {default}",
    )


def run(args: argparse.Namespace) -> int:
    from planner.errors import InputError
    from planner.memory import PRECISIONS, Transformer, plan_splits, zero_table
    from planner.shape import shape_for

    if (args.params is None) == (args.shape is None):
        raise InputError("give exactly one of --params N or --shape L,D,H")
    if args.gpus < 1:
        raise InputError(f"--gpus: {args.gpus} is not allowed; expected a positive count")
    if args.shape is not None:
        try:
            layers, width, heads = (int(part) for part in args.shape.split(","))
        except ValueError:
            raise InputError(
                f"--shape: '{args.shape}' is not three integers L,D,H (e.g. 32,4096,32)"
            ) from None
        if min(layers, width, heads) < 1 or width % heads:
            raise InputError(f"--shape: {args.shape}: expected positive L,D,H with H dividing D")
        shape = Transformer(layers, width, heads, args.seq_len, args.vocab_size)
        n_params = shape.n_params
    else:
        n_params = float(args.params)
        shape = shape_for(n_params, seq_len=args.seq_len, vocab_size=args.vocab_size)
    precision = PRECISIONS[args.precision]
    states = zero_table(n_params, args.gpus, precision)
    splits = plan_splits(
        shape,
        gpus=args.gpus,
        gpu=args.gpu,
        batch_sequences=args.batch,
        micro_batch=args.micro_batch,
        precision=precision,
        mfu=args.mfu,
    )
    if args.json:
        output.print_json(
            {
                "n_params": n_params,
                "shape": vars(shape),
                "model_states_gb": states,
                "splits": [split.to_dict() for split in splits],
            }
        )
        return 0
    output.print_table(
        f"Model states per GPU: {output.count(n_params)} parameters, {args.gpus} data-parallel "
        f"GPUs, {precision.name} ({precision.param:g}+{precision.grad:g}+"
        f"{precision.optimizer:g} bytes per parameter)",
        ["", "weights GB", "gradients GB", "optimizer GB", "total GB"],
        [
            [row["stage"], *(f"{row[k]:.1f}" for k in ("params", "grads", "optimizer", "total"))]
            for row in states
        ],
        caption="Rajbhandari et al. 2020, ZeRO (arXiv:1910.02054), sec. 5 and Fig. 1.",
    )
    fitting = [split for split in splits if split.fits][: args.top]
    rows = [_split_row(split) for split in fitting]
    title = (
        f"Splits of {args.gpus} x {args.gpu} for {shape.n_layer} x {shape.d_model} "
        f"({shape.n_head} heads, sequence {shape.seq_len}, {output.count(shape.n_params)} with "
        f"embeddings), batch {args.batch} sequences"
    )
    if not rows:
        least = min(splits, key=lambda s: s.total_gb) if splits else None
        needs = f"; at best {least.label} needs {least.total_gb:.1f} GB" if least else ""
        raise InputError(
            f"--gpus: the model fits no split of {args.gpus} {args.gpu} GPUs{needs}; use more "
            "GPUs or a smaller model"
        )
    output.print_table(
        title,
        ["split", "states GB", "activations GB", "total GB", "bubble", "all-reduce s", "step s"],
        rows,
        caption="Fastest first (estimated). Activations: Korthikanti et al. 2022 "
        "(arXiv:2205.05198), flash attention; bubble (p-1)/(m+p-1): Narayanan et al. 2021 "
        "(arXiv:2104.04473); ring all-reduce over NVLink inside a node, 50 GB/s across.",
    )
    return 0


def _split_row(split: Any) -> list[str]:
    return [
        split.label,
        f"{split.states_gb:.1f}",
        f"{split.activations_gb:.1f}",
        f"{split.total_gb:.1f}",
        f"{split.bubble:.1%}",
        f"{split.allreduce_s:.3g}",
        f"{split.step_s:.3g}",
    ]
