"""One round of local training at a site: DP-SGD over its shoppers (or plain Adam, dp=False).

This is the function the Flower ClientApp calls: global weights in, new weights plus
privacy accounting out. One training example is one shopper (their last ``max_len`` + 1
events, loss at every position, `shared.sequences.next_item_examples`). With ``dp=True``
each round is DP-SGD with Poisson sampling, per-shopper clipping to ``max_grad_norm`` and
Gaussian noise (`edge_client.dp_sgd`), i.e. user-level (epsilon, delta)-DP for every
shopper of the site against everyone outside it; the site's `PrivacyLedger` composes the
rounds and refuses a round that would exceed the site's budget *before* any shopper's data
is read (only the shopper count is).

Randomness: ``seed`` drives model-side randomness (dropout) and, without DP, the batch
order. The DP sampling and noise never come from ``seed`` (a coordinator that knew it could
subtract the noise): they are seeded from the OS CSPRNG on every call.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from edge_client.dp_sgd import (
    DPSGDEngine,
    check_dp_compatible,
    poisson_batches,
    sampling_plan,
    secure_seed,
    seeded_generator,
)
from edge_client.errors import PrivacyBudgetExceeded
from edge_client.privacy_ledger import (
    Mechanism,
    PrivacyLedger,
    PrivacySpent,
    compose,
    noise_for_epsilon,
)
from shared.errors import ConfigError, DataError, ModelError
from shared.sequences import UserSequences, next_item_examples
from shared.training import length_batches, n_behaviours, resolve_device, sequence_loss, trim_left


@dataclass(frozen=True)
class LocalTrainConfig:
    """Settings of one local round; defaults are the project's DP defaults (docs/privacy.md).

    ``epsilon_budget`` and ``delta`` are the *site's* (read them from the site's own node
    config, not from the coordinator's run config: whoever sets the budget controls privacy).
    """

    epochs: float = 1.0  # expected passes over the site's shoppers per round
    batch_size: int = 256  # expected batch under Poisson sampling (q = batch_size / shoppers)
    lr: float = 2e-3  # Adam (or SGD, see ``optimizer``)
    # Without DP: a fresh Adam, or plain SGD (lr 1 and one step = the site's mean gradient)
    optimizer: Literal["adam", "sgd"] = "adam"
    # Without DP, > 0: exactly this many steps, each on ``batch_size`` shoppers drawn
    # uniformly (length-grouped batches would make one step's sample biased), not epochs.
    max_steps: int = 0
    max_grad_norm: float = 1.0  # C: each shopper's gradient is clipped to this L2 norm
    noise_multiplier: float | None = 1.2  # sigma: noise std = sigma * C on the summed gradient
    target_epsilon: float | None = None  # per-round epsilon; if set, sigma is derived (PRV)
    delta: float = 1e-5  # per shopper; keep it below 1 / (shoppers at the site)
    epsilon_budget: float = 10.0  # the site's total epsilon over all rounds (PRV)
    dp: bool = True
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_logits: int = 1 << 25  # per micro-batch: target positions x catalogue (memory bound)
    verify_shoppers: int = 4  # DP: check per-shopper norms vs brute force on this many first

    def __post_init__(self) -> None:
        if not self.epochs > 0 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError("epochs and lr must be > 0 and batch_size >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.max_logits < 1 or self.verify_shoppers < 0:
            raise ConfigError("max_logits must be >= 1 and verify_shoppers >= 0")
        if self.optimizer not in ("adam", "sgd") or self.max_steps < 0:
            raise ConfigError("optimizer must be adam or sgd, and max_steps >= 0")
        if not self.dp:
            return
        if self.optimizer != "adam" or self.max_steps:
            raise ConfigError("DP-SGD plans its own steps: optimizer and max_steps are non-DP")
        if not self.max_grad_norm > 0 or not 0 < self.delta < 1 or not self.epsilon_budget > 0:
            raise ConfigError("DP needs max_grad_norm > 0, 0 < delta < 1 and epsilon_budget > 0")
        if self.target_epsilon is None and (
            self.noise_multiplier is None or not self.noise_multiplier > 0
        ):
            raise ConfigError("DP needs noise_multiplier > 0 or a per-round target_epsilon")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ConfigError("target_epsilon must be > 0")


@dataclass(frozen=True)
class LocalTrainResult:
    """What one local round produced (``state_dict`` has the plain model's names)."""

    state_dict: dict[str, torch.Tensor]
    loss: float  # mean training cross-entropy (DP: of shoppers' means; else: of positions)
    num_examples: int  # shoppers trained on (the FedAvg weight)
    steps: int  # optimizer steps (DP: including empty Poisson batches)
    seconds: float  # wall time of the training loop
    cpu_seconds: float  # CPU time of this process during the training loop (all threads)
    epsilon: float  # PRV epsilon the site has spent after this round (inf without DP)
    epsilon_rdp: float  # the same under RDP (cross-check, looser)
    epsilon_round: float  # this round alone (PRV)
    delta: float
    noise_multiplier: float  # 0 without DP
    sample_rate: float  # q (DP) or batch / shoppers
    max_grad_norm: float
    dp: bool
    device: str


def _shopper_count(train: UserSequences) -> int:
    """Shoppers that give a training example (>= 2 events): a count, no behaviour read."""
    return int((train.lengths >= 2).sum())


def plan_round(n: int, config: LocalTrainConfig) -> Mechanism:
    """The (sigma, q, steps) a DP round over ``n`` shoppers would run."""
    q, steps = sampling_plan(n, config.batch_size, config.epochs)
    if config.target_epsilon is not None:
        sigma = noise_for_epsilon(config.target_epsilon, config.delta, q, steps)
    else:
        sigma = float(config.noise_multiplier)  # type: ignore[arg-type]  # checked in config
    return Mechanism(sigma, q, steps)


def check_budget(
    mechanism: Mechanism, config: LocalTrainConfig, ledger: PrivacyLedger | None
) -> PrivacySpent:
    """Epsilon after ``mechanism``; raise `PrivacyBudgetExceeded` if over the site's budget."""
    if ledger is not None:
        after = ledger.epsilon_if(*mechanism, delta=config.delta)
    else:
        after = compose([mechanism], config.delta)
    if after.epsilon_prv > config.epsilon_budget:
        before = ledger.spent(config.delta).epsilon_prv if ledger is not None else 0.0
        raise PrivacyBudgetExceeded(before, after.epsilon_prv, config.epsilon_budget, config.delta)
    return after


def _check_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise ModelError("trained weights do not match the model's parameter names and shapes")


def _nondp_batches(
    inputs: np.ndarray, batch_size: int, epochs: float, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Length-grouped batches (as centralized training) for ``epochs`` passes."""
    total = max(1, math.ceil(epochs * len(inputs) / batch_size - 1e-9))
    done = 0
    while done < total:
        for rows in length_batches(inputs, batch_size, rng):
            yield rows
            done += 1
            if done == total:
                return


def _uniform_batches(
    n: int, batch_size: int, steps: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """``steps`` batches of ``batch_size`` rows (all, if fewer) drawn without replacement."""
    for _ in range(steps):
        yield np.sort(rng.choice(n, size=min(batch_size, n), replace=False))


def _micro_batches(rows: np.ndarray, targets: np.ndarray, limit: int) -> Iterator[np.ndarray]:
    """Consecutive slices of ``rows`` with at most ``limit`` targets each (a row is never split)."""
    per_row = (targets[rows] > 0).sum(axis=1)
    start, acc = 0, 0
    for i, count in enumerate(per_row.tolist()):
        if acc and acc + count > limit:
            yield rows[start:i]
            start, acc = i, 0
        acc += count
    yield rows[start:]


def train_local(
    model: nn.Module,
    train: UserSequences,
    config: LocalTrainConfig,
    ledger: PrivacyLedger | None = None,
    *,
    model_version: str = "",
    secret_seed: int | None = None,
) -> LocalTrainResult:
    """Train a copy of ``model`` on the site's shoppers for one round; ``model`` is unchanged.

    Parameters
    ----------
    model
        The global model (a `shared.models` sequential model).
    train
        The site's training sequences.
    config
        Round settings; ``config.dp`` selects DP-SGD.
    ledger
        The site's privacy ledger: with DP the round is checked against the budget before
        any data is read and recorded before the weights are returned. Without a ledger the
        budget applies to this round alone.
    model_version
        Recorded in the ledger next to the round.
    secret_seed
        Seed of the DP sampling and noise. Leave it None (a fresh OS-random seed): anyone who
        knows it can remove the noise. Tests pass one for reproducibility.

    Raises
    ------
    PrivacyBudgetExceeded
        The round would take the site past ``config.epsilon_budget``; nothing was trained.
    DataError
        No shopper has two or more events.
    DPModelError
        The model cannot be trained with exact per-shopper clipping.
    """
    device = resolve_device(config.device)
    max_len = int(model.config.max_len)  # type: ignore[union-attr,arg-type]
    n = _shopper_count(train)
    if n == 0:
        raise DataError("the site has no shopper with two or more events to train on")
    mechanism = None
    after = PrivacySpent(math.inf, math.inf, config.delta)
    if config.dp:
        check_dp_compatible(model)
        mechanism = plan_round(n, config)
        after = check_budget(mechanism, config, ledger)  # before any behaviour is read
    behaviour_items = 0
    if n_behaviours(model):
        # A multi-behaviour model reads event types in its inputs and learns the next item
        # here. Its will-purchase head is not in this loss (nor in DP-SGD's): it is frozen
        # and returned as received (trained centrally, `shared.training`).
        behaviour_items = int(model.config.n_items)  # type: ignore[union-attr,arg-type]
        model = copy.deepcopy(model)
        model.purchase_head.requires_grad_(False)
    inputs, targets = next_item_examples(train, max_len, behaviour_items)
    if len(inputs) != n:
        raise DataError(f"expected {n} training examples, built {len(inputs)}")
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed)
        t0, c0 = time.perf_counter(), time.process_time()
        if mechanism is not None:
            state, loss, steps = _train_dp(
                model, inputs, targets, config, mechanism, device, secret_seed
            )
        else:
            state, loss, steps = _train_plain(model, inputs, targets, config, device)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    _check_weights(model, state)
    epsilon_round = math.inf
    if mechanism is not None and ledger is None:
        epsilon_round = after.epsilon_prv  # the budget check composed this round alone
    elif mechanism is not None and ledger is not None:
        # Recorded before the weights can leave the site; a failed write raises.
        recorded = ledger.record(
            mechanism,
            delta=config.delta,
            max_grad_norm=config.max_grad_norm,
            num_examples=n,
            epsilon_budget=config.epsilon_budget,
            model_version=model_version,
        )
        after = PrivacySpent(recorded.epsilon_prv, recorded.epsilon_rdp, config.delta)
        epsilon_round = recorded.epsilon_round
    return LocalTrainResult(
        state_dict=state,
        loss=loss,
        num_examples=n,
        steps=steps,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        epsilon=after.epsilon_prv,
        epsilon_rdp=after.epsilon_rdp,
        epsilon_round=epsilon_round,
        delta=config.delta,
        noise_multiplier=mechanism.noise_multiplier if mechanism else 0.0,
        sample_rate=mechanism.sample_rate if mechanism else min(1.0, config.batch_size / n),
        max_grad_norm=config.max_grad_norm,
        dp=config.dp,
        device=str(device),
    )


def _train_dp(
    model: nn.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    config: LocalTrainConfig,
    mechanism: Mechanism,
    device: torch.device,
    secret_seed: int | None,
) -> tuple[dict[str, torch.Tensor], float, int]:
    seed = secure_seed() if secret_seed is None else secret_seed
    engine = DPSGDEngine(
        model,
        lr=config.lr,
        max_grad_norm=config.max_grad_norm,
        noise_multiplier=mechanism.noise_multiplier,
        expected_batch_size=mechanism.sample_rate * len(inputs),
        noise_generator=seeded_generator(seed, device),
        device=device,
        max_logits=config.max_logits,
    )
    if config.verify_shoppers:
        # A model change that makes per-shopper norms wrong fails here, loudly, every round.
        rows = np.random.default_rng(config.seed).permutation(len(inputs))[: config.verify_shoppers]
        engine.verify(inputs[rows], targets[rows])
    sampler = seeded_generator(seed ^ 0x5DEECE66D)  # a second stream for the sampling
    total, seen = 0.0, 0
    for rows in poisson_batches(len(inputs), mechanism.sample_rate, mechanism.steps, sampler):
        total += engine.step(inputs[rows], targets[rows])
        seen += len(rows)
    return engine.state_dict(), total / max(1, seen), mechanism.steps


def _train_plain(
    model: nn.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    config: LocalTrainConfig,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], float, int]:
    net = copy.deepcopy(model).to(device)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=config.lr)
        if config.optimizer == "sgd"
        else torch.optim.Adam(params, lr=config.lr)
    )
    rng = np.random.default_rng(config.seed)
    batches = (
        _uniform_batches(len(inputs), config.batch_size, config.max_steps, rng)
        if config.max_steps
        else _nondp_batches(inputs, config.batch_size, config.epochs, rng)
    )
    # Each micro-batch's (targets, catalogue) logits stay under max_logits; their gradients
    # add up to the whole batch's mean exactly (each weighted by its share of the targets).
    per_target = int(getattr(getattr(net, "head", None), "out_features", 1))
    limit = max(1, config.max_logits // per_target)
    total, count, steps = 0.0, 0, 0
    for rows in batches:
        n_targets = int((targets[rows] > 0).sum())
        if n_targets == 0:  # only padding: no loss to follow
            continue
        optimizer.zero_grad(set_to_none=True)
        for chunk in _micro_batches(rows, targets, limit):
            x_np, y_np = trim_left(inputs[chunk], targets[chunk])
            x = torch.from_numpy(x_np).to(device)
            y = torch.from_numpy(y_np).to(device)
            loss = sequence_loss(net, x, y)
            share = int((y_np > 0).sum())
            (loss * (share / n_targets)).backward()  # type: ignore[no-untyped-call]
            total += float(loss.detach()) * share
        optimizer.step()
        count += n_targets
        steps += 1
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return state, total / max(1, count), steps
