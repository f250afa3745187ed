"""The coordinator's registry: runs, rounds, per-site results, model versions and sites.

One SQLite file (WAL, so `fedrec coordinator status` reads while a run writes) with its own
schema migrations. What it holds is what the coordinator legitimately sees: aggregate
metrics, counts, privacy spent, hashes, never anything about an individual shopper.

Tables:

- ``runs``: one row per ServerApp run (Flower run id, mode, strategy, config, outcome).
- ``rounds``: one row per federated round: status (``running``, ``completed``,
  ``missed-quorum``, ``failed``), sites asked/answered/accepted/rejected/refused/failed,
  seconds, bytes down/up, aggregated train and evaluation metrics, the model version made.
- ``site_results``: one row per site and phase of a round (outcome, reason, examples, loss,
  epsilon, evaluation metrics).
- ``models``: model versions with round, parent, sha256 of the weights, metrics, max/mean
  epsilon across sites, privacy mode, published flag.
- ``publications``: the publish/rollback log.
- ``sites``: each site's last contact, epsilon spent of its budget, serving version.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

from coordinator.errors import RegistryError

migrations = Migrations("fedrec-coordinator")


@migrations(transactional=False)
def m001_wal(db: sqlite_utils.Database) -> None:
    """Readers (the admin CLI) never block the writer (the ServerApp)."""
    db.enable_wal()


@migrations()
def m002_tables(db: sqlite_utils.Database) -> None:
    """The initial schema."""
    db.table("runs").create(
        {
            "id": int,
            "flwr_run_id": str,
            "started_at": str,
            "finished_at": str,
            "status": str,
            "mode": str,
            "privacy_mode": str,
            "strategy": str,
            "secagg": int,
            "config": str,
            "detail": str,
        },
        pk="id",
    )
    db.table("rounds").create(
        {
            "id": int,
            "run_id": int,
            "number": int,
            "started_at": str,
            "finished_at": str,
            "seconds": float,
            "status": str,
            "sites_asked": int,
            "sites_answered": int,
            "sites_accepted": int,
            "sites_rejected": int,
            "sites_refused": int,
            "sites_failed": int,
            "bytes_down": int,
            "bytes_up": int,
            "train_metrics": str,
            "eval_metrics": str,
            "model_version": str,
            "epsilon_max": float,
            "epsilon_mean": float,
            "detail": str,
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
    )
    db.table("rounds").create_index(["number"], unique=True)
    db.table("site_results").create(
        {
            "id": int,
            "round_id": int,
            "phase": str,
            "site": str,
            "node_id": str,  # Flower node ids are unsigned 64-bit: TEXT, not INTEGER
            "outcome": str,
            "reason": str,
            "num_examples": int,
            "loss": float,
            "epsilon": float,
            "delta": float,
            "metrics": str,
        },
        pk="id",
        foreign_keys=[("round_id", "rounds", "id")],
    )
    db.table("site_results").create_index(["round_id"])
    db.table("models").create(
        {
            "version": str,
            "created_at": str,
            "run_id": int,
            "round": int,
            "parent": str,
            "sha256": str,
            "path": str,
            "kind": str,
            "n_items": int,
            "metrics": str,
            "privacy_mode": str,
            "accountant": str,
            "epsilon_max": float,
            "epsilon_mean": float,
            "delta": float,
            "published": int,
            "published_at": str,
        },
        pk="version",
    )
    db.table("publications").create(
        {"id": int, "at": str, "action": str, "version": str, "previous": str, "note": str},
        pk="id",
    )
    db.table("sites").create(
        {
            "name": str,
            "node_id": str,
            "first_seen": str,
            "last_contact": str,
            "epsilon_spent": float,
            "epsilon_budget": float,
            "delta": float,
            "rounds_trained": int,
            "last_round": int,
            "new_events": int,
            "serving_version": str,
            "last_outcome": str,
        },
        pk="name",
    )


@migrations()
def m003_app_privacy(db: sqlite_utils.Database) -> None:
    """App mode: Flower's accountant state, so client-level epsilon composes across runs."""
    db.table("app_privacy").create(
        {
            "id": int,
            "config": str,
            "state": str,
            "epsilon": float,
            "delta": float,
            "releases": int,
            "closed": int,
            "updated_at": str,
        },
        pk="id",
    )


