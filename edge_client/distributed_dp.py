"""A site's share of one distributed DP-FedSGD round (privacy mode ``distributed``).

Every round, every participating site computes its share of one DP-SGD step over the
*union* of all sites' shoppers:

1. each of its shoppers joins the round independently with probability q (Poisson, the
   same q at every site, drawn from a seed taken from the OS CSPRNG);
2. each sampled shopper's gradient (over the trainable parameters, one training example
   per shopper: `shared.sequences.next_item_examples`) is clipped to L2 norm C and summed,
   exactly as in local DP-SGD (`edge_client.dp_sgd.DPSGDEngine.accumulate_batch`);
3. Gaussian noise N(0, sigma^2 C^2 / m) is added to every trainable coordinate, where m
   (``noise_shares``) is the smallest number of shares the coordinator will ever sum;
4. the noisy sum, divided by the public ``share_scale`` so that it fits SecAgg+'s
   quantisation range, leaves the site only *masked* by SecAgg+.

The coordinator unmasks only the sum of at least m shares: the clipped gradients of every
sampled shopper plus noise of variance at least sigma^2 C^2 per coordinate, i.e. one step
of central DP-SGD with Poisson rate q and noise multiplier sigma. Each round is therefore
recorded in the site's ledger as the mechanism (sigma, q, 1 step) and composed with PRV;
a round that would take the site past its budget is refused before any behaviour is read.
The trust model (SecAgg+ semi-honest, collusion, dropouts) is in docs/privacy.md.

The share of a frozen parameter (public item vectors, see ``frozen``) is zero: its gradient
is neither computed, clipped nor noised.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from edge_client.dp_sgd import (
    DPSGDEngine,
    check_dp_compatible,
    poisson_batches,
    secure_seed,
    seeded_generator,
)
from edge_client.errors import PrivacyBudgetExceeded, PrivacyError
from edge_client.privacy_ledger import Mechanism, PrivacyLedger, PrivacySpent
from shared.errors import ConfigError, DataError
from shared.sequences import UserSequences, next_item_examples
from shared.training import resolve_device

# Noise beyond this many standard deviations is treated as impossible when sizing the
# SecAgg+ range (probability < 1e-23 per coordinate).
NOISE_TAIL_SDS = 10.0


class ShareRangeError(PrivacyError):
    """The site's share could exceed SecAgg+'s quantisation range (too many shoppers)."""


@dataclass(frozen=True)
class ShareConfig:
    """Settings of one share: the coordinator's round settings and the site's budget."""

    sample_rate: float  # q: each shopper joins the round with this probability
    noise_multiplier: float  # sigma of the *sum* of the shares (noise std sigma * C)
    max_grad_norm: float  # C
    noise_shares: int  # m: this site adds noise of std sigma * C / sqrt(m)
    share_scale: float  # the share is divided by this before SecAgg+ quantisation
    share_range: float  # SecAgg+ clips every value to +- this: the share must fit
    delta: float = 1e-5  # the site's delta per shopper
    epsilon_budget: float = 10.0  # the site's total epsilon over all rounds (PRV)
    frozen: frozenset[str] = field(default_factory=frozenset)  # parameters not trained
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_logits: int = 1 << 25
    verify_shoppers: int = 4  # per-shopper norms checked against brute force first

    def __post_init__(self) -> None:
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample rate must be in (0, 1], got {self.sample_rate}")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError("distributed DP needs a noise multiplier > 0")
        if not self.max_grad_norm > 0 or self.noise_shares < 1:
            raise ConfigError("distributed DP needs max_grad_norm > 0 and noise_shares >= 1")
        if not (self.share_scale > 0 and self.share_range > 0):
            raise ConfigError("share_scale and share_range must be > 0")
        if not 0 < self.delta < 1 or not self.epsilon_budget > 0:
            raise ConfigError("delta must be in (0, 1) and the epsilon budget > 0")

    @property
    def mechanism(self) -> Mechanism:
        """What one round costs each shopper of the site: (sigma, q, 1 step)."""
        return Mechanism(self.noise_multiplier, self.sample_rate, 1)

    @property
    def share_noise_std(self) -> float:
        """Std of the noise this site adds to each trainable coordinate: sigma C / sqrt(m)."""
        return self.noise_multiplier * self.max_grad_norm / math.sqrt(self.noise_shares)

    def max_shoppers(self) -> int:
        """Most shoppers whose share fits the range whatever their gradients.

        Each coordinate of a clipped sum over n shoppers is at most n C in absolute value;
        with the noise tail that must stay within share_range * share_scale.
        """
        room = self.share_range * self.share_scale - NOISE_TAIL_SDS * self.share_noise_std
        return max(0, math.floor(room / self.max_grad_norm))


@dataclass(frozen=True)
class ShareResult:
    """A site's share of one round: arrays under the model's state_dict names."""

    share: dict[str, torch.Tensor]  # (clipped sum + noise) / share_scale; zero if frozen
    num_shoppers: int  # N at the site (a count; sets nothing in the mechanism)
    epsilon: float  # PRV epsilon the site has spent after this round
    epsilon_rdp: float
    epsilon_round: float
    delta: float
    seconds: float


def check_share_budget(
    config: ShareConfig, ledger: PrivacyLedger, num_shoppers: int
) -> PrivacySpent:
    """Epsilon after this round; raise before any data is read if it breaks a limit.

    `PrivacyBudgetExceeded` over the site's budget, `ShareRangeError` when the site has more
    shoppers than its share can represent within SecAgg+'s range.
    """
    if num_shoppers > config.max_shoppers():
        raise ShareRangeError(
            f"the site has {num_shoppers} shoppers; a share fits SecAgg+'s range for at most "
            f"{config.max_shoppers()} (raise secagg-max-weight on the coordinator)"
        )
    after = ledger.epsilon_if(*config.mechanism, delta=config.delta)
    if after.epsilon_prv > config.epsilon_budget:
        before = ledger.spent(config.delta).epsilon_prv if ledger.delta is not None else 0.0
        raise PrivacyBudgetExceeded(before, after.epsilon_prv, config.epsilon_budget, config.delta)
    return after


def freeze(model: nn.Module, names: Collection[str]) -> None:
    """Mark ``names`` (parameter names) as not trainable; an unknown name is an error."""
    params = dict(model.named_parameters())
    unknown = sorted(set(names) - set(params))
    if unknown:
        raise ConfigError(f"cannot freeze unknown parameter(s): {', '.join(unknown)}")
    for name in names:
        params[name].requires_grad_(False)


def noisy_clipped_sum(
    model: nn.Module,
    train: UserSequences,
    config: ShareConfig,
    ledger: PrivacyLedger,
    *,
    model_version: str = "",
    secret_seed: int | None = None,
) -> ShareResult:
    """The site's share of one distributed DP-FedSGD round; ``model`` is unchanged.

    The round is checked against the site's budget before any behaviour is read and
    recorded in ``ledger`` before the share is returned (a failed write raises, and the
    share never leaves). ``secret_seed`` is for tests only: whoever knows it can remove
    this site's noise.

    Raises
    ------
    PrivacyBudgetExceeded, ShareRangeError
        Before anything is read or computed.
    DataError
        No shopper with two or more events.
    """
    started = time.perf_counter()
    device = resolve_device(config.device)
    n = int((train.lengths >= 2).sum())
    if n == 0:
        raise DataError("the site has no shopper with two or more events to train on")
    work = _trainable_copy(model, config.frozen)
    check_dp_compatible(work)
    check_share_budget(config, ledger, n)
    max_len = int(model.config.max_len)  # type: ignore[union-attr,arg-type]
    inputs, targets = next_item_examples(train, max_len)
    if len(inputs) != n:
        raise DataError(f"expected {n} training examples, built {len(inputs)}")
    seed = secure_seed() if secret_seed is None else secret_seed
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed((seed ^ 0x1F3779B97F4A7C15) & ((1 << 63) - 1))  # dropout masks
        engine = DPSGDEngine(
            work,
            lr=1.0,  # the engine's optimizer never steps here
            max_grad_norm=config.max_grad_norm,
            noise_multiplier=0.0,
            expected_batch_size=1.0,
            noise_generator=seeded_generator(seed, device),
            device=device,
            max_logits=config.max_logits,
        )
        if config.verify_shoppers:
            rows = np.random.default_rng(seed).permutation(n)[: config.verify_shoppers]
            engine.verify(inputs[rows], targets[rows])
        sampler = seeded_generator(seed ^ 0x5DEECE66D)
        (rows,) = list(poisson_batches(n, config.sample_rate, 1, sampler))
        engine.accumulate_batch(inputs[rows], targets[rows])
        noise = seeded_generator(seed ^ 0x2545F4914F6CDD1D, device)
        share = _noised_share(engine, config, noise)
    return _recorded_share(ledger, config, share, n, config.max_grad_norm, model_version, started)


def shopper_item_weights(train: UserSequences, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Each shopper's contribution to the item counts: (item indices, weights), concatenated.

    A shopper adds 1/sqrt(k) to each of the k distinct items among their last ``window``
    training events, so their contribution vector has L2 norm exactly 1 (sensitivity 1
    under adding or removing one shopper).
    """
    items: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for seq in train.item_lists():
        distinct = np.unique(np.asarray(seq[-window:], dtype=np.int64))
        distinct = distinct[distinct > 0]
        if len(distinct):
            items.append(distinct)
            weights.append(np.full(len(distinct), 1.0 / math.sqrt(len(distinct))))
    if not items:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(items), np.concatenate(weights)


