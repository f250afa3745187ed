"""A/B experiments on the coordinator: define them, collect the sites' reports, judge, promote.

State lives in the registry's SQLite file (``coordinator.db``) under its own migration set
``fedrec-ab``: ``ab_experiments`` (definition, status, report number) and ``ab_reports``
(the latest report of each site: report number, epsilon, per-arm counts). The experiment
reaches the sites through Flower (`coordinator.ab_sync`, run by the ServerApp at the start
of a run and after every round); this module never touches the network.

Life of an experiment: `ABRegistry.start` (two or more registered versions and their traffic
weights; one experiment runs at a time) -> reports accumulate -> `summarize` (CTR and
conversion per arm, Wilson intervals, z-tests; `coordinator.ab_stats`) -> `stop` (sites stop
serving it at the next sync and send a last report) or `promote` (publish the winner in the
registry, which every site then serves, and stop).

CTR and conversion are per shopper: the share of exposed shoppers who clicked (viewed,
carted, saved or bought a recommended item within the window) or converted (bought one).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

from coordinator.ab_stats import MetricComparison, compare_arms, discrete_laplace_variance
from coordinator.errors import CoordinatorError, RegistryError
from coordinator.registry import ModelVersion, Registry, now_iso
from shared.ab import COUNTS, ArmSpec, ExperimentSpec
from shared.errors import ConfigError

migrations = Migrations("fedrec-ab")

METRICS = {"ctr": "clicked", "conversion": "converted"}
SENSITIVITY = len(COUNTS)  # as the sites (edge_client.ab_site): one shopper, 4 counts of 1
ANNOUNCE_DAYS = 7  # an ended experiment is still sent (as stopped) this long after its end


class ABTestError(CoordinatorError):
    """An experiment cannot be started, found, judged or promoted as asked."""


@migrations()
def m001_experiments(db: sqlite_utils.Database) -> None:
    """Experiments and the latest report of each site about each."""
    db.table("ab_experiments").create(
        {
            "id": str,
            "created_at": str,
            "status": str,  # running | stopped | promoted
            "spec": str,  # ExperimentSpec JSON (report_seq and status live in columns)
            "report_seq": int,
            "final_sync": int,  # 1 once a sync after the stop told the sites
            "metric": str,
            "alpha": float,
            "stopped_at": str,
            "promoted_version": str,
            "note": str,
        },
        pk="id",
    )
    db.table("ab_reports").create(
        {
            "experiment_id": str,
            "site": str,
            "node_id": str,
            "report_seq": int,
            "received_at": str,
            "epsilon": float,
            "active": int,
            "missing": int,
            "counts": str,  # JSON list per arm: {count: value}
        },
        pk=("experiment_id", "site"),
    )


@dataclass(frozen=True)
class SiteReport:
    """One site's reply about one experiment (numbers only)."""

    site: str
    node_id: int
    report_seq: int
    epsilon: float
    active: bool
    missing: int
    counts: list[dict[str, float]]


@dataclass(frozen=True)
class Experiment:
    """An experiment as the registry holds it."""

    spec: ExperimentSpec
    status: str
    created_at: str
    metric: str
    alpha: float
    stopped_at: str | None = None
    promoted_version: str | None = None
    reports: list[SiteReport] = field(default_factory=list)

    @property
    def experiment_id(self) -> str:
        """The experiment's id."""
        return self.spec.experiment_id


