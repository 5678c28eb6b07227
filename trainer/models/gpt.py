"""A GPT decoder in the spirit of nanoGPT's model.py, with the knobs scaling studies turn.

Parameter names tell muP code what each matrix is (see `GPT.parameter_roles`):
``wte`` / ``wpe`` are the token / position embeddings (input), ``blocks.{i}.attn.c_attn``,
``blocks.{i}.attn.c_proj``, ``blocks.{i}.mlp.c_fc`` and ``blocks.{i}.mlp.c_proj`` are the hidden
matrices (the two ``c_proj`` write into the residual stream), ``lm_head`` is the readout.

Forward multipliers, all neutral by default, are plain attributes for trainer.parametrization
to set: ``GPT.embedding_multiplier``, ``GPT.logit_multiplier``, ``CausalSelfAttention.scale``
(None = 1/sqrt(head_dim); muP uses 1/head_dim) and ``Block.residual_multiplier`` (depth scaling).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.errors import ConfigError
from trainer.models.init import InitFields, Role, init_model_, roles_by_name

ROTARY_BASE = 10_000.0  # Su et al. 2021 (RoFormer), eq. 15: theta_i = 10000^(-2i/d)


class GPTConfig(InitFields):
    """A decoder-only transformer. Defaults: a 0.85M-parameter byte-level model."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["gpt"] = Field(default="gpt", description="Model family: a GPT decoder.")
    n_layer: int = Field(default=4, ge=1, description="Number of transformer blocks.")
    n_head: int = Field(
        default=4, ge=1, description="Attention heads per block; must divide d_model."
    )
    d_model: int = Field(default=128, ge=1, description="Width of the residual stream.")
    block_size: int = Field(
        default=256,
        ge=1,
        description="Longest sequence the model accepts (context length, in tokens).",
    )
    dropout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on embeddings, attention and residual branches.",
    )
    bias: bool = Field(default=False, description="Biases in linear layers and LayerNorm.")
    norm: Literal["layernorm", "rmsnorm"] = Field(
        default="layernorm", description="Normalisation layer: LayerNorm or RMSNorm (no bias)."
    )
    norm_position: Literal["pre", "post"] = Field(
        default="pre",
        description="pre: norm before each sublayer plus a final norm (GPT-2); post: norm after "
        "each residual sum, no final norm (Vaswani et al. 2017).",
    )
    position: Literal["learned", "rotary"] = Field(
        default="learned",
        description="Position encoding: a learned table or rotary (RoPE) in attention.",
    )
    tie_embeddings: bool = Field(
        default=True, description="Share the token embedding matrix with the readout (lm_head)."
    )
    mlp_ratio: float = Field(
        default=4.0, gt=0, description="Feed-forward width as a multiple of d_model."
    )
    activation_checkpointing: bool = Field(
        default=False, description="Recompute each block's activations in backward to save memory."
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> GPTConfig:
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"model.n_head: {self.n_head} does not divide model.d_model {self.d_model}; "
                "expected a divisor of d_model"
            )
        if self.position == "rotary" and (self.d_model // self.n_head) % 2 != 0:
            raise ValueError(
                f"model.n_head: {self.n_head} gives an odd head size "
                f"{self.d_model // self.n_head}; rotary positions need an even head size"
            )
        if self.zero_init_readout and self.tie_embeddings:
            raise ValueError(
                "model.zero_init_readout: true would zero the tied token embeddings; "
                "set model.tie_embeddings: false to use it"
            )
        return self

    @property
    def d_ff(self) -> int:
        """Hidden width of the feed-forward sublayer."""
        return int(round(self.mlp_ratio * self.d_model))


def make_norm(kind: Literal["layernorm", "rmsnorm"], dim: int, bias: bool) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim, bias=bias)
    return nn.RMSNorm(dim, eps=1e-5)


