"""What the edge recommended, and what came of it: impressions, outcomes, and the indicators.

Every answer of the recommender is an **impression**: who was shown which items, when, by
which model (and, during an A/B test, in which arm). Impressions live in ``site.db`` in the
tables of the migration set ``fedrec-outcomes``, next to the events, and never leave the site.
Outcomes are not written anywhere: they are the shopper's own later events, joined with the
impressions when counted, so an event that arrives by any path (HTTP, bulk import) counts.

- A/B counts per arm (`arm_counts`): shoppers exposed, and shoppers who viewed, saved,
  carted, bought or rated (clicked), carted, or bought (converted) an item recommended to
  them within the experiment's window after it was shown (``shown < event <= shown + W``).
  Each shopper counts at most once in each count: that bounds one shopper's contribution
  for the optional noise (`edge_client.ab_site`) and makes the counts independent trials.
- The design's indicators (`indicators`), over a window W ending now:
  recommendation effect R = sum(r_i [r_i > 0]) / N over the N distinct (shopper, item)
  pairs recommended in the window, r_i the shopper's latest rating of the item after it was
  first recommended (0 when unrated); user interest I_u = sum(r_i [r_i > 0]) / M over the M
  items a shopper rated in the window (latest rating per item), averaged over shoppers.
  The "implicit" variants read the strongest event instead of a rating (view 1, fav 2,
  cart 3, purchase 4) for sites whose shoppers never rate.

Writes are buffered (`ImpressionLog.record` is a list append) and flushed in one
transaction by the service every second, so a recommendation never waits for the disk;
what a crash loses is at most the last unflushed second of impressions, never events.
Forgetting a shopper deletes their impressions too: the table is registered in
``forget_tables``, which `EventStore.forget` reads.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from edge_client.errors import StoreError
from edge_client.store import write_transaction

migrations = Migrations("fedrec-outcomes")

DAY_MS = 86_400_000
CLICK_TYPES = ("view", "cart", "fav", "purchase", "rating")  # any engagement with the item
IMPLICIT_SCALE = {"view": 1.0, "fav": 2.0, "cart": 3.0, "purchase": 4.0}
MAX_BUFFER = 50_000  # impressions kept in memory before a flush is forced on the caller


@migrations()
def m001_impressions(db: Database) -> None:
    """Impressions and their items; forget_tables names per-shopper tables for forget."""
    db.execute(
        """
        CREATE TABLE rec_impressions (
            id INTEGER PRIMARY KEY,
            shown_ms INTEGER NOT NULL,
            user_id TEXT NOT NULL,
            source TEXT NOT NULL,
            model_version TEXT NOT NULL DEFAULT '',
            experiment_id TEXT NOT NULL DEFAULT '',
            arm INTEGER NOT NULL DEFAULT -1
        ) STRICT
        """
    )
    db.execute("CREATE INDEX rec_impressions_time ON rec_impressions (shown_ms)")
    db.execute("CREATE INDEX rec_impressions_user ON rec_impressions (user_id)")
    db.execute(
        "CREATE INDEX rec_impressions_experiment ON rec_impressions (experiment_id, arm) "
        "WHERE experiment_id != ''"
    )
    db.execute(
        """
        CREATE TABLE rec_impression_items (
            impression_id INTEGER NOT NULL REFERENCES rec_impressions (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            item_id TEXT NOT NULL,
            PRIMARY KEY (impression_id, position)
        ) STRICT, WITHOUT ROWID
        """
    )
    db.execute(
        """
        CREATE TABLE IF NOT EXISTS forget_tables (
            table_name TEXT PRIMARY KEY,
            column_name TEXT NOT NULL
        ) STRICT
        """
    )
    db.execute("INSERT OR IGNORE INTO forget_tables VALUES ('rec_impressions', 'user_id')")


def open_site_db(path: Path, sets: Sequence[Migrations]) -> sqlite3.Connection:
    """A connection to ``site.db`` with the event schema and ``sets`` applied.

    The event store's own migrations run first (the outcome queries join its ``events``);
    ours run under ``BEGIN IMMEDIATE`` so that two processes opening a new file do not race.
    """
    from edge_client.store import EventStore

    EventStore(path).close()
    try:
        conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA secure_delete = ON")
        # Impressions and A/B state survive a crash of the process; losing the last commits
        # on power loss costs a few impressions, never an event (the store stays FULL).
        conn.execute("PRAGMA synchronous = NORMAL")
        db = Database(conn, strict=True, execute_plugins=False)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for m in sets:
                m.apply(db)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as err:
        raise StoreError(f"cannot open or migrate {path}: {err}") from err
    return conn


@dataclass(frozen=True, slots=True)
class Impression:
    """One answer shown to one shopper."""

    shown_ms: int
    user_id: str
    items: tuple[str, ...]
    source: str
    model_version: str = ""
    experiment_id: str = ""
    arm: int = -1


def _now_ms() -> int:
    from edge_client.store import now_ms

    return now_ms()


# ?1: JSON array of [shown_ms, user_id, source, model_version, experiment_id, arm, [items]];
# ?2: the largest id stored so far (impression i of the batch gets ?2 + 1 + i).
_INSERT_IMPRESSIONS = """
INSERT INTO rec_impressions
SELECT ?2 + 1 + key, value->>0, value->>1, value->>2, value->>3, value->>4, value->>5
FROM json_each(?1)
"""
_INSERT_IMPRESSION_ITEMS = """
INSERT INTO rec_impression_items
SELECT ?2 + 1 + imp.key, item.key, item.value
FROM json_each(?1) AS imp, json_each(imp.value, '$[6]') AS item
"""


class ImpressionLog:
    """Buffered impressions of one site, written to ``site.db`` by `flush`."""

    def __init__(self, db_path: Path, *, clock: Callable[[], int] | None = None) -> None:
        self.path = Path(db_path)
        self.clock = clock or _now_ms
        self._conn = open_site_db(self.path, [migrations])
        self._buffer: list[Impression] = []
        self._lock = threading.Lock()  # the buffer
        self._db_lock = threading.Lock()  # the connection (flush, queries, prune)

    def record(
        self,
        user_id: str,
        items: Sequence[str],
        *,
        source: str,
        model_version: str = "",
        experiment_id: str = "",
        arm: int = -1,
        shown_ms: int | None = None,
    ) -> None:
        """Remember that ``items`` were shown to ``user_id`` now (written at the next flush)."""
        if not items:
            return
        impression = Impression(
            self.clock() if shown_ms is None else shown_ms,
            user_id,
            tuple(items),
            source,
            model_version,
            experiment_id,
            arm,
        )
        with self._lock:
            self._buffer.append(impression)
            full = len(self._buffer) >= MAX_BUFFER
        if full:
            self.flush()

    @property
    def pending(self) -> int:
        """Impressions recorded but not written yet."""
        return len(self._buffer)

    def flush(self) -> int:
        """Write every buffered impression in one transaction; returns how many."""
        with self._lock:
            batch, self._buffer = self._buffer, []
        if not batch:
            return 0
        try:
            # One JSON document per flush, unpacked by SQLite itself: json.dumps runs in C and
            # sqlite3 releases the GIL while it steps, so a flush of a second's answers does
            # not stall the event loop (binding 11 rows per answer in Python did).
            payload = json.dumps(
                [
                    [
                        imp.shown_ms,
                        imp.user_id,
                        imp.source,
                        imp.model_version,
                        imp.experiment_id,
                        imp.arm,
                        imp.items,
                    ]
                    for imp in batch
                ]
            )
            with self._db_lock, write_transaction(self._conn, "writing impressions") as conn:
                first = conn.execute("SELECT COALESCE(MAX(id), 0) FROM rec_impressions")
                base = int(first.fetchone()[0])
                conn.execute(_INSERT_IMPRESSIONS, (payload, base))
                conn.execute(_INSERT_IMPRESSION_ITEMS, (payload, base))
        except BaseException:
            with self._lock:  # keep them for the next attempt, in order
                self._buffer[:0] = batch
            raise
        return len(batch)

    def prune(self, older_than_ms: int) -> int:
        """Delete impressions shown before ``older_than_ms``; returns how many."""
        with self._db_lock, write_transaction(self._conn, "pruning impressions") as conn:
            return conn.execute(
                "DELETE FROM rec_impressions WHERE shown_ms < ?", (older_than_ms,)
            ).rowcount

    def query(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run a read (`arm_counts`, `indicators`) on this log's connection, after a flush."""
        self.flush()
        with self._db_lock:
            return fn(self._conn)

    def count(self) -> int:
        """Impressions written so far (after flushing the buffer)."""
        self.flush()
        with self._db_lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM rec_impressions").fetchone()[0])

    def close(self) -> None:
        """Flush what is buffered and close the connection."""
        try:
            self.flush()
        finally:
            with self._db_lock:
                self._conn.close()


# ----------------------------------------------------------------------------- A/B counts
_CLICKS = ", ".join(f"'{t}'" for t in CLICK_TYPES)
_ARM_COUNTS = f"""
WITH imp AS (
    SELECT id, user_id, arm, shown_ms FROM rec_impressions WHERE experiment_id = :exp
),
hits AS (
    SELECT imp.user_id AS user_id, imp.arm AS arm, e.event_type AS event_type
    FROM imp
    JOIN rec_impression_items it ON it.impression_id = imp.id
    JOIN events e ON e.user_id = imp.user_id AND e.item_id = it.item_id
        AND e.ts_ms > imp.shown_ms AND e.ts_ms <= imp.shown_ms + :window
    WHERE e.event_type IN ({_CLICKS})
)
SELECT arm, 'exposed', COUNT(DISTINCT user_id) FROM imp GROUP BY arm
UNION ALL SELECT arm, 'impressions', COUNT(*) FROM imp GROUP BY arm
UNION ALL SELECT arm, 'clicked', COUNT(DISTINCT user_id) FROM hits GROUP BY arm
UNION ALL SELECT arm, 'carted', COUNT(DISTINCT user_id) FROM hits
    WHERE event_type = 'cart' GROUP BY arm
UNION ALL SELECT arm, 'converted', COUNT(DISTINCT user_id) FROM hits
    WHERE event_type = 'purchase' GROUP BY arm
"""

ARM_COUNT_NAMES = ("exposed", "clicked", "carted", "converted")


def arm_counts(
    conn: sqlite3.Connection, experiment_id: str, window_ms: int, n_arms: int
) -> list[dict[str, int]]:
    """Per arm: shoppers ``exposed``, ``clicked``, ``carted``, ``converted``; ``impressions``.

    A shopper is counted once per count (their arm is fixed by the experiment); outcomes are
    events strictly after an impression of the item and at most ``window_ms`` after it.
    """
    out = [dict.fromkeys((*ARM_COUNT_NAMES, "impressions"), 0) for _ in range(n_arms)]
    try:
        rows = conn.execute(_ARM_COUNTS, {"exp": experiment_id, "window": window_ms}).fetchall()
    except sqlite3.Error as err:
        raise StoreError(f"cannot count the outcomes of {experiment_id}: {err}") from err
    for arm, name, value in rows:
        if 0 <= int(arm) < n_arms:
            out[int(arm)][str(name)] = int(value)
    return out


# ----------------------------------------------------------------------------- indicators
@dataclass(frozen=True)
class Indicators:
    """The design's indicators over one window (explicit ratings and implicit strength)."""

    window_days: float
    until_ms: int
    recommended_pairs: int  # N: distinct (shopper, item) pairs recommended in the window
    recommendation_effect: float  # R with explicit ratings
    recommendation_effect_implicit: float  # R with the strongest later event (1..4)
    raters: int  # shoppers with at least one rating in the window
    user_interest: float  # mean I_u over those shoppers
    active_shoppers: int  # shoppers with any event in the window
    user_interest_implicit: float  # mean implicit I_u over them

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        from dataclasses import asdict

        return asdict(self)


_IMPLICIT_CASE = (
    "CASE e.event_type WHEN 'purchase' THEN 4.0 WHEN 'cart' THEN 3.0 "
    "WHEN 'fav' THEN 2.0 WHEN 'view' THEN 1.0 ELSE 0.0 END"
)

_EFFECT = f"""
WITH pairs AS (
    SELECT i.user_id AS user_id, it.item_id AS item_id, MIN(i.shown_ms) AS first_ms
    FROM rec_impressions i JOIN rec_impression_items it ON it.impression_id = i.id
    WHERE i.shown_ms >= :since AND i.shown_ms <= :until
      AND (:exp IS NULL OR i.experiment_id = :exp) AND (:arm IS NULL OR i.arm = :arm)
    GROUP BY i.user_id, it.item_id
),
rated AS (
    SELECT
        (SELECT COALESCE(e.value, 0.0) FROM events e
         WHERE e.user_id = p.user_id AND e.item_id = p.item_id AND e.event_type = 'rating'
           AND e.ts_ms > p.first_ms AND e.ts_ms <= :until
         ORDER BY e.ts_ms DESC, e.seq DESC LIMIT 1) AS rating,
        (SELECT MAX({_IMPLICIT_CASE}) FROM events e
         WHERE e.user_id = p.user_id AND e.item_id = p.item_id
           AND e.ts_ms > p.first_ms AND e.ts_ms <= :until) AS strength
    FROM pairs p
)
SELECT COUNT(*),
       COALESCE(SUM(MAX(COALESCE(rating, 0.0), 0.0)), 0.0),
       COALESCE(SUM(COALESCE(strength, 0.0)), 0.0)
FROM rated
"""

_INTEREST = """
WITH latest AS (
    SELECT user_id, COALESCE(value, 0.0) AS value,
           ROW_NUMBER() OVER (PARTITION BY user_id, item_id ORDER BY ts_ms DESC, seq DESC) AS rn
    FROM events
    WHERE event_type = 'rating' AND ts_ms >= :since AND ts_ms <= :until
),
per_user AS (
    SELECT SUM(MAX(value, 0.0)) * 1.0 / COUNT(*) AS iu FROM latest WHERE rn = 1 GROUP BY user_id
)
SELECT COUNT(*), COALESCE(AVG(iu), 0.0) FROM per_user
"""

_INTEREST_IMPLICIT = f"""
WITH strongest AS (
    SELECT e.user_id AS user_id, MAX({_IMPLICIT_CASE}) AS strength
    FROM events e
    WHERE e.event_type != 'rating' AND e.ts_ms >= :since AND e.ts_ms <= :until
    GROUP BY e.user_id, e.item_id
),
per_user AS (
    SELECT SUM(strength) * 1.0 / COUNT(*) AS iu FROM strongest GROUP BY user_id
)
SELECT COUNT(*), COALESCE(AVG(iu), 0.0) FROM per_user
"""


def indicators(
    conn: sqlite3.Connection,
    until_ms: int,
    window_days: float,
    *,
    experiment_id: str | None = None,
    arm: int | None = None,
) -> Indicators:
    """R and mean I_u of the site over ``[until_ms - window, until_ms]`` (see module doc).

    ``experiment_id`` / ``arm`` restrict R to the impressions of one A/B experiment (arm);
    I_u, a property of the shoppers, is not restricted.
    """
    since = until_ms - int(window_days * DAY_MS)
    params = {"since": since, "until": until_ms, "exp": experiment_id, "arm": arm}
    try:
        n, r_sum, r_implicit = conn.execute(_EFFECT, params).fetchone()
        raters, interest = conn.execute(_INTEREST, params).fetchone()
        active, interest_implicit = conn.execute(_INTEREST_IMPLICIT, params).fetchone()
    except sqlite3.Error as err:
        raise StoreError(f"cannot compute the indicators: {err}") from err
    n = int(n)
    return Indicators(
        window_days=float(window_days),
        until_ms=until_ms,
        recommended_pairs=n,
        recommendation_effect=float(r_sum) / n if n else 0.0,
        recommendation_effect_implicit=float(r_implicit) / n if n else 0.0,
        raters=int(raters),
        user_interest=float(interest),
        active_shoppers=int(active),
        user_interest_implicit=float(interest_implicit),
    )


def site_indicators(db_path: Path, window_days: float, until_ms: int | None = None) -> Indicators:
    """`indicators` of a site's ``site.db`` (for `fedrec edge status`)."""
    conn = open_site_db(Path(db_path), [migrations])
    try:
        return indicators(conn, _now_ms() if until_ms is None else until_ms, window_days)
    finally:
        conn.close()
