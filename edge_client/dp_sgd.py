"""Fast, exact DP-SGD for the shared models: per-shopper gradient norms, clipping and noise.

One training example is one shopper: `PerShopperLoss` returns each shopper's mean
cross-entropy over their non-padded positions, and DP-SGD clips each shopper's whole
gradient to norm C and adds Gaussian noise of std sigma * C to the sum (user-level DP).

How it is fast (measured by ``benchmarks/dp_training.py``; Opacus' stock path with DPGRU
was measured 25x slower than non-DP training, with 10 GB at 50k items, before the project):

- **Ghost norms, one backward (book-keeping).** Opacus' hooks record each layer's input and
  output gradient; from them we compute exact per-shopper gradient norms without ever
  forming a B x V x H per-shopper gradient (ghost clipping: Li et al., "Large Language
  Models Can Be Strong Differentially Private Learners", ICLR 2022), then the *clipped*
  weight gradients directly as sum_b c_b g_b (book-keeping: Bu et al., "Differentially
  Private Optimization on Large Model at Small Cost", ICML 2023), instead of the second
  backward pass of Opacus' ghost mode. The first pass asks autograd
  only for the embedding tables' gradient, so no other weight gradient is computed twice.
- **The head runs on real positions only**, as in non-DP training: `GhostLinear` takes a
  (B, T) mask and computes the ghost norms of the (N, V) output gradient per shopper.
- **`FastGradGRU`** replaces Opacus' DPGRU (a Python loop of cells): it runs torch's fused
  kernel layer by layer and gets the exact per-shopper gradients of every GRU weight in one
  batched pass (gates recomputed in (B, T, 3H) tensors; only the dL/dh recurrence loops).
- **Micro-batches of similar length**: a Poisson batch is split by length (each part trimmed
  of common left padding, with a bounded number of logits); clipping is per shopper, so the
  summed clipped gradient is exactly that of the whole batch, while memory stays bounded
  whatever the batch and the catalogue. Noise is added once per batch by Opacus'
  `DPOptimizerFastGradientClipping`.

Layers are swapped for subclasses with the *same parameters and state_dict keys*
(`FastGradGRU`, `PadAwareEmbedding`, `GhostLinear`, `GhostLayerNorm`), so weights map back
to the plain model exactly. `PadAwareEmbedding` also fixes a quiet flaw of Opacus' embedding
norm sampler: it counts the gradient flowing into the padding row, which `nn.Embedding`
never updates (inflated norms, over-clipping).

Opacus fails silently on tied weights and on packed sequences, so these are refused: a
parameter shared by two modules or held outside a supported layer (`check_dp_compatible`),
`PackedSequence` inputs and a loss through the GRU's final state (`FastGradGRU`), and a
weight used through a functional matmul (`DPSGDEngine.verify`, which compares the norms with
`reference_per_sample_grads`, one backward per shopper, on a few shoppers every round).
"""

from __future__ import annotations

import contextlib
import copy
import math
import secrets
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus.grad_sample import (
    GradSampleModuleFastGradientClipping,
    register_grad_sampler,
    register_norm_sampler,
)
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import _VF, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from edge_client.errors import DPModelError

PerSampleGrads = dict[torch.Tensor, torch.Tensor]  # parameter -> (B, *parameter shape)


class _BookKeeping:
    """Mixin of the DP layers: what the norm pass keeps for the clipped gradient."""

    _dp_pending: Any = None

    def accumulate_clipped(self, coef: torch.Tensor) -> None:
        """Add sum_b coef[b] * (per-sample gradient b) to each parameter's ``.grad``."""
        raise NotImplementedError


