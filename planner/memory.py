"""Memory per GPU and a data x tensor x pipeline split for training a transformer.

Model states (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", arXiv:1910.02054, sec. 3.1 and 5): for Psi parameters trained with Adam, the
weights take ``param_bytes`` Psi, the gradients ``grad_bytes`` Psi and the optimiser state K Psi.
Over N_d data-parallel ranks:

- DDP (no sharding): (param + grad + K) Psi
- ZeRO-1 (P_os, optimiser state sharded): (param + grad) Psi + K Psi / N_d
- ZeRO-2 (P_os+g, + gradients): param Psi + (grad + K) Psi / N_d
- ZeRO-3 (P_os+g+p, + parameters; FSDP's full sharding): (param + grad + K) Psi / N_d

`MIXED` is the paper's mixed-precision Adam (fp16 weights and gradients, fp32 master weights,
momentum and variance: 2 + 2 + 12 bytes); `AUTOCAST` is PyTorch autocast and FSDP2 as this
project's trainer runs them (fp32 weights and gradients, Adam's two fp32 moments: 4 + 4 + 8).
Tensor (t) and pipeline (p) parallelism divide each GPU's share of Psi by t * p.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", arXiv:2205.05198, sec. 4, 16-bit values): per layer and micro-batch of b sequences of
length s, width h, a heads, ``s b h (34 + 5 a s / h)`` bytes; with tensor parallelism and
sequence parallelism both terms divide by t. Flash attention (the trainer's SDPA) keeps no
a*s*s score matrix, which drops the ``5 a s / h`` term (the paper's selective recomputation).
With full activation checkpointing a layer keeps only its input, ``2 s b h`` bytes. Under the
1F1B pipeline schedule the first stage holds p micro-batches of its L/p layers, so the peak is
L layers' worth whatever p is (their sec. 4.2). Embedding and head activations are left out.

Pipeline bubble (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", arXiv:2104.04473, sec. 2.2.1): with m micro-batches per step the
idle fraction of a step is (p - 1) / (m + p - 1).

Data-parallel gradient all-reduce (ring; Patarasuk and Yuan 2009, "Bandwidth optimal
all-reduce algorithms"): each rank sends and receives 2 (N_d - 1) / N_d of the gradient bytes,
at the slowest link's bandwidth (NVLink inside a node, the network across nodes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from planner.errors import InputError
from planner.hardware import INTER_NODE_GBS, accelerator, peak_flops

GIB = 2**30
GB = 1e9


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of the weights, the gradients and the optimiser state (K)."""

    name: str
    param: float
    grad: float
    optimizer: float


MIXED = StateBytes("mixed", 2.0, 2.0, 12.0)  # ZeRO's mixed-precision Adam
AUTOCAST = StateBytes("autocast", 4.0, 4.0, 8.0)  # fp32 weights and grads, Adam's 2 moments
PRECISIONS = {s.name: s for s in (MIXED, AUTOCAST)}

ZERO_STAGES = {0: "DDP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3 / FSDP"}


def model_state_bytes(
    n_params: float, zero_stage: int, data_parallel: int, precision: StateBytes = MIXED
) -> dict[str, float]:
    """Bytes per GPU of weights, gradients and optimiser state, and their ``total``, for
    `n_params` parameters on this GPU's model-parallel share (ZeRO, sec. 5)."""
    if zero_stage not in ZERO_STAGES:
        raise InputError(f"zero_stage: {zero_stage} is not one of 0, 1, 2, 3")
    n_d = float(data_parallel)
    weights = precision.param * n_params / (n_d if zero_stage >= 3 else 1.0)
    grads = precision.grad * n_params / (n_d if zero_stage >= 2 else 1.0)
    optimizer = precision.optimizer * n_params / (n_d if zero_stage >= 1 else 1.0)
    return {
        "params": weights,
        "grads": grads,
        "optimizer": optimizer,
        "total": weights + grads + optimizer,
    }


@dataclass(frozen=True)
class Transformer:
    """A GPT's shape, as far as memory and parallelism need it."""

    n_layer: int
    d_model: int
    n_head: int
    seq_len: int
    vocab_size: int
    mlp_ratio: float = 4.0

    @property
    def n_params_non_embedding(self) -> float:
        """Attention 4 h^2 and MLP 2 r h^2 per layer (Kaplan et al. 2020, eq. 2.1: 12 L h^2
        at r = 4); norms and biases left out."""
        return self.n_layer * (4.0 + 2.0 * self.mlp_ratio) * self.d_model**2

    @property
    def n_params(self) -> float:
        """With the token embedding (tied to the head) and a learned position table."""
        return self.n_params_non_embedding + (self.vocab_size + self.seq_len) * self.d_model


