"""Distributed DP-FedSGD under SecAgg+ (privacy mode ``distributed``): the coordinator's side.

Each round every asked site sends its share of one DP-SGD step over the union of all
sites' shoppers (`edge_client.distributed_dp`): the clipped gradients of its Poisson-sampled
shoppers plus Gaussian noise of std sigma C / sqrt(m), divided by ``share_scale``, masked
by SecAgg+. The coordinator unmasks only the mean of the shares that completed the round
(Flower's `SecAggPlusWorkflow`, every share weighted 1), and here:

1. refuses to use fewer than ``quorum`` shares (at least m: otherwise the sum would carry
   less than the full noise sigma C);
2. recovers the noisy sum (mean x shares x share_scale) and divides it by the expected
   batch q N, N being the shoppers of the sites that answered (counts they report);
3. takes one step of the server optimizer (Adam) on the trainable parameters, resets the
   embeddings' padding rows (post-processing), checks the result like any aggregate, and
   records it as the next model version;
4. composes the round into the coordinator's own population ledger
   (``<state>/coordinator/distributed-privacy.db``, the sites' `PrivacyLedger` class): the
   mechanism (sigma, q, 1 step) per round, PRV for the figure it reports, RDP beside it.
   With ``dist-epsilon-budget`` set, a round that would exceed it is not started.

Every site keeps its own ledger of the same mechanism and refuses a round past its own
budget; a refusal is a SecAgg+ dropout (and with too few shares left, no aggregate).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Context
from flwr.common import FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.serverapp import Grid

from coordinator.errors import UpdateRejectedError
from coordinator.federation import Federation, to_numpy
from coordinator.run_config import RunConfig
from coordinator.secagg import SecAggFedAvg, run_secagg
from coordinator.validation import check_update
from shared.models import build_model

log = logging.getLogger(__name__)

LEDGER_FILE = "distributed-privacy.db"
SHOPPERS_METRIC = "shoppers"
# Noise beyond this many standard deviations is treated as impossible when sizing shares
# (the sites use the same constant: edge_client.distributed_dp.NOISE_TAIL_SDS).
NOISE_TAIL_SDS = 10.0


def noise_shares(cfg: RunConfig) -> int:
    """m: the number of shares each site sizes its noise for (default: the quorum)."""
    return cfg.dist_noise_shares or cfg.quorum


def share_scale(cfg: RunConfig, *, popularity: bool = False) -> float:
    """The public divisor that keeps every share within SecAgg+'s clipping range.

    A share's coordinate is at most n C (n shoppers, each contributing at most C) plus the
    noise tail; ``secagg-max-weight`` is the largest number of shoppers a site may have.
    The popularity release has C = 1 and sigma = ``dist-popularity-noise``.
    """
    sigma, c = (
        (cfg.dist_popularity_noise, 1.0)
        if popularity
        else (cfg.noise_multiplier, cfg.max_grad_norm)
    )
    tail = NOISE_TAIL_SDS * sigma * c / math.sqrt(noise_shares(cfg))
    return (cfg.secagg_max_weight * c + tail) / cfg.secagg_clipping_range


def open_ledger(cfg: RunConfig) -> Any:
    """The coordinator's population ledger (same class and accountant as a site's)."""
    from edge_client.privacy_ledger import PrivacyLedger

    path = cfg.resolved_state_dir / "coordinator" / LEDGER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return PrivacyLedger(path)


def round_mechanism(cfg: RunConfig, *, popularity: bool = False) -> Any:
    """(sigma, q, 1): one distributed round for every shopper of every site.

    A DP-FedSGD round is (noise-multiplier, dist-sample-rate, 1); the popularity release is
    one Gaussian mechanism of sensitivity 1 over every shopper: (dist-popularity-noise, 1, 1).
    """
    from edge_client.privacy_ledger import Mechanism

    if popularity:
        return Mechanism(cfg.dist_popularity_noise, 1.0, 1)
    return Mechanism(cfg.noise_multiplier, cfg.dist_sample_rate, 1)


def popularity_bias(counts: np.ndarray) -> np.ndarray:
    """The output bias from noisy item counts: log(1 + max(0, count)); padding gets 0.

    Post-processing of the released counts (as the popularity model's log(1 + count)).
    """
    bias = np.log1p(np.clip(np.asarray(counts, dtype=np.float64), 0.0, None))
    bias[0] = 0.0
    return bias.astype(np.float32)


class ServerOptimizer:
    """Adam on the noisy mean gradient, over the trainable parameters of the global model."""

    def __init__(self, federation: Federation, frozen: set[str]) -> None:
        cfg = federation.cfg
        self.module = build_model(federation.model.kind, federation.model.config)
        self.module.load_state_dict(federation.model.arrays.to_torch_state_dict())
        self.trainable = {
            name: p for name, p in self.module.named_parameters() if name not in frozen
        }
        for name, p in self.module.named_parameters():
            p.requires_grad_(name in self.trainable)
        self.optimizer = torch.optim.Adam(list(self.trainable.values()), lr=cfg.dist_server_lr)

    def step(self, gradient: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One Adam step with ``gradient`` (names of the state_dict); the new state."""
        self.optimizer.zero_grad(set_to_none=True)
        for name, p in self.trainable.items():
            p.grad = torch.from_numpy(np.asarray(gradient[name], dtype=np.float32)).reshape(p.shape)
        self.optimizer.step()
        with torch.no_grad():
            for m in self.module.modules():
                # the noise lands on the padding rows too; their true gradient is zero
                if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
        return {k: v.detach().numpy().copy() for k, v in self.module.state_dict().items()}

    def reset_to(self, state: dict[str, np.ndarray]) -> None:
        """Load ``state`` into the server model; the optimizer's moments are kept."""
        self.module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})


