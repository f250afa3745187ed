"""Exactness of the DP-SGD engine: per-shopper norms and clipped sums vs one backward per shopper.

Every check compares against `reference_per_sample_grads` (autograd, one backward per
shopper on the same forward, so dropout masks match) with relative error < 1e-3. The shared
models are checked as they are in `shared.models`, so tying their head to the embedding or
packing their sequences makes these tests fail.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from edge_client.dp_sgd import (
    DPSGDEngine,
    FastGradGRU,
    PerShopperLoss,
    check_dp_compatible,
    gru_per_sample_grads,
    reference_per_sample_grads,
    seeded_generator,
    to_dp_model,
)
from edge_client.errors import DPModelError
from shared.models import build_model
from shared.models.gru4rec import GRU4Rec, GRU4RecConfig

RTOL = 1e-3
N_ITEMS = 30
MODELS = {
    "gru": ("gru", {"n_items": N_ITEMS, "max_len": 6, "dim": 8, "hidden": 6, "dropout": 0.0}),
    "gru-2layer-dropout": (
        "gru",
        {"n_items": N_ITEMS, "max_len": 6, "dim": 8, "hidden": 6, "n_layers": 2, "dropout": 0.3},
    ),
    "sasrec": (
        "sasrec",
        {"n_items": N_ITEMS, "max_len": 6, "dim": 8, "n_heads": 2, "n_layers": 2, "dropout": 0.2},
    ),
    "mf": ("mf", {"n_items": N_ITEMS, "max_len": 6, "dim": 8, "dropout": 0.1}),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny tensors: OpenMP threads only contend on the shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Six shoppers, unsorted lengths 6, 1, 3, 3, 5, 2 (left-padded), a repeated item."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [6, 1, 3, 3, 5, 2]
    items = torch.zeros(len(lengths), 6, dtype=torch.long)
    targets = torch.zeros_like(items)
    for row, n in enumerate(lengths):
        items[row, 6 - n :] = torch.randint(1, N_ITEMS + 1, (n,), generator=gen)
        targets[row, 6 - n :] = torch.randint(1, N_ITEMS + 1, (n,), generator=gen)
    items[0, 2:4] = 7  # the same item twice in one shopper's history
    return items, targets


def relative_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    return float((got - truth).abs().max() / truth.abs().max().clamp(min=1e-12))


def make_engine(model: nn.Module, max_grad_norm: float = 1.0) -> DPSGDEngine:
    return DPSGDEngine(
        model,
        lr=1e-3,
        max_grad_norm=max_grad_norm,
        noise_multiplier=1.0,
        expected_batch_size=6.0,
        noise_generator=seeded_generator(0),
        device=torch.device("cpu"),
    )


def reference(engine: DPSGDEngine, items: torch.Tensor, targets: torch.Tensor, seed: int):
    engine.module.disable_hooks()
    try:
        torch.manual_seed(seed)
        losses, grads = reference_per_sample_grads(engine.module, items, targets)
    finally:
        engine.module.enable_hooks()
    return losses, grads


@pytest.mark.parametrize("name", list(MODELS))
def test_ghost_norms_and_clipped_sum_match_brute_force(name: str) -> None:
    # Arrange: C at the median true norm, so some shoppers are clipped and some are not
    kind, config = MODELS[name]
    torch.manual_seed(1)
    model = build_model(kind, config)
    items, targets = batch()
    probe = make_engine(model)
    _, grads = reference(probe, items, targets, seed=5)
    norms = torch.stack([torch.sqrt(sum((g * g).sum() for g in per)) for per in grads])
    clip = float(norms.median())
    engine = make_engine(model, max_grad_norm=clip)
    losses, grads = reference(engine, items, targets, seed=5)
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (coef < 1).any() and (coef == 1).any()

    # Act: the same forward (same dropout masks) through the DP engine
    torch.manual_seed(5)
    got_losses = engine.clipped_backward(items, targets)

    # Assert: losses, every parameter's per-shopper norm, every clipped summed gradient
    torch.testing.assert_close(got_losses, losses)
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    assert len(names) == len(engine.params) > 0
    for i, (pname, p) in enumerate(zip(names, engine.params, strict=True)):
        truth = torch.stack([per[i].norm() for per in grads])
        assert relative_error(p._norm_sample, truth) < RTOL, pname
        clipped = sum(coef[b] * grads[b][i] for b in range(len(grads)))
        assert relative_error(p.grad, clipped) < RTOL, pname


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("name", list(MODELS))
def test_per_sample_gradients_in_opacus_hooks_mode_match_brute_force(name: str) -> None:
    # Arrange: the grad samplers registered for the DP layers, under Opacus' hooks mode
    kind, config = MODELS[name]
    torch.manual_seed(2)
    loss_module = PerShopperLoss(to_dp_model(build_model(kind, config)))
    gsm = GradSampleModule(loss_module, loss_reduction="sum")
    items, targets = batch(seed=3)
    gsm.disable_hooks()
    torch.manual_seed(9)
    _, grads = reference_per_sample_grads(gsm, items, targets)
    gsm.enable_hooks()

    # Act
    torch.manual_seed(9)
    gsm(items, targets).sum().backward()

    # Assert
    params = [p for p in gsm.parameters() if p.requires_grad]
    for i, p in enumerate(params):
        truth = torch.stack([per[i] for per in grads])
        assert relative_error(p.grad_sample, truth) < RTOL


@pytest.mark.parametrize(("bias", "layers", "dropout"), [(False, 1, 0.0), (True, 2, 0.5)])
def test_gru_per_sample_gradients_match_brute_force(
    bias: bool, layers: int, dropout: float
) -> None:
    # Arrange: per-sample losses sum_t <y_bt, w_bt>, so dL/dy = w
    torch.manual_seed(3)
    gru = FastGradGRU(5, 4, num_layers=layers, bias=bias, batch_first=True, dropout=dropout)
    x = torch.randn(3, 7, 5)
    w = torch.randn(3, 7, 4)
    y, _ = gru(x)
    per_sample = (y * w).sum(dim=(1, 2))
    params = list(gru.parameters())
    truth = [torch.autograd.grad(per_sample[b], params, retain_graph=True) for b in range(3)]

    # Act
    got = gru_per_sample_grads(gru, w)

    # Assert: every weight of every layer, every sample
    assert set(got) == set(params)
    for i, p in enumerate(params):
        assert relative_error(got[p], torch.stack([t[i] for t in truth])) < RTOL


@pytest.mark.parametrize("name", list(MODELS))
def test_dp_model_keeps_the_plain_parameter_names_and_function(name: str) -> None:
    # Arrange
    kind, config = MODELS[name]
    plain = build_model(kind, config)
    dp = to_dp_model(plain)
    items, _ = batch()

    # Act
    state = dp.state_dict()
    reloaded = build_model(kind, config)
    reloaded.load_state_dict(state, strict=True)

    # Assert: same keys and shapes; same scores in eval mode
    assert {k: v.shape for k, v in state.items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }
    plain.eval(), dp.eval(), reloaded.eval()
    with torch.no_grad():
        assert float((dp(items) - plain(items)).abs().max()) < 1e-6
        assert float((reloaded(items) - plain(items)).abs().max()) == 0.0


def test_fast_gru_training_forward_equals_nn_gru() -> None:
    # The per-layer training path must compute exactly nn.GRU (no dropout here).
    torch.manual_seed(4)
    plain = nn.GRU(5, 4, num_layers=2, batch_first=True, bias=False)
    fast = FastGradGRU.from_gru(plain)
    x = torch.randn(3, 6, 5)
    torch.testing.assert_close(fast(x)[0], plain(x)[0])
    torch.testing.assert_close(fast(x)[1], plain(x)[1])


def tiny_gru(**overrides: object) -> GRU4Rec:
    config = {"n_items": N_ITEMS, "max_len": 6, "dim": 6, "hidden": 6, "dropout": 0.0}
    config.update(overrides)
    return GRU4Rec(GRU4RecConfig(**config))  # type: ignore[arg-type]


def test_tied_head_is_refused() -> None:
    model = tiny_gru()
    model.head.weight = model.item_emb.weight
    with pytest.raises(DPModelError, match="tying"):
        check_dp_compatible(model)


class FunctionalTie(GRU4Rec):
    """Reuses the embedding table through a matmul: a use Opacus cannot see."""

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        h = super().encode(items)  # (B, T, H)
        return h + 0.5 * torch.tanh(h @ self.item_emb.weight.t()) @ self.item_emb.weight


def test_functional_weight_tie_is_caught_by_the_brute_force_check() -> None:
    # Arrange
    torch.manual_seed(6)
    engine = make_engine(FunctionalTie(GRU4RecConfig(N_ITEMS, 6, 6, 6, dropout=0.0)))
    items, targets = batch()

    # Act / Assert: the norms miss the functional use, and verify() says so
    with pytest.raises(DPModelError, match="item_emb"):
        engine.verify(items.numpy(), targets.numpy())
    assert make_engine(tiny_gru()).verify(items.numpy(), targets.numpy()) < RTOL


class Packed(GRU4Rec):
    """Packs the padded sequences: Opacus' per-sample gradients come back reordered."""

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        x = self.item_emb(items)
        lengths = (items != 0).sum(dim=1).clamp(min=1)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        return out