def activation_bytes(
    shape: Transformer,
    micro_batch: int,
    *,
    tensor_parallel: int = 1,
    checkpointing: bool = False,
    flash_attention: bool = True,
    bytes_per_value: float = 2.0,
) -> float:
    """Peak activation bytes per GPU for one micro-batch of `micro_batch` sequences through
    all layers (Korthikanti et al. 2022, sec. 4; sequence parallelism with t > 1)."""
    s, b, h, a = shape.seq_len, micro_batch, shape.d_model, shape.n_head
    scale = bytes_per_value / 2.0  # their counts are for 16-bit values
    if checkpointing:
        per_layer = 2.0 * s * b * h / tensor_parallel
    else:
        attention_scores = 0.0 if flash_attention else 5.0 * a * s / h
        per_layer = s * b * h * (34.0 + attention_scores) / tensor_parallel
    return per_layer * shape.n_layer * scale


def pipeline_bubble(pipeline: int, micro_batches: int) -> float:
    """Idle fraction of a 1F1B pipeline step: (p - 1) / (m + p - 1) (Narayanan et al. 2021)."""
    return (pipeline - 1) / (micro_batches + pipeline - 1)


def allreduce_seconds(gradient_bytes: float, data_parallel: int, bandwidth_gbs: float) -> float:
    """Ring all-reduce time of `gradient_bytes` over `data_parallel` ranks at `bandwidth_gbs`
    GB/s per rank and direction: 2 (N - 1) / N of the bytes cross each rank's link."""
    if data_parallel <= 1:
        return 0.0
    return 2.0 * (data_parallel - 1) / data_parallel * gradient_bytes / (bandwidth_gbs * GB)


@dataclass(frozen=True)
class Split:
    """One way to lay the model over the GPUs, and what it costs per GPU."""

    data: int
    tensor: int
    pipeline: int
    zero_stage: int
    checkpointing: bool
    micro_batch: int
    micro_batches: int  # per step per pipeline, m
    states_gb: float
    activations_gb: float
    total_gb: float
    fits: bool
    bubble: float
    allreduce_s: float
    allreduce_link: str
    compute_s: float  # the step's FLOPs on this GPU at the given MFU (recomputation included)
    tensor_comm_s: float
    step_s: float  # estimated: see `step_seconds`

    @property
    def label(self) -> str:
        ckpt = " + act. ckpt" if self.checkpointing else ""
        layout = f"d{self.data} x t{self.tensor} x p{self.pipeline}"
        return f"{layout}, {ZERO_STAGES[self.zero_stage]}{ckpt}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def step_seconds(
    compute_s: float, bubble: float, allreduce_s: float, tensor_comm_s: float
) -> float:
    """A step's estimated time: the compute stretched by the pipeline bubble, plus the
    tensor-parallel all-reduces (on the critical path), plus what the data-parallel gradient
    reduction does not hide behind the backward pass (two thirds of the compute)."""
    exposed = max(0.0, allreduce_s - 2.0 / 3.0 * compute_s)
    return compute_s / (1.0 - bubble) + tensor_comm_s + exposed


