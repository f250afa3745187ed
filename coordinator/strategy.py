"""Strategies: Flower's FedAvg/FedAdam/FedMedian/FedTrimmedAvg, app-mode DP, and the guard.

`build_strategy` composes, from the inside out:

1. the aggregation rule, Flower's own: ``fedavg``, ``fedadam`` (server-side Adam),
   ``fedmedian`` (coordinate-wise median) or ``fedtrimmedavg`` (trimmed mean, robust to a
   share ``trim-beta`` of outliers on each side);
2. in app mode, Flower's `DifferentialPrivacyClientSideFixedClipping` (devices clip their
   update with ``fixedclipping_mod``, the server adds Gaussian noise to the aggregate) with
   Flower's `RdpAccountant`; it samples exactly ``min-sites`` devices per round because the
   accountant needs a fixed sample size and equal client weights;
3. `GuardedStrategy`: every reply is checked before anything is aggregated (errors,
   refusals, NaN/Inf, wrong shapes, update norm above the bound: rejected, site named in the
   log); fewer valid updates than the quorum means no aggregation at all; per-site outcomes
   are kept for the registry.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Strategy,
)

from coordinator.errors import UpdateRejectedError
from coordinator.registry import SiteResult
from coordinator.run_config import RunConfig
from coordinator.validation import check_metrics, check_update, check_weight
from shared import federated

log = logging.getLogger(__name__)

WEIGHT_KEY = "num-examples"


class FixedSampleFedAvg(FedAvg):
    """FedAvg that asks exactly ``sample_size`` sites per training round.

    Flower's fixed-clipping accountant composes one Gaussian event per round with the
    sample size fixed at construction; sampling a fraction of whoever is connected would
    break it. Aggregation is FedAvg's own (the accountant checks that).
    """

    def __init__(self, sample_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sample_size = sample_size

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample exactly ``sample_size`` connected sites (waiting for them if needed)."""
        node_ids = wait_for_nodes(grid, self.sample_size, timeout=None)
        chosen = random.sample(node_ids, self.sample_size)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.TRAIN)


def wait_for_nodes(grid: Grid, count: int, timeout: float | None) -> list[int]:
    """Connected node ids once at least ``count`` are connected (or when ``timeout`` ends)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= count or (deadline is not None and time.monotonic() >= deadline):
            return nodes
        time.sleep(1.0)


def build_aggregator(cfg: RunConfig) -> FedAvg:
    """The aggregation rule named by ``strategy`` with the run's sampling settings."""
    # Flower's sampling waits *without a timeout* until enough nodes are connected. The
    # round loop waits for ``min-sites`` with the round timeout before training, so the
    # strategy only insists on ``min-sites`` for training; evaluation takes whoever is
    # connected (a site that died mid-round must not block it forever).
    common: dict[str, Any] = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_sites,
        "min_evaluate_nodes": 1 if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": 1,
        "weighted_by_key": WEIGHT_KEY,
        "arrayrecord_key": federated.ARRAYS,
        "configrecord_key": federated.CONFIG,
    }
    if cfg.privacy_mode == "app":
        return FixedSampleFedAvg(cfg.min_sites, **common)
    if cfg.strategy == "fedadam":
        return FedAdam(**common, eta=cfg.fedadam_eta, eta_l=cfg.learning_rate, tau=cfg.fedadam_tau)
    if cfg.strategy == "fedmedian":
        return FedMedian(**common)
    if cfg.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.trim_beta)
    return FedAvg(**common)


def build_app_dp(
    cfg: RunConfig, aggregator: FedAvg, accountant: Any
) -> DifferentialPrivacyClientSideFixedClipping:
    """Client-level DP: clip on the device, Gaussian noise on the sum, RDP accounting."""
    return DifferentialPrivacyClientSideFixedClipping(
        aggregator,
        noise_multiplier=cfg.app_noise_multiplier,
        clipping_norm=cfg.app_clipping_norm,
        num_sampled_clients=cfg.min_sites,
        accountant=accountant,
    )


def asked_nodes(messages: Iterable[Message]) -> dict[str, int]:
    """Message id -> the node it was sent to (ids exist once Flower has pushed them)."""
    return {
        m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id
    }