def now_iso() -> str:
    """UTC time, seconds precision, ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class SiteResult:
    """One site's answer in one phase of a round."""

    site: str
    node_id: int
    phase: str  # "train" | "evaluate"
    outcome: str  # "accepted" | "rejected" | "refused" | "failed" | "evaluated"
    reason: str = ""
    num_examples: int = 0
    loss: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    epsilon_budget: float | None = None
    new_events: int | None = None
    serving_version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundSummary:
    """What a finished round records."""

    status: str  # "completed" | "missed-quorum" | "failed"
    sites_asked: int
    sites_answered: int
    sites_accepted: int
    sites_rejected: int
    sites_refused: int
    sites_failed: int
    bytes_down: int
    bytes_up: int
    seconds: float
    train_metrics: dict[str, float] = field(default_factory=dict)
    model_version: str | None = None
    epsilon_max: float | None = None
    epsilon_mean: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class ModelVersion:
    """A model the federation produced (or that seeded it)."""

    version: str
    round: int | None
    parent: str | None
    sha256: str
    path: str
    kind: str
    n_items: int
    run_id: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    privacy_mode: str = "none"
    accountant: str | None = None
    epsilon_max: float | None = None
    epsilon_mean: float | None = None
    delta: float | None = None
    published: bool = False
    published_at: str | None = None
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


