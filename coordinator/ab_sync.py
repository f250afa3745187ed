"""The ServerApp's A/B sync: experiments to the sites, arm models where missing, counts back.

One sync is two kinds of Flower query messages, through the run's `Grid` (no other
transport): ``query.ab_sync`` to every connected site, carrying the experiments
(`shared.ab.encode_experiments`) with a new report number; each site answers with per-arm
counts and the arm versions it lacks. Sites that lack versions then get ``query.ab_models``
with those versions' weights (``ab-arm-<j>`` ArrayRecords) and, per version, its kind,
config, catalogue (gzip JSON + sha256, as in `shared.federated`) and metadata; they store
them as model directories, and serve the experiment once every arm is there.

`Federation.run` calls `sync_experiments` at the start of a run and after every round; a
failure is logged and never stops the training.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from coordinator.ab_testing import ABRegistry, SiteReport
from shared import ab, federated

log = logging.getLogger(__name__)

SYNC_TYPE = f"query.{ab.AB_SYNC}"
MODELS_TYPE = f"query.{ab.AB_MODELS}"


@dataclass
class SyncSummary:
    """What one sync did."""

    experiments: list[str] = field(default_factory=list)
    sites_answered: int = 0
    reports: int = 0
    models_sent: int = 0
    failures: list[str] = field(default_factory=list)


def reply_site(msg: Message) -> str:
    """The site name a reply carries (``node-<id>`` when it has none)."""
    record = msg.content.config_records.get(federated.SITE)
    name = record.get("name") if record is not None else None
    return name if isinstance(name, str) and name else f"node-{msg.metadata.src_node_id}"


def parse_reports(
    msg: Message, specs: list[ab.ExperimentSpec]
) -> tuple[list[tuple[str, SiteReport]], list[str]]:
    """The reports in one ``ab_sync`` reply, and the versions the site lacks."""
    metrics = msg.content.metric_records.get(federated.METRICS)
    if metrics is None:
        return [], []
    reports = reports_from_metrics(metrics, reply_site(msg), int(msg.metadata.src_node_id), specs)
    missing: list[str] = []
    extra = msg.content.config_records.get("ab")
    if extra is not None and isinstance(extra.get(ab.MISSING), str):
        try:
            listed = json.loads(str(extra[ab.MISSING]))
        except json.JSONDecodeError:
            listed = []
        wanted = {a.version for s in specs for a in s.arms}
        missing = [v for v in listed if isinstance(v, str) and v in wanted]
    return reports, missing


def reports_from_metrics(
    metrics: Mapping[str, Any], site: str, node_id: int, specs: list[ab.ExperimentSpec]
) -> list[tuple[str, SiteReport]]:
    """A site's reports from its reply metrics (`shared.ab` key names), experiment by experiment.

    Only the expected keys are read; a malformed number drops that experiment's report
    (logged), never the sync.
    """
    out: list[tuple[str, SiteReport]] = []
    for e, spec in enumerate(specs):
        try:
            if _number(metrics, ab.experiment_key(e, "refused")) != 0:
                continue
            counts = [
                {
                    name: _number(metrics, ab.report_key(e, a, name))
                    for name in (*ab.COUNTS, *ab.EXACT_ONLY_COUNTS)
                    if ab.report_key(e, a, name) in metrics
                }
                for a in range(len(spec.arms))
            ]
            if any(set(ab.COUNTS) - set(c) for c in counts):
                raise ValueError("a count is missing")
            report = SiteReport(
                site=site,
                node_id=node_id,
                report_seq=int(_number(metrics, ab.experiment_key(e, "seq"))),
                epsilon=_number(metrics, ab.experiment_key(e, "epsilon")),
                active=_number(metrics, ab.experiment_key(e, "active")) == 1,
                missing=int(_number(metrics, ab.experiment_key(e, "missing"))),
                counts=counts,
            )
        except (KeyError, ValueError) as err:
            log.warning("A/B: ignoring %s's report on %s: %s", site, spec.experiment_id, err)
            continue
        if report.epsilon == 0 and any(v < 0 for c in report.counts for v in c.values()):
            log.warning("A/B: ignoring %s's exact report with negative counts", site)
            continue
        out.append((spec.experiment_id, report))
    return out


def _number(metrics: Any, key: str) -> float:
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} is not a finite number")
    return float(value)


def models_message(node: int, versions: Iterable[str], registry_path: Path) -> Message:
    """An ``ab_models`` message with the weights and descriptions of ``versions``."""
    from shared.artifacts import load_model_dir
    from shared.federated import encode_catalogue
    from shared.models import config_dict, model_kind

    with ABRegistry(registry_path) as reg:
        paths = {v: Path(reg.registry.model(v).path) for v in versions}
    content = RecordDict()
    described = []
    config: dict[str, Any] = {}
    for j, (version, path) in enumerate(paths.items()):
        module, vocab, meta = load_model_dir(path)
        blob, sha = encode_catalogue(vocab)
        config[f"catalogue-gz-{j}"] = blob
        described.append(
            {
                "version": version,
                "kind": model_kind(module),
                "config": config_dict(module),
                "catalogue-sha256": sha,
                "meta": {
                    "privacy": meta.to_dict()["privacy"],
                    "parent": meta.parent,
                    "round": meta.round,
                    "metrics": dict(meta.metrics),
                },
            }
        )
        content[ab.arm_array_key(j)] = ArrayRecord(module.state_dict())
    config[ab.MODELS] = json.dumps(described, sort_keys=True)
    content[federated.CONFIG] = ConfigRecord(config)
    return Message(content, dst_node_id=node, message_type=MODELS_TYPE)


def sync_experiments(grid: Grid, registry_path: Path, *, timeout: float) -> SyncSummary:
    """Send the experiments to every connected site, collect their counts, deliver models."""
    summary = SyncSummary()
    with ABRegistry(registry_path) as reg:
        specs = reg.specs_to_send()
    if not specs:
        return summary
    summary.experiments = [s.experiment_id for s in specs]
    payload = ConfigRecord({ab.EXPERIMENTS: ab.encode_experiments(specs)})
    messages = [
        Message(RecordDict({federated.CONFIG: payload}), dst_node_id=node, message_type=SYNC_TYPE)
        for node in grid.get_node_ids()
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    needs: dict[int, list[str]] = {}
    with ABRegistry(registry_path) as reg:
        for reply in replies:
            if reply.has_error():
                summary.failures.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                continue
            summary.sites_answered += 1
            reports, missing = parse_reports(reply, specs)
            for experiment_id, site_report in reports:
                reg.record_report(experiment_id, site_report)
                summary.reports += 1
            if missing:
                needs[int(reply.metadata.src_node_id)] = missing
        reg.mark_announced([s.experiment_id for s in specs if s.status != "running"])
    if needs:
        deliveries = [
            models_message(node, versions, registry_path) for node, versions in needs.items()
        ]
        for reply in grid.send_and_receive(deliveries, timeout=timeout):
            if reply.has_error():
                summary.failures.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                continue
            metrics = reply.content.metric_records.get(federated.METRICS)
            stored = metrics.get("stored", 0) if metrics is not None else 0
            summary.models_sent += int(stored) if isinstance(stored, int | float) else 0
    log.info(
        "A/B sync: %s; %d site(s) answered, %d report(s), %d model(s) delivered%s",
        ", ".join(summary.experiments),
        summary.sites_answered,
        summary.reports,
        summary.models_sent,
        f"; failures: {summary.failures}" if summary.failures else "",
    )
    return summary


def sync_quietly(grid: Grid, registry_path: Path, *, timeout: float) -> SyncSummary | None:
    """`sync_experiments`, with any failure logged instead of raised (training goes on)."""
    try:
        return sync_experiments(grid, registry_path, timeout=timeout)
    except Exception:  # an A/B problem must never stop federated training; it is logged
        log.exception("A/B sync failed")
        return None
