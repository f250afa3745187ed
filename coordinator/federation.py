"""The coordinator's round loop: rounds, model versions, publication and the feedback loop.

A `Federation` is what the ServerApp runs. For each round it asks the strategy for the
training messages, sends them through Flower's `Grid` with the round timeout, lets the
(guarded) strategy validate and aggregate the replies, stores the new global model as a
model directory and a registry version, publishes it (``publish = "auto"``), then sends it
back for federated evaluation, which is also how every site receives the version it must
serve. Round numbers, versions and the app-mode privacy accountant continue across runs.

In ``continuous`` mode, rounds are driven by the sites' fresh behaviour: every
``poll-interval`` seconds a cheap ``query`` message asks each site how many events it
recorded since its last round (a count, nothing else), and a round starts once
``min-ready-sites`` sites have ``min-new-events`` or more, or ``round-interval`` passed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from coordinator.errors import RegistryError, RunConfigError
from coordinator.registry import ModelVersion, Registry, RoundSummary, SiteResult
from coordinator.run_config import RunConfig
from coordinator.strategy import (
    GuardedStrategy,
    asked_nodes,
    payload_bytes,
    reply_node,
    wait_for_nodes,
)
from shared import federated
from shared.artifacts import (
    VOCAB_FILE,
    WEIGHTS_FILE,
    PrivacyStatement,
    load_model_dir,
    new_version,
    read_metadata,
    save_model_dir,
    verify_model_dir,
)
from shared.errors import FedrecError, ModelError, VocabError
from shared.models import build_model, config_dict, model_kind
from shared.vocab import ItemVocab

log = logging.getLogger(__name__)


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """Content hash of named arrays (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Named numpy arrays of an ArrayRecord."""
    return {name: arr.numpy() for name, arr in record.items()}


def load_catalogue(path: Path) -> ItemVocab:
    """The catalogue from a vocab.json file or a model directory."""
    target = path / VOCAB_FILE if path.is_dir() else path
    if not target.is_file():
        raise RunConfigError(f"catalogue {path} is neither a vocab.json nor a model directory")
    try:
        return ItemVocab.load(target)
    except VocabError as err:
        raise RunConfigError(f"catalogue {path}: {err}") from err


@dataclass
class GlobalModel:
    """The model the federation trains: its version, architecture, weights and catalogue."""

    version: str
    kind: str
    config: dict[str, Any]
    vocab: ItemVocab
    arrays: ArrayRecord


@dataclass(frozen=True)
class RoundResult:
    """What one round produced."""

    number: int
    status: str
    version: str | None
    detail: str = ""


class Federation:
    """Runs rounds for one ServerApp run and records everything in the registry."""

    def __init__(self, cfg: RunConfig, grid: Grid, flwr_run_id: int) -> None:
        self.cfg = cfg
        self.grid = grid
        self.flwr_run_id = flwr_run_id
        self.registry = Registry(cfg.registry_path)
        self.run_id = self.registry.start_run(
            flwr_run_id,
            cfg.to_mapping(),
            mode=cfg.mode,
            privacy_mode=cfg.privacy_mode,
            strategy=cfg.strategy,
            secagg=cfg.secagg,
        )
        self.accountant: Any = None
        self._accounting_key: dict[str, Any] = {}
        # Registry round numbers continue across runs; the lr schedule counts this run's.
        self.first_round = self.registry.next_round_number()
        try:
            self.model = self._initial_model()
        except BaseException as err:
            self.close("failed", str(err)[:500])
            raise

    # ------------------------------------------------------------------ model store
    def _initial_model(self) -> GlobalModel:
        """``init-model``, else the registry's newest version, else a fresh model."""
        cfg = self.cfg
        if cfg.init_model:
            return self._adopt_model_dir(Path(cfg.init_model), note="init-model")
        head = self.registry.head()
        if head is not None:
            model = self._load_version(head)
            if cfg.catalogue:
                wanted = load_catalogue(Path(cfg.catalogue))
                if wanted != model.vocab:
                    raise RunConfigError(
                        f"catalogue {cfg.catalogue} (sha256 {wanted.sha256[:12]}) differs from "
                        f"the catalogue of the newest version {head.version} "
                        f"({model.vocab.sha256[:12]}); a new catalogue needs a new model: pass "
                        "init-model or use another state-dir"
                    )
            return model
        catalogue = Path(cfg.catalogue) if cfg.catalogue else self._demo_catalogue()
        if catalogue is None:
            raise RunConfigError(
                "the registry has no model yet: set run-config 'catalogue' to the product "
                "catalogue (a vocab.json or a model directory) or 'init-model'"
            )
        vocab = load_catalogue(catalogue)
        torch.manual_seed(cfg.seed)
        try:
            module = build_model(cfg.model_kind, {**cfg.model_overrides, "n_items": vocab.n_items})
        except ModelError as err:
            raise RunConfigError(str(err)) from err
        note = "fresh"
        if cfg.item_attributes:
            note = self._init_from_attributes(module, vocab)
        return self._register_new(module, vocab, parent=None, round_number=None, note=note)

    def _init_from_attributes(self, module: torch.nn.Module, vocab: ItemVocab) -> str:
        """Item tables from the catalogue's public attributes (no privacy cost)."""
        from shared.item_vectors import init_item_tables, read_item_attributes

        cfg = self.cfg
        tables = [t.strip() for t in cfg.item_attribute_tables.split(",") if t.strip()]
        try:
            attributes = read_item_attributes(Path(cfg.item_attributes))
            names = init_item_tables(module, vocab, attributes, tables)
        except FedrecError as err:
            raise RunConfigError(f"item-attributes {cfg.item_attributes}: {err}") from err
        log.info("item tables %s from the attributes in %s", names, cfg.item_attributes)
        return f"fresh, {' and '.join(names)} from public item attributes"

    def _demo_catalogue(self) -> Path | None:
        """``<state>/sites/catalogue.json`` (written with simulated sites), if present."""
        path = self.cfg.resolved_state_dir / "sites" / "catalogue.json"
        if path.is_file():
            log.info("no catalogue given: using %s", path)
            return path
        return None

    def _adopt_model_dir(self, path: Path, note: str) -> GlobalModel:
        try:
            module, vocab, meta = load_model_dir(path)
        except FedrecError as err:
            raise RunConfigError(f"init-model {path}: {err}") from err
        try:
            known = self.registry.model(meta.version)
            return self._load_version(known)
        except RegistryError:
            return self._register_new(
                module, vocab, parent=meta.parent, round_number=None, note=note
            )

    def _load_version(self, version: ModelVersion) -> GlobalModel:
        try:
            module, vocab, _ = load_model_dir(Path(version.path))
        except FedrecError as err:
            raise RegistryError(f"model version {version.version}: {err}") from err
        return GlobalModel(
            version=version.version,
            kind=model_kind(module),
            config=config_dict(module),
            vocab=vocab,
            arrays=ArrayRecord(module.state_dict()),
        )

    def _register_new(
        self,
        module: torch.nn.Module,
        vocab: ItemVocab,
        *,
        parent: str | None,
        round_number: int | None,
        note: str,
        metrics: dict[str, float] | None = None,
        epsilon_max: float | None = None,
        epsilon_mean: float | None = None,
    ) -> GlobalModel:
        """Save ``module`` as a model directory and a registry version; returns it."""
        state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
        version = new_version(arrays_sha256(state))
        privacy = self._privacy_statement(epsilon_max)
        out = self.cfg.model_store / version
        meta = save_model_dir(
            out,
            module,
            vocab,
            version=version,
            privacy=privacy,
            metrics=metrics,
            parent=parent,
            round=round_number,
            extra={"note": note, "flwr_run_id": self.flwr_run_id},
        )
        self.registry.add_model(
            ModelVersion(
                version=version,
                round=round_number,
                parent=parent,
                sha256=meta.files[WEIGHTS_FILE],
                path=str(out),
                kind=meta.kind,
                n_items=meta.n_items,
                run_id=self.run_id,
                metrics=dict(metrics or {}),
                privacy_mode=self.cfg.privacy_mode if round_number is not None else "none",
                accountant=privacy.accountant,
                epsilon_max=epsilon_max,
                epsilon_mean=epsilon_mean,
                delta=privacy.delta,
            )
        )
        log.info("model version %s saved to %s (%s)", version, out, note)
        return GlobalModel(
            version=version,
            kind=meta.kind,
            config=config_dict(module),
            vocab=vocab,
            arrays=ArrayRecord(module.state_dict()),
        )

    def _privacy_statement(self, epsilon: float | None) -> PrivacyStatement:
        cfg = self.cfg
        if epsilon is None or cfg.privacy_mode == "none":
            return PrivacyStatement()
        secagg = " + SecAgg+" if cfg.secagg else ""
        if cfg.privacy_mode == "app":
            _, delta, _ = self.registry.app_privacy_spent()
            return PrivacyStatement(
                unit="shopper (one device)",
                epsilon=epsilon,
                delta=delta or cfg.app_target_delta,
                accountant="rdp",
                mechanism=f"client-level DP (app mode){secagg}",
            )
        if cfg.privacy_mode == "distributed":
            return PrivacyStatement(
                unit="shopper",
                epsilon=epsilon,
                delta=cfg.dist_delta,
                accountant="prv",
                mechanism="distributed dp-fedsgd (noise shares summed under SecAgg+)",
            )
        deltas = self.registry.site_deltas()
        return PrivacyStatement(
            unit="shopper",
            epsilon=epsilon,
            delta=max(deltas) if deltas else None,
            accountant="prv",
            mechanism=f"dp-sgd (store mode){secagg}",
        )

    def weights_of(self, version: str) -> ArrayRecord:
        """The weights of a registered version, verified against their sha256."""
        entry = self.registry.model(version)
        path = Path(entry.path)
        try:
            verify_model_dir(path)
        except ModelError as err:
            raise RegistryError(f"model version {version}: {err}") from err
        state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        return ArrayRecord(state)

    # ------------------------------------------------------------------ instructions
    def version_meta(self, version: str) -> dict[str, Any]:
        """Privacy statement, lineage and metrics of a version (from its model directory)."""
        if not version:
            return {}
        meta = read_metadata(Path(self.registry.model(version).path))
        return {
            "privacy": dataclasses.asdict(meta.privacy),
            "parent": meta.parent,
            "round": meta.round,
            "metrics": dict(meta.metrics),
        }

    def instructions(self, number: int, model: GlobalModel, serve: str) -> ConfigRecord:
        """The ConfigRecord of a train or evaluate message."""
        cfg = self.cfg
        instr = federated.RoundInstructions(
            server_round=number,
            model_version=model.version,
            model_kind=model.kind,
            model_config=model.config,
            catalogue=model.vocab,
            serve_version=serve,
            privacy_mode=cfg.privacy_mode,
            local_epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            learning_rate=cfg.round_learning_rate(number - self.first_round + 1),
            local_optimizer=cfg.local_optimizer,
            local_steps=cfg.local_steps,
            noise_multiplier=cfg.noise_multiplier,
            max_grad_norm=cfg.max_grad_norm,
            seed=cfg.seed + number,
            eval_k=cfg.eval_k,
            **self._distributed_instructions(),
            model_meta=self.version_meta(model.version),
            serve_meta=self.version_meta(serve) if serve != model.version else {},
        )
        return ConfigRecord(instr.to_config())

    def _distributed_instructions(self) -> dict[str, Any]:
        """Distributed-DP settings of a round (docs/privacy.md); {} in the other modes."""
        cfg = self.cfg
        if cfg.privacy_mode != "distributed":
            return {}
        from coordinator.distributed_dp import noise_shares, share_scale

        return {
            "sample_rate": cfg.dist_sample_rate,
            "noise_shares": noise_shares(cfg),
            "share_scale": share_scale(cfg),
            "share_range": cfg.secagg_clipping_range,
            "frozen": ",".join(cfg.frozen_parameters),
        }

    def serve_target(self, evaluated: str) -> tuple[str, ArrayRecord | None]:
        """The published version and, when it is not ``evaluated``, its weights."""
        published = self.registry.published()
        if published is None:
            return "", None
        if published.version == evaluated:
            return published.version, None
        return published.version, self.weights_of(published.version)

    # ------------------------------------------------------------------ one round
    def train_round(self, strategy: GuardedStrategy) -> RoundResult:
        """One round: train, validate, aggregate, version, publish, evaluate."""
        cfg = self.cfg
        number = self.registry.next_round_number()
        started = time.monotonic()
        connected = wait_for_nodes(self.grid, cfg.min_sites, timeout=cfg.round_timeout)
        if len(connected) < cfg.min_sites:
            round_id = self.registry.start_round(self.run_id, number, 0, 0)
            detail = f"only {len(connected)} site(s) connected, min-sites is {cfg.min_sites}"
            log.warning("round %d not started: %s", number, detail)
            self._finish(round_id, "missed-quorum", started, detail=detail)
            return RoundResult(number, "missed-quorum", None, detail)

        published = self.registry.published()
        serve = published.version if published else ""
        config = self.instructions(number, self.model, serve)
        messages = list(strategy.configure_train(number, self.model.arrays, config, self.grid))
        bytes_down = sum(payload_bytes(m.content) for m in messages)
        round_id = self.registry.start_round(self.run_id, number, len(messages), bytes_down)
        log.info(
            "round %d: asked %d site(s) to train %s", number, len(messages), self.model.version
        )
        replies = list(self.grid.send_and_receive(messages, timeout=cfg.round_timeout))
        try:
            new_arrays, train_metrics = strategy.aggregate_train(number, replies)
        except (ValueError, FedrecError) as err:
            log.error("round %d: aggregation failed: %s", number, err)
            self._record_outcomes(round_id, strategy, messages, replies)
            self._finish(round_id, "failed", started, detail=str(err)[:500], strategy=strategy)
            return RoundResult(number, "failed", None, str(err))
        self._record_outcomes(round_id, strategy, messages, replies)
        report = strategy.train_report
        if new_arrays is None:
            status = "missed-quorum" if report.quorum_missed else "failed"
            detail = (
                f"{report.accepted} valid update(s), quorum {cfg.quorum}"
                if report.quorum_missed
                else "the aggregator released nothing (app mode: every sampled device must "
                "answer with a valid update for the accountant)"
            )
            self._finish(round_id, status, started, detail=detail, strategy=strategy)
            return RoundResult(number, status, None, detail)

        aggregate = to_numpy(new_arrays)
        if not all(np.isfinite(a).all() for a in aggregate.values() if a.dtype.kind == "f"):
            detail = "the aggregate is not finite; nothing recorded"
            log.error("round %d: %s", number, detail)
            self._finish(round_id, "failed", started, detail=detail, strategy=strategy)
            return RoundResult(number, "failed", None, detail)

        eps_max, eps_mean = self._round_epsilon()
        metrics = {
            k: float(v) for k, v in (train_metrics or {}).items() if isinstance(v, int | float)
        }
        version = self.commit_version(aggregate, number, metrics, eps_max, eps_mean)
        self._finish(
            round_id,
            "completed",
            started,
            strategy=strategy,
            train_metrics=metrics,
            version=version,
            eps=(eps_max, eps_mean),
        )
        self.evaluate(number, round_id, strategy)
        self.registry.set_round_seconds(round_id, time.monotonic() - started)
        return RoundResult(number, "completed", version)

    def commit_version(
        self,
        aggregate: dict[str, np.ndarray],
        number: int,
        metrics: dict[str, float],
        eps_max: float | None,
        eps_mean: float | None,
    ) -> str:
        """Store an aggregate as the new global model (and publish it when ``auto``)."""
        module = build_model(self.model.kind, self.model.config)
        module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in aggregate.items()})
        parent = self.model.version
        self.model = self._register_new(
            module,
            self.model.vocab,
            parent=parent,
            round_number=number,
            note=f"round {number}",
            metrics=metrics,
            epsilon_max=eps_max,
            epsilon_mean=eps_mean,
        )
        if self.cfg.publish == "auto":
            self.registry.publish(self.model.version, note=f"auto-published after round {number}")
        return self.model.version

    def _round_epsilon(self) -> tuple[float | None, float | None]:
        """(max, mean) epsilon of the guarantee after this round, per the privacy mode."""
        if self.cfg.privacy_mode == "none":
            return None, None
        if self.cfg.privacy_mode == "app":
            if self.accountant is None:
                return None, None
            self._save_accountant()
            eps, _, _ = self.registry.app_privacy_spent()
            return eps, eps
        epsilons = self.registry.site_epsilons()
        if not epsilons:
            return None, None
        return max(epsilons), float(np.mean(epsilons))

    def _record_outcomes(
        self,
        round_id: int,
        strategy: GuardedStrategy,
        messages: list[Message],
        replies: list[Message],
    ) -> None:
        asked = asked_nodes(messages)
        answered = {reply_node(r, asked) for r in replies}
        for outcome in strategy.train_report.outcomes:
            if outcome.site == f"node-{outcome.node_id}":
                # An error reply names no site; the registry knows the node's last name.
                outcome = dataclasses.replace(
                    outcome, site=self.registry.site_name_for_node(outcome.node_id)
                )
            self.registry.record_site_result(round_id, outcome)
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in answered:
                name = self.registry.site_name_for_node(node)
                log.warning("site %s (node %d) did not answer within the round timeout", name, node)
                self.registry.record_site_result(
                    round_id,
                    SiteResult(
                        name,
                        node,
                        "train",
                        "timeout",
                        f"no reply in {self.cfg.round_timeout:.0f} s",
                    ),
                )

    def _finish(
        self,
        round_id: int,
        status: str,
        started: float,
        *,
        detail: str = "",
        strategy: GuardedStrategy | None = None,
        train_metrics: dict[str, float] | None = None,
        version: str | None = None,
        eps: tuple[float | None, float | None] = (None, None),
    ) -> None:
        report = strategy.train_report if strategy else None
        asked = int(self.registry.round_row(round_id)["sites_asked"] or 0)
        answered = len(report.outcomes) if report else 0
        summary = RoundSummary(
            status=status,
            sites_asked=asked,
            sites_answered=answered,
            sites_accepted=report.count("accepted") if report else 0,
            sites_rejected=report.count("rejected") if report else 0,
            sites_refused=report.count("refused") if report else 0,
            sites_failed=(report.count("failed") if report else 0) + max(0, asked - answered),
            bytes_down=int(self.registry.round_row(round_id)["bytes_down"] or 0),
            bytes_up=report.bytes_up if report else 0,
            seconds=time.monotonic() - started,
            train_metrics=train_metrics or {},
            model_version=version,
            epsilon_max=eps[0],
            epsilon_mean=eps[1],
            detail=detail,
        )
        self.registry.finish_round(round_id, summary)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, number: int, round_id: int, strategy: GuardedStrategy) -> None:
        """Send the new version to the sites for evaluation (and to store and serve)."""
        if self.cfg.fraction_evaluate == 0.0:
            return
        serve, serve_arrays = self.serve_target(self.model.version)
        strategy.serve_arrays = serve_arrays
        config = self.instructions(number, self.model, serve)
        messages = list(strategy.configure_evaluate(number, self.model.arrays, config, self.grid))
        down = sum(payload_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout))
        metrics = strategy.aggregate_evaluate(number, replies)
        for outcome in strategy.eval_report.outcomes:
            self.registry.record_site_result(round_id, outcome)
        values = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, int | float)}
        self.registry.add_round_bytes(round_id, down, strategy.eval_report.bytes_up)
        if values:
            self.registry.set_round_eval_metrics(round_id, values)
            self.registry.set_model_metrics(self.model.version, values)
            log.info("round %d: federated evaluation %s", number, _fmt(values))

    # ------------------------------------------------------------------ app-mode accounting
    def accounting_config(self, population: int) -> dict[str, Any]:
        """What identifies an app-mode accountant (a change starts a new segment)."""
        cfg = self.cfg
        return {
            "target_delta": cfg.app_target_delta,
            "population_size": population,
            "noise_multiplier": cfg.app_noise_multiplier,
            "clipping_norm": cfg.app_clipping_norm,
            "sample_size": cfg.min_sites,
        }

    def make_accountant(self) -> Any:
        """Flower's RDP accountant, restored from the registry when the config matches."""
        from flwr.serverapp import (
            NeighboringRelation,
            PrivacyConfig,
            RdpAccountant,
            SamplingMethod,
        )

        cfg = self.cfg
        population = cfg.app_population or len(wait_for_nodes(self.grid, cfg.min_sites, None))
        if population < cfg.min_sites:
            raise RunConfigError(
                f"app-population ({population}) is smaller than the sample size ({cfg.min_sites})"
            )
        spent, _, _ = self.registry.app_privacy_spent()
        limit = cfg.app_max_epsilon - spent if cfg.app_max_epsilon > 0 else None
        if limit is not None and limit <= 0:
            raise RunConfigError(
                f"the app-mode budget is spent: epsilon {spent:.3g} of {cfg.app_max_epsilon}"
            )
        self._accounting_key = self.accounting_config(population)
        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=cfg.app_target_delta,
                population_size=population,
                # Fixed-clipping accounting in flwr 1.42 supports only no amplification.
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
                max_epsilon=limit,
            )
        )
        state = self.registry.app_accountant_state(self._accounting_key)
        if state is not None:
            accountant.load_state_dict(state)
            log.info("app mode: restored the accountant (%d releases)", accountant.num_releases)
        self.accountant = accountant
        return accountant

    def _save_accountant(self) -> None:
        spent = self.accountant.get_privacy_spent()
        self.registry.save_app_accountant(
            self._accounting_key,
            self.accountant.state_dict(),
            float(spent.epsilon),
            float(spent.delta),
            int(spent.num_releases),
        )

    # ------------------------------------------------------------------ feedback loop
    def query_event_counts(self) -> list[tuple[str, int, int]]:
        """Ask every connected site for its event counts: [(site, node, new events)]."""
        nodes = list(self.grid.get_node_ids())
        messages = [
            Message(
                RecordDict({federated.CONFIG: ConfigRecord({"ask": federated.QUERY_EVENT_COUNTS})}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node in nodes
        ]
        timeout = min(self.cfg.round_timeout, max(10.0, self.cfg.poll_interval))
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        counts: list[tuple[str, int, int]] = []
        for msg in replies:
            if msg.has_error():
                continue
            metrics = msg.content.metric_records.get(federated.METRICS)
            if metrics is None:
                continue
            new = metrics.get("new-events")
            if not isinstance(new, int | float) or not math.isfinite(new) or new < 0:
                continue
            name = _reply_site(msg)
            node = msg.metadata.src_node_id
            eps = metrics.get("epsilon")
            budget = metrics.get("epsilon-budget")
            self.registry.touch_site_counts(
                name,
                node,
                int(new),
                float(eps) if isinstance(eps, int | float) else None,
                float(budget) if isinstance(budget, int | float) else None,
            )
            counts.append((name, node, int(new)))
        return counts

    def run(self, strategy: GuardedStrategy) -> None:
        """Fixed rounds or the continuous loop, per the run config (A/B sync around rounds)."""
        cfg = self.cfg
        self.sync_ab()
        if cfg.mode == "rounds":
            for _ in range(cfg.num_rounds):
                self.train_round(strategy)
                self.sync_ab()
            return
        started = time.monotonic()
        last_round = time.monotonic()
        done = 0
        while True:
            if cfg.num_rounds and done >= cfg.num_rounds:
                log.info("continuous mode: %d round(s) done, the cap", done)
                return
            if cfg.max_seconds and time.monotonic() - started >= cfg.max_seconds:
                log.info("continuous mode: max-seconds reached after %d round(s)", done)
                return
            counts = self.query_event_counts()
            ready = [c for c in counts if c[2] >= cfg.min_new_events]
            due = cfg.round_interval > 0 and time.monotonic() - last_round >= cfg.round_interval
            if len(ready) >= cfg.min_ready_sites or due:
                reason = "scheduled" if due and len(ready) < cfg.min_ready_sites else "new events"
                log.info(
                    "continuous mode: round triggered (%s; %d of %d site(s) ready)",
                    reason,
                    len(ready),
                    len(counts),
                )
                self.train_round(strategy)
                self.sync_ab()
                done += 1
                last_round = time.monotonic()
                continue
            time.sleep(cfg.poll_interval)

    def sync_ab(self) -> None:
        """Send A/B experiments to the sites and collect their counts (never fails the run)."""
        from coordinator.ab_sync import sync_quietly

        sync_quietly(self.grid, self.cfg.registry_path, timeout=self.cfg.round_timeout)

    def close(self, status: str, detail: str = "") -> None:
        """Record the run's end."""
        self.registry.finish_run(self.run_id, status, detail)
        self.registry.close()


def _reply_site(msg: Message) -> str:
    if federated.SITE in msg.content.config_records:
        name = msg.content.config_records[federated.SITE].get("name")
        if isinstance(name, str) and name:
            return name
    return f"node-{msg.metadata.src_node_id}"


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
