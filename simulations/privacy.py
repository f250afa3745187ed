"""Noise calibration: the σ that keeps a whole simulated run within an ε budget.

Store mode: every site runs DP-SGD with the σ the coordinator sends; each site's ledger
composes its rounds with PRV (`edge_client.privacy_ledger.compose`, the very function the
site uses) and refuses a round past its budget. A site that takes part in every round
spends the most, and the smallest site (largest sampling rate q) most of all, so σ is the
smallest value for which R rounds of the smallest sites stay within ε.

App mode: Flower's `RdpAccountant` composes one Gaussian release per round without
sampling amplification (flwr 1.42's fixed-clipping accounting), so ε depends on σ and the
number of rounds only; σ is the smallest value for which R releases stay within ε.

Distributed mode: every round is one Gaussian step over the whole population, each shopper
sampled with probability q (`coordinator.distributed_dp`); the coordinator's ledger and
every site's compose those steps with PRV, after the optional popularity release
(σ_p, q = 1). σ is the smallest value for which that history stays within ε.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from simulations.errors import SimulationError

SIGMA_MAX = 1e4  # beyond this the budget is unreachable in any useful way


def _smallest_above(
    fits: Callable[[float], bool],
    low: float = 0.05,
    high: float = 2.0,
    rel_tol: float = 2e-3,
    grow: float = 2.0,
) -> float:
    """The smallest σ in [``low``, ∞) (within ``rel_tol``) with ``fits(σ)``, if monotone.

    ``high`` is the first guess; it is multiplied by ``grow`` until it fits.
    """
    while not fits(high):
        low, high = high, high * grow
        if high > SIGMA_MAX:
            raise SimulationError("no noise multiplier up to 1e4 meets this privacy budget")
    if fits(low):
        return low
    while high - low > rel_tol * high:
        mid = math.sqrt(low * high)
        if fits(mid):
            high = mid
        else:
            low = mid
    return high


def store_mechanisms(
    shoppers_per_site: Iterable[int], batch_size: int, local_epochs: float
) -> list[tuple[float, int]]:
    """The distinct (q, steps per round) of the sites' DP-SGD rounds, largest q first."""
    from edge_client.dp_sgd import sampling_plan

    plans = {sampling_plan(n, batch_size, local_epochs) for n in shoppers_per_site if n > 0}
    if not plans:
        raise SimulationError("no site has a shopper to train on")
    return sorted(plans, reverse=True)


def store_noise_multiplier(
    epsilon: float,
    delta: float,
    rounds: int,
    shoppers_per_site: Iterable[int],
    batch_size: int,
    local_epochs: float,
    check_sites: int = 4,
) -> float:
    """σ for which ``rounds`` DP-SGD rounds cost at most ``epsilon`` at every site (PRV).

    ``shoppers_per_site``: each site's shoppers with a training example (>= 2 training
    events). The ``check_sites`` plans with the largest sampling rates are checked.
    """
    from edge_client.errors import PrivacyLedgerError
    from edge_client.privacy_ledger import Mechanism, compose, noise_for_epsilon

    if not epsilon > 0 or not 0 < delta < 1 or rounds < 1:
        raise SimulationError("calibration needs epsilon > 0, 0 < delta < 1 and rounds >= 1")
    plans = store_mechanisms(shoppers_per_site, batch_size, local_epochs)[:check_sites]

    def fits(sigma: float) -> bool:
        return all(
            compose([Mechanism(sigma, q, steps)] * rounds, delta).epsilon_prv <= epsilon
            for q, steps in plans
        )

    # Opacus' search on the worst plan lands within 1% of the answer; the ledger's own
    # composition (σ rounded down, q up) then decides, stepping σ up by 0.2%. Bisecting
    # with `compose` alone is slow: PRV at small σ takes seconds per call.
    q, steps = plans[0]
    try:
        sigma = noise_for_epsilon(epsilon, delta, q, steps * rounds)
    except PrivacyLedgerError as err:
        raise SimulationError(f"no noise multiplier meets epsilon {epsilon}: {err}") from err
    while not fits(sigma):
        sigma *= 1.002
        if sigma > SIGMA_MAX:
            raise SimulationError("no noise multiplier up to 1e4 meets this privacy budget")
    return sigma


def app_epsilon(
    noise_multiplier: float, rounds: int, delta: float, sample_size: int, population: int
) -> float:
    """ε of ``rounds`` app-mode releases, as the coordinator's Flower accountant reports it."""
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    accountant.compose(
        GaussianPrivacyEvent(noise_multiplier, sample_size, population), count=rounds
    )
    return float(accountant.get_privacy_spent().epsilon)


def app_noise_multiplier(
    epsilon: float, delta: float, rounds: int, sample_size: int, population: int
) -> float:
    """σ for which ``rounds`` app-mode releases cost at most ``epsilon`` (Flower's RDP)."""
    if not epsilon > 0 or not 0 < delta < 1 or rounds < 1:
        raise SimulationError("calibration needs epsilon > 0, 0 < delta < 1 and rounds >= 1")
    return _smallest_above(
        lambda s: app_epsilon(s, rounds, delta, sample_size, population) <= epsilon
    )


def distributed_noise_multiplier(
    epsilon: float, delta: float, steps: int, sample_rate: float, *, popularity_noise: float = 0.0
) -> float:
    """σ for which ``steps`` distributed DP-FedSGD steps cost at most ``epsilon`` (PRV).

    With ``popularity_noise`` > 0 the popularity release (σ_p, q = 1) comes first; the
    composition is the ledgers' own (`edge_client.privacy_ledger.compose`).
    """
    from edge_client.errors import PrivacyLedgerError
    from edge_client.privacy_ledger import Mechanism, compose, noise_for_epsilon

    if not epsilon > 0 or not 0 < delta < 1 or steps < 1 or not 0 < sample_rate <= 1:
        raise SimulationError(
            "calibration needs epsilon > 0, 0 < delta < 1, a training round and 0 < q <= 1"
        )
    before = [Mechanism(popularity_noise, 1.0, 1)] if popularity_noise > 0 else []
    if before and compose(before, delta).epsilon_prv >= epsilon:
        raise SimulationError(
            f"the popularity release alone (sigma {popularity_noise}) spends epsilon {epsilon}"
        )

    def fits(sigma: float) -> bool:
        return (
            compose([*before, Mechanism(sigma, sample_rate, steps)], delta).epsilon_prv <= epsilon
        )

    # Opacus' search without the release is a lower bound (the release only adds to ε);
    # the ledgers' composition then decides. PRV far below the answer needs gigabytes,
    # so the search never goes under that bound.
    try:
        low = noise_for_epsilon(epsilon, delta, sample_rate, steps)  # for the steps alone
    except PrivacyLedgerError as err:
        raise SimulationError(f"no noise multiplier meets epsilon {epsilon}: {err}") from err
    return _smallest_above(fits, low=low / 1.01, high=low, grow=1.05)
