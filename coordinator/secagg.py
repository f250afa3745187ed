"""SecAgg+ rounds: Flower's legacy workflow, so the coordinator only ever sees sums.

In flwr 1.42 secure aggregation exists only in the legacy API: a `LegacyContext`, the
`DefaultWorkflow` with a `SecAggPlusWorkflow` as its fit step, a legacy strategy, and
``secaggplus_mod`` on the sites' train handler. Sites mask ``num_examples * weights`` with
pairwise and private masks; the server learns only the (weighted) average of the masked
updates. Consequences, documented in docs/privacy.md:

- per-site update validation is impossible (the server never sees one update); the
  aggregate is checked instead (finite, norm of its change below ``max-update-norm``);
- weights are clipped to +-``secagg-clipping-range`` and quantised (2**22 levels) before
  masking, and ``secagg-max-weight`` must exceed every site's num-examples;
- ``secagg-num-shares`` must be odd: an even number makes every site fail while the
  round still "completes" having aggregated nothing. `SecAggFedAvg` therefore refuses to
  record a round whose aggregate equals the model the round started from.

Evaluation, storage and publication of the new version use the same Message-API code as
every other round (`Federation.evaluate`), run as the workflow's evaluate step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, cast

from flwr.app import Context
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from coordinator.errors import UpdateRejectedError
from coordinator.federation import Federation, to_numpy
from coordinator.registry import RoundSummary, SiteResult
from coordinator.run_config import RunConfig
from coordinator.strategy import GuardedStrategy, build_aggregator, wait_for_nodes
from coordinator.validation import check_update

log = logging.getLogger(__name__)

# Metric a site adds to a legacy FitRes to name itself (legacy metrics may hold strings).
SITE_NAME_METRIC = "site-name"


class SecAggFedAvg(LegacyFedAvg):
    """Legacy FedAvg whose rounds are recorded in the registry like Message-API rounds."""

    def __init__(self, federation: Federation, keys: list[str], **kwargs: Any) -> None:
        self.federation = federation
        self.keys = keys
        self.first_number = federation.registry.next_round_number()
        self.round_id: int | None = None
        self.started = 0.0
        self.sites_asked = 0
        super().__init__(
            initial_parameters=ndarrays_to_parameters(
                [federation.model.arrays[k].numpy() for k in keys]
            ),
            on_fit_config_fn=self._fit_config,
            **kwargs,
        )

    def number(self, server_round: int) -> int:
        """The registry's round number of the workflow's round ``server_round``."""
        return self.first_number + server_round - 1

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        fed = self.federation
        published = fed.registry.published()
        record = fed.instructions(
            self.number(server_round), fed.model, published.version if published else ""
        )
        return cast(dict[str, Scalar], dict(record.items()))

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample sites (legacy FedAvg) and open the round in the registry."""
        self.started = time.monotonic()
        timeout = int(self.federation.cfg.round_timeout)
        if not client_manager.wait_for(self.min_fit_clients, timeout=timeout):
            # Legacy sampling would otherwise wait a day for the missing sites.
            self.round_id = self.federation.registry.start_round(
                self.federation.run_id, self.number(server_round), 0, 0
            )
            self.sites_asked = 0
            detail = f"fewer than {self.min_fit_clients} sites connected within {timeout} s"
            log.warning("round %d (SecAgg+) not started: %s", self.number(server_round), detail)
            self._finish("missed-quorum", [], 0, detail=detail)
            return []
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.sites_asked = len(instructions)
        per_site = sum(len(t) for t in parameters.tensors)
        self.round_id = self.federation.registry.start_round(
            self.federation.run_id,
            self.number(server_round),
            len(instructions),
            per_site * len(instructions),
        )
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Check the securely aggregated model and record it as a new version."""
        fed = self.federation
        number = self.number(server_round)
        assert self.round_id is not None, "configure_fit opens the round"
        outcomes = [_site_outcome(proxy, res) for proxy, res in results]
        for outcome in outcomes:
            fed.registry.record_site_result(self.round_id, outcome)
        n_failed = max(len(failures), self.sites_asked - len(results))
        quorum = fed.cfg.quorum
        if len(results) < quorum:
            detail = f"{len(results)} masked update(s), quorum {quorum}"
            log.warning("round %d (SecAgg+) missed its quorum: %s", number, detail)
            self._finish("missed-quorum", outcomes, n_failed, detail=detail)
            return None, {}
        heaviest = max(res.num_examples for _, res in results)
        if heaviest > fed.cfg.secagg_max_weight:
            # The masked sum may have wrapped around the modulus: the aggregate is garbage.
            detail = (
                f"a site reported {heaviest} examples > secagg-max-weight "
                f"{fed.cfg.secagg_max_weight:g}; raise secagg-max-weight"
            )
            log.error("round %d (SecAgg+): %s", number, detail)
            self._finish("failed", outcomes, n_failed, detail=detail)
            return None, {}
        parameters, _ = super().aggregate_fit(server_round, results, failures)
        if parameters is None:
            self._finish("failed", outcomes, n_failed, detail="nothing was aggregated")
            return None, {}
        aggregate = dict(zip(self.keys, parameters_to_ndarrays(parameters), strict=True))
        reference = to_numpy(fed.model.arrays)
        try:
            norm = check_update(aggregate, reference, fed.cfg.max_update_norm)
            if norm == 0.0:
                raise UpdateRejectedError(
                    "the securely aggregated model equals the one the round started from: "
                    "SecAgg+ aggregated nothing (misconfigured shares?)"
                )
        except UpdateRejectedError as err:
            log.error("round %d (SecAgg+): aggregate rejected: %s", number, err)
            self._finish("failed", outcomes, n_failed, detail=str(err))
            return None, {}
        metrics = _mean_metrics(results)
        eps_max, eps_mean = fed._round_epsilon()
        version = fed.commit_version(aggregate, number, metrics, eps_max, eps_mean)
        self._finish(
            "completed",
            outcomes,
            n_failed,
            metrics=metrics,
            version=version,
            eps=(eps_max, eps_mean),
            detail=f"secagg+: change norm {norm:.4g}",
        )
        log.info(
            "round %d (SecAgg+): new version %s from %d site(s)", number, version, len(results)
        )
        return parameters, cast(dict[str, Scalar], metrics)

    def _finish(
        self,
        status: str,
        outcomes: list[SiteResult],
        n_failed: int,
        *,
        metrics: dict[str, float] | None = None,
        version: str | None = None,
        eps: tuple[float | None, float | None] = (None, None),
        detail: str = "",
    ) -> None:
        assert self.round_id is not None
        row = self.federation.registry.round_row(self.round_id)
        self.federation.registry.finish_round(
            self.round_id,
            RoundSummary(
                status=status,
                sites_asked=self.sites_asked,
                sites_answered=len(outcomes),
                sites_accepted=len(outcomes) if status == "completed" else 0,
                sites_rejected=0,
                sites_refused=0,
                sites_failed=n_failed,
                bytes_down=int(row["bytes_down"] or 0),
                bytes_up=int(row["bytes_down"] or 0) // max(1, self.sites_asked) * len(outcomes),
                seconds=time.monotonic() - self.started,
                train_metrics=metrics or {},
                model_version=version,
                epsilon_max=eps[0],
                epsilon_mean=eps[1],
                detail=detail,
            ),
        )


def _site_outcome(proxy: ClientProxy, res: FitRes) -> SiteResult:
    metrics = res.metrics

    def number(key: str) -> float | None:
        value = metrics.get(key)
        return (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )

    name = metrics.get(SITE_NAME_METRIC)
    new_events = number("new-events")
    return SiteResult(
        site=name if isinstance(name, str) and name else f"node-{proxy.node_id}",
        node_id=proxy.node_id,
        phase="train",
        outcome="accepted",
        reason="masked (SecAgg+)",
        num_examples=int(res.num_examples),
        loss=number("train-loss"),
        epsilon=number("epsilon"),
        delta=number("delta"),
        epsilon_budget=number("epsilon-budget"),
        new_events=int(new_events) if new_events is not None else None,
    )


def _mean_metrics(results: list[tuple[ClientProxy, FitRes]]) -> dict[str, float]:
    """Example-weighted means of the numeric train metrics (they are not masked)."""
    total = sum(res.num_examples for _, res in results)
    out: dict[str, float] = {}
    for key in ("train-loss", "epsilon"):
        values = [
            (res.num_examples, float(v))
            for _, res in results
            if isinstance(v := res.metrics.get(key), int | float) and not isinstance(v, bool)
        ]
        if values and total > 0:
            out[key] = sum(n * v for n, v in values) / total
    return out


def _evaluation_config(cfg: RunConfig) -> RunConfig:
    """The settings of the (plain Message-API) evaluation phase of a SecAgg+ run."""
    if cfg.privacy_mode == "distributed":
        return replace(cfg, secagg=False, strategy="fedavg", privacy_mode="none", frozen="")
    return replace(cfg, secagg=False, strategy="fedavg")


def run_secagg(
    federation: Federation,
    grid: Grid,
    context: Context,
    *,
    strategy_cls: type[SecAggFedAvg] = SecAggFedAvg,
    max_weight: float | None = None,
) -> None:
    """Run ``num-rounds`` SecAgg+ rounds through Flower's legacy DefaultWorkflow.

    ``strategy_cls`` aggregates the unmasked result (distributed DP passes its own);
    ``max_weight`` overrides ``secagg-max-weight`` (distributed DP: every share weighs 1).
    """
    cfg = federation.cfg
    connected = wait_for_nodes(grid, cfg.min_sites, timeout=cfg.round_timeout)
    if len(connected) < cfg.min_sites:
        raise UpdateRejectedError(
            f"only {len(connected)} site(s) connected within {cfg.round_timeout:.0f} s; "
            f"SecAgg+ needs min-sites={cfg.min_sites}"
        )
    keys = list(federation.model.arrays.keys())
    strategy = strategy_cls(
        federation,
        keys,
        fraction_fit=cfg.fraction_train,
        fraction_evaluate=0.0,  # evaluation runs through `evaluate_step` below
        min_fit_clients=cfg.min_sites,
        min_available_clients=cfg.min_sites,
        accept_failures=True,
    )
    evaluator = GuardedStrategy(
        build_aggregator(_evaluation_config(cfg)),
        max_update_norm=cfg.max_update_norm,
        quorum=cfg.quorum,
    )

    def evaluate_step(grid: Grid, context: Context) -> None:
        if strategy.round_id is None:
            return
        row = federation.registry.round_row(strategy.round_id)
        if row["status"] == "running":
            # The SecAgg+ workflow halted before aggregate_fit (too few sites answered a
            # stage, shares could not be combined): record it instead of leaving it open.
            strategy._finish("failed", [], strategy.sites_asked, detail="SecAgg+ protocol halted")
            return
        if row["status"] == "completed":
            federation.evaluate(int(row["number"]), strategy.round_id, evaluator)

    legacy = LegacyContext(
        context,
        config=ServerConfig(num_rounds=cfg.num_rounds, round_timeout=cfg.round_timeout),
        strategy=strategy,
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=cfg.secagg_num_shares,
            reconstruction_threshold=cfg.secagg_threshold,
            max_weight=cfg.secagg_max_weight if max_weight is None else max_weight,
            clipping_range=cfg.secagg_clipping_range,
            timeout=cfg.round_timeout,
        ),
        evaluate_workflow=evaluate_step,
    )
    workflow(grid, legacy)
    if strategy.round_id is None:
        raise UpdateRejectedError("the SecAgg+ workflow ran no round")
