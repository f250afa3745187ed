"""A site's side of A/B testing: the experiments it received, and what it releases about them.

Tables (``site.db``, migration set ``fedrec-ab``): ``ab_experiments`` (the definitions the
coordinator sent, `shared.ab.ExperimentSpec`) and ``ab_releases`` (every report the site sent:
report number, epsilon, the released counts). The ClientApp's ``ab_sync`` handler calls
`sync_site`; the ``ab_models`` handler calls `store_arm_models`; the edge service reads the
running experiment through `ABSite.running`.

What leaves the site about an experiment is one **release** per report number: per arm, the
shoppers exposed, clicked, carted and converted (`edge_client.outcomes.arm_counts`). Each
shopper is in exactly one arm and adds at most 1 to each of the 4 counts, so one shopper
changes a release by at most 4 in L1 norm. With the experiment's ``epsilon`` > 0 every count
gets discrete Laplace noise of scale 4 / epsilon (two-sided geometric, P(k) proportional to
exp(-epsilon |k| / 4)): each release is epsilon-DP for one shopper (pure DP, delta = 0), and
releases compose by addition (basic composition). The site's A/B budget
(``ab-epsilon-budget`` in its node config, default 5) caps that sum: past it the site sends
its last release again (which costs nothing) instead of a new one. A report number the site
already answered is answered with the same release, so repeated queries cost nothing either.
With ``epsilon`` = 0 the counts are exact (and include impressions); a site whose node config
says ``ab-exact-counts=false`` refuses such experiments.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from edge_client import outcomes
from edge_client.errors import EdgeError, StoreError
from edge_client.store import write_transaction
from shared.ab import COUNTS, ExperimentSpec, experiment_key, report_key

log = logging.getLogger(__name__)

migrations = Migrations("fedrec-ab")

SENSITIVITY = len(COUNTS)  # L1 change of a release when one shopper is added or removed
DEFAULT_AB_EPSILON_BUDGET = 5.0


class ABSiteError(EdgeError):
    """An A/B message or the site's A/B state cannot be used."""


@migrations()
def m001_experiments(db: Database) -> None:
    """The experiments received and the reports released."""
    db.execute(
        """
        CREATE TABLE ab_experiments (
            experiment_id TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('running', 'stopped')),
            received_ms INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL
        ) STRICT
        """
    )
    db.execute(
        """
        CREATE TABLE ab_releases (
            id INTEGER PRIMARY KEY,
            experiment_id TEXT NOT NULL,
            report_seq INTEGER NOT NULL,
            released_ms INTEGER NOT NULL,
            epsilon REAL NOT NULL CHECK (epsilon >= 0),
            counts TEXT NOT NULL
        ) STRICT
        """
    )
    db.execute("CREATE INDEX ab_releases_experiment ON ab_releases (experiment_id, report_seq)")


@dataclass(frozen=True)
class ABSiteConfig:
    """The site's own A/B privacy settings (its node config, never the coordinator's)."""

    epsilon_budget: float = DEFAULT_AB_EPSILON_BUDGET  # sum of epsilon over noisy releases
    allow_exact: bool = True  # release exact counts when an experiment asks for them

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> ABSiteConfig:
        """``ab-epsilon-budget`` (> 0) and ``ab-exact-counts`` (bool) of a node config."""
        budget = node_config.get("ab-epsilon-budget", DEFAULT_AB_EPSILON_BUDGET)
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget > 0:
            raise ABSiteError(f"ab-epsilon-budget must be a number > 0, got {budget!r}")
        exact = node_config.get("ab-exact-counts", True)
        if not isinstance(exact, bool):
            raise ABSiteError(f"ab-exact-counts must be true or false, got {exact!r}")
        return cls(float(budget), exact)


@dataclass(frozen=True)
class Release:
    """One report about one experiment, as sent (counts per arm; impressions when exact)."""

    experiment_id: str
    report_seq: int
    epsilon: float
    counts: list[dict[str, float]]
    fresh: bool = True  # False: an earlier release sent again
    note: str = ""