@contextlib.contextmanager
def _quiet_embedding_hooks() -> Iterator[None]:
    """Silence torch's note that hooks of modules with integer inputs fire on outputs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


def _add_grad(p: nn.Parameter | torch.Tensor, g: torch.Tensor) -> None:
    if p.grad is None:
        p.grad = g.detach().reshape(p.shape).clone()
    else:
        p.grad.add_(g.reshape(p.shape))


# ----------------------------------------------------------------------------- GRU


@dataclass
class _GRUStash:
    """What one training forward of `FastGradGRU` keeps for its per-sample gradients."""

    inputs: list[torch.Tensor]  # per layer (B, T, In), detached
    outputs: list[torch.Tensor]  # per layer (B, T, H), detached, before inter-layer dropout
    masks: list[torch.Tensor | None]  # inter-layer dropout masks (already scaled by 1/(1-p))


class _FinalStateGuard(torch.autograd.Function):
    """Identity on the GRU's final state that refuses to back-propagate through it.

    Opacus sees only the gradient of the GRU's first output; a loss that used ``h_n`` would
    get per-sample norms that miss part of the gradient, so the clipping bound would not hold.
    """

    @staticmethod
    def forward(ctx: Any, h_n: torch.Tensor) -> torch.Tensor:
        return h_n.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        if bool(grad.ne(0).any()):
            raise DPModelError(
                "the loss depends on the GRU's final state h_n; DP-SGD supports the per-step "
                "output only (use output[:, -1] instead of h_n)"
            )
        return grad


class FastGradGRU(_BookKeeping, nn.GRU):
    """`nn.GRU` (same parameters, names and kernel) with exact, batched per-sample gradients.

    Batch-first, unidirectional, no projection, no initial state. In training with autograd
    on, layers run one at a time through the fused kernel so that each layer's input, output
    and inter-layer dropout mask can be kept for `gru_per_sample_grads`; otherwise it is
    exactly `nn.GRU.forward`.
    """

    _dp_stash: _GRUStash | None = None

    @classmethod
    def from_gru(cls, gru: nn.GRU) -> FastGradGRU:
        """A `FastGradGRU` holding a copy of ``gru``'s weights."""
        if not gru.batch_first or gru.bidirectional or gru.proj_size:
            raise DPModelError(
                "DP-SGD supports batch_first, unidirectional GRUs without projection only"
            )
        new = cls(
            gru.input_size,
            gru.hidden_size,
            num_layers=gru.num_layers,
            bias=gru.bias,
            batch_first=True,
            dropout=gru.dropout,
        )
        new.load_state_dict(gru.state_dict())
        return new.to(next(gru.parameters()).device)

    def layer_weights(self, layer: int) -> list[torch.Tensor]:
        """The flat weights of one layer: W_ih, W_hh[, b_ih, b_hh]."""
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        return [getattr(self, f"{name}_l{layer}") for name in names]

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, hx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, In) -> output (B, T, H), final state (L, B, H)."""
        if isinstance(input, PackedSequence):
            raise DPModelError(
                "PackedSequence gives wrong per-sample gradients under Opacus; left-pad instead"
            )
        if hx is not None:
            raise DPModelError("the DP-SGD GRU takes no initial state (it starts from zeros)")
        if input.dim() != 3:
            raise DPModelError(f"the DP-SGD GRU expects (B, T, In), got {tuple(input.shape)}")
        if not (self.training and torch.is_grad_enabled()):
            self._dp_stash = None
            out, h_n = super().forward(input)
            return out, h_n
        x = input
        stash = _GRUStash([], [], [])
        finals = []
        for layer in range(self.num_layers):
            h0 = x.new_zeros(1, x.shape[0], self.hidden_size)
            y, h_n = _VF.gru(x, h0, self.layer_weights(layer), self.bias, 1, 0.0, True, False, True)
            stash.inputs.append(x.detach())
            stash.outputs.append(y.detach())
            finals.append(h_n)
            mask = None
            if layer < self.num_layers - 1 and self.dropout > 0:
                keep = 1.0 - self.dropout
                mask = torch.empty_like(y).bernoulli_(keep).div_(keep)
                y = y * mask
            stash.masks.append(mask)
            x = y
        self._dp_stash = stash
        h_n = _FinalStateGuard.apply(torch.cat(finals, 0))  # type: ignore[no-untyped-call]
        return x, h_n

    def accumulate_clipped(self, coef: torch.Tensor) -> None:
        """Add sum_b coef[b] * (per-sample gradient b) to each parameter's ``.grad``."""
        grads: PerSampleGrads = self._dp_pending
        self._dp_pending = None
        for p, g in grads.items():
            _add_grad(p, torch.tensordot(coef.to(g.dtype), g, dims=1))


def _grad_of_hidden(
    dy: torch.Tensor, gate_scale: torch.Tensor, z: torch.Tensor, w_hh: torch.Tensor
) -> torch.Tensor:
    """Total dL/dh_t for every step, (B, T, H): the only sequential part of the backward.

    ``gate_scale`` (B, T, 3H) maps dL/dh_t to dL/d(W_hh h_{t-1} + b_hh) at step t; the carry to
    step t-1 is the direct path ``z_t * dh_t`` plus that gate gradient times W_hh.
    """
    B, T, H = dy.shape
    out = torch.empty_like(dy)
    carry = dy.new_zeros(B, H)
    for t in range(T - 1, -1, -1):
        dh = dy[:, t] + carry  # (B, H)
        out[:, t] = dh
        dgh = dh.repeat(1, 3) * gate_scale[:, t]  # (B, 3H)
        carry = torch.addmm(dh * z[:, t], dgh, w_hh)  # (B, H)
    return out