class Registry:
    """The coordinator's SQLite registry (`create=False` refuses to make a new file)."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = path
        if not create and not path.exists():
            raise RegistryError(
                f"no coordinator registry at {path}: no federated run has been recorded "
                "there yet (run `fedrec coordinator run` or pass --state-dir)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite_utils.Database(path)
            migrations.apply(self.db)
        except Exception as err:  # sqlite3 raises several unrelated types on corrupt files
            raise RegistryError(f"cannot open the registry {path}: {err}") from err

    def close(self) -> None:
        """Close the database connection."""
        self.db.close()

    @contextmanager
    def _atomic(self) -> Iterator[None]:
        with self.db.atomic():
            yield

    # ------------------------------------------------------------------ runs
    def start_run(
        self,
        flwr_run_id: int,
        config: dict[str, Any],
        *,
        mode: str,
        privacy_mode: str,
        strategy: str,
        secagg: bool,
    ) -> int:
        """Record that a ServerApp run started; returns the registry's run id."""
        table = self.db.table("runs")
        with self._atomic():
            table.insert(
                {
                    "flwr_run_id": str(flwr_run_id),
                    "started_at": now_iso(),
                    "status": "running",
                    "mode": mode,
                    "privacy_mode": privacy_mode,
                    "strategy": strategy,
                    "secagg": int(secagg),
                    "config": json.dumps(config, sort_keys=True),
                    "detail": "",
                }
            )
        return int(table.last_pk or 0)

    def finish_run(self, run_id: int, status: str, detail: str = "") -> None:
        """Record a run's end (``completed``, ``failed``, ``stopped``)."""
        with self._atomic():
            self.db.table("runs").update(
                run_id, {"finished_at": now_iso(), "status": status, "detail": detail}
            )

    def runs(self) -> list[dict[str, Any]]:
        """Every run, newest first."""
        rows = self.db.query("select * from runs order by id desc")
        return [_decode(r, ("config",)) for r in rows]

    # ------------------------------------------------------------------ rounds
    def next_round_number(self) -> int:
        """Round numbers continue across runs, so site ledgers and lineage never repeat."""
        row = next(self.db.query("select coalesce(max(number), 0) as n from rounds"))
        return int(row["n"]) + 1

    def start_round(self, run_id: int, number: int, sites_asked: int, bytes_down: int) -> int:
        """Record that a round's training messages went out; returns the round's row id."""
        table = self.db.table("rounds")
        with self._atomic():
            table.insert(
                {
                    "run_id": run_id,
                    "number": number,
                    "started_at": now_iso(),
                    "status": "running",
                    "sites_asked": sites_asked,
                    "bytes_down": bytes_down,
                    "bytes_up": 0,
                    "train_metrics": "{}",
                    "eval_metrics": "{}",
                    "detail": "",
                }
            )
        return int(table.last_pk or 0)

    def finish_round(self, round_id: int, summary: RoundSummary) -> None:
        """Record a round's outcome and aggregated training metrics."""
        values = asdict(summary)
        values["train_metrics"] = json.dumps(summary.train_metrics, sort_keys=True)
        values["finished_at"] = now_iso()
        with self._atomic():
            self.db.table("rounds").update(round_id, values)

    def add_round_bytes(self, round_id: int, down: int, up: int) -> None:
        """Add the evaluation phase's traffic to a round."""
        with self._atomic():
            self.db.execute(
                "update rounds set bytes_down = bytes_down + ?, bytes_up = bytes_up + ? "
                "where id = ?",
                [down, up, round_id],
            )

    def set_round_eval_metrics(self, round_id: int, metrics: dict[str, float]) -> None:
        """Record a round's aggregated federated-evaluation metrics."""
        with self._atomic():
            self.db.table("rounds").update(
                round_id, {"eval_metrics": json.dumps(metrics, sort_keys=True)}
            )

    def rounds(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Rounds, newest first."""
        sql = "select * from rounds order by number desc"
        if limit is not None:
            sql += f" limit {int(limit)}"
        return [_decode(r, ("train_metrics", "eval_metrics")) for r in self.db.query(sql)]

    def round_row(self, round_id: int) -> dict[str, Any]:
        """One round by its row id (as stored; JSON columns decoded)."""
        return _decode(
            dict(self.db.table("rounds").get(round_id)), ("train_metrics", "eval_metrics")
        )

    def set_round_seconds(self, round_id: int, seconds: float) -> None:
        """Correct a round's duration (it ends after its evaluation phase)."""
        with self._atomic():
            self.db.table("rounds").update(round_id, {"seconds": seconds})

    def round_by_number(self, number: int) -> dict[str, Any]:
        """One round by its number; raises `RegistryError` when unknown."""
        rows = list(self.db.query("select * from rounds where number = ?", [number]))
        if not rows:
            raise RegistryError(f"no round {number} in the registry")
        return _decode(rows[0], ("train_metrics", "eval_metrics"))

    def record_site_result(self, round_id: int, result: SiteResult) -> None:
        """Record one site's answer and refresh what the registry knows about the site."""
        now = now_iso()
        with self._atomic():
            self.db.table("site_results").insert(
                {
                    "round_id": round_id,
                    "phase": result.phase,
                    "site": result.site,
                    "node_id": str(result.node_id),
                    "outcome": result.outcome,
                    "reason": result.reason,
                    "num_examples": result.num_examples,
                    "loss": result.loss,
                    "epsilon": result.epsilon,
                    "delta": result.delta,
                    "metrics": json.dumps(result.metrics, sort_keys=True),
                }
            )
            self._touch_site(result, now, round_id)

    def site_results(self, round_number: int) -> list[dict[str, Any]]:
        """Every site's answers in one round."""
        rows = self.db.query(
            "select s.* from site_results s join rounds r on r.id = s.round_id "
            "where r.number = ? order by s.id",
            [round_number],
        )
        return [_decode(r, ("metrics",)) for r in rows]

    # ------------------------------------------------------------------ sites
    def _touch_site(self, result: SiteResult, now: str, round_id: int) -> None:
        table = self.db.table("sites")
        existing = list(self.db.query("select * from sites where name = ?", [result.site]))
        row: dict[str, Any] = (
            dict(existing[0])
            if existing
            else {
                "name": result.site,
                "first_seen": now,
                "rounds_trained": 0,
            }
        )
        row["node_id"] = str(result.node_id)
        row["last_contact"] = now
        row["last_outcome"] = f"{result.phase}:{result.outcome}"
        if result.epsilon is not None:
            row["epsilon_spent"] = result.epsilon
        if result.epsilon_budget is not None:
            row["epsilon_budget"] = result.epsilon_budget
        if result.delta is not None:
            row["delta"] = result.delta
        if result.new_events is not None:
            row["new_events"] = result.new_events
        if result.serving_version:
            row["serving_version"] = result.serving_version
        if result.phase == "train" and result.outcome == "accepted":
            row["rounds_trained"] = int(row.get("rounds_trained") or 0) + 1
            number = next(self.db.query("select number from rounds where id = ?", [round_id]))
            row["last_round"] = int(number["number"])
        table.upsert(row, pk="name")

    def touch_site_counts(
        self,
        site: str,
        node_id: int,
        new_events: int,
        epsilon: float | None,
        epsilon_budget: float | None,
    ) -> None:
        """Record a cheap event-count report (continuous mode) as a contact."""
        now = now_iso()
        with self._atomic():
            existing = list(self.db.query("select * from sites where name = ?", [site]))
            row: dict[str, Any] = (
                dict(existing[0])
                if existing
                else {
                    "name": site,
                    "first_seen": now,
                    "rounds_trained": 0,
                }
            )
            row.update(
                {
                    "node_id": str(node_id),
                    "last_contact": now,
                    "new_events": new_events,
                    "last_outcome": "query:reported",
                }
            )
            if epsilon is not None:
                row["epsilon_spent"] = epsilon
            if epsilon_budget is not None:
                row["epsilon_budget"] = epsilon_budget
            self.db.table("sites").upsert(row, pk="name")

    def site_name_for_node(self, node_id: int) -> str:
        """The name a node last reported, or ``node-<id>`` for a node never heard from."""
        rows = list(
            self.db.query(
                "select name from sites where node_id = ? order by last_contact desc limit 1",
                [str(node_id)],
            )
        )
        return str(rows[0]["name"]) if rows else f"node-{node_id}"

    def sites(self) -> list[dict[str, Any]]:
        """Every site seen, by name."""
        return [dict(r) for r in self.db.query("select * from sites order by name")]

    def site_epsilons(self) -> list[float]:
        """Latest epsilon of every site that ever contributed an accepted update."""
        rows = self.db.query(
            "select epsilon_spent from sites where rounds_trained > 0 and epsilon_spent is not null"
        )
        return [float(r["epsilon_spent"]) for r in rows]

    def site_deltas(self) -> list[float]:
        """The delta of every site that ever contributed an accepted update."""
        rows = self.db.query(
            "select delta from sites where rounds_trained > 0 and delta is not null"
        )
        return [float(r["delta"]) for r in rows]

    # ------------------------------------------------------------------ models
    def add_model(self, model: ModelVersion) -> None:
        """Record a new model version (unpublished unless ``model.published``)."""
        row = model.to_dict()
        row["metrics"] = json.dumps(model.metrics, sort_keys=True)
        row["published"] = 0
        row["published_at"] = None
        row["created_at"] = model.created_at or now_iso()
        with self._atomic():
            if list(self.db.query("select 1 from models where version = ?", [model.version])):
                raise RegistryError(f"model version {model.version} is already registered")
            self.db.table("models").insert(row)
        if model.published:
            self.publish(model.version, note="published on creation")

    def set_model_metrics(self, version: str, metrics: dict[str, float]) -> None:
        """Merge evaluation metrics into a version's record."""
        current = self.model(version)
        merged = {**current.metrics, **metrics}
        with self._atomic():
            self.db.table("models").update(version, {"metrics": json.dumps(merged, sort_keys=True)})

    def model(self, version: str) -> ModelVersion:
        """One version; raises `RegistryError` when unknown."""
        rows = list(self.db.query("select * from models where version = ?", [version]))
        if not rows:
            known = [m.version for m in self.models()[:5]]
            raise RegistryError(
                f"unknown model version {version!r}"
                + (f"; latest: {', '.join(known)}" if known else "; the registry has none")
            )
        return _model_from_row(rows[0])

    def models(self) -> list[ModelVersion]:
        """Every version, newest first."""
        rows = self.db.query("select * from models order by created_at desc, rowid desc")
        return [_model_from_row(r) for r in rows]

    def head(self) -> ModelVersion | None:
        """The newest version (training continues from it), or None."""
        rows = list(self.db.query("select * from models order by rowid desc limit 1"))
        return _model_from_row(rows[0]) if rows else None

    def published(self) -> ModelVersion | None:
        """The version sites must serve, or None when nothing was published."""
        rows = list(self.db.query("select * from models where published = 1"))
        return _model_from_row(rows[0]) if rows else None

    def publish(self, version: str, *, action: str = "publish", note: str = "") -> ModelVersion:
        """Make ``version`` the one every site serves (from the next message it receives)."""
        target = self.model(version)
        previous = self.published()
        now = now_iso()
        with self._atomic():
            self.db.execute("update models set published = 0 where published = 1")
            self.db.table("models").update(version, {"published": 1, "published_at": now})
            self.db.table("publications").insert(
                {
                    "at": now,
                    "action": action,
                    "version": version,
                    "previous": previous.version if previous else None,
                    "note": note,
                }
            )
        return self.model(target.version)

    def rollback(self, version: str | None = None) -> ModelVersion:
        """Publish ``version``, or the version published before the current one."""
        if version is None:
            current = self.published()
            if current is None:
                raise RegistryError("nothing is published: there is nothing to roll back")
            rows = list(
                self.db.query(
                    "select previous from publications where version = ? "
                    "and previous is not null and previous != ? order by id desc limit 1",
                    [current.version, current.version],
                )
            )
            if not rows:
                raise RegistryError(
                    f"{current.version} has no earlier published version to roll back to; "
                    "name one: `fedrec coordinator models rollback VERSION`"
                )
            version = str(rows[0]["previous"])
        return self.publish(version, action="rollback")

    # ------------------------------------------------------------------ app-mode accountant
    def app_accountant_state(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """The open accountant state recorded for exactly this accounting ``config``.

        An open segment with another configuration (population or delta changed) is
        closed: its epsilon stays in `app_privacy_spent` (basic composition).
        """
        key = json.dumps(config, sort_keys=True)
        with self._atomic():
            rows = list(self.db.query("select * from app_privacy where closed = 0"))
            state = None
            for row in rows:
                if row["config"] == key:
                    state = json.loads(row["state"])
                else:
                    self.db.table("app_privacy").update(row["id"], {"closed": 1})
        return state

    def save_app_accountant(
        self,
        config: dict[str, Any],
        state: dict[str, Any],
        epsilon: float,
        delta: float,
        releases: int,
    ) -> None:
        """Store the accountant after a release (one open segment per configuration)."""
        key = json.dumps(config, sort_keys=True)
        values = {
            "config": key,
            "state": json.dumps(state, sort_keys=True),
            "epsilon": epsilon,
            "delta": delta,
            "releases": releases,
            "closed": 0,
            "updated_at": now_iso(),
        }
        with self._atomic():
            rows = list(
                self.db.query("select id from app_privacy where closed = 0 and config = ?", [key])
            )
            if rows:
                self.db.table("app_privacy").update(rows[0]["id"], values)
            else:
                self.db.table("app_privacy").insert(values)

    def app_privacy_spent(self) -> tuple[float, float, int]:
        """App-mode (epsilon, delta, releases) summed over every accountant segment.

        Sequential composition of separately accounted segments is an upper bound.
        """
        row = next(
            self.db.query(
                "select coalesce(sum(epsilon), 0) as e, coalesce(sum(delta), 0) as d, "
                "coalesce(sum(releases), 0) as r from app_privacy"
            )
        )
        return float(row["e"]), float(row["d"]), int(row["r"])

    def publications(self) -> list[dict[str, Any]]:
        """The publish/rollback log, newest first."""
        return [dict(r) for r in self.db.query("select * from publications order by id desc")]


def _decode(row: dict[str, Any], json_columns: tuple[str, ...]) -> dict[str, Any]:
    out = dict(row)
    for col in json_columns:
        if out.get(col):
            out[col] = json.loads(out[col])
    return out


def _model_from_row(row: dict[str, Any]) -> ModelVersion:
    return ModelVersion(
        version=row["version"],
        round=row["round"],
        parent=row["parent"],
        sha256=row["sha256"],
        path=row["path"],
        kind=row["kind"],
        n_items=int(row["n_items"]),
        run_id=row["run_id"],
        metrics=json.loads(row["metrics"] or "{}"),
        privacy_mode=row["privacy_mode"],
        accountant=row["accountant"],
        epsilon_max=row["epsilon_max"],
        epsilon_mean=row["epsilon_mean"],
        delta=row["delta"],
        published=bool(row["published"]),
        published_at=row["published_at"],
        created_at=row["created_at"],
    )