class ABRegistry:
    """Experiments in ``coordinator.db`` (the registry must exist: versions come from it)."""

    def __init__(self, registry_path: Path) -> None:
        self.path = registry_path
        self.registry = Registry(registry_path, create=False)
        try:
            self.db = sqlite_utils.Database(registry_path)
            migrations.apply(self.db)
        except Exception as err:  # sqlite3 raises several unrelated types on corrupt files
            raise RegistryError(f"cannot open the A/B tables of {registry_path}: {err}") from err

    def close(self) -> None:
        """Close both connections."""
        self.db.close()
        self.registry.close()

    def __enter__(self) -> ABRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ lifecycle
    def start(
        self,
        versions: list[str],
        *,
        weights: list[float] | None = None,
        names: list[str] | None = None,
        window_s: float = 1800.0,
        epsilon: float = 0.0,
        metric: str = "ctr",
        alpha: float = 0.05,
    ) -> Experiment:
        """Define and start an experiment over registered ``versions`` (first = control)."""
        if self.running() is not None:
            raise ABTestError(
                f"experiment {self.running().experiment_id} is running; stop it first"  # type: ignore[union-attr]
            )
        if metric not in METRICS:
            raise ABTestError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
        if not 0 < alpha < 1:
            raise ABTestError(f"alpha must be in (0, 1), got {alpha}")
        for version in versions:
            self._verified(version)
        weights = weights or [1.0] * len(versions)
        names = names or [chr(ord("A") + i) for i in range(len(versions))]
        if not len(weights) == len(names) == len(versions):
            raise ABTestError("give one weight and one name per version")
        created = now_iso()
        digest = hashlib.sha256(f"{created}|{'|'.join(versions)}".encode()).hexdigest()[:6]
        experiment_id = f"ab{datetime.now(UTC):%Y%m%dT%H%M%S}-{digest}"
        try:
            spec = ExperimentSpec(
                experiment_id=experiment_id,
                arms=tuple(
                    ArmSpec(n, v, float(w))
                    for n, v, w in zip(names, versions, weights, strict=True)
                ),
                window_s=window_s,
                epsilon=epsilon,
                report_seq=0,
            )
        except ConfigError as err:
            raise ABTestError(str(err)) from err
        with self.db.atomic():
            self.db.table("ab_experiments").insert(
                {
                    "id": experiment_id,
                    "created_at": created,
                    "status": "running",
                    "spec": json.dumps(spec.to_dict(), sort_keys=True),
                    "report_seq": 0,
                    "final_sync": 0,
                    "metric": metric,
                    "alpha": alpha,
                    "stopped_at": None,
                    "promoted_version": None,
                    "note": "",
                }
            )
        return self.get(experiment_id)

    def _verified(self, version: str) -> ModelVersion:
        from shared.artifacts import verify_model_dir
        from shared.errors import ModelError

        model = self.registry.model(version)  # RegistryError for an unknown version
        try:
            verify_model_dir(Path(model.path))
        except ModelError as err:
            raise ABTestError(f"version {version} cannot be served: {err}") from err
        return model

    def stop(self, experiment_id: str | None = None, *, status: str = "stopped") -> Experiment:
        """Stop an experiment (the running one by default); sites learn it at the next sync."""
        exp = self.get(experiment_id)
        if exp.status != "running":
            raise ABTestError(f"experiment {exp.experiment_id} is already {exp.status}")
        with self.db.atomic():
            self.db.table("ab_experiments").update(
                exp.experiment_id, {"status": status, "stopped_at": now_iso(), "final_sync": 0}
            )
        return self.get(exp.experiment_id)

    def promote(
        self, experiment_id: str | None = None, *, arm: str | None = None, force: bool = False
    ) -> tuple[Experiment, ModelVersion]:
        """Publish the winner's version (or ``arm``'s) and end the experiment.

        Without ``arm`` the winner must be significant on the experiment's metric, unless
        ``force``. The publication reaches every site with the next round, like any publish.
        """
        exp = self.get(experiment_id)
        if exp.status == "promoted":
            raise ABTestError(f"experiment {exp.experiment_id} was already promoted")
        if arm is not None:
            names = [a.name for a in exp.spec.arms]
            if arm not in names:
                raise ABTestError(f"experiment {exp.experiment_id} has no arm {arm!r} ({names})")
            chosen = exp.spec.arms[names.index(arm)]
        else:
            if not exp.reports:
                raise ABTestError(f"no site has reported on {exp.experiment_id} yet")
            comparison = summarize(exp)[exp.metric]
            if not comparison.significant and not force:
                raise ABTestError(
                    f"no significant winner on {exp.metric} yet (best arm "
                    f"{exp.spec.arms[comparison.best].name}, p-values "
                    f"{_fmt_p(comparison.p_values_vs_best)} vs alpha {exp.alpha}/"
                    f"{max(1, len(exp.spec.arms) - 1)}); wait for more traffic, or pass --arm "
                    "or --force"
                )
            chosen = exp.spec.arms[comparison.best]
        model = self.registry.publish(
            chosen.version, note=f"A/B {exp.experiment_id}: arm {chosen.name} promoted"
        )
        changes: dict[str, Any] = {
            "status": "promoted",
            "stopped_at": exp.stopped_at or now_iso(),
            "promoted_version": chosen.version,
        }
        if exp.status == "running":
            changes["final_sync"] = 0  # the next sync tells the sites it ended
        with self.db.atomic():
            self.db.table("ab_experiments").update(exp.experiment_id, changes)
        return self.get(exp.experiment_id), model

    # ------------------------------------------------------------------ reads
    def get(self, experiment_id: str | None = None) -> Experiment:
        """One experiment (the newest by default) with its sites' latest reports."""
        if experiment_id is None:
            rows = list(
                self.db.query(
                    "select * from ab_experiments order by created_at desc, rowid desc limit 1"
                )
            )
            if not rows:
                raise ABTestError(
                    "no A/B experiment has been started (fedrec coordinator ab start)"
                )
        else:
            rows = list(self.db.query("select * from ab_experiments where id = ?", [experiment_id]))
            if not rows:
                raise ABTestError(f"no A/B experiment {experiment_id!r}")
        return self._experiment(rows[0])

    def running(self) -> Experiment | None:
        """The running experiment, if any."""
        rows = list(self.db.query("select * from ab_experiments where status = 'running'"))
        return self._experiment(rows[0]) if rows else None

    def experiments(self) -> list[Experiment]:
        """Every experiment, newest first."""
        rows = self.db.query("select * from ab_experiments order by created_at desc, rowid desc")
        return [self._experiment(r) for r in rows]

    def _experiment(self, row: dict[str, Any]) -> Experiment:
        spec = ExperimentSpec.from_dict(
            {
                **json.loads(row["spec"]),
                "report_seq": int(row["report_seq"]),
                "status": "running" if row["status"] == "running" else "stopped",
            }
        )
        reports = [
            SiteReport(
                site=r["site"],
                node_id=int(r["node_id"]),
                report_seq=int(r["report_seq"]),
                epsilon=float(r["epsilon"]),
                active=bool(r["active"]),
                missing=int(r["missing"]),
                counts=json.loads(r["counts"]),
            )
            for r in self.db.query(
                "select * from ab_reports where experiment_id = ? order by site", [row["id"]]
            )
        ]
        return Experiment(
            spec=spec,
            status=str(row["status"]),
            created_at=str(row["created_at"]),
            metric=str(row["metric"]),
            alpha=float(row["alpha"]),
            stopped_at=row["stopped_at"],
            promoted_version=row["promoted_version"],
            reports=reports,
        )

    # ------------------------------------------------------------------ sync (ServerApp)
    def specs_to_send(self) -> list[ExperimentSpec]:
        """Experiments a sync carries; those that still report get a new report number.

        Running experiments, and ended ones (stopped or promoted) for `ANNOUNCE_DAYS` after
        their end, so that a site offline at the end still learns it and stops serving. The
        report number advances for running experiments and for an ended one at the first
        sync after its end (the sites' last report); later announcements reuse it, so a site
        answers them with the release it already made, at no privacy cost. The schedule of
        releases is the coordinator's, independent of the data.
        """
        since = (datetime.now(UTC) - timedelta(days=ANNOUNCE_DAYS)).isoformat(timespec="seconds")
        rows = list(
            self.db.query(
                "select id, status, final_sync from ab_experiments where status = 'running' "
                "or final_sync = 0 or stopped_at >= ? order by created_at",
                [since],
            )
        )
        with self.db.atomic():
            for row in rows:
                if row["status"] == "running" or not row["final_sync"]:
                    self.db.execute(
                        "update ab_experiments set report_seq = report_seq + 1 where id = ?",
                        [row["id"]],
                    )
        return [self.get(r["id"]).spec for r in rows]

    def mark_announced(self, experiment_ids: list[str]) -> None:
        """Record that a sync told the sites an experiment ended."""
        with self.db.atomic():
            for eid in experiment_ids:
                self.db.execute(
                    "update ab_experiments set final_sync = 1 where id = ? and status != 'running'",
                    [eid],
                )

    def record_report(self, experiment_id: str, report: SiteReport) -> None:
        """Keep a site's report when it is newer than (or as new as) the one held."""
        held = list(
            self.db.query(
                "select report_seq from ab_reports where experiment_id = ? and site = ?",
                [experiment_id, report.site],
            )
        )
        if held and int(held[0]["report_seq"]) > report.report_seq:
            return
        with self.db.atomic():
            self.db.table("ab_reports").upsert(
                {
                    "experiment_id": experiment_id,
                    "site": report.site,
                    "node_id": str(report.node_id),
                    "report_seq": report.report_seq,
                    "received_at": now_iso(),
                    "epsilon": report.epsilon,
                    "active": int(report.active),
                    "missing": report.missing,
                    "counts": json.dumps(report.counts),
                },
                pk=("experiment_id", "site"),
            )