def noisy_item_counts(
    model: nn.Module,
    train: UserSequences,
    config: ShareConfig,
    ledger: PrivacyLedger,
    *,
    model_version: str = "",
    secret_seed: int | None = None,
) -> ShareResult:
    """The site's share of the popularity release: DP item counts for the output bias.

    Every shopper (q = 1) contributes a vector of L2 norm 1 over the items of their last
    ``max_len`` + 1 training events (`shopper_item_weights`); the site adds
    N(0, sigma^2 / m) per item (C = 1) and sends the sum, divided by ``share_scale``, as the
    share of ``head.bias`` (every other share is zero). Recorded as the mechanism
    (sigma, 1, 1 step): one Gaussian mechanism of sensitivity 1.
    """
    started = time.perf_counter()
    if config.sample_rate != 1.0 or config.max_grad_norm != 1.0:
        raise ConfigError("the popularity release samples every shopper with C = 1")
    n = int((train.lengths >= 1).sum())
    if n == 0:
        raise DataError("the site has no shopper to count")
    check_share_budget(config, ledger, n)
    window = int(model.config.max_len) + 1  # type: ignore[union-attr,arg-type]
    state = model.state_dict()
    bias = state.get("head.bias")
    if bias is None or bias.dim() != 1:
        raise ConfigError("the popularity release needs a model with a head bias per item")
    items, weights = shopper_item_weights(train, window)
    if len(items) and int(items.max()) >= len(bias):
        raise DataError("an item index is outside the model's catalogue")
    counts = torch.zeros(len(bias), dtype=torch.float64)
    counts.index_add_(0, torch.from_numpy(items), torch.from_numpy(weights))
    seed = secure_seed() if secret_seed is None else secret_seed
    noise = torch.randn(len(bias), generator=seeded_generator(seed), dtype=torch.float64)
    noisy = counts + noise * config.share_noise_std
    share = {k: torch.zeros_like(v) for k, v in state.items()}
    share["head.bias"] = (noisy / config.share_scale).to(bias.dtype)
    return _recorded_share(ledger, config, share, n, 1.0, model_version, started)


