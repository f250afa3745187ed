"""SASRec-style next-item model: a causal Transformer over the shopper's item sequence.

Kang & McAuley, "Self-Attentive Sequential Recommendation" (ICDM 2018), trained here with
full-catalogue cross-entropy at every position instead of one sampled negative (the change
Klenitskiy & Vasilev, RecSys 2023, show matters most). Differences from the paper, and why:

- attention is written out with `nn.Linear` projections and an explicit matmul/softmax, not
  `nn.MultiheadAttention`, so that Opacus computes per-sample gradients for every weight;
- positions are counted from the shopper's first real item (0, 1, 2, ...), not from the
  left edge of the padded input, and padding keys are masked: a history gets the same
  scores however much left padding precedes it, so training can trim batches and serving
  can pad to ``max_len``;
- the output layer is an untied `nn.Linear`, like every model here (ghost clipping needs it);
- pre-LayerNorm blocks with a final LayerNorm (more stable at the larger learning rates used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class SASRecConfig:
    """Hyperparameters of `SASRec`."""

    n_items: int  # catalogue size; index 0 is padding, so tables have n_items + 1 rows
    max_len: int = 50  # longest history the model reads (size of the position table)
    dim: int = 64  # model width
    n_heads: int = 2
    n_layers: int = 2
    dropout: float = 0.3
    ff_mult: int = 2  # feed-forward width = ff_mult * dim


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees itself and earlier real items."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        if config.dim % config.n_heads:
            raise ValueError(f"dim {config.dim} is not a multiple of n_heads {config.n_heads}")
        self.n_heads = config.n_heads
        self.head_size = config.dim // config.n_heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """(B, T, D) states, (B, 1, T, T) bool mask of visible keys -> (B, T, D)."""
        B, T, _ = x.shape
        nh, hs = self.n_heads, self.head_size  # Python ints: constants in an exported graph
        q, k, v = self.qkv(x).split(nh * hs, dim=2)  # 3 x (B, T, D)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
        att = att.masked_fill(~allowed, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, D)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """Position-wise two-layer perceptron with GELU."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.dim, config.ff_mult * config.dim)
        self.proj = nn.Linear(config.ff_mult * config.dim, config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.dim)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.dim)
        self.ff = FeedForward(config)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """(B, T, D), (B, 1, T, T) -> (B, T, D)."""
        x = x + self.attn(self.ln_1(x), allowed)
        return x + self.ff(self.ln_2(x))


class SASRec(nn.Module):
    """Scores every catalogue item as the next event of each prefix of a sequence."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.n_items + 1, config.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.n_items + 1)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """Sequence state after each event: (B, T) int64 -> (B, T, D)."""
        T = items.shape[1]
        real = items != 0  # (B, T)
        # Position 0 is the first real item; histories longer than the table share its end.
        pos = (torch.cumsum(real.long(), dim=1) - 1).clamp(0, self.config.max_len - 1)  # (B, T)
        x = self.item_emb(items) * math.sqrt(self.config.dim) + self.pos_emb(pos)  # (B, T, D)
        x = self.emb_dropout(x) * real.unsqueeze(-1)  # padding carries nothing
        idx = torch.arange(T, device=items.device)
        causal = idx.unsqueeze(0) <= idx.unsqueeze(1)  # (T, T): key <= query
        self_only = idx.unsqueeze(0) == idx.unsqueeze(1)  # keeps padded queries finite
        allowed = (causal & real.unsqueeze(1)) | self_only  # (B, T, T)
        allowed = allowed.unsqueeze(1)  # (B, 1, T, T)
        for block in self.blocks:
            x = block(x, allowed)
        return self.ln_f(x)  # (B, T, D)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Next-item logits at every position: (B, T) int64 -> (B, T, n_items + 1)."""
        return self.head(self.encode(items))  # (B, T, V)