def reply_node(msg: Message, asked: Mapping[str, int]) -> int:
    """The node a reply answers for.

    An error reply the SuperLink makes for a node that is gone carries the SuperLink's own
    id (1) as its source; only ``reply_to_message_id`` says which site it stands for.
    """
    asked_id = msg.metadata.reply_to_message_id
    return asked.get(asked_id, msg.metadata.src_node_id) if asked_id else msg.metadata.src_node_id


def site_name(msg: Message, node: int | None = None) -> str:
    """The name a site reports in its reply, or ``node-<id>``."""
    if not msg.has_error() and federated.SITE in msg.content.config_records:
        name = msg.content.config_records[federated.SITE].get("name")
        if isinstance(name, str) and name:
            return name
    return f"node-{msg.metadata.src_node_id if node is None else node}"


def _site_str(msg: Message, key: str) -> str:
    if not msg.has_error() and federated.SITE in msg.content.config_records:
        value = msg.content.config_records[federated.SITE].get(key)
        if isinstance(value, str):
            return value
    return ""


def _metric(metrics: MetricRecord, key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, int | float) else None


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the payload a message carries (arrays, config bytes/strings, metrics)."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(arr.data) for arr in record.values())
    for cfg_record in content.config_records.values():
        for value in cfg_record.values():
            if isinstance(value, bytes | str):
                total += len(value)
            elif isinstance(value, list):
                total += 8 * len(value)
            else:
                total += 8
    for metric_record in content.metric_records.values():
        total += 8 * len(metric_record)
    return total


@dataclass
class PhaseReport:
    """What the guard saw in one phase (train or evaluate) of a round."""

    outcomes: list[SiteResult] = field(default_factory=list)
    bytes_up: int = 0
    accepted: int = 0
    quorum_missed: bool = False

    def count(self, outcome: str) -> int:
        """How many sites ended the phase with ``outcome``."""
        return sum(1 for o in self.outcomes if o.outcome == outcome)