@dataclass
class SyncResult:
    """What the site replies to ``ab_sync``: numbers and the versions it lacks."""

    metrics: dict[str, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def discrete_laplace(epsilon: float, sensitivity: float, size: int) -> np.ndarray:
    """Two-sided geometric noise: P(k) proportional to exp(-epsilon |k| / sensitivity).

    Integer noise on integer counts avoids the floating-point attacks on the continuous
    Laplace mechanism (Mironov 2012); the generator is seeded from the OS's secure source.
    """
    rng = np.random.default_rng(secrets.randbits(128))
    p = -math.expm1(-epsilon / sensitivity)  # 1 - exp(-epsilon / sensitivity)
    return (rng.geometric(p, size) - rng.geometric(p, size)).astype(np.int64)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class ABSite:
    """The experiments and releases of one site (its own connection to ``site.db``)."""

    def __init__(self, db_path: Path) -> None:
        self.path = Path(db_path)
        self._conn = outcomes.open_site_db(self.path, [outcomes.migrations, migrations])

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> ABSite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ experiments
    def upsert(self, specs: Sequence[ExperimentSpec], *, stop_others: bool = True) -> None:
        """Store received definitions; experiments the coordinator no longer sends stop."""
        now = _now_ms()
        with write_transaction(self._conn, "storing experiments") as conn:
            for spec in specs:
                text = json.dumps(spec.to_dict(), sort_keys=True)
                row = conn.execute(
                    "SELECT spec FROM ab_experiments WHERE experiment_id = ?",
                    (spec.experiment_id,),
                ).fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO ab_experiments VALUES (?, ?, ?, ?, ?)",
                        (spec.experiment_id, text, spec.status, now, now),
                    )
                elif row[0] != text:
                    conn.execute(
                        "UPDATE ab_experiments SET spec = ?, status = ?, updated_ms = ? "
                        "WHERE experiment_id = ?",
                        (text, spec.status, now, spec.experiment_id),
                    )
            if stop_others:
                sent = [s.experiment_id for s in specs]
                marks = ",".join("?" * len(sent)) or "''"
                conn.execute(
                    "UPDATE ab_experiments SET status = 'stopped', updated_ms = ? "
                    f"WHERE status = 'running' AND experiment_id NOT IN ({marks})",
                    (now, *sent),
                )

    def touch(self) -> None:
        """Mark the running experiments changed (their arm models arrived): the service reloads."""
        with write_transaction(self._conn, "touching experiments") as conn:
            conn.execute(
                "UPDATE ab_experiments SET updated_ms = MAX(updated_ms + 1, ?) "
                "WHERE status = 'running'",
                (_now_ms(),),
            )

    def experiments(self) -> list[ExperimentSpec]:
        """Every experiment received, oldest first (with its current status)."""
        rows = self._read("SELECT spec, status FROM ab_experiments ORDER BY received_ms, rowid")
        out = []
        for text, status in rows:
            spec = ExperimentSpec.from_dict(json.loads(text))
            out.append(_with_status(spec, status))
        return out

    def running(self) -> ExperimentSpec | None:
        """The experiment the site serves: the newest one received that is running."""
        running = [s for s in self.experiments() if s.status == "running"]
        return running[-1] if running else None

    def stamp(self) -> tuple[int, int]:
        """Changes whenever an experiment is added or changed (cheap poll for the service)."""
        n, updated = self._read(
            "SELECT COUNT(*), COALESCE(MAX(updated_ms), 0) FROM ab_experiments"
        )[0]
        return int(n), int(updated)

    def pinned_versions(self) -> set[str]:
        """Model versions of running experiments' arms (never pruned from ``models/``)."""
        return {a.version for s in self.experiments() if s.status == "running" for a in s.arms}

    # ------------------------------------------------------------------ releases
    def epsilon_spent(self) -> float:
        """Sum of epsilon over every noisy release of this site (basic composition)."""
        return float(self._read("SELECT COALESCE(SUM(epsilon), 0.0) FROM ab_releases")[0][0])

    def releases(self, experiment_id: str) -> list[Release]:
        """Every release about one experiment, oldest first."""
        rows = self._read(
            "SELECT report_seq, epsilon, counts FROM ab_releases WHERE experiment_id = ? "
            "ORDER BY id",
            (experiment_id,),
        )
        return [Release(experiment_id, int(s), float(e), json.loads(c)) for s, e, c in rows]

    def release(self, spec: ExperimentSpec, config: ABSiteConfig) -> Release | None:
        """The release answering ``spec.report_seq``: an earlier one, a new one, or None.

        None means the site releases nothing (exact counts refused, or no budget for a first
        noisy release); ``Release.note`` says why an earlier release was sent again.
        """
        earlier = self.releases(spec.experiment_id)
        last = earlier[-1] if earlier else None
        if last is not None and last.report_seq >= spec.report_seq:
            return _again(last, "")
        if spec.epsilon == 0 and not config.allow_exact:
            return None
        if spec.epsilon > 0 and self.epsilon_spent() + spec.epsilon > config.epsilon_budget + 1e-12:
            return _again(last, "A/B privacy budget exhausted") if last else None
        exact = outcomes.arm_counts(self._conn, spec.experiment_id, spec.window_ms, len(spec.arms))
        if spec.epsilon == 0:
            counts = [{k: float(v) for k, v in arm.items()} for arm in exact]
        else:
            noise = discrete_laplace(spec.epsilon, SENSITIVITY, len(exact) * len(COUNTS))
            flat = iter(noise.tolist())
            counts = [{k: float(arm[k] + next(flat)) for k in COUNTS} for arm in exact]
        now = _now_ms()
        try:
            with write_transaction(self._conn, "recording an A/B release") as conn:
                conn.execute(
                    "INSERT INTO ab_releases (experiment_id, report_seq, released_ms, epsilon, "
                    "counts) VALUES (?, ?, ?, ?, ?)",
                    (spec.experiment_id, spec.report_seq, now, spec.epsilon, json.dumps(counts)),
                )
        except StoreError as err:  # unrecorded, the release must not leave the site
            raise ABSiteError(f"cannot record the release of {spec.experiment_id}: {err}") from err
        return Release(spec.experiment_id, spec.report_seq, spec.epsilon, counts)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as err:
            raise StoreError(f"read from {self.path} failed: {err}") from err