class DistributedDPFedSGD(SecAggFedAvg):
    """SecAgg+ rounds whose masked sum is a noisy clipped gradient, stepped with server Adam."""

    def __init__(self, federation: Federation, keys: list[str], **kwargs: Any) -> None:
        super().__init__(federation, keys, **kwargs)
        cfg = federation.cfg
        self.frozen = set(cfg.frozen_parameters)
        unknown = self.frozen - set(keys)
        if unknown:
            raise UpdateRejectedError(f"frozen names no parameter: {', '.join(sorted(unknown))}")
        self.server = ServerOptimizer(federation, self.frozen)
        self.ledger = open_ledger(cfg)

    def is_popularity_round(self, server_round: int) -> bool:
        """The run's first round releases the DP item counts when asked to."""
        return server_round == 1 and self.federation.cfg.dist_popularity_noise > 0

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        config = super()._fit_config(server_round)
        if self.is_popularity_round(server_round):
            cfg = self.federation.cfg
            config.update(
                {
                    "dp-task": "popularity",
                    "noise-multiplier": cfg.dist_popularity_noise,
                    "max-grad-norm": 1.0,
                    "sample-rate": 1.0,
                    "share-scale": share_scale(cfg, popularity=True),
                }
            )
        return config

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Refuse to start a round past the population budget; else as SecAgg+."""
        cfg = self.federation.cfg
        if cfg.dist_epsilon_budget > 0:
            mechanism = round_mechanism(cfg, popularity=self.is_popularity_round(server_round))
            after = self.ledger.epsilon_if(*mechanism, delta=cfg.dist_delta)
            if after.epsilon_prv > cfg.dist_epsilon_budget:
                number = self.number(server_round)
                self.round_id = self.federation.registry.start_round(
                    self.federation.run_id, number, 0, 0
                )
                self.sites_asked = 0
                detail = (
                    f"the population budget would be exceeded: epsilon after this round "
                    f"{after.epsilon_prv:.3f} > dist-epsilon-budget {cfg.dist_epsilon_budget:g}"
                )
                log.warning("round %d not started: %s", number, detail)
                self._finish("failed", [], 0, detail=detail)
                return []
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Noisy sum -> mean gradient -> server Adam step -> a new version."""
        from coordinator.secagg import _site_outcome

        fed = self.federation
        cfg = fed.cfg
        number = self.number(server_round)
        assert self.round_id is not None, "configure_fit opens the round"
        outcomes = [
            replace(_site_outcome(proxy, res), reason="masked share (distributed DP)")
            for proxy, res in results
        ]
        for outcome in outcomes:
            fed.registry.record_site_result(self.round_id, outcome)
        n_failed = max(len(failures), self.sites_asked - len(results))
        needed = max(cfg.quorum, noise_shares(cfg))
        if len(results) < needed:
            detail = (
                f"{len(results)} share(s), {needed} needed (quorum; noise is sized for "
                f"{noise_shares(cfg)})"
            )
            log.warning("round %d (distributed DP) not aggregated: %s", number, detail)
            self._finish("missed-quorum", outcomes, n_failed, detail=detail)
            return None, {}
        shoppers = [_number(res.metrics.get(SHOPPERS_METRIC)) for _, res in results]
        if any(s is None or s < 1 for s in shoppers):
            self._finish("failed", outcomes, n_failed, detail="a share without a shopper count")
            return None, {}
        population = float(sum(cast(float, s) for s in shoppers))
        popularity = self.is_popularity_round(server_round)
        mean = parameters_to_ndarrays(results[0][1].parameters)  # every result holds it
        scale = share_scale(cfg, popularity=popularity)
        total = {
            k: np.asarray(v, dtype=np.float64) * len(results) * scale
            for k, v in zip(self.keys, mean, strict=True)
        }
        reference = to_numpy(fed.model.arrays)
        if popularity:
            new_state = {k: np.array(v) for k, v in reference.items()}
            new_state["head.bias"] = popularity_bias(total["head.bias"])
            self.server.reset_to(new_state)
            gradient = {"head.bias": total["head.bias"] / population}
        else:
            expected_batch = cfg.dist_sample_rate * population
            gradient = {k: v / expected_batch for k, v in total.items()}
            new_state = self.server.step(gradient)
        try:
            if not all(np.isfinite(v).all() for v in new_state.values()):
                raise UpdateRejectedError("the server step produced non-finite weights")
            # the popularity release sets the bias outright: no step size to bound
            bound = 0.0 if popularity else cfg.max_update_norm
            norm = check_update(new_state, reference, bound)
        except UpdateRejectedError as err:
            self.server.reset_to(reference)
            log.error("round %d (distributed DP): %s", number, err)
            self._finish("failed", outcomes, n_failed, detail=str(err))
            return None, {}
        recorded = self.ledger.record(
            round_mechanism(cfg, popularity=popularity),
            delta=cfg.dist_delta,
            max_grad_norm=cfg.max_grad_norm,
            num_examples=int(population),
            epsilon_budget=cfg.dist_epsilon_budget or math.inf,
            model_version=fed.model.version,
        )
        metrics = {
            "popularity-release": float(popularity),
            "population-epsilon": recorded.epsilon_prv,
            "population-epsilon-rdp": recorded.epsilon_rdp,
            "shares": float(len(results)),
            "gradient-norm": float(math.sqrt(sum(float((v**2).sum()) for v in gradient.values()))),
        }
        version = fed.commit_version(
            new_state, number, metrics, recorded.epsilon_prv, recorded.epsilon_prv
        )
        self._finish(
            "completed",
            outcomes,
            n_failed,
            metrics=metrics,
            version=version,
            eps=(recorded.epsilon_prv, recorded.epsilon_prv),
            detail=(
                f"distributed DP {'popularity release' if popularity else 'gradient step'}: "
                f"{len(results)} shares, change norm {norm:.4g}"
            ),
        )
        log.info(
            "round %d (distributed DP): version %s, epsilon %.3f (PRV, delta %g)",
            number,
            version,
            recorded.epsilon_prv,
            cfg.dist_delta,
        )
        params = [new_state[k] for k in self.keys]
        from flwr.common import ndarrays_to_parameters

        return ndarrays_to_parameters(params), cast(dict[str, Scalar], metrics)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def run_distributed(federation: Federation, grid: Grid, context: Context) -> None:
    """``num-rounds`` distributed DP-FedSGD rounds through Flower's SecAgg+ workflow."""
    started = time.monotonic()
    run_secagg(federation, grid, context, strategy_cls=DistributedDPFedSGD, max_weight=1.0)
    log.info("distributed DP run done in %.0f s", time.monotonic() - started)


def ledger_path(state_dir: Path) -> Path:
    """Where the population ledger of a state directory lives."""
    return state_dir / "coordinator" / LEDGER_FILE