def totals(exp: Experiment) -> list[dict[str, float]]:
    """Per arm, every count summed over the sites' latest reports."""
    out: list[dict[str, float]] = [{} for _ in exp.spec.arms]
    for report in exp.reports:
        for arm, counts in zip(out, report.counts, strict=False):
            for name, value in counts.items():
                arm[name] = arm.get(name, 0.0) + float(value)
    return out


def summarize(exp: Experiment) -> dict[str, MetricComparison]:
    """CTR and conversion comparisons of an experiment's arms (see `coordinator.ab_stats`)."""
    sums = totals(exp)
    noisy = [r for r in exp.reports if r.epsilon > 0]
    noise_var = sum(discrete_laplace_variance(r.epsilon, SENSITIVITY) for r in noisy)
    exposed = [arm.get("exposed", 0.0) for arm in sums]
    return {
        metric: compare_arms(
            metric,
            exposed,
            [arm.get(count, 0.0) for arm in sums],
            alpha=exp.alpha,
            noise_var=noise_var,
        )
        for metric, count in METRICS.items()
    }


def report(exp: Experiment) -> dict[str, Any]:
    """The status of an experiment as one JSON-ready object (what `ab status --json` prints)."""
    sums = totals(exp)
    comparisons = summarize(exp)
    arms = []
    for i, arm in enumerate(exp.spec.arms):
        row: dict[str, Any] = {
            "arm": arm.name,
            "version": arm.version,
            "weight": arm.weight,
            "counts": {k: round(v, 3) for k, v in sums[i].items()},
        }
        for metric, comparison in comparisons.items():
            rate = comparison.arms[i]
            row[metric] = {
                "rate": rate.rate,
                "ci95": [rate.low, rate.high],
                "z_vs_control": rate.vs_control.z if rate.vs_control else None,
                "p_vs_control": rate.vs_control.p_value if rate.vs_control else None,
            }
        arms.append(row)
    return {
        "experiment_id": exp.experiment_id,
        "status": exp.status,
        "created_at": exp.created_at,
        "stopped_at": exp.stopped_at,
        "promoted_version": exp.promoted_version,
        "window_s": exp.spec.window_s,
        "epsilon_per_report": exp.spec.epsilon,
        "report_seq": exp.spec.report_seq,
        "metric": exp.metric,
        "alpha": exp.alpha,
        "test": "two-sided two-proportion z-test (pooled), Bonferroni over arms; Wilson 95% CI",
        "unit": "shopper (each counted once per count)",
        "sites": [
            {
                "site": r.site,
                "report_seq": r.report_seq,
                "epsilon": r.epsilon,
                "active": r.active,
                "missing_models": r.missing,
            }
            for r in exp.reports
        ],
        "arms": arms,
        "winner": {
            metric: {
                "arm": exp.spec.arms[c.best].name,
                "version": exp.spec.arms[c.best].version,
                "significant": c.significant,
                "p_values_vs_best": {
                    exp.spec.arms[i].name: p for i, p in c.p_values_vs_best.items()
                },
            }
            for metric, c in comparisons.items()
        },
    }


def _fmt_p(p_values: dict[int, float]) -> str:
    return ", ".join(f"{p:.3g}" for p in p_values.values()) or "none"