def gru_per_sample_grads(gru: FastGradGRU, backprops: torch.Tensor) -> PerSampleGrads:
    """Exact per-sample gradients of every GRU weight, from the last training forward.

    ``backprops`` is dL/d(output) (B, T, H), where L is the sum of the per-sample losses.
    For each layer (top first) the gates are recomputed in batch from the stored input and
    output (torch's gate order r, z, n), dL/dh_t is propagated back in time, and then

        dW_ih[b] = sum_t dgi[b, t] x[b, t]^T      dW_hh[b] = sum_t dgh[b, t] h[b, t-1]^T

    with dgi, dgh the gradients of the input and hidden gate pre-activations.
    """
    stash = gru._dp_stash
    if stash is None:
        raise DPModelError("no stored GRU forward: per-sample gradients need a training forward")
    grads: PerSampleGrads = {}
    dy = backprops
    H = gru.hidden_size
    for layer in range(gru.num_layers - 1, -1, -1):
        x, y = stash.inputs[layer], stash.outputs[layer]
        weights = [w.detach() for w in gru.layer_weights(layer)]
        params = gru.layer_weights(layer)
        w_ih, w_hh = weights[0], weights[1]
        b_ih, b_hh = (weights[2], weights[3]) if gru.bias else (None, None)
        h_prev = torch.cat([y.new_zeros(y.shape[0], 1, H), y[:, :-1]], dim=1)  # (B, T, H)
        gi = F.linear(x, w_ih, b_ih)  # (B, T, 3H)
        gh = F.linear(h_prev, w_hh, b_hh)  # (B, T, 3H)
        r = torch.sigmoid(gi[..., :H] + gh[..., :H])
        z = torch.sigmoid(gi[..., H : 2 * H] + gh[..., H : 2 * H])
        n = torch.tanh(gi[..., 2 * H :] + r * gh[..., 2 * H :])
        dn_pre = (1 - z) * (1 - n * n)  # d(n pre-activation) / dh_t
        dr_pre = dn_pre * gh[..., 2 * H :] * r * (1 - r)
        dz_pre = (h_prev - n) * z * (1 - z)
        gate_scale = torch.cat([dr_pre, dz_pre, dn_pre * r], dim=-1)  # (B, T, 3H)
        dh3 = _grad_of_hidden(dy, gate_scale, z, w_hh).repeat(1, 1, 3)  # (B, T, 3H)
        dgh = dh3 * gate_scale  # (B, T, 3H)
        dgi = dh3 * torch.cat([dr_pre, dz_pre, dn_pre], dim=-1)  # (B, T, 3H)
        grads[params[0]] = torch.einsum("btg,bti->bgi", dgi, x)
        grads[params[1]] = torch.einsum("btg,bth->bgh", dgh, h_prev)
        if gru.bias:
            grads[params[2]] = dgi.sum(dim=1)
            grads[params[3]] = dgh.sum(dim=1)
        if layer > 0:
            dy = dgi @ w_ih  # (B, T, In): dL/d(input of this layer)
            mask = stash.masks[layer - 1]
            if mask is not None:
                dy = dy * mask
    return grads


