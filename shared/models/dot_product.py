"""Embedding dot-product model ("mf"): the shopper vector is the mean of their items' embeddings.

The matrix-factorisation baseline of the original design, made sequential and federable:
there are no per-shopper parameters (a shopper is represented by the running mean of the
embeddings of the items seen so far), so it serves a new shopper from their first event
and its weights can be averaged across sites. The score of an item is the dot product of
that mean with the item's row of a separate output table (the untied `head`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DotProductConfig:
    """Hyperparameters of `DotProduct`."""

    n_items: int  # catalogue size; index 0 is padding, so tables have n_items + 1 rows
    max_len: int = 50  # inputs are left-padded (or cut) to this many events
    dim: int = 64  # item embedding size
    dropout: float = 0.2


class DotProduct(nn.Module):
    """Scores items by their dot product with the causal mean of the history's embeddings."""

    def __init__(self, config: DotProductConfig) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.n_items + 1, config.dim, padding_idx=0)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.dim, config.n_items + 1)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """Mean embedding of the items up to each position: (B, T) int64 -> (B, T, D)."""
        x = self.dropout(self.item_emb(items))  # (B, T, D); padding rows are 0
        count = torch.cumsum((items != 0).to(x.dtype), dim=1).clamp(min=1.0)  # (B, T)
        return torch.cumsum(x, dim=1) / count.unsqueeze(-1)  # (B, T, D)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Next-item logits at every position: (B, T) int64 -> (B, T, n_items + 1)."""
        return self.head(self.encode(items))  # (B, T, V)
