"""A site's durable event store: SQLite in WAL mode, STRICT tables, idempotent by event id.

One `EventStore` per process is shared by every thread; each thread gets its own SQLite
connection (sqlite3 connections must not be shared between threads). Every write is one
``BEGIN IMMEDIATE`` transaction, so a batch is stored completely or not at all, a retried
batch is a no-op (its event ids are reported as duplicates), and readers in other threads or
processes (the Flower ClientApp, `fedrec edge status`) are never blocked by it.

Popularity, the cold-start answer, is kept in ``item_counts`` (all-time) and
``item_day_counts`` (per UTC day, for recent popularity), both updated set-wise in the same
transaction as each write or delete, so a recommendation never scans the event log.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import math
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from sqlite_utils import Database

from edge_client.errors import EventValidationError, RowProblem, StoreError
from edge_client.migrations import migrations
from shared.events import EVENT_COLUMNS, MAX_FUTURE_SKEW_MS, EventType, check_event_frame

# Ids are opaque ASCII tokens: letters, digits and a few separators. Anything else (spaces,
# quotes, control or bidi characters) is refused at the door instead of being stored.
ID_MAX_LEN = 128
SITE_MAX_LEN = 64
ID_CHARS = "A-Za-z0-9_.:@/+=~-"
ID_PATTERN = f"^[{ID_CHARS}]{{1,{ID_MAX_LEN}}}$"
SITE_PATTERN = f"^[{ID_CHARS}]{{0,{SITE_MAX_LEN}}}$"
_ID_RE = re.compile(ID_PATTERN)
_SITE_RE = re.compile(SITE_PATTERN)
ID_RULE = f"1-{ID_MAX_LEN} characters from A-Z a-z 0-9 and _ . : @ / + = ~ -"
EVENT_TYPES: frozenset[str] = frozenset(t.value for t in EventType)
# Generated ids of bulk-imported rows; client ids may use the prefix too (it is just text).
IMPORT_ID_PREFIX = "imp-"
MAX_PROBLEMS = 100  # rows named in one error; the total is always reported
CACHE_KIB = 32 * 1024  # SQLite page cache per connection
DAY_MS = 86_400_000  # the buckets of ``item_day_counts`` are UTC days
IMPORT_CACHE_KIB = 512 * 1024  # ... while a bulk import runs
MAX_RETENTION_DAYS = 100 * 366  # retention bounds (beyond them SQLite integers overflow)
MAX_USER_CAP = 1_000_000_000

Synchronous = Literal["FULL", "NORMAL"]

_INSERT = (
    "INSERT INTO events (event_id, user_id, item_id, event_type, ts_ms, value, site, "
    "received_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_OR_IGNORE = _INSERT.replace("INSERT INTO", "INSERT OR IGNORE INTO", 1)
# A bulk-import chunk: ?1 is a JSON array of [event_id, user_id, item_id, event_type, ts_ms,
# value as JSON number text or null, site] rows, ?2 the arrival time of them all.
_INSERT_JSON = (
    "INSERT OR IGNORE INTO events (event_id, user_id, item_id, event_type, ts_ms, value, "
    "site, received_ms) "
    "SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, "
    "json_extract(value ->> 5, '$'), value ->> 6, ?2 FROM json_each(?1)"
)
_COUNT_NEW = (
    "INSERT INTO item_counts (item_id, n) "
    "SELECT item_id, COUNT(*) FROM events WHERE seq > ? GROUP BY item_id "
    "ON CONFLICT (item_id) DO UPDATE SET n = n + excluded.n"
)
# The WHERE true resolves SQLite's upsert-after-SELECT parsing ambiguity.
_ADD_COUNTS_JSON = (
    "INSERT INTO item_counts (item_id, n) SELECT value ->> 0, value ->> 1 FROM json_each(?) "
    "WHERE true ON CONFLICT (item_id) DO UPDATE SET n = n + excluded.n"
)
_ADD_DAY_COUNTS_JSON = (
    "INSERT INTO item_day_counts (day, item_id, n) "
    "SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(?) "
    "WHERE true ON CONFLICT (day, item_id) DO UPDATE SET n = n + excluded.n"
)
_DAY_COUNT_NEW = (
    "INSERT INTO item_day_counts (day, item_id, n) "
    f"SELECT ts_ms / {DAY_MS}, item_id, COUNT(*) FROM events WHERE seq > ? GROUP BY 1, 2 "
    "ON CONFLICT (day, item_id) DO UPDATE SET n = n + excluded.n"
)
_ID_CHUNK = 500  # SQLite host parameters per IN (...) lookup


@dataclass(frozen=True, slots=True)
class Event:
    """One behaviour event as stored; ``ts_ms`` is milliseconds since the epoch (UTC)."""

    event_id: str
    user_id: str
    item_id: str
    event_type: str
    ts_ms: int
    value: float | None = None
    site: str = ""


@dataclass(frozen=True)
class IngestResult:
    """What a write did: events newly stored, and events already present (by event id)."""

    accepted: int
    duplicates: int
    duplicate_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetentionResult:
    """Rows deleted by a retention pass, by rule."""

    deleted_by_age: int
    deleted_by_cap: int

    @property
    def deleted(self) -> int:
        """Rows deleted in total."""
        return self.deleted_by_age + self.deleted_by_cap


def now_ms() -> int:
    """Wall-clock time in integer milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def valid_id(value: object) -> bool:
    """Whether ``value`` is an acceptable event, shopper or item id."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def event_problems(event: Event, row: int, now: int) -> list[RowProblem]:
    """Every reason ``event`` (row number ``row`` of a batch) cannot be stored."""
    problems = []
    for name in ("event_id", "user_id", "item_id"):
        if not valid_id(getattr(event, name)):
            problems.append(RowProblem(row, name, f"must be {ID_RULE}"))
    if event.event_type not in EVENT_TYPES:
        problems.append(
            RowProblem(row, "event_type", f"must be one of {', '.join(sorted(EVENT_TYPES))}")
        )
    ts = event.ts_ms
    if not isinstance(ts, int) or isinstance(ts, bool):
        problems.append(RowProblem(row, "ts_ms", "must be an integer"))
    elif ts < 0:
        problems.append(RowProblem(row, "ts_ms", "is before 1970 (negative)"))
    elif ts > now + MAX_FUTURE_SKEW_MS:
        problems.append(RowProblem(row, "ts_ms", "is more than a day in the future"))
    if event.value is not None and not math.isfinite(event.value):
        problems.append(RowProblem(row, "value", "must be a finite number"))
    if not isinstance(event.site, str) or _SITE_RE.fullmatch(event.site) is None:
        problems.append(
            RowProblem(row, "site", f"must be 0-{SITE_MAX_LEN} characters from {ID_CHARS}")
        )
    return problems


def _value_text(frame: pd.DataFrame) -> pd.Series:
    """``repr`` of each value, "" for NaN (the canonical text hashed into an event id)."""
    values = frame["value"].to_numpy(dtype=np.float64)
    text = np.full(len(values), "", dtype=object)
    present = ~np.isnan(values)
    text[present] = [repr(v) for v in values[present].tolist()]
    return pd.Series(text, dtype=object)


def _text_column(frame: pd.DataFrame, name: str) -> np.ndarray:
    """Column ``name`` as an object array of str (without a round trip through Arrow)."""
    values = frame[name].to_numpy(dtype=object)
    if pd.api.types.infer_dtype(values, skipna=False) == "string":
        return values
    return frame[name].astype(str).to_numpy(dtype=object)


def deterministic_event_ids(frame: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """Content-derived event ids for rows that have none, and a write order for them.

    An id is ``imp-<shopper hash>-<row hash>``: the row hash covers every canonical column,
    so importing a file twice stores nothing new, and identical rows are told apart by their
    occurrence number. The shopper prefix makes the ids of one shopper adjacent in the
    unique index; writing rows in the returned order (shopper prefix, shopper, time, input
    order) then appends to both indexes almost sequentially instead of at random places.
    """
    make_ids, order = _deterministic_id_maker(frame)
    return make_ids(np.arange(len(frame))), order


def _deterministic_id_maker(
    frame: pd.DataFrame,
) -> tuple[Callable[[np.ndarray], list[str]], np.ndarray]:
    """`deterministic_event_ids` in two steps: the order now, the ids of given rows later.

    The hashing is the costly part; the bulk import runs it chunk by chunk beside SQLite.
    """
    sep = "\x1f"
    canonical = pd.DataFrame(
        {
            "user_id": pd.Series(_text_column(frame, "user_id"), dtype=object),
            "item_id": pd.Series(_text_column(frame, "item_id"), dtype=object),
            "event_type": pd.Series(_text_column(frame, "event_type"), dtype=object),
            "ts_ms": frame["ts_ms"].to_numpy(dtype=np.int64),
            "value": _value_text(frame),
            "site": pd.Series(_text_column(frame, "site"), dtype=object),
        }
    )
    # The n-th repeat of an identical row (n >= 1) hashes "<row>\x1f<n>".
    occurrence = np.zeros(len(canonical), dtype=np.int64)
    repeated = canonical.duplicated(keep=False).to_numpy()
    if repeated.any():
        subset = canonical[repeated]
        occurrence[repeated] = subset.groupby(list(subset.columns), sort=False).cumcount()
    text = [canonical[c].to_numpy(dtype=object) for c in canonical.columns]
    blake = hashlib.blake2b
    codes, uniques = pd.factorize(text[0])
    prefixes = np.array(
        [f"{IMPORT_ID_PREFIX}{blake(u.encode(), digest_size=6).hexdigest()}-" for u in uniques],
        dtype=object,
    )
    rank = np.empty(len(prefixes), dtype=np.int64)
    rank[np.argsort(prefixes, kind="stable")] = np.arange(len(prefixes))
    order = np.lexsort((canonical["ts_ms"].to_numpy(), rank[codes]))

    def make_ids(rows: np.ndarray) -> list[str]:
        columns = (t[rows].tolist() for t in text)
        keys = [sep.join(map(str, row)) for row in zip(*columns, strict=True)]
        for j in np.flatnonzero(occurrence[rows]).tolist():
            keys[j] += f"{sep}{occurrence[rows[j]]}"
        return [
            p + blake(k.encode(), digest_size=10).hexdigest()
            for p, k in zip(prefixes[codes[rows]].tolist(), keys, strict=True)
        ]

    return make_ids, order


def _insert_chunks(
    conn: sqlite3.Connection,
    pool: concurrent.futures.Executor,
    order: np.ndarray,
    chunk_json: Callable[[np.ndarray], str],
    chunk_size: int,
    progress: Callable[[int], None] | None,
) -> int:
    """Insert the rows ``order`` names, chunk by chunk, in one open write; rows newly stored.

    Each chunk is one JSON array that SQLite unpacks itself (binding eight Python objects per
    row through executemany cost more than the insert, measured). ``pool`` builds the next
    chunks while SQLite, which releases the GIL, writes this one: on two cores the hashing
    and JSON encoding run beside the insert instead of before it.
    """
    received = now_ms()
    changes = conn.total_changes
    starts = range(0, len(order), chunk_size)
    # at most two chunks wait in memory
    ahead = [pool.submit(chunk_json, order[s : s + chunk_size]) for s in starts[:2]]
    for i, start in enumerate(starts):
        chunk = ahead.pop(0).result()
        if i + 2 < len(starts):
            later = starts[i + 2]
            ahead.append(pool.submit(chunk_json, order[later : later + chunk_size]))
        conn.execute(_INSERT_JSON, (chunk, received))
        if progress is not None:
            progress(min(chunk_size, len(order) - start))
    return conn.total_changes - changes


def _new_counts_json(items: np.ndarray, ts_ms: np.ndarray) -> tuple[str, str]:
    """Rows to add to ``item_counts`` and ``item_day_counts`` for these items and times.

    Both come sorted the way SQLite's BINARY collation orders ASCII ids, so the upserts walk
    the primary keys in order.
    """
    codes, uniques = pd.factorize(items, sort=True)
    uniques = np.asarray(uniques, dtype=object)
    per_item = np.bincount(codes, minlength=len(uniques))
    totals = pd.DataFrame({"item_id": uniques, "n": per_item}).to_json(orient="values")
    keys, per_key = np.unique((ts_ms // DAY_MS) * len(uniques) + codes, return_counts=True)
    pairs = pd.DataFrame(
        {"day": keys // len(uniques), "item_id": uniques[keys % len(uniques)], "n": per_key}
    )
    return str(totals), str(pairs.to_json(orient="values"))


def _frame_problems(frame: pd.DataFrame, now: int) -> tuple[list[RowProblem], int]:
    """Row problems of a canonical event frame (vectorised): the first few and the total."""
    bad: list[tuple[np.ndarray, str, str]] = []
    id_columns = ["user_id", "item_id"] + (["event_id"] if "event_id" in frame.columns else [])
    for name in id_columns:
        col = frame[name]
        ok = col.notna().to_numpy() & col.astype(str).str.fullmatch(ID_PATTERN).to_numpy(bool)
        bad.append((~ok, name, f"must be {ID_RULE}"))
    ts = frame["ts_ms"].to_numpy(dtype=np.int64)
    bad.append((ts < 0, "ts_ms", "is before 1970 (negative)"))
    bad.append((ts > now + MAX_FUTURE_SKEW_MS, "ts_ms", "is more than a day in the future"))
    values = frame["value"].to_numpy(dtype=np.float64)
    bad.append((np.isinf(values), "value", "must be a finite number"))
    site = frame["site"]
    site_ok = site.notna().to_numpy() & site.astype(str).str.fullmatch(SITE_PATTERN).to_numpy(bool)
    bad.append((~site_ok, "site", f"must be 0-{SITE_MAX_LEN} characters from {ID_CHARS}"))
    problems: list[RowProblem] = []
    total = 0
    for mask, name, reason in bad:
        rows = np.flatnonzero(mask)
        total += len(rows)
        problems.extend(RowProblem(int(r), name, reason) for r in rows[:MAX_PROBLEMS])
    problems.sort(key=lambda p: p.row)
    return problems[:MAX_PROBLEMS], total


def _forget_elsewhere(conn: sqlite3.Connection, user_id: str) -> int:
    """Delete the shopper's rows from the tables other modules list in ``forget_tables``.

    Modules keeping per-shopper rows in ``site.db`` under their own migration sets (e.g. the
    impressions of `edge_client.outcomes`) register ``(table_name, column_name)`` there, so
    forgetting a shopper reaches them in the same transaction as the events.
    """
    listed = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'forget_tables'"
    ).fetchone()
    if listed is None:
        return 0
    deleted = 0
    tables = conn.execute("SELECT table_name, column_name FROM forget_tables").fetchall()
    for table, column in tables:
        # Names come from our own migrations, never from a request.
        deleted += conn.execute(f'DELETE FROM "{table}" WHERE "{column}" = ?', (user_id,)).rowcount
    return deleted


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection, what: str) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back otherwise."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as err:
        raise StoreError(f"{what}: the site's database is not writable now: {err}") from err
    try:
        yield conn
    except BaseException as err:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        if isinstance(err, sqlite3.Error):
            raise StoreError(f"{what} failed, nothing written: {err}") from err
        raise
    try:
        conn.execute("COMMIT")
    except sqlite3.Error as err:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise StoreError(f"{what}: commit failed, nothing written: {err}") from err


# STRICT tables need 3.37; the JSON operators (->>) of bulk writes and impressions, 3.38.
SQLITE_MIN = (3, 38, 0)


def check_sqlite_version(found: tuple[int, int, int] = sqlite3.sqlite_version_info) -> None:
    """Refuse a store on an SQLite too old for its SQL, instead of failing on first use."""
    if found < SQLITE_MIN:
        raise StoreError(
            f"SQLite {'.'.join(map(str, found))} is too old: the event store needs "
            f">= {'.'.join(map(str, SQLITE_MIN))} (Python's sqlite3 module links the system "
            "library; use a Python built against a newer one)"
        )


class EventStore:
    """The events of one site in ``site.db``; safe to share between threads.

    Parameters
    ----------
    path
        The SQLite file; created (with its parent directory) and migrated when needed.
    synchronous
        ``FULL`` (default): an acknowledged write survives a power cut, not only a crash of
        this process. ``NORMAL`` survives a process crash (SIGKILL) but may lose the last
        transactions on power loss.
    busy_timeout_s
        How long a write waits for another process's write lock before failing.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: Synchronous = "FULL",
        busy_timeout_s: float = 10.0,
        create: bool = True,
    ) -> None:
        self.path = Path(path)
        check_sqlite_version()
        if synchronous not in ("FULL", "NORMAL"):
            raise StoreError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        if not create and not self.path.is_file():
            raise StoreError(f"{self.path} does not exist (no events have been stored there)")
        self.synchronous = synchronous
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create {self.path.parent}: {err}") from err
        self._migrate()

    # ------------------------------------------------------------------ connections

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; every write opens its own.
            # check_same_thread=False only so that close() may close every thread's handle.
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA temp_store = MEMORY")
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            # Deleted rows (forget, retention) are overwritten on disk, not just unlinked.
            conn.execute("PRAGMA secure_delete = ON")
        except sqlite3.Error as err:
            raise StoreError(f"cannot open {self.path}: {err}") from err
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise StoreError(f"the event store {self.path} is closed")
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection; the store cannot be used afterwards."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot switch to WAL (journal mode {mode})")
            db = Database(conn, strict=True, execute_plugins=False)
            # One migrating process at a time: the ClientApp and the service may open a new
            # site.db at the same moment. Migrations run as savepoints inside this lock.
            conn.execute("BEGIN IMMEDIATE")
            try:
                migrations.apply(db)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            raise StoreError(f"cannot open or migrate {self.path}: {err}") from err
        finally:
            conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction on this thread's connection: all or nothing."""
        with write_transaction(self._conn(), f"write to {self.path}") as conn:
            yield conn

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as err:
            raise StoreError(f"read from {self.path} failed: {err}") from err

    # ------------------------------------------------------------------ writes

    def add_events(self, events: Sequence[Event]) -> IngestResult:
        """Store a batch of events atomically; ids already stored are reported, not rewritten.

        Raises `EventValidationError` (naming every bad row) before touching the database
        when any event is invalid: a batch is stored completely or not at all.
        """
        now = now_ms()
        problems: list[RowProblem] = []
        for row, event in enumerate(events):
            problems.extend(event_problems(event, row, now))
        if problems:
            raise EventValidationError(problems[:MAX_PROBLEMS], total=len(problems))
        if not events:
            return IngestResult(0, 0)
        ids = [e.event_id for e in events]
        with self._write() as conn:
            before = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
            stored: set[str] = set()
            for start in range(0, len(ids), _ID_CHUNK):
                chunk = ids[start : start + _ID_CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT event_id FROM events WHERE event_id IN ({marks})"
                stored.update(r[0] for r in conn.execute(sql, chunk))
            seen: set[str] = set()
            fresh = []
            duplicates = []
            for e in events:
                if e.event_id in stored or e.event_id in seen:
                    duplicates.append(e.event_id)
                    continue
                seen.add(e.event_id)
                fresh.append(
                    (e.event_id, e.user_id, e.item_id, e.event_type, e.ts_ms, e.value, e.site, now)
                )
            if fresh:
                conn.executemany(_INSERT, fresh)
                conn.execute(_COUNT_NEW, (before,))
                conn.execute(_DAY_COUNT_NEW, (before,))
        return IngestResult(len(fresh), len(duplicates), tuple(duplicates))

    def import_events(
        self,
        frame: pd.DataFrame,
        *,
        chunk_size: int = 20_000,
        progress: Callable[[int], None] | None = None,
    ) -> IngestResult:
        """Bulk-store a canonical event frame (plus an optional ``event_id`` column).

        Rows without an ``event_id`` column get `deterministic_event_ids`, so importing the
        same file twice stores nothing the second time. Rows are written shopper by shopper in
        time order (equal times keep input order) in one transaction, all or nothing;
        ``progress`` is called with the number of rows written after each chunk.
        """
        check_event_frame(frame)
        if len(frame) == 0:
            return IngestResult(0, 0)
        frame = frame.reset_index(drop=True)
        problems, total = _frame_problems(frame, now_ms())
        if total:
            raise EventValidationError(problems, total=total)
        make_ids: Callable[[np.ndarray], list[str]]
        if "event_id" in frame.columns:
            given = _text_column(frame, "event_id")
            # Shopper-then-time order (= `shared.events.sort_events`) keeps the history index
            # growing almost sequentially.
            codes, _ = pd.factorize(_text_column(frame, "user_id"), sort=True)
            order = np.lexsort((frame["ts_ms"].to_numpy(dtype=np.int64), codes))

            def given_ids(rows: np.ndarray) -> list[str]:
                return list(given[rows])

            make_ids = given_ids

        else:
            make_ids, order = _deterministic_id_maker(frame)
        columns = {
            name: _text_column(frame, name) for name in ("user_id", "item_id", "event_type", "site")
        }
        ts_ms = frame["ts_ms"].to_numpy(dtype=np.int64)
        values = frame["value"].to_numpy(dtype=np.float64)

        def chunk_json(rows: np.ndarray) -> str:
            # JSON numbers from Python's float repr round-trip exactly through SQLite's JSON
            # parser (measured; pandas' own float output keeps only 15 digits).
            value_text = np.full(len(rows), None, dtype=object)
            chunk_values = values[rows]
            present = ~np.isnan(chunk_values)
            value_text[present] = [repr(v) for v in chunk_values[present].tolist()]
            table = pd.DataFrame(
                {
                    "event_id": pd.Series(make_ids(rows), dtype=object),
                    "user_id": pd.Series(columns["user_id"][rows], dtype=object),
                    "item_id": pd.Series(columns["item_id"][rows], dtype=object),
                    "event_type": pd.Series(columns["event_type"][rows], dtype=object),
                    "ts_ms": ts_ms[rows],
                    "value": pd.Series(value_text, dtype=object),
                    "site": pd.Series(columns["site"][rows], dtype=object),
                }
            )
            return str(table.to_json(orient="values"))

        conn = self._conn()
        # A bulk write touches index pages all over the file: a larger page cache for its
        # duration keeps them in memory (the default suits the small writes of the service).
        conn.execute(f"PRAGMA cache_size = -{IMPORT_CACHE_KIB}")
        try:
            with (
                concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="import") as pool,
                self._write() as conn,
            ):
                # Counted in memory beside the insert: re-reading what was written is slower.
                # Only used when every row is new (duplicates are not counted twice).
                counts = pool.submit(_new_counts_json, columns["item_id"], ts_ms)
                before = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
                accepted = _insert_chunks(conn, pool, order, chunk_json, chunk_size, progress)
                if accepted == len(frame):
                    totals, per_day = counts.result()
                    conn.execute(_ADD_COUNTS_JSON, (totals,))
                    conn.execute(_ADD_DAY_COUNTS_JSON, (per_day,))
                elif accepted:
                    conn.execute(_COUNT_NEW, (before,))
                    conn.execute(_DAY_COUNT_NEW, (before,))
            return IngestResult(accepted, len(frame) - accepted)
        finally:
            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")

    def _delete_where(self, conn: sqlite3.Connection, where: str, params: Sequence[Any]) -> int:
        """Delete matching events and take them out of the popularity counts (in a write)."""
        conn.execute(
            "UPDATE item_counts SET n = item_counts.n - gone.c "
            f"FROM (SELECT item_id, COUNT(*) AS c FROM events WHERE {where} GROUP BY item_id) "
            "AS gone WHERE item_counts.item_id = gone.item_id",
            params,
        )
        conn.execute("DELETE FROM item_counts WHERE n <= 0")
        conn.execute(
            "UPDATE item_day_counts SET n = item_day_counts.n - gone.c "
            f"FROM (SELECT ts_ms / {DAY_MS} AS day, item_id, COUNT(*) AS c FROM events "
            f"WHERE {where} GROUP BY 1, 2) AS gone "
            "WHERE item_day_counts.day = gone.day AND item_day_counts.item_id = gone.item_id",
            params,
        )
        conn.execute("DELETE FROM item_day_counts WHERE n <= 0")
        return conn.execute(f"DELETE FROM events WHERE {where}", params).rowcount

    def forget(self, user_id: str) -> int:
        """Delete every event of one shopper; returns how many rows were deleted.

        Deleted rows are overwritten (``secure_delete``) and the WAL is checkpointed and
        truncated afterwards, so the shopper's rows do not linger in the database files.
        """
        with self._write() as conn:
            deleted = self._delete_where(conn, "user_id = ?", (user_id,))
            others = _forget_elsewhere(conn, user_id)
        if deleted or others:
            self.checkpoint()
        return deleted

    def apply_retention(
        self,
        *,
        max_age_days: float | None = None,
        max_events_per_user: int | None = None,
        now: int | None = None,
    ) -> RetentionResult:
        """Delete old events and events beyond a per-shopper cap; rows deleted by each rule.

        Events older than ``max_age_days`` go, then all but each shopper's newest
        ``max_events_per_user``; None disables a rule.
        """
        if max_age_days is not None and not 0 < max_age_days <= MAX_RETENTION_DAYS:
            raise StoreError(f"max_age_days must be in (0, {MAX_RETENTION_DAYS}]")
        if max_events_per_user is not None and not 1 <= max_events_per_user <= MAX_USER_CAP:
            raise StoreError(f"max_events_per_user must be in [1, {MAX_USER_CAP}]")
        by_age = by_cap = 0
        with self._write() as conn:
            if max_age_days is not None:
                cutoff = (now_ms() if now is None else now) - int(max_age_days * 86_400_000)
                by_age = self._delete_where(conn, "ts_ms < ?", (cutoff,))
            if max_events_per_user is not None:
                over_cap = (
                    "seq IN (SELECT seq FROM (SELECT seq, ROW_NUMBER() OVER ("
                    "PARTITION BY user_id ORDER BY ts_ms DESC, seq DESC) AS rn FROM events "
                    "WHERE user_id IN (SELECT user_id FROM events GROUP BY user_id "
                    "HAVING COUNT(*) > ?)) WHERE rn > ?)"
                )
                by_cap = self._delete_where(
                    conn, over_cap, (max_events_per_user, max_events_per_user)
                )
        if by_age or by_cap:
            self.checkpoint()
        return RetentionResult(by_age, by_cap)

    def checkpoint(self) -> bool:
        """Copy the WAL into the database and truncate it; False when readers kept it busy."""
        try:
            busy = self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error as err:
            raise StoreError(f"checkpoint of {self.path} failed: {err}") from err
        return not busy

    # ------------------------------------------------------------------ reads

    def recent_events(self, user_id: str, limit: int = 50) -> list[Event]:
        """A shopper's newest ``limit`` events, newest first."""
        rows = self._read(
            "SELECT event_id, user_id, item_id, event_type, ts_ms, value, site FROM events "
            "WHERE user_id = ? ORDER BY ts_ms DESC, seq DESC LIMIT ?",
            (user_id, limit),
        )
        return [Event(*row) for row in rows]

    def history(self, user_id: str, limit: int) -> list[str]:
        """The item ids of a shopper's newest ``limit`` events, oldest first (model input)."""
        return [item for item, _ in reversed(self.recent_items(user_id, limit))]

    def recent_items(self, user_id: str, limit: int) -> list[tuple[str, str]]:
        """``(item_id, event_type)`` of a shopper's newest ``limit`` events, newest first.

        What one recommendation reads: the model input and, for the reasons, what the
        shopper did with each of those items, in one indexed query.
        """
        rows = self._read(
            "SELECT item_id, event_type FROM events WHERE user_id = ? "
            "ORDER BY ts_ms DESC, seq DESC LIMIT ?",
            (user_id, limit),
        )
        return rows

    def purchased_items(self, user_id: str) -> set[str]:
        """Every item the shopper has bought (excluded from recommendations by default)."""
        rows = self._read(
            "SELECT item_id FROM events WHERE user_id = ? AND event_type = 'purchase'",
            (user_id,),
        )
        return {r[0] for r in rows}

    def events_frame(self, since_ms: int | None = None) -> pd.DataFrame:
        """Every event (with ``ts_ms >= since_ms``) as a canonical frame: local training's input.

        Rows are ordered by shopper, time and arrival (`shared.events.sort_events` order).
        """
        where, params = ("WHERE ts_ms >= ?", (since_ms,)) if since_ms is not None else ("", ())
        rows = self._read(
            "SELECT user_id, item_id, event_type, ts_ms, value, site FROM events "
            f"{where} ORDER BY user_id, ts_ms, seq",
            params,
        )
        columns = list(zip(*rows, strict=True)) if rows else [()] * len(EVENT_COLUMNS)
        frame = pd.DataFrame(
            {
                "user_id": pd.Series(columns[0], dtype=object),
                "item_id": pd.Series(columns[1], dtype=object),
                "event_type": pd.Series(columns[2], dtype=object),
                "ts_ms": pd.Series(columns[3], dtype=np.int64),
                "value": pd.Series(
                    [np.nan if v is None else v for v in columns[4]], dtype=np.float64
                ),
                "site": pd.Series(columns[5], dtype=object),
            }
        )
        return frame

    def count_events(self, since_ms: int | None = None) -> int:
        """Number of stored events (with ``ts_ms >= since_ms`` when given)."""
        if since_ms is None:
            return int(self._read("SELECT COUNT(*) FROM events")[0][0])
        return int(self._read("SELECT COUNT(*) FROM events WHERE ts_ms >= ?", (since_ms,))[0][0])

    def popularity(self, limit: int = 10, exclude: Collection[str] = ()) -> list[tuple[str, int]]:
        """The site's most popular items as ``(item_id, events)``, most events first.

        Ties are broken by item id; items in ``exclude`` are skipped.
        """
        if limit <= 0:
            return []
        rows = self._read(
            "SELECT item_id, n FROM item_counts ORDER BY n DESC, item_id LIMIT ?",
            (limit + len(exclude),),
        )
        return [(item, int(n)) for item, n in rows if item not in exclude][:limit]

    def recent_popularity(self, limit: int, days: int) -> list[tuple[str, int]]:
        """``(item_id, events)`` of the store's last ``days`` UTC days, most events first.

        Ties are broken by item id. The window ends at the day of the newest stored event,
        not at the wall clock: a log imported from the past, or a store that was closed for a
        while, still has a recent past.
        """
        if limit <= 0 or days <= 0:
            return []
        rows = self._read(
            "SELECT item_id, SUM(n) AS total FROM item_day_counts "
            "WHERE day > (SELECT MAX(day) FROM item_day_counts) - ? "
            "GROUP BY item_id ORDER BY total DESC, item_id LIMIT ?",
            (days, limit),
        )
        return [(item, int(n)) for item, n in rows]

    def ping(self) -> bool:
        """Whether the database answers a trivial query."""
        try:
            self._conn().execute("SELECT 1 FROM events LIMIT 1").fetchall()
        except (sqlite3.Error, StoreError):
            return False
        return True

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check``: ``"ok"`` for a sound file."""
        return str(self._read("PRAGMA integrity_check")[0][0])

    def stats(self) -> dict[str, Any]:
        """Rows, shoppers, items, time span, disk use and schema version of this store."""
        n, shoppers, first, last, received = self._read(
            "SELECT COUNT(*), COUNT(DISTINCT user_id), MIN(ts_ms), MAX(ts_ms), "
            "MAX(received_ms) FROM events"
        )[0]
        items = self._read("SELECT COUNT(*) FROM item_counts")[0][0]
        applied = self._read(
            "SELECT name FROM _sqlite_migrations WHERE migration_set = ? ORDER BY id",
            (migrations.name,),
        )
        disk = sum(
            p.stat().st_size
            for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"))
            if p.exists()
        )
        return {
            "path": str(self.path),
            "events": int(n),
            "shoppers": int(shoppers),
            "items": int(items),
            "first_ts_ms": first,
            "last_ts_ms": last,
            "last_received_ms": received,
            "disk_bytes": disk,
            "journal_mode": self._read("PRAGMA journal_mode")[0][0],
            "migrations": [r[0] for r in applied],
        }
