"""A GPT shape (layers, width, heads) that hits a parameter count.

Loss depends on the shape only weakly once N is fixed: over d_model / n_layer from about 20 to
200 it moves by a few percent (Kaplan et al. 2020, "Scaling Laws for Neural Language Models",
arXiv:2001.08361, sec. 3.1 and Fig. 5). Within that flat region the shape follows GPT-3's
family (Brown et al. 2020, "Language Models are Few-Shot Learners", arXiv:2005.14165, Table
2.1): d_model / n_layer = 64 up to about 1B non-embedding parameters (125M: 12 x 768) and 128
above (6.7B: 32 x 4096), heads of width 64, or 128 from d_model 2048 on. So with
N = 12 L d^2 (non-embedding, Kaplan eq. 2.1) and d = r L, the width is r (N / (12 r^2))^(1/3),
rounded to a multiple of the head width (16 below width 256); from 16 heads on, to a multiple of
8 heads, and from 16 layers on the depth is a multiple of 4, so that tensor and pipeline
parallelism have ways to divide them. Of the depths from L/2 to 2L whose nearest width keeps d / L
within a factor of 2 of r, the one nearest N is taken, and among those within 3% of N the one
whose d / L is nearest r (6.7B: 32 x 4096 and 175B: 96 x 12288, GPT-3's own shapes).
"""

from __future__ import annotations

import math

from planner.errors import InputError
from planner.memory import Transformer

ASPECT_SMALL, ASPECT_LARGE = 64.0, 128.0
LARGE_FROM = 1e9  # non-embedding parameters
N_TOLERANCE = 0.03  # shapes within 3% of N count as hitting it


def shape_for(
    n_params_non_embedding: float, *, seq_len: int = 1024, vocab_size: int = 50304
) -> Transformer:
    """The shape whose 12 L d^2 is nearest `n_params_non_embedding` at the aspect ratio above."""
    n = float(n_params_non_embedding)
    if not math.isfinite(n) or n < 12 * 16**2:
        raise InputError(
            f"params: {n_params_non_embedding:g} non-embedding parameters is below the smallest "
            f"GPT this sizes (one layer of width 16: {12 * 16**2})"
        )
    aspect = ASPECT_LARGE if n >= LARGE_FROM else ASPECT_SMALL
    width = aspect * (n / (12.0 * aspect**2)) ** (1.0 / 3.0)  # d = r L, 12 L d^2 = N
    head_dim = 128 if width >= 2048 else 64 if width >= 256 else 16
    step = head_dim * (8 if width >= 32 * head_dim else 1)  # many heads: a multiple of 8

    def nearest_width(n_layer: int) -> int:
        return max(head_dim, step * round(math.sqrt(n / (12.0 * n_layer)) / step))

    depth = width / aspect
    quantum = 4 if depth >= 32 else 2 if depth >= 16 else 1
    candidates = range(quantum, max(quantum, 2 * int(depth) + 1) + 1, quantum)
    shapes = [(layers, nearest_width(layers)) for layers in candidates if layers >= depth / 2]
    inside = [(lay, wid) for lay, wid in shapes if aspect / 2 <= wid / lay <= 2 * aspect]

    def miss(shape: tuple[int, int]) -> tuple[float, float]:  # N first (3% is as good as
        # exact), then the aspect ratio nearest r
        n_miss = abs(math.log(12.0 * shape[0] * shape[1] ** 2 / n))
        return max(0.0, n_miss - N_TOLERANCE), abs(math.log(shape[1] / shape[0] / aspect))

    n_layer, d_model = min(inside or shapes, key=miss)
    return Transformer(
        n_layer=n_layer,
        d_model=d_model,
        n_head=d_model // head_dim,
        seq_len=seq_len,
        vocab_size=vocab_size,
    )


def flop_params(shape: Transformer) -> float:
    """The FLOP-equivalent parameter count: training FLOPs per token over 6, i.e. the
    non-embedding N plus attention's scores and values, 2 L d n_ctx (Kaplan et al. 2020, Table
    1: C_forward = 2N + 2 L n_ctx d; the trainer's count), the LM head left out as in Kaplan."""
    return shape.n_params_non_embedding + 2.0 * shape.n_layer * shape.d_model * shape.seq_len


def shape_for_flop_params(
    n_flop_params: float, *, seq_len: int = 1024, vocab_size: int = 50304
) -> Transformer:
    """The shape (of `shape_for`'s family) whose `flop_params` is nearest `n_flop_params`: a law
    fitted to a ladder's table counts N this way. Attention is the larger share of a small
    model at a long context, so the non-embedding targets below N are searched."""
    n = float(n_flop_params)
    smallest = 12.0 * 16**2
    if not math.isfinite(n) or n < smallest:
        raise InputError(
            f"params: {n_flop_params:g} FLOP-equivalent parameters is below the smallest GPT "
            f"this sizes (one layer of width 16: {smallest + 2 * 16 * seq_len:g} at context "
            f"{seq_len})"
        )
    low = max(smallest, n / 64.0)
    targets = [low * (2.0 * n / low) ** (k / 120) for k in range(121)]
    shapes: dict[tuple[int, int], Transformer] = {}
    for target in targets:
        shape = shape_for(target, seq_len=seq_len, vocab_size=vocab_size)
        shapes.setdefault((shape.n_layer, shape.d_model), shape)
    return min(shapes.values(), key=lambda s: abs(math.log(flop_params(s) / n)))