class GuardedStrategy(Strategy):
    """Validates every reply, enforces the quorum, then delegates to ``inner``."""

    def __init__(self, inner: Strategy, *, max_update_norm: float, quorum: int) -> None:
        self.inner = inner
        self.max_update_norm = max_update_norm
        self.quorum = quorum
        self.reference: dict[str, np.ndarray] = {}
        self.train_report = PhaseReport()
        self.eval_report = PhaseReport()
        self.serve_arrays: ArrayRecord | None = None
        # The messages of the phase in flight: Flower sets their ids when it pushes them,
        # and replies made by the SuperLink (a node that died) name only those ids.
        self.asked: list[Message] = []

    def summary(self) -> None:
        """Log the configuration."""
        log.info("guard: quorum %d, max update norm %s", self.quorum, self.max_update_norm or "off")
        self.inner.summary()

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global weights (updates are checked against them), then delegate."""
        self.reference = {k: v.numpy() for k, v in arrays.items()}
        self.train_report = PhaseReport()
        self.asked = list(self.inner.configure_train(server_round, arrays, config, grid))
        return self.asked

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep only valid updates; aggregate them if there are at least ``quorum``."""
        report = self.train_report
        accepted: list[Message] = []
        asked = asked_nodes(self.asked)
        for msg in replies:
            node = reply_node(msg, asked)
            name = site_name(msg, node)
            if msg.has_error():
                reason = msg.error.reason or f"error code {msg.error.code}"
                log.warning(
                    "round %d: site %s (node %d) failed: %s", server_round, name, node, reason
                )
                report.outcomes.append(SiteResult(name, node, "train", "failed", reason[:500]))
                continue
            report.bytes_up += payload_bytes(msg.content)
            outcome = self._check_train_reply(server_round, msg, name)
            report.outcomes.append(outcome)
            if outcome.outcome == "accepted":
                accepted.append(msg)
        report.accepted = len(accepted)
        if len(accepted) < self.quorum:
            report.quorum_missed = True
            log.warning(
                "round %d missed its quorum: %d valid update(s), %d needed; nothing aggregated",
                server_round,
                len(accepted),
                self.quorum,
            )
            return None, None
        return self.inner.aggregate_train(server_round, accepted)

    def _check_train_reply(self, server_round: int, msg: Message, name: str) -> SiteResult:
        node = msg.metadata.src_node_id
        content = msg.content
        metrics = content.metric_records.get(federated.METRICS)
        if metrics is None:
            return self._reject(server_round, name, node, "reply has no metrics")
        epsilon = _metric(metrics, "epsilon")
        budget = _metric(metrics, "epsilon-budget")
        new_events = _metric(metrics, "new-events")
        base: dict[str, Any] = {
            "epsilon": epsilon,
            "delta": _metric(metrics, "delta"),
            "epsilon_budget": budget,
            "new_events": int(new_events) if new_events is not None else None,
            "loss": _metric(metrics, "train-loss"),
        }
        if _metric(metrics, "refused") == 1.0:
            reason = _site_str(msg, "reason") or "refused"
            log.warning("round %d: site %s (node %d) refused: %s", server_round, name, node, reason)
            return SiteResult(name, node, "train", "refused", reason, **base)
        try:
            check_metrics(metrics)
            weight = check_weight(metrics.get(WEIGHT_KEY))
            arrays = content.array_records.get(federated.ARRAYS)
            if arrays is None or len(content.array_records) != 1:
                raise UpdateRejectedError("reply must carry exactly one ArrayRecord named 'arrays'")
            norm = check_update(
                {k: v.numpy() for k, v in arrays.items()}, self.reference, self.max_update_norm
            )
        except UpdateRejectedError as err:
            return self._reject(server_round, name, node, str(err), base)
        return SiteResult(
            name,
            node,
            "train",
            "accepted",
            num_examples=weight,
            metrics={"update-norm": norm},
            **base,
        )

    @staticmethod
    def _reject(
        server_round: int, name: str, node: int, reason: str, base: dict[str, Any] | None = None
    ) -> SiteResult:
        log.warning(
            "round %d: rejected the update of site %s (node %d): %s",
            server_round,
            name,
            node,
            reason,
        )
        return SiteResult(name, node, "train", "rejected", reason, **(base or {}))

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, then attach the published version's weights if it is not this one.

        Sites must serve another version than the one they evaluate after a rollback or a
        manual publish; they may not have it stored yet.
        """
        self.eval_report = PhaseReport()
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        if self.serve_arrays is not None:
            for msg in messages:
                msg.content.array_records[federated.SERVE_ARRAYS] = self.serve_arrays
        self.asked = messages
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Aggregate the evaluation metrics of sites that evaluated at least one shopper."""
        report = self.eval_report
        usable: list[Message] = []
        asked = asked_nodes(self.asked)
        for msg in replies:
            node = reply_node(msg, asked)
            name = site_name(msg, node)
            if msg.has_error():
                reason = msg.error.reason or f"error code {msg.error.code}"
                log.warning(
                    "round %d: evaluation failed at site %s: %s", server_round, name, reason
                )
                report.outcomes.append(SiteResult(name, node, "evaluate", "failed", reason[:500]))
                continue
            report.bytes_up += payload_bytes(msg.content)
            metrics = msg.content.metric_records.get(federated.METRICS)
            serving = _site_str(msg, "serving") or None
            try:
                if metrics is None:
                    raise UpdateRejectedError("reply has no metrics")
                check_metrics(metrics)
                n = metrics.get(WEIGHT_KEY)
                if not isinstance(n, int | float) or n < 0:
                    raise UpdateRejectedError(f"num-examples must be >= 0, got {n!r}")
            except UpdateRejectedError as err:
                log.warning("round %d: ignored evaluation of site %s: %s", server_round, name, err)
                report.outcomes.append(
                    SiteResult(
                        name, node, "evaluate", "rejected", str(err), serving_version=serving
                    )
                )
                continue
            values = {k: float(cast(float, v)) for k, v in metrics.items()}
            report.outcomes.append(
                SiteResult(
                    name,
                    node,
                    "evaluate",
                    "evaluated",
                    num_examples=int(values[WEIGHT_KEY]),
                    serving_version=serving,
                    metrics=values,
                )
            )
            if values[WEIGHT_KEY] > 0:
                usable.append(msg)
        report.accepted = len(usable)
        if not usable:
            return None
        return self.inner.aggregate_evaluate(server_round, usable)
