"""`scaleplan plan`: compute-optimal N, D and loss for budgets, or inference-aware sizing."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from studies.cli import number
from studies.commands import output
from studies.commands.memory import add_precision_option

DEFAULT_LAW = "epoch2024"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    budget = parser.add_argument_group("budget (one of)")
    budget.add_argument(
        "--compute",
        type=number,
        nargs="+",
        metavar="FLOPS",
        help="training compute in FLOPs, one or more (e.g. 1e21 1e22)",
    )
    budget.add_argument(
        "--gpu-hours",
        type=number,
        nargs="+",
        metavar="H",
        help="GPU-hours, converted to FLOPs with --gpu and --mfu",
    )
    budget.add_argument(
        "--target-loss",
        type=number,
        metavar="L",
        help="with --inference-tokens: the cheapest model over its lifetime",
    )
    parser.add_argument("--gpu", default="h100", help="accelerator for --gpu-hours (default h100)")
    parser.add_argument(
        "--mfu",
        type=number,
        default=0.4,
        help="model FLOPs utilisation for --gpu-hours (default 0.4)",
    )
    parser.add_argument(
        "--inference-tokens",
        type=number,
        metavar="T",
        help="tokens the model will serve; costs 2 N T FLOPs (Sardana et al. 2024)",
    )
    parser.add_argument(
        "--law",
        nargs="+",
        default=[DEFAULT_LAW],
        metavar="NAME|FILE",
        help=f"published law(s) or law file(s) (default {DEFAULT_LAW}; see `scaleplan laws`)",
    )
    parser.add_argument(
        "--level",
        type=number,
        default=0.8,
        help="central interval for bands from bootstrap samples (default 0.8)",
    )
    parser.add_argument(
        "--hparams",
        default="deepseek2024",
        metavar="NAME|FILE",
        help="the learning-rate and batch law: deepseek2024 (default) or a file "
        "`scaleplan fit --approach hparams` wrote",
    )
    parser.add_argument(
        "--batch-from",
        type=Path,
        metavar="FILE",
        help="a `scaleplan batch-size` result (batch_size.json): recommend the batch from your "
        "measured B_crit, carried to the predicted loss with Kaplan's exponent",
    )
    recipe = parser.add_argument_group(
        "recipe (one budget, one law): shape, batch, schedule, GPUs and a trainer config"
    )
    recipe.add_argument(
        "--emit-config",
        type=Path,
        metavar="FILE",
        help="write the recipe as a trainer config that `scaleplan train` runs as is",
    )
    recipe.add_argument(
        "--base",
        type=Path,
        metavar="CONFIG",
        help="trainer config whose data, tracking and other settings the emitted one keeps "
        "(default: the default corpus)",
    )
    recipe.add_argument(
        "--gpus", type=int, metavar="N", help="plan memory and a data x tensor x pipeline split"
    )
    recipe.add_argument("--seq-len", type=int, default=1024, help="sequence length (1024)")
    recipe.add_argument(
        "--vocab-size", type=int, default=50304, help="vocabulary, for total parameters (50304)"
    )
    recipe.add_argument(
        "--micro-batch", type=int, default=1, help="sequences per micro-batch per GPU (1)"
    )
    add_precision_option(recipe, "autocast")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from planner.errors import InputError
    from planner.published import load_law

    given = [
        flag
        for flag, value in (
            ("--compute", args.compute),
            ("--gpu-hours", args.gpu_hours),
            ("--target-loss", args.target_loss),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise InputError(
            f"give exactly one of --compute, --gpu-hours or --target-loss (got {len(given)}:"
            f" {', '.join(given) or 'none'})"
        )
    if not 0 < args.level < 1:
        raise InputError(f"--level: {args.level} must be between 0 and 1 (e.g. 0.8)")
    laws = [load_law(name) for name in args.law]
    if args.target_loss is not None:
        return _lifetime(laws, args)
    if args.compute is not None and args.inference_tokens is not None:
        return _lifetime_budget(laws, args)
    if args.inference_tokens is not None:
        raise InputError("--inference-tokens goes with --compute or --target-loss")
    if args.emit_config is not None or args.gpus is not None or args.base is not None:
        return _recipe(laws, args)
    return _frontier(laws, args)


def _frontier(laws: list[Any], args: argparse.Namespace) -> int:
    from planner.allocate import compute_optimal
    from planner.batch import load_measured_batch
    from planner.hardware import gpu_hours_to_flops
    from planner.hparams import load_hparam_law

    measured = load_measured_batch(args.batch_from) if args.batch_from else None
    hparams = load_hparam_law(args.hparams)
    compute = args.compute
    if args.gpu_hours is not None:
        compute = gpu_hours_to_flops(args.gpu_hours, args.gpu, args.mfu)
    rows = []
    for law in laws:
        law_rows = compute_optimal(
            law, compute, level=args.level, measured_batch=measured, hparams=hparams
        )
        if args.gpu_hours is not None:
            for row, hours in zip(law_rows, args.gpu_hours, strict=True):
                row.update(gpu_hours=hours, gpu=args.gpu, mfu=args.mfu)
        rows.extend(law_rows)
    if args.json:
        output.print_json(rows)
        return 0
    for law in laws:
        columns = [
            "compute (FLOPs)",
            "params N",
            "tokens D",
            "tokens/param",
            "loss",
            "peak LR",
            "batch (tokens)",
            "Kaplan B_crit",
        ]
        if args.gpu_hours is not None:
            columns.insert(1, f"{args.gpu} GPU-hours")
        table = []
        for row in (r for r in rows if r["law"] == law.name):
            cells = [
                output.sci(row["compute_flops"]),
                output.with_band(row, "n_params", output.count),
                output.with_band(row, "n_tokens", output.count),
                output.with_band(row, "tokens_per_param", lambda v: output.fixed(v, 1)),
                output.with_band(row, "loss", output.fixed),
                f"{row['learning_rate']:.2e}",
                output.count(row["batch_tokens"]),
                output.count(row["kaplan_b_crit_tokens"]),
            ]
            if args.gpu_hours is not None:
                cells.insert(1, output.count(row["gpu_hours"]))
            table.append(cells)
        output.print_table(
            f"{law.name}: compute-optimal allocation",
            columns,
            table,
            caption=_caption(law, args.level, measured, hparams),
        )
    return 0


def _caption(law: Any, level: float, measured: Any = None, hparams: Any = None) -> str:
    from planner.hparams import DEEPSEEK2024

    counts = {"flops": "FLOPs per token / 6 (a ladder's count)"}.get(law.n_counts)
    lines = [law.citation, f"N counts {counts or law.n_counts + ' parameters'}."]
    if law.form != "allocation":
        lines[-1] += f" Loss in {law.loss_units}."
    if law.bootstrap:
        lines.append(f"[low–high]: central {level:.0%} over {len(law.bootstrap)} bootstrap fits.")
    source = (
        "DeepSeek LLM power laws (arXiv:2401.02954, eq. 1)"
        if hparams is None or hparams is DEEPSEEK2024
        else f"{hparams.name}: {hparams.citation}"
    )
    lines.append(f"Peak LR and batch: {source}.")
    if measured is not None:
        lines.append(
            f"Batch bounded by your B_crit ({output.count(measured.b_crit_tokens)} tokens at "
            f"loss {measured.loss:.4g}, {measured.source}) carried to the predicted loss as "
            "L^(-1/0.21); meaningful when the law was fitted on the same data (`scaleplan fit` "
            "on your runs)."
        )
    lines.append(
        "Kaplan B_crit: 2e8 tokens / L^(1/0.21) at the predicted loss (Kaplan et al. 2020, "
        "eq. 5.1; their WebText2 nats)."
    )
    return "\n".join(lines)


def _lifetime(laws: list[Any], args: argparse.Namespace) -> int:
    from planner.allocate import inference_optimal
    from planner.errors import InputError

    if args.inference_tokens is None:
        raise InputError("--target-loss needs --inference-tokens T (the tokens the model serves)")
    results = [inference_optimal(law, args.target_loss, args.inference_tokens) for law in laws]
    if args.json:
        output.print_json(results if len(results) > 1 else results[0])
        return 0
    for result in results:
        base = result["chinchilla_optimal"]
        rows = [
            [
                name,
                output.count(r["n_params"]),
                output.count(r["n_tokens"]),
                output.fixed(r["tokens_per_param"], 1),
                output.sci(r["train_flops"]),
                output.sci(r["inference_flops"]),
                output.sci(r["total_flops"]),
            ]
            for name, r in (("inference-aware", result), ("Chinchilla-optimal", base))
        ]
        output.print_table(
            f"{result['law']}: loss {result['target_loss']:.4g} serving"
            f" {output.count(result['inference_tokens'])} tokens",
            [
                "model",
                "params N",
                "tokens D",
                "tokens/param",
                "train FLOPs",
                "inference FLOPs",
                "total FLOPs",
            ],
            rows,
            caption=f"Lifetime FLOPs saved: {result['total_flops_saving']:.1%}"
            " (Sardana et al. 2024, Beyond Chinchilla-Optimal, arXiv:2401.00448).",
        )
    return 0


def _lifetime_budget(laws: list[Any], args: argparse.Namespace) -> int:
    from planner.allocate import inference_budget_optimal

    results = [
        inference_budget_optimal(law, c, args.inference_tokens)
        for law in laws
        for c in args.compute
    ]
    if args.json:
        output.print_json(results)
        return 0
    rows = [
        [
            r["law"],
            output.sci(r["compute_flops"]),
            output.count(r["n_params"]),
            output.count(r["n_tokens"]),
            output.fixed(r["tokens_per_param"], 1),
            output.sci(r["train_flops"]),
            output.sci(r["inference_flops"]),
            output.fixed(r["loss"]),
        ]
        for r in results
    ]
    output.print_table(
        f"Lowest loss when training and serving {output.count(args.inference_tokens)} tokens"
        " fit the budget",
        [
            "law",
            "total FLOPs",
            "params N",
            "tokens D",
            "tokens/param",
            "train FLOPs",
            "inference FLOPs",
            "loss",
        ],
        rows,
    )
    return 0


def _recipe(laws: list[Any], args: argparse.Namespace) -> int:
    import yaml

    from planner.batch import load_measured_batch
    from planner.errors import InputError
    from planner.hardware import gpu_hours_to_flops
    from planner.hparams import load_hparam_law
    from planner.memory import PRECISIONS, fits_note
    from planner.recipe import make_recipe, trainer_config
    from trainer.config import parse_config, read_yaml_mapping
    from trainer.tracking import write_text_atomic

    budgets = args.compute if args.compute is not None else args.gpu_hours
    if len(laws) != 1 or len(budgets) != 1:
        raise InputError(
            f"--emit-config / --gpus / --base: a recipe is for one budget and one law (got "
            f"{len(budgets)} budgets, {len(laws)} laws)"
        )
    compute = float(budgets[0])
    if args.gpu_hours is not None:
        compute = float(gpu_hours_to_flops(budgets, args.gpu, args.mfu)[0])
    base = read_yaml_mapping(args.base, "--base") if args.base is not None else {}
    vocab = args.vocab_size
    if args.emit_config is not None and (base.get("data") or {}).get("kind", "stdlib") in (
        "stdlib",
        "text",
    ):
        vocab = 256  # byte corpora (the default one too)
    hparams = load_hparam_law(args.hparams)
    recipe = make_recipe(
        laws[0],
        compute,
        hparams=hparams,
        seq_len=args.seq_len,
        vocab_size=vocab,
        level=args.level,
        measured_batch=load_measured_batch(args.batch_from) if args.batch_from else None,
        gpu=args.gpu,
        mfu=args.mfu,
        gpus=args.gpus,
        micro_batch=args.micro_batch,
        precision=PRECISIONS[args.precision],
    )
    config = None
    if args.emit_config is not None:
        config = trainer_config(recipe, base)
        parse_config(config)  # what is written trains as is
        header = (
            f"# scaleplan plan --compute {compute:.3g} --law {laws[0].name}: N "
            f"{output.count(recipe['n_params'])}, D {output.count(recipe['n_tokens'])}, "
            f"predicted loss {output.fixed(recipe['loss'])} ({laws[0].loss_units})\n"
        )
        text = header + yaml.safe_dump(config, sort_keys=False)
        write_text_atomic(args.emit_config, text)
    if args.json:
        output.print_json({**recipe, "config": config})
        return 0
    shape = recipe["shape"]
    rows = [
        ["compute", f"{output.sci(compute)} FLOPs"],
        ["params N (law)", output.with_band(recipe, "n_params", output.count)],
        ["tokens D (law)", output.with_band(recipe, "n_tokens", output.count)],
        ["predicted loss", output.with_band(recipe, "loss", output.fixed)],
        [
            "shape",
            f"{shape['n_layer']} layers x {shape['d_model']} wide, {shape['n_head']} heads, "
            f"sequence {shape['seq_len']} ({output.count(recipe['shape_params_non_embedding'])} "
            f"non-embedding, {output.count(recipe['shape_params'])} with vocabulary "
            f"{shape['vocab_size']}, {output.count(recipe['shape_flop_params'])} FLOPs/token/6)",
        ],
        ["peak LR", f"{recipe['learning_rate']:.3g} (AdamW)"],
        [
            "batch",
            f"{recipe['batch_sequences']} sequences = {output.count(recipe['tokens_per_step'])} "
            f"tokens ({recipe['batch_from']})",
        ],
        [
            "schedule",
            f"{recipe['steps']} steps ({output.count(recipe['steps'] * recipe['tokens_per_step'])}"
            f" tokens: C at the shape's N): warm-up {recipe['warmup_steps']}, cosine to "
            f"{recipe['min_lr_ratio']:.0%}",
        ],
        ["GPU-hours", f"{output.count(recipe['gpu_hours'])} {args.gpu} at MFU {args.mfu:.0%}"],
    ]
    if args.gpus is not None:
        hours = recipe["wall_clock_hours"]
        shown = f"{hours:,.0f} h ({hours / 24:,.1f} days)" if hours >= 10 else f"{hours:.3g} h"
        rows.append(["on GPUs", f"{args.gpus} x {args.gpu}: {shown}"])
        rows.append(["split", fits_note(_split(recipe["split"]), args.gpu)])
    if config is not None:
        rows.append(["config", f"{args.emit_config} (scaleplan train {args.emit_config})"])
    output.print_table(
        f"{laws[0].name}: compute-optimal recipe",
        ["", "value"],
        rows,
        caption=_caption(laws[0], args.level, None, hparams)
        + "\nShape: Kaplan et al. 2020 sec. 3.1 (loss flat in d/L), GPT-3's d/L (Brown et al. "
        "2020, Table 2.1). Schedule: Hoffmann et al. 2022 (cosine cycle = run, to 10%)."
        + (
            "\nMemory: ZeRO (Rajbhandari et al. 2020), activations (Korthikanti et al. 2022), "
            "bubble (Narayanan et al. 2021); see `scaleplan memory` for every split."
            if args.gpus is not None
            else ""
        ),
    )
    return 0


def _split(row: dict[str, Any]) -> Any:
    from planner.memory import Split

    return Split(**{k: v for k, v in row.items() if k != "label"})