def rotary_tables(head_dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (length, head_dim), in the rotate-half layout."""
    inv_freq = ROTARY_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by position (Su et al. 2021, eq. 34, GPT-NeoX layout)."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        # query, key and value for all heads in one matrix
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.scale: float | None = None  # None: SDPA's 1/sqrt(head_dim)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
            scale=self.scale,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.ln_1 = make_norm(config.norm, config.d_model, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config.norm, config.d_model, config.bias)
        self.mlp = FeedForward(config)
        self.residual_multiplier = 1.0  # each branch's output x this (depth scaling)

    def _branch(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.residual_multiplier == 1.0 else y * self.residual_multiplier

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        if self.pre_norm:
            x = x + self._branch(self.attn(self.ln_1(x), rotary))
            x = x + self._branch(self.mlp(self.ln_2(x)))
        else:
            x = self.ln_1(x + self._branch(self.attn(x, rotary)))
            x = self.ln_2(x + self._branch(self.mlp(x)))
        return x


class GPT(nn.Module):
    """Decoder-only transformer: ``forward(idx, targets) -> (logits, loss)``.

    >>> model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=2, block_size=16), vocab_size=256)
    >>> logits, loss = model(torch.zeros(1, 16, dtype=torch.long))
    >>> tuple(logits.shape), loss
    ((1, 16, 256), None)
    """

    rotary_cos: torch.Tensor  # (block_size, head_dim) buffers, only with rotary positions
    rotary_sin: torch.Tensor

    def __init__(
        self, config: GPTConfig, vocab_size: int, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.embedding_multiplier = 1.0
        self.logit_multiplier = config.output_multiplier

        self.wte = nn.Embedding(vocab_size, config.d_model)
        self.wpe = (
            nn.Embedding(config.block_size, config.d_model)
            if config.position == "learned"
            else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        # post-norm blocks already end in a norm, so only pre-norm needs a final one
        self.ln_f = (
            make_norm(config.norm, config.d_model, config.bias)
            if config.norm_position == "pre"
            else nn.Identity()
        )
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # Press & Wolf 2017
        if config.position == "rotary":
            cos, sin = rotary_tables(config.d_model // config.n_head, config.block_size)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise all weights from the config's scheme (see trainer.models.init)."""
        init_model_(
            self,
            self.parameter_roles(),
            scheme=self.config.init,
            std=self.config.init_std,
            zero_init_readout=self.config.zero_init_readout,
            residual_projections=self.residual_projections(),
            n_layer=self.config.n_layer,
            generator=generator,
        )

    def parameter_roles(self) -> dict[str, Role]:
        """Role of every parameter (input, hidden, readout, vector), keyed by name."""
        return roles_by_name(self, input_prefixes=("wte.", "wpe."), readout_prefixes=("lm_head.",))

    def residual_projections(self) -> list[str]:
        """Names of the matrices that write into the residual stream."""
        return [name for name, _ in self.named_parameters() if name.endswith("c_proj.weight")]

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count; tied matrices count once.

        Without embeddings it leaves out the token and position tables and an untied lm_head:
        every vocabulary and positional parameter (Kaplan et al. 2020, section 2.1).
        """
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward) at context length `seq_len`.

        6 * N + 12 * n_layer * d_model * seq_len with N the non-embedding parameter count:
        6N for the matrix multiplies (Kaplan et al. 2020, section 2.1) plus attention scores
        and values as in Chowdhery et al. 2022 (PaLM), appendix B, without causal halving.
        The readout's 6 * d_model * vocab_size is left out, as in Kaplan et al.
        """
        seq_len = self.config.block_size if seq_len is None else seq_len
        attention = 12 * self.config.n_layer * self.config.d_model * seq_len
        return float(6 * self.num_params(include_embeddings=False) + attention)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids (B, T); mean cross-entropy when targets are given.

        Targets equal to -1 are ignored.
        """
        seq_len = idx.shape[1]
        if seq_len > self.config.block_size:
            raise ConfigError(
                f"data.block_size: {seq_len} is longer than model.block_size "
                f"{self.config.block_size}; expected at most {self.config.block_size}"
            )
        x = self.wte(idx)
        if self.embedding_multiplier != 1.0:
            x = x * self.embedding_multiplier
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(seq_len, device=idx.device))
        x = self.drop(x)
        rotary = (
            (self.rotary_cos[:seq_len], self.rotary_sin[:seq_len]) if self.wpe is None else None
        )
        for block in self.blocks:
            if self.config.activation_checkpointing and self.training:
                x = checkpoint(block, x, rotary, use_reentrant=False)
            else:
                x = block(x, rotary)
        logits = self.lm_head(self.ln_f(x))
        if self.logit_multiplier != 1.0:
            logits = logits * self.logit_multiplier
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=-1,
            label_smoothing=label_smoothing,
        )
        return logits, loss