def plan_splits(
    shape: Transformer,
    *,
    gpus: int,
    gpu: str = "h100",
    batch_sequences: int,
    micro_batch: int = 1,
    precision: StateBytes = AUTOCAST,
    headroom: float = 0.9,
    mfu: float = 0.4,
    inter_node_gbs: float = INTER_NODE_GBS,
) -> list[Split]:
    """Every data x tensor x pipeline split of `gpus` that the shape allows (t divides the
    heads and stays inside a node; p divides the layers; each of the d ranks gets at least one
    micro-batch of the `batch_sequences`, m = ceil(batch / (d b)) of them), under each ZeRO
    stage, with and without activation checkpointing; fitting ones first, fastest first by
    `step_seconds`. A split fits when its bytes stay under `headroom` of the GPU's memory.

    Communication: ring all-reduces; data-parallel gradients in bf16, 1.5x as many bytes under
    ZeRO-3 (its parameter all-gathers; ZeRO sec. 7) and none moved twice under ZeRO-1/2; four
    all-reduces of the s b h activations per layer and micro-batch under tensor parallelism
    (two forward, two backward: Shoeybi et al. 2019, Megatron-LM, sec. 3). Compute: 6 N
    FLOPs per token (8 N with full recomputation) at `mfu` of the GPU's peak."""
    if gpus < 1:
        raise InputError(f"--gpus: {gpus} is not allowed; expected a positive count")
    if batch_sequences < 1 or micro_batch < 1:
        raise InputError(
            f"batch: {batch_sequences} sequences in micro-batches of {micro_batch}; expected "
            "positive counts"
        )
    card = accelerator(gpu)
    limit = headroom * card.memory_gb * GB
    rate = peak_flops(gpu) * mfu
    splits = []
    for tensor in _divisors(min(gpus, card.gpus_per_node)):
        if shape.n_head % tensor or gpus % tensor:
            continue
        for pipeline in _divisors(gpus // tensor):
            if shape.n_layer % pipeline:
                continue
            data = gpus // (tensor * pipeline)
            if data * micro_batch > batch_sequences:
                continue  # a data-parallel rank without a micro-batch
            micro_batches = math.ceil(batch_sequences / (data * micro_batch))
            share = shape.n_params / (tensor * pipeline)
            crosses = data * tensor > card.gpus_per_node
            link = "network" if crosses else "NVLink"
            bandwidth = inter_node_gbs if crosses else card.intra_node_gbs
            tokens = micro_batches * micro_batch * data * shape.seq_len  # the step, all ranks
            activation_bytes_tp = 2.0 * shape.seq_len * micro_batch * shape.d_model
            tensor_comm = (
                micro_batches
                * shape.n_layer
                / pipeline
                * 4
                * allreduce_seconds(activation_bytes_tp, tensor, card.intra_node_gbs)
            )
            for zero_stage in ZERO_STAGES:
                if zero_stage and data == 1:
                    continue  # nothing to shard over
                states = model_state_bytes(share, zero_stage, data, precision)["total"]
                volume = 1.5 if zero_stage == 3 else 1.0
                reduce_s = allreduce_seconds(volume * 2.0 * share, data, bandwidth)
                for checkpointing in (False, True):
                    acts = activation_bytes(
                        shape, micro_batch, tensor_parallel=tensor, checkpointing=checkpointing
                    )
                    total = states + acts
                    flops = (8.0 if checkpointing else 6.0) * shape.n_params * tokens / gpus
                    bubble = pipeline_bubble(pipeline, micro_batches)
                    compute = flops / rate
                    splits.append(
                        Split(
                            data, tensor, pipeline, zero_stage, checkpointing, micro_batch,
                            micro_batches, states / GB, acts / GB, total / GB, total <= limit,
                            bubble, reduce_s, link, compute, tensor_comm,
                            step_seconds(compute, bubble, reduce_s, tensor_comm),
                        )
                    )  # fmt: skip
    splits.sort(  # ties (within 0.1%): fewer model-parallel ways, less sharding, no recompute
        key=lambda s: (
            not s.fits,
            float(f"{s.step_s:.3g}"),
            s.tensor * s.pipeline,
            s.zero_stage,
            s.checkpointing,
        )
    )
    return splits


def suggest_split(splits: list[Split], gpus: int, gpu: str) -> Split:
    """The fastest split that fits (`plan_splits`' first), or one line saying none does."""
    for split in splits:
        if split.fits:
            return split
    if not splits:
        raise InputError(
            f"--gpus: no data x tensor x pipeline split of {gpus} GPUs divides the model's "
            "heads and layers and the batch; choose another GPU count"
        )
    least = min(splits, key=lambda s: s.total_gb)
    raise InputError(
        f"--gpus: the model fits no split of {gpus} {gpu} GPUs (at best {least.label} needs "
        f"{least.total_gb:.1f} GB per GPU, over {accelerator(gpu).memory_gb:.0f} GB); use more "
        "GPUs or a smaller model"
    )


def zero_table(
    n_params: float, data_parallel: int, precision: StateBytes = MIXED
) -> list[dict[str, Any]]:
    """Model-state GB per GPU under DDP and ZeRO-1/2/3 (the rows of ZeRO's Figure 1)."""
    rows = []
    for stage, name in ZERO_STAGES.items():
        parts = model_state_bytes(n_params, stage, data_parallel, precision)
        rows.append({"stage": name, **{k: v / GB for k, v in parts.items()}})
    return rows


def fits_note(split: Split, gpu: str) -> str:
    memory = accelerator(gpu).memory_gb
    return (
        f"{split.label}: {split.total_gb:.1f} of {memory:.0f} GB per GPU "
        f"({split.states_gb:.1f} model states, {split.activations_gb:.1f} activations); step "
        f"~{split.step_s:.3g} s (compute {split.compute_s:.3g} s, bubble {split.bubble:.1%}, "
        f"gradient all-reduce {split.allreduce_s:.3g} s over {split.allreduce_link}, tensor "
        f"all-reduces {split.tensor_comm_s:.3g} s)"
    )