def _gru_grad_sampler(
    gru: FastGradGRU, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> PerSampleGrads:
    stash = gru._dp_stash
    if stash is None or stash.inputs[0].data_ptr() != activations[0].data_ptr():
        raise DPModelError("GRU per-sample gradients: the stored forward is not this batch's")
    grads = gru_per_sample_grads(gru, backprops)
    gru._dp_stash = None
    return grads


def _gru_norm_sampler(
    gru: FastGradGRU, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> PerSampleGrads:
    grads = _gru_grad_sampler(gru, activations, backprops)
    gru._dp_pending = grads
    return {p: g.flatten(1).norm(dim=1) for p, g in grads.items()}


# ----------------------------------------------------------------------------- Embedding


class PadAwareEmbedding(_BookKeeping, nn.Embedding):
    """`nn.Embedding` whose per-sample gradients leave out the padding row, as autograd does."""

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> PadAwareEmbedding:
        """A `PadAwareEmbedding` holding a copy of ``emb``'s table."""
        if emb.max_norm is not None or emb.sparse or emb.scale_grad_by_freq:
            raise DPModelError("DP-SGD supports plain embeddings (no max_norm/sparse/scaling)")
        new = cls(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx)
        new.load_state_dict(emb.state_dict())
        return new.to(emb.weight.device)

    def accumulate_clipped(self, coef: torch.Tensor) -> None:
        """Add sum_b coef[b] * (per-sample gradient b) to the table's ``.grad``."""
        sample, ids, g = self._dp_pending
        self._dp_pending = None
        scaled = g * coef.to(g.dtype)[sample].unsqueeze(1)  # (N, D)
        if self.weight.grad is None:
            self.weight.grad = torch.zeros_like(self.weight)
        self.weight.grad.index_add_(0, ids, scaled)


def _embedding_rows(
    layer: nn.Embedding, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample index, table row, output gradient) of every lookup that gets a gradient."""
    ids = activations[0].reshape(activations[0].shape[0], -1)  # (B, T)
    B, D = ids.shape[0], layer.embedding_dim
    g = backprops.reshape(B, -1, D)  # (B, T, D)
    keep = torch.ones_like(ids, dtype=torch.bool)
    if layer.padding_idx is not None:
        keep = ids != layer.padding_idx
    sample = torch.arange(B, device=ids.device).unsqueeze(1).expand_as(ids)[keep]  # (N,)
    return sample, ids[keep], g[keep]


def _embedding_norm_sampler(
    layer: PadAwareEmbedding, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> PerSampleGrads:
    # ||g_b||^2 = sum over rows r of ||sum_{t: id_bt = r} grad_bt||^2, through a unique() of
    # (sample, row) keys: O(B T D), never B x V x D.
    sample, ids, g = _embedding_rows(layer, activations, backprops)
    B = activations[0].shape[0]
    key = sample * layer.num_embeddings + ids
    uniq, inverse = torch.unique(key, return_inverse=True)
    summed = g.new_zeros(len(uniq), g.shape[1]).index_add_(0, inverse, g)  # (U, D)
    sq = g.new_zeros(B).index_add_(0, uniq // layer.num_embeddings, summed.pow(2).sum(dim=1))
    layer._dp_pending = (sample, ids, g)
    return {layer.weight: sq.sqrt()}


def _embedding_grad_sampler(
    layer: PadAwareEmbedding, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> PerSampleGrads:
    # B x V x D: only for small tables (Opacus' non-ghost modes).
    sample, ids, g = _embedding_rows(layer, activations, backprops)
    B = activations[0].shape[0]
    out = g.new_zeros(B * layer.num_embeddings, g.shape[1])
    out.index_add_(0, sample * layer.num_embeddings + ids, g)
    return {layer.weight: out.view(B, layer.num_embeddings, -1)}


# ----------------------------------------------------------------------------- Linear


class GhostLinear(_BookKeeping, nn.Linear):
    """`nn.Linear` that can run on the real positions only: ``forward(x, mask)`` -> (N, out).

    With a (B, T) bool ``mask`` the layer sees only ``x[mask]``, as non-DP training does for
    the catalogue head, and its sampler groups the rows back into shoppers.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> GhostLinear:
        """A `GhostLinear` holding a copy of ``linear``'s weights."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.load_state_dict(linear.state_dict())
        return new.to(linear.weight.device)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, ..., in) -> (B, ..., out); with a (B, T) mask, (B, T, in) -> (N, out)."""
        if mask is None:
            return super().forward(x)
        return F.linear(x[mask], self.weight, self.bias)

    def accumulate_clipped(self, coef: torch.Tensor) -> None:
        """Add sum_b coef[b] * (per-sample gradient b) to weight and bias ``.grad``."""
        rows, a, g = self._dp_pending  # rows[i] = shopper of row i; a (N, in), g (N, out)
        self._dp_pending = None
        c = coef.to(g.dtype)[rows]  # (N,)
        if self.weight.requires_grad:  # a frozen weight (public features) gets no update
            _add_grad(self.weight, g.t() @ (a * c.unsqueeze(1)))  # (out, in)
        if self.bias is not None and self.bias.requires_grad:
            _add_grad(self.bias, c @ g)


def _linear_rows(
    activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of a linear layer's inputs and output gradients, grouped by shopper.

    Returns (shopper of each row (N,), inputs (N, in), output gradients (N, out), rows per
    shopper (B,)). A shopper's rows are consecutive.
    """
    a = activations[0]
    B = a.shape[0]
    if len(activations) == 2:  # masked: rows are x[mask], shopper by shopper
        mask = activations[1]
        counts = mask.reshape(B, -1).sum(dim=1)
        rows_a = a[mask]
        g = backprops
    else:
        T = a[0].numel() // a.shape[-1]
        counts = torch.full((B,), T, dtype=torch.long, device=a.device)
        rows_a = a.reshape(B * T, a.shape[-1])
        g = backprops.reshape(B * T, backprops.shape[-1])
    rows = torch.arange(B, device=a.device).repeat_interleave(counts)
    return rows, rows_a.to(g.dtype), g, counts


def _linear_norm_sampler(
    layer: GhostLinear, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> PerSampleGrads:
    # The per-shopper gradient of W is sum_t g_t a_t^T; its squared norm is
    # sum_{s,t} (g_s . g_t)(a_s . a_t) = <G G^T, A A^T> over that shopper's rows: O(T^2 out)
    # per shopper and never a B x out x in tensor. Shoppers with equal row counts that are
    # next to each other (micro-batches are sorted by length) share one batched matmul.
    rows, a, g, counts = _linear_rows(activations, backprops)
    B = len(counts)
    w_sq = g.new_zeros(B)
    b_sq = g.new_zeros(B)
    counts_list = counts.tolist()
    start_row, i = 0, 0
    while i < B:
        length = counts_list[i]
        j = i
        while j < B and counts_list[j] == length:
            j += 1
        n_rows = (j - i) * length
        if length:
            G = g[start_row : start_row + n_rows].view(j - i, length, -1)  # (n, L, out)
            A = a[start_row : start_row + n_rows].view(j - i, length, -1)  # (n, L, in)
            ggt = torch.bmm(G, G.transpose(1, 2))  # (n, L, L)
            w_sq[i:j] = (ggt * torch.bmm(A, A.transpose(1, 2))).sum(dim=(1, 2))
            b_sq[i:j] = ggt.sum(dim=(1, 2))
        start_row += n_rows
        i = j
    layer._dp_pending = (rows, a, g)
    norms = {layer.weight: w_sq.clamp(min=0).sqrt()}
    if layer.bias is not None:
        norms[layer.bias] = b_sq.clamp(min=0).sqrt()
    return norms


def _linear_grad_sampler(
    layer: GhostLinear, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> PerSampleGrads:
    rows, a, g, counts = _linear_rows(activations, backprops)
    B = len(counts)
    outer = torch.einsum("no,ni->noi", g, a)
    weight = outer.new_zeros(B, *outer.shape[1:]).index_add_(0, rows, outer)
    grads = {layer.weight: weight}
    if layer.bias is not None:
        grads[layer.bias] = g.new_zeros(B, g.shape[1]).index_add_(0, rows, g)
    return grads


# ----------------------------------------------------------------------------- LayerNorm


class GhostLayerNorm(_BookKeeping, nn.LayerNorm):
    """`nn.LayerNorm` whose per-sample gradients (B x D, tiny) are kept for book-keeping."""

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm) -> GhostLayerNorm:
        """A `GhostLayerNorm` holding a copy of ``ln``'s weights."""
        if not ln.elementwise_affine:
            raise DPModelError("a LayerNorm without parameters needs no replacing")
        new = cls(ln.normalized_shape, eps=ln.eps, bias=ln.bias is not None)
        new.load_state_dict(ln.state_dict())
        return new.to(ln.weight.device)

    def accumulate_clipped(self, coef: torch.Tensor) -> None:
        """Add sum_b coef[b] * (per-sample gradient b) to weight and bias ``.grad``."""
        grads: PerSampleGrads = self._dp_pending
        self._dp_pending = None
        for p, g in grads.items():
            _add_grad(p, torch.tensordot(coef.to(g.dtype), g, dims=1))


def _layer_norm_grad_sampler(
    layer: GhostLayerNorm, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> PerSampleGrads:
    x = activations[0]
    B = x.shape[0]
    d = len(layer.normalized_shape)
    normed = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
    grads: PerSampleGrads = {
        layer.weight: (normed * backprops).reshape(B, -1, *x.shape[-d:]).sum(dim=1)
    }
    if layer.bias is not None:
        grads[layer.bias] = backprops.reshape(B, -1, *x.shape[-d:]).sum(dim=1)
    return grads


def _layer_norm_norm_sampler(
    layer: GhostLayerNorm, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> PerSampleGrads:
    grads = _layer_norm_grad_sampler(layer, activations, backprops)
    layer._dp_pending = grads
    return {p: g.flatten(1).norm(dim=1) for p, g in grads.items()}


# Registered on our subclasses only: stock modules keep Opacus' own samplers.
register_grad_sampler(FastGradGRU)(_gru_grad_sampler)
register_norm_sampler(FastGradGRU)(_gru_norm_sampler)
register_grad_sampler(PadAwareEmbedding)(_embedding_grad_sampler)
register_norm_sampler(PadAwareEmbedding)(_embedding_norm_sampler)
register_grad_sampler(GhostLinear)(_linear_grad_sampler)
register_norm_sampler(GhostLinear)(_linear_norm_sampler)
register_grad_sampler(GhostLayerNorm)(_layer_norm_grad_sampler)
register_norm_sampler(GhostLayerNorm)(_layer_norm_norm_sampler)


# ----------------------------------------------------------------------------- models


def check_dp_compatible(model: nn.Module) -> None:
    """Raise `DPModelError` unless every trainable parameter gets exact per-sample gradients.

    Each parameter must belong to exactly one module of a supported type (GRU, Embedding,
    Linear, LayerNorm) and must not be shared (tied) with another module.
    """
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            raise DPModelError(
                f"parameter {name} is the same tensor as {seen[id(p)]} (weight tying): "
                "per-sample gradients would be wrong; use an untied head"
            )
        seen[id(p)] = name
    if not any(p.requires_grad for p in model.parameters()):
        raise DPModelError(f"{type(model).__name__} has no trainable parameters")
    supported = (nn.GRU, nn.Embedding, nn.Linear, nn.LayerNorm)
    for module_name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own and type(module) not in supported and not isinstance(module, _BookKeeping):
            raise DPModelError(
                f"module {module_name or '<root>'} ({type(module).__name__}) holds parameters "
                f"{own} without an exact per-sample gradient rule for DP-SGD"
            )
    for attr in ("encode", "head"):
        if not hasattr(model, attr):
            raise DPModelError(f"{type(model).__name__} has no {attr!r} (see SequentialModel)")
    if type(model.head) is not nn.Linear and not isinstance(model.head, GhostLinear):
        raise DPModelError("the model's head must be an untied nn.Linear")


def to_dp_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its layers swapped for the DP subclasses above.

    Parameter names and the state_dict are unchanged, so the copy's `state_dict()` loads into
    the plain model with ``strict=True`` and exports to ONNX as usual.
    """
    check_dp_compatible(model)
    dp = copy.deepcopy(model)
    swaps: dict[type[nn.Module], Any] = {
        nn.GRU: FastGradGRU.from_gru,
        nn.Embedding: PadAwareEmbedding.from_embedding,
        nn.Linear: GhostLinear.from_linear,
        nn.LayerNorm: GhostLayerNorm.from_layer_norm,
    }
    trainable = {name: p.requires_grad for name, p in dp.named_parameters()}
    for parent in list(dp.modules()):
        for name, child in list(parent.named_children()):
            swap = swaps.get(type(child))
            if swap is not None and any(True for _ in child.parameters()):
                setattr(parent, name, swap(child))
    for name, p in dp.named_parameters():
        p.requires_grad_(trainable[name])  # the swapped layers' fresh parameters
    return dp


def zero_padding_rows(model: nn.Module) -> None:
    """Reset each embedding's padding row to zero (the noise lands on every coordinate).

    The shared models rely on a zero padding row (GRU4Rec: h = 0 stays 0 over left padding).
    The row's true gradient is always zero, so resetting it is post-processing of the noisy
    update and costs no privacy.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()


class PerShopperLoss(nn.Module):
    """Each shopper's mean cross-entropy over their non-padded positions: (B, T) x 2 -> (B,).

    The head runs only on positions with a target, like `shared.training.sequence_loss`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model  # a SequentialModel whose head is a GhostLinear

    def forward(self, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Inputs and targets (B, T) int64 (target 0 = no loss) -> per-shopper loss (B,)."""
        h = self.model.encode(items)  # (B, T, H)
        mask = targets > 0  # (B, T)
        logits = self.model.head(h, mask)  # (N, V)
        ce = F.cross_entropy(logits, targets[mask], reduction="none")  # (N,)
        count = mask.sum(dim=1)  # (B,)
        shopper = torch.arange(len(count), device=ce.device).repeat_interleave(count)
        total = ce.new_zeros(len(count)).index_add_(0, shopper, ce)
        return total / count.clamp(min=1)


def reference_per_sample_grads(
    loss_module: nn.Module, items: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """Ground truth: per-shopper losses and gradients, one backward per shopper.

    Runs one forward (so dropout masks are those of the batch) and then, for each shopper b,
    ``autograd.grad(loss[b], params)``. Returns (losses (B,), grads[b][param index]).
    """
    params = [p for p in loss_module.parameters() if p.requires_grad]
    losses = loss_module(items, targets)
    grads = []
    for b in range(len(losses)):
        with _quiet_embedding_hooks():
            g = torch.autograd.grad(losses[b], params, retain_graph=True, allow_unused=True)
        grads.append(
            [torch.zeros_like(p) if x is None else x for p, x in zip(params, g, strict=True)]
        )
    return losses.detach(), grads


# ----------------------------------------------------------------------------- batches


def microbatches(lengths: np.ndarray, max_logits: int, n_outputs: int) -> list[np.ndarray]:
    """Split a batch (row indices) into micro-batches of similar length, longest first.

    A new micro-batch starts when a row is less than half as long as the micro-batch's
    longest row (bounding the padding the GRU/attention run over), or when its number of
    target positions x ``n_outputs`` would exceed ``max_logits`` (bounding the memory for
    logits whatever the batch size and the catalogue).
    """
    order = np.argsort(-lengths, kind="stable")
    cap = max(1, max_logits // max(1, n_outputs))  # target positions per micro-batch
    out: list[np.ndarray] = []
    start, positions = 0, 0
    for i, row in enumerate(order):
        length = int(lengths[row])
        if i > start and (2 * length < int(lengths[order[start]]) or positions + length > cap):
            out.append(order[start:i])
            start, positions = i, 0
        positions += length
    if len(order) > start:
        out.append(order[start:])
    return out


def trim(inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the leading columns that are padding in every row (exact for left padding)."""
    width = max(1, int((inputs != 0).sum(axis=1).max(initial=1)))
    width = max(width, int((targets != 0).sum(axis=1).max(initial=1)))
    return inputs[:, -width:], targets[:, -width:]


# ----------------------------------------------------------------------------- engine


class DPSGDEngine:
    """DP-SGD on one model: Poisson batches in, clipped, noised Adam updates out.

    Parameters
    ----------
    model
        A shared model (left untouched; the engine trains a DP copy).
    lr, max_grad_norm, noise_multiplier, expected_batch_size
        Adam step size, clipping bound C, noise std / C (sigma), and q x N (the divisor of
        the noisy sum).
    noise_generator
        Source of the Gaussian noise; seed it from the OS (`secure_seed`), never from
        configuration anyone else knows.
    max_logits
        Upper bound of target positions x catalogue per micro-batch (memory bound).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        noise_generator: torch.Generator,
        device: torch.device,
        max_logits: int = 1 << 25,
    ) -> None:
        self.device = device
        self.dp_model = to_dp_model(model).to(device)
        self.n_outputs = int(self.dp_model.head.out_features)  # type: ignore[union-attr,arg-type]
        self.module = GradSampleModuleFastGradientClipping(
            PerShopperLoss(self.dp_model),
            batch_first=True,
            loss_reduction="sum",
            max_grad_norm=max_grad_norm,
            use_ghost_clipping=True,
        )
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.layers = [m for m in self.dp_model.modules() if isinstance(m, _BookKeeping)]
        # The norm pass asks autograd for the tables' gradients only: every layer between the
        # loss and the embeddings still runs its hook, and no other weight gradient is built.
        # A frozen table (item vectors from public attributes) cannot be an anchor: then
        # the pass asks for every trainable parameter instead.
        self.anchors = [
            m.weight
            for m in self.dp_model.modules()
            if isinstance(m, PadAwareEmbedding) and m.weight.requires_grad
        ]
        self.optimizer = DPOptimizerFastGradientClipping(
            torch.optim.Adam(self.params, lr=lr),
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=noise_generator,
        )
        self.max_logits = max_logits

    def clipped_backward(self, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Add sum_b min(1, C/||g_b||) g_b of one micro-batch to ``p.grad``; returns losses."""
        losses = self.module(items, targets)  # (b,)
        for p in self.params:
            p._norm_sample = None  # a stale norm must never be reused
        for m in self.layers:
            m._dp_pending = None
        with _quiet_embedding_hooks():
            torch.autograd.grad(losses.sum(), self.anchors or self.params)
        missing = [p for p in self.params if getattr(p, "_norm_sample", None) is None]
        if missing:
            raise DPModelError(f"{len(missing)} parameter(s) got no per-sample gradient norm")
        coef = self.module.get_clipping_coef().detach()  # (b,) min(1, C / (||g_b|| + 1e-6))
        for m in self.layers:
            if m._dp_pending is not None:
                m.accumulate_clipped(coef)
        return losses.detach()

    def accumulate_batch(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        """Set ``p.grad`` to the batch's summed clipped gradient (no noise); sum of losses."""
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        if len(inputs):
            lengths = (targets != 0).sum(axis=1)
            for rows in microbatches(lengths, self.max_logits, self.n_outputs):
                x, y = self._tensors(inputs[rows], targets[rows])
                total += float(self.clipped_backward(x, y).sum())
        for p in self.params:
            if p.grad is None:  # empty batch (or unused weight): the update is noise only
                p.grad = torch.zeros_like(p)
        return total

    def noisy_update(self) -> None:
        """Add N(0, sigma^2 C^2) to the summed gradient, divide by q N, take an Adam step."""
        self.optimizer.step()
        zero_padding_rows(self.dp_model)

    def step(self, inputs: np.ndarray, targets: np.ndarray) -> float:
        """One DP-SGD step on a Poisson batch (possibly empty); the sum of its losses."""
        total = self.accumulate_batch(inputs, targets)
        self.noisy_update()
        return total

    def verify(self, inputs: np.ndarray, targets: np.ndarray, rtol: float = 1e-3) -> float:
        """Check the per-shopper gradient norms against one backward per shopper.

        Guards against model changes that would make the norms silently wrong (a weight
        used outside its module, a final state fed to the loss, packed inputs). Returns the
        worst relative error; raises `DPModelError` above ``rtol``. Nothing is updated.
        """
        x, y = self._tensors(inputs, targets)
        self.module.train()
        losses = self.module(x, y)
        self.module.disable_hooks()
        try:
            with _quiet_embedding_hooks():
                ref = [
                    torch.autograd.grad(
                        losses[b], self.params, retain_graph=True, allow_unused=True
                    )
                    for b in range(len(losses))
                ]
        finally:
            self.module.enable_hooks()
        for p in self.params:
            p._norm_sample = None
        with _quiet_embedding_hooks():
            torch.autograd.grad(losses.sum(), self.anchors or self.params)
        for m in self.layers:
            m._dp_pending = None
        worst = 0.0
        names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        for i, (name, p) in enumerate(zip(names, self.params, strict=True)):
            truth = torch.stack(
                [torch.zeros((), device=p.device) if g[i] is None else g[i].norm() for g in ref]
            )
            got = getattr(p, "_norm_sample", None)
            if got is None:
                raise DPModelError(f"parameter {name} got no per-sample gradient norm")
            err = float((got - truth).abs().max() / truth.abs().max().clamp(min=1e-12))
            if err > rtol:
                raise DPModelError(
                    f"per-shopper gradient norms of {name} are wrong (relative error {err:.2g}): "
                    "a weight is used outside its module (tying?), or inputs are packed"
                )
            worst = max(worst, err)
        return worst

    def _tensors(
        self, inputs: np.ndarray, targets: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x_np, y_np = trim(inputs, targets)
        return torch.from_numpy(x_np).to(self.device), torch.from_numpy(y_np).to(self.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The current weights under the plain model's parameter names (CPU tensors)."""
        return {k: v.detach().cpu().clone() for k, v in self.dp_model.state_dict().items()}


# ----------------------------------------------------------------------------- sampling


def poisson_batches(
    n: int, sample_rate: float, steps: int, generator: torch.Generator
) -> Iterator[np.ndarray]:
    """``steps`` Poisson samples of ``range(n)``: each row joins each batch with prob. q.

    The same draw as Opacus' `UniformWithReplacementSampler` (an independent Bernoulli per
    row and step); batches vary in size and may be empty.
    """
    for _ in range(steps):
        mask = torch.rand(n, generator=generator, device=generator.device) < sample_rate
        yield mask.nonzero().flatten().cpu().numpy()


def secure_seed() -> int:
    """A 63-bit seed from the operating system's CSPRNG (`secrets`)."""
    return secrets.randbits(63)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def sampling_plan(n: int, batch_size: int, epochs: float) -> tuple[float, int]:
    """Sample rate q = min(1, batch/n) and the steps for ``epochs`` expected passes."""
    q = min(1.0, batch_size / n)
    return q, max(1, math.ceil(epochs / q - 1e-9))
