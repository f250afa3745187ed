"""Popularity baseline: every shopper gets the most frequent items, as a one-input linear head.

Written as an `nn.Module` with the same `encode`/`head` shape as the sequential models so
that it exports to the same ONNX serving graph and lives in the same model directories.
`encode` returns a constant zero state, so the logits are the head's bias, which
`fit_counts` sets to the log of each item's count (plus one) in the training sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class PopularityConfig:
    """Hyperparameters of `Popularity` (only the catalogue size matters)."""

    n_items: int  # catalogue size; index 0 is padding, so tables have n_items + 1 rows
    max_len: int = 50  # kept for the common model contract; the history is not read


class Popularity(nn.Module):
    """Item scores independent of the history: log(1 + training count)."""

    def __init__(self, config: PopularityConfig) -> None:
        super().__init__()
        self.config = config
        self.head = nn.Linear(1, config.n_items + 1)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """A zero state per position: (B, T) int64 -> (B, T, 1)."""
        # Derived from `items` (not a constant) so the exported graph keeps its input.
        return items.unsqueeze(-1).to(torch.float32) * 0.0  # (B, T, 1)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Next-item logits at every position: (B, T) int64 -> (B, T, n_items + 1)."""
        return self.head(self.encode(items))  # (B, T, V)

    @torch.no_grad()
    def fit_counts(self, items: np.ndarray) -> None:
        """Set the scores from the item indices of every training event (padding ignored)."""
        counts = np.bincount(np.asarray(items, dtype=np.int64), minlength=self.config.n_items + 1)
        counts = counts[: self.config.n_items + 1].astype(np.float64)
        counts[0] = 0.0
        self.head.weight.zero_()
        self.head.bias.copy_(torch.from_numpy(np.log1p(counts)).to(self.head.bias.dtype))