def _recorded_share(
    ledger: PrivacyLedger,
    config: ShareConfig,
    share: dict[str, torch.Tensor],
    n: int,
    max_grad_norm: float,
    model_version: str,
    started: float,
) -> ShareResult:
    """Charge the round to the site's ledger and wrap the share with what it cost."""
    recorded = ledger.record(
        config.mechanism,
        delta=config.delta,
        max_grad_norm=max_grad_norm,
        num_examples=n,
        epsilon_budget=config.epsilon_budget,
        model_version=model_version,
    )
    return ShareResult(
        share=share,
        num_shoppers=n,
        epsilon=recorded.epsilon_prv,
        epsilon_rdp=recorded.epsilon_rdp,
        epsilon_round=recorded.epsilon_round,
        delta=config.delta,
        seconds=time.perf_counter() - started,
    )


def _trainable_copy(model: nn.Module, frozen: Collection[str]) -> nn.Module:
    import copy

    work = copy.deepcopy(model)
    for p in work.parameters():
        p.requires_grad_(True)
    freeze(work, frozen)
    return work


def _noised_share(
    engine: DPSGDEngine, config: ShareConfig, noise: torch.Generator
) -> dict[str, torch.Tensor]:
    """(clipped sum + N(0, (sigma C / sqrt m)^2)) / share_scale per trainable parameter."""
    grads = {
        name: p.grad
        for name, p in engine.dp_model.named_parameters()
        if p.requires_grad and p.grad is not None
    }
    std = config.share_noise_std
    out: dict[str, torch.Tensor] = {}
    for name, value in engine.dp_model.state_dict().items():
        grad = grads.get(name)
        if grad is None:
            out[name] = torch.zeros_like(value, device="cpu")
            continue
        noisy = grad + torch.randn(grad.shape, generator=noise, device=grad.device) * std
        out[name] = (noisy / config.share_scale).detach().cpu()
    return out