def test_packed_sequences_are_refused() -> None:
    engine = make_engine(Packed(GRU4RecConfig(N_ITEMS, 6, 6, 6, dropout=0.0)))
    items, targets = batch()
    with pytest.raises(DPModelError, match="PackedSequence"):
        engine.clipped_backward(items, targets)


class UsesFinalState(GRU4Rec):
    """Feeds the GRU's h_n to the loss, a gradient path the hooks do not see."""

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        out, h_n = self.gru(self.item_emb(items))
        return out + h_n[-1].unsqueeze(1)


def test_a_loss_through_the_final_state_is_refused() -> None:
    engine = make_engine(UsesFinalState(GRU4RecConfig(N_ITEMS, 6, 6, 6, dropout=0.0)))
    items, targets = batch()
    with pytest.raises(DPModelError, match="final state"):
        engine.clipped_backward(items, targets)


class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(N_ITEMS + 1, 4, padding_idx=0)
        self.rnn = nn.LSTM(4, 4, batch_first=True)
        self.head = nn.Linear(4, N_ITEMS + 1)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        return self.rnn(self.item_emb(items))[0]


class WithLooseParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(N_ITEMS + 1, 4, padding_idx=0)
        self.scale = nn.Parameter(torch.ones(4))
        self.head = nn.Linear(4, N_ITEMS + 1)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_emb(items) * self.scale