def _with_status(spec: ExperimentSpec, status: str) -> ExperimentSpec:
    from dataclasses import replace

    return spec if spec.status == status else replace(spec, status=status)


def _again(release: Release, note: str) -> Release:
    from dataclasses import replace

    return replace(release, fresh=False, note=note)


def sync_site(
    db_path: Path,
    models_present: Mapping[str, bool],
    specs: Sequence[ExperimentSpec],
    config: ABSiteConfig,
) -> SyncResult:
    """Store the coordinator's experiments and release each one's counts (numbers only).

    ``models_present`` says, per arm version, whether a verified model directory is on the
    site; an experiment is served only when every arm's model is.
    """
    result = SyncResult()
    with ABSite(db_path) as ab:
        ab.upsert(specs)
        for e, spec in enumerate(specs):
            missing = [a.version for a in spec.arms if not models_present.get(a.version, False)]
            result.missing.extend(v for v in missing if v not in result.missing)
            running = spec.status == "running"
            result.metrics[experiment_key(e, "missing")] = float(len(missing))
            result.metrics[experiment_key(e, "active")] = float(running and not missing)
            release = ab.release(spec, config)
            if release is None:
                result.metrics[experiment_key(e, "refused")] = 1.0
                continue
            result.metrics[experiment_key(e, "refused")] = 0.0
            result.metrics[experiment_key(e, "seq")] = float(release.report_seq)
            result.metrics[experiment_key(e, "epsilon")] = release.epsilon
            result.metrics[experiment_key(e, "fresh")] = float(release.fresh)
            for a, counts in enumerate(release.counts):
                for name, value in counts.items():
                    result.metrics[report_key(e, a, name)] = float(value)
        result.metrics["ab.epsilon-spent"] = ab.epsilon_spent()
        result.metrics["ab.epsilon-budget"] = config.epsilon_budget
    return result


def pinned_versions(db_path: Path) -> set[str]:
    """Arm versions of the site's running experiments ({} when the site has none)."""
    if not Path(db_path).is_file():
        return set()
    with ABSite(db_path) as ab:
        return ab.pinned_versions()
