"""Serving an A/B experiment at the edge: which arm a shopper is in, and that arm's model.

`ExperimentServing.refresh` (called by the service's background loop, one cheap query when
nothing changed) reads the running experiment from ``site.db`` (`edge_client.ab_site`) and
loads every arm's model directory from ``models/`` with the same verification as any served
model (`edge_client.inference.load_model`, int8 included when configured). Only when every
arm loaded does the experiment go live; until then, and after it stops, shoppers get the
version ``models/CURRENT`` names. `assign` is a hash and a tuple lookup: no I/O per request.

`maintain` is the service's loop for this and for the impression log: refresh experiments,
flush impressions every ``flush_interval_s``, prune impressions past their retention.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_client.ab_site import ABSite
from edge_client.errors import EdgeError, ModelRejectedError
from edge_client.inference import LoadedModel, ModelServer, load_model
from edge_client.outcomes import DAY_MS, ImpressionLog
from edge_client.quantize import Precision
from shared.ab import ExperimentSpec, assign_arm

log = logging.getLogger(__name__)

RETRY_S = 30.0  # a failed arm load is retried this often even if nothing changed


@dataclass(frozen=True)
class ArmAssignment:
    """The experiment and arm a shopper is in."""

    experiment_id: str
    arm: int
    arm_name: str


@dataclass(frozen=True)
class LiveExperiment:
    """A running experiment whose arms are all loaded."""

    spec: ExperimentSpec
    models: tuple[LoadedModel, ...]

    def assign(self, user_id: str) -> tuple[ArmAssignment, LoadedModel]:
        """The shopper's arm and its model."""
        arm = assign_arm(self.spec.experiment_id, user_id, self.spec.weights)
        name = self.spec.arms[arm].name
        return ArmAssignment(self.spec.experiment_id, arm, name), self.models[arm]


class ExperimentServing:
    """The running A/B experiment of a site, ready to assign shoppers and serve their arm."""

    def __init__(
        self,
        db_path: Path,
        models_dir: Path,
        *,
        models: ModelServer | None = None,
        intra_op_threads: int = 1,
        quantize: Precision = "none",
    ) -> None:
        self.models_dir = Path(models_dir)
        self.models = models
        self.intra_op_threads = intra_op_threads
        self.quantize: Precision = quantize
        self._ab = ABSite(Path(db_path))
        self._live: LiveExperiment | None = None
        self._stamp: tuple[int, int] | None = None
        self._failed_at = 0.0
        self.problem = ""  # why the running experiment is not served, if it is not
        self._lock = threading.Lock()
        self._closed = False

    @property
    def live(self) -> LiveExperiment | None:
        """The experiment being served, or None."""
        return self._live

    def assign(self, user_id: str) -> tuple[ArmAssignment, LoadedModel] | None:
        """The shopper's arm and model, or None when no experiment is live."""
        live = self._live
        return live.assign(user_id) if live is not None else None

    def refresh(self) -> None:
        """Follow the site's running experiment: load its arms, or stop serving it."""
        with self._lock:
            if self._closed:
                return  # the service is stopping; its connection is gone
            stamp = self._ab.stamp()
            retry = self.problem and time.monotonic() - self._failed_at >= RETRY_S
            if stamp == self._stamp and not retry:
                return
            self._stamp = stamp
            spec = self._ab.running()
            live = self._live
            if spec is None:
                if live is not None:
                    log.info("A/B experiment %s ended here", live.spec.experiment_id)
                self._live, self.problem = None, ""
                return
            if live is not None and _same_serving(live.spec, spec):
                return
            try:
                models = tuple(self._load(arm.version) for arm in spec.arms)
            except (ModelRejectedError, EdgeError) as err:
                self._live = None
                self.problem = f"experiment {spec.experiment_id} not served: {err}"
                self._failed_at = time.monotonic()
                log.warning("A/B %s", self.problem)
                return
            self._live, self.problem = LiveExperiment(spec, models), ""
            log.info(
                "A/B experiment %s live: %s",
                spec.experiment_id,
                ", ".join(f"{a.name}={a.version} ({a.weight:g})" for a in spec.arms),
            )

    def _load(self, version: str) -> LoadedModel:
        served = self.models.current if self.models is not None else None
        if served is not None and served.version == version:
            return served
        model = load_model(
            self.models_dir / version,
            intra_op_threads=self.intra_op_threads,
            quantize=self.quantize,
        )
        if model.version != version:
            raise ModelRejectedError(f"{version}: its metadata says {model.version}")
        return model

    def status(self) -> dict[str, Any]:
        """What is served (for status output)."""
        live = self._live
        if live is None:
            return {"live": None, "problem": self.problem}
        return {
            "live": live.spec.experiment_id,
            "arms": [
                {"name": a.name, "version": a.version, "weight": a.weight, "precision": m.precision}
                for a, m in zip(live.spec.arms, live.models, strict=True)
            ],
            "window_s": live.spec.window_s,
            "problem": "",
        }

    def close(self) -> None:
        """Close the connection to ``site.db``, after a `refresh` still running in a thread.

        A cancelled ``asyncio.to_thread(refresh)`` keeps running; closing the connection
        under it crashed the process (SQLite segfault, seen in the test suite).
        """
        with self._lock:
            self._closed = True
            self._ab.close()


def _same_serving(a: ExperimentSpec, b: ExperimentSpec) -> bool:
    """Whether two definitions serve the same arms (report numbers do not matter)."""
    return (a.experiment_id, a.arms, a.status) == (b.experiment_id, b.arms, b.status)


async def maintain(
    experiments: ExperimentServing | None,
    impressions: ImpressionLog | None,
    *,
    poll_interval_s: float,
    flush_interval_s: float = 1.0,
    retention_days: float = 30.0,
) -> None:
    """The service's background loop for A/B serving and the impression log (never returns)."""
    last_poll = last_prune = 0.0
    while True:
        now = time.monotonic()
        try:
            if experiments is not None and now - last_poll >= poll_interval_s:
                last_poll = now
                await asyncio.to_thread(experiments.refresh)
            if impressions is not None:
                await asyncio.to_thread(impressions.flush)
                if now - last_prune >= 3600.0:
                    last_prune = now
                    cutoff = impressions.clock() - int(retention_days * DAY_MS)
                    pruned = await asyncio.to_thread(impressions.prune, cutoff)
                    if pruned:
                        log.info("pruned %d impressions older than %g days", pruned, retention_days)
        except Exception:  # the loop must outlive any one failure; it is logged
            log.exception("A/B / impression maintenance failed")
        await asyncio.sleep(min(flush_interval_s, poll_interval_s))
