"""The versioned schema of a site's ``site.db`` (sqlite-utils migration set ``fedrec-edge``).

Every schema change is a new function appended here; applied ones are recorded in
``_sqlite_migrations`` and never run twice. Other modules keep their own tables in the same
file under their own sets (e.g. ``fedrec-privacy``), which these migrations never touch.

The schema can be inspected or applied with sqlite-utils' own CLI as well:
``sqlite-utils migrate site.db edge_client/migrations.py --list``.
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

migrations = Migrations("fedrec-edge")


@migrations()
def m001_events(db: Database) -> None:
    """Events (idempotent by event_id), the shopper-history index and popularity counts."""
    # seq is the rowid: the arrival order, which breaks ties of equal timestamps exactly as
    # `shared.events.sort_events` does (stable, input order).
    db.execute(
        """
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY,
            event_id TEXT NOT NULL UNIQUE,
            user_id TEXT NOT NULL,
            item_id TEXT NOT NULL,
            event_type TEXT NOT NULL
                CHECK (event_type IN ('view', 'cart', 'fav', 'purchase', 'rating')),
            ts_ms INTEGER NOT NULL CHECK (ts_ms >= 0),
            value REAL,
            site TEXT NOT NULL DEFAULT '',
            received_ms INTEGER NOT NULL
        ) STRICT
        """
    )
    # "The last L events of a shopper": equal timestamps are ordered by rowid (= seq), which
    # every index carries as its last column.
    db.execute("CREATE INDEX events_user_time ON events (user_id, ts_ms)")
    # Already-purchased items are excluded from every answer; this keeps that lookup tiny.
    db.execute(
        "CREATE INDEX events_user_purchases ON events (user_id, item_id) "
        "WHERE event_type = 'purchase'"
    )
    # Popularity (cold start) is maintained set-wise on every write and delete, so a
    # recommendation never scans the event log.
    db.execute(
        """
        CREATE TABLE item_counts (
            item_id TEXT PRIMARY KEY,
            n INTEGER NOT NULL
        ) STRICT, WITHOUT ROWID
        """
    )
    db.execute("CREATE INDEX item_counts_rank ON item_counts (n DESC, item_id)")


@migrations()
def m002_item_day_counts(db: Database) -> None:
    """Events per item and UTC day: the recent popularity new shoppers get.

    Kept set-wise in the same transaction as every write and delete, like ``item_counts``;
    filled here from the events already stored.
    """
    db.execute(
        """
        CREATE TABLE item_day_counts (
            day INTEGER NOT NULL,
            item_id TEXT NOT NULL,
            n INTEGER NOT NULL,
            PRIMARY KEY (day, item_id)
        ) STRICT, WITHOUT ROWID
        """
    )
    db.execute(
        "INSERT INTO item_day_counts (day, item_id, n) "
        "SELECT ts_ms / 86400000, item_id, COUNT(*) FROM events GROUP BY 1, 2"
    )
