"""GRU4Rec-style next-item model: item embedding -> GRU -> untied linear over the catalogue.

Hidasi et al., "Session-based Recommendations with Recurrent Neural Networks" (ICLR 2016),
trained here with full-catalogue cross-entropy at every position. Three choices keep it
correct for DP-SGD and serving:

- the output layer is a separate `nn.Linear` (Opacus computes wrong per-sample gradients for
  a weight tied through a functional matmul);
- inputs are left-padded instead of packed (PackedSequence reorders per-sample gradients
  silently);
- the GRU has no bias terms, so the zero state is a fixed point of a zero input: with
  h = 0 and x = 0 (the padding row of the embedding is zero) the candidate state is
  tanh(0) = 0 and the new state stays 0. Left padding therefore never changes a shopper's
  scores, however many padding steps precede the history; this lets training trim batches
  to their longest sequence while serving pads to ``max_len``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GRU4RecConfig:
    """Hyperparameters of `GRU4Rec`."""

    n_items: int  # catalogue size; index 0 is padding, so tables have n_items + 1 rows
    max_len: int = 50  # inputs are left-padded (or cut) to this many events
    dim: int = 64  # item embedding size
    hidden: int = 64  # GRU state size
    n_layers: int = 1
    dropout: float = 0.25
    n_behaviours: int = 0  # event-type codes in the input tokens (0 = item ids only)


class GRU4Rec(nn.Module):
    """Scores every catalogue item as the next event of each prefix of a sequence."""

    def __init__(self, config: GRU4RecConfig) -> None:
        super().__init__()
        self.config = config
        self.item_emb = nn.Embedding(config.n_items + 1, config.dim, padding_idx=0)
        if config.n_behaviours:
            # Row 0 (unknown type, and padding) stays zero, keeping the zero-state invariant.
            self.behaviour_emb = nn.Embedding(config.n_behaviours + 1, config.dim, padding_idx=0)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.gru = nn.GRU(
            config.dim,
            config.hidden,
            num_layers=config.n_layers,
            bias=False,  # keeps h = 0 a fixed point over padding (module docstring)
            batch_first=True,
            dropout=config.dropout if config.n_layers > 1 else 0.0,
        )
        # A direct path from the current item to the output: next-item choice in shopping logs
        # depends most on the latest item (item-to-item transitions), which a GRU alone
        # passes on only through its gates.
        self.skip = nn.Linear(config.dim, config.hidden, bias=False)
        self.out_dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, config.n_items + 1)
        if config.n_behaviours:
            self.purchase_head = nn.Linear(config.hidden, 1)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """Sequence state after each event: (B, T) int64 item ids or tokens -> (B, T, H)."""
        if self.config.n_behaviours:
            vocab = self.config.n_items + 1
            x = self.item_emb(items % vocab) + self.behaviour_emb(items // vocab)  # (B, T, D)
        else:
            x = self.item_emb(items)  # (B, T, D)
        x = self.emb_dropout(x)  # padding rows stay 0
        h, _ = self.gru(x)  # (B, T, H)
        return self.out_dropout(h + self.skip(x))  # (B, T, H)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Next-item logits at every position: (B, T) int64 -> (B, T, n_items + 1)."""
        return self.head(self.encode(items))  # (B, T, V)