@pytest.mark.parametrize("model_cls", [WithLSTM, WithLooseParameter])
def test_layers_without_an_exact_rule_are_refused(model_cls: type[nn.Module]) -> None:
    with pytest.raises(DPModelError, match="without an exact per-sample gradient rule"):
        check_dp_compatible(model_cls())


def test_padding_row_never_counts_in_the_embedding_norm() -> None:
    # Opacus' stock embedding norm sampler also counts the gradient that reaches the padding
    # row (non-zero under left padding), which nn.Embedding never applies: inflated norms.
    from opacus.grad_sample.embedding_norm_sample import compute_embedding_norm_sample

    from edge_client.dp_sgd import PadAwareEmbedding, _embedding_norm_sampler

    torch.manual_seed(7)
    emb = PadAwareEmbedding(N_ITEMS + 1, 4, padding_idx=0)
    items, _ = batch()
    out = emb(items)
    weights = torch.randn_like(out)
    per_sample = (out * weights).sum(dim=(1, 2))
    truth = torch.stack(
        [
            torch.autograd.grad(per_sample[b], emb.weight, retain_graph=True)[0].norm()
            for b in range(6)
        ]
    )
    ours = _embedding_norm_sampler(emb, [items], weights)[emb.weight]
    stock = compute_embedding_norm_sample(emb, [items], weights)[emb.weight]
    assert relative_error(ours, truth) < RTOL
    padded = (items == 0).any(dim=1)
    assert bool((stock[padded] > truth[padded] * (1 + 1e-3)).all())


def test_masked_head_rows_follow_shoppers_in_any_order() -> None:
    # The head's ghost norms group rows by shopper; an unsorted batch must still be exact.
    torch.manual_seed(8)
    engine = make_engine(tiny_gru())
    items, targets = batch()
    order = np.array([3, 0, 5, 1, 4, 2])
    assert engine.verify(items.numpy()[order], targets.numpy()[order]) < RTOL
