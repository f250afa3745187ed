"""The event store on real SQLite files: idempotence, atomicity, order, popularity, deletion."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from edge_client.errors import EventValidationError, StoreError
from edge_client.store import (
    Event,
    EventStore,
    check_sqlite_version,
    deterministic_event_ids,
    now_ms,
)
from shared.events import EVENT_COLUMNS, empty_events

T0 = 1_700_000_000_000


def ev(eid: str, user: str = "u1", item: str = "i1", kind: str = "view", ts: int = T0) -> Event:
    return Event(eid, user, item, kind, ts)


def frame(rows: list[tuple[str, str, str, int]]) -> pd.DataFrame:
    out = empty_events()
    data = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "ts_ms"])
    data["ts_ms"] = data["ts_ms"].astype(np.int64)
    data["value"] = np.nan
    data["site"] = ""
    return pd.concat([out, data], ignore_index=True)[list(EVENT_COLUMNS)]


def all_rows(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT * FROM events ORDER BY seq").fetchall()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EventStore]:
    s = EventStore(tmp_path / "site.db")
    yield s
    s.close()


def test_new_store_is_wal_strict_and_migrated(tmp_path: Path) -> None:
    # Arrange / Act
    store = EventStore(tmp_path / "deep" / "site.db")
    stats = store.stats()
    store.close()
    # Assert
    with sqlite3.connect(tmp_path / "deep" / "site.db") as conn:
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'events'").fetchone()[0]
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert "STRICT" in sql
    assert mode == "wal"
    assert stats["migrations"] == ["m001_events", "m002_item_day_counts"]
    assert stats["events"] == 0


def test_retried_batch_is_reported_as_duplicates_and_not_rewritten(store: EventStore) -> None:
    # Arrange
    first = store.add_events([ev("e1"), ev("e2", item="i2")])
    # Act
    again = store.add_events([ev("e2", item="CHANGED"), ev("e3", item="i3"), ev("e3", item="i3")])
    # Assert
    assert (first.accepted, first.duplicates) == (2, 0)
    assert (again.accepted, again.duplicates) == (1, 2)
    assert again.duplicate_ids == ("e2", "e3")
    assert [r[3] for r in all_rows(store.path)] == ["i1", "i2", "i3"]  # first write wins


def test_invalid_row_refuses_the_whole_batch(store: EventStore) -> None:
    # Arrange
    store.add_events([ev("e0")])
    before = all_rows(store.path)
    bad = [ev("e1"), ev("e2", ts=-1), ev("e 3"), ev("e4", kind="teleport")]
    # Act
    with pytest.raises(EventValidationError) as info:
        store.add_events(bad)
    # Assert
    assert [(p.row, p.field) for p in info.value.problems] == [
        (1, "ts_ms"),
        (2, "event_id"),
        (3, "event_type"),
    ]
    assert all_rows(store.path) == before


def test_history_is_oldest_first_with_ties_in_arrival_order(store: EventStore) -> None:
    # Arrange: arrival order differs from time order; two events share a timestamp
    store.add_events([ev("a", item="late", ts=T0 + 50), ev("b", item="tie1", ts=T0)])
    store.add_events([ev("c", item="tie2", ts=T0), ev("d", item="first", ts=T0 - 10)])
    store.add_events([ev("x", user="u2", item="other", ts=T0)])
    # Act
    history = store.history("u1", 10)
    newest_two = store.history("u1", 2)
    recent = store.recent_events("u1", 3)
    # Assert
    assert history == ["first", "tie1", "tie2", "late"]
    assert newest_two == ["tie2", "late"]
    assert [e.event_id for e in recent] == ["a", "c", "b"]


def test_popularity_tracks_writes_forget_and_retention(store: EventStore) -> None:
    # Arrange
    store.add_events(
        [ev(f"a{i}", user="u1", item="hot", ts=T0 + i) for i in range(3)]
        + [ev(f"b{i}", user="u2", item="warm", ts=T0 + i) for i in range(2)]
        + [ev("c0", user="u2", item="hot", ts=T0)]
    )
    assert store.popularity(5) == [("hot", 4), ("warm", 2)]
    # Act
    forgotten = store.forget("u1")
    # Assert
    assert forgotten == 3
    assert store.popularity(5) == [("warm", 2), ("hot", 1)]
    assert store.popularity(5, exclude={"warm"}) == [("hot", 1)]
    assert store.recent_events("u1") == []


def test_retention_by_age_and_by_cap(store: EventStore) -> None:
    # Arrange: u1 has events on days 1, 3, 5, 7, 9; u2 one on day 0; "now" is day 10
    day = 86_400_000
    now = T0 + 10 * day
    store.add_events(
        [ev(f"a{i}", user="u1", item=f"i{i}", ts=T0 + (1 + 2 * i) * day) for i in range(5)]
    )
    store.add_events([ev("old", user="u2", item="i9", ts=T0)])
    # Act
    result = store.apply_retention(max_age_days=7, max_events_per_user=2, now=now)
    # Assert: days 0 and 1 are older than 7 days; u1 then keeps its newest 2 of 4
    assert (result.deleted_by_age, result.deleted_by_cap) == (2, 2)
    assert store.history("u1", 10) == ["i3", "i4"]
    assert store.popularity(10) == [("i3", 1), ("i4", 1)]


def test_import_is_deterministic_idempotent_and_canonical(store: EventStore) -> None:
    # Arrange: a repeated identical row is a genuine repeat and must be kept twice
    rows = [
        ("u2", "i1", "view", T0 + 5),
        ("u1", "i2", "view", T0 + 1),
        ("u1", "i2", "view", T0 + 1),
        ("u1", "i3", "purchase", T0),
    ]
    data = frame(rows)
    # Act
    first = store.import_events(data)
    again = store.import_events(data.iloc[::-1])
    exported = store.events_frame()
    # Assert
    assert (first.accepted, first.duplicates) == (4, 0)
    assert (again.accepted, again.duplicates) == (0, 4)
    assert list(exported.columns) == list(EVENT_COLUMNS)
    assert exported["ts_ms"].dtype == np.int64
    assert exported[["user_id", "item_id", "ts_ms"]].values.tolist() == [
        ["u1", "i3", T0],
        ["u1", "i2", T0 + 1],
        ["u1", "i2", T0 + 1],
        ["u2", "i1", T0 + 5],
    ]
    assert store.purchased_items("u1") == {"i3"}
    assert store.count_events(since_ms=T0 + 1) == 3


def test_import_refuses_bad_rows_and_stores_nothing(store: EventStore) -> None:
    # Arrange
    data = frame(
        [("u1", "i1", "view", T0), ("bad user", "i2", "view", T0), ("u3", "i3", "view", -5)]
    )
    # Act
    with pytest.raises(EventValidationError) as info:
        store.import_events(data)
    # Assert
    assert {(p.row, p.field) for p in info.value.problems} == {(1, "user_id"), (2, "ts_ms")}
    assert store.count_events() == 0


def test_generated_ids_depend_on_content_only() -> None:
    # Arrange
    data = frame([("u1", "i1", "view", T0), ("u2", "i1", "view", T0), ("u1", "i1", "view", T0)])
    # Act
    ids, order = deterministic_event_ids(data)
    shuffled, _ = deterministic_event_ids(data.iloc[[1, 0, 2]].reset_index(drop=True))
    # Assert
    assert len(set(ids)) == 3
    assert ids[0] == shuffled[1] and ids[1] == shuffled[0]
    assert sorted(order.tolist()) == [0, 1, 2]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["u1", "u2", "u3"]),
            st.sampled_from(["i1", "i2", "i3", "i4"]),
            st.sampled_from(["view", "cart", "fav", "purchase"]),
            st.integers(0, 5),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_events_frame_round_trips_in_canonical_order(
    tmp_path_factory: pytest.TempPathFactory, rows: list[tuple[str, str, str, int]]
) -> None:
    # Arrange
    data = frame([(u, i, t, T0 + d) for u, i, t, d in rows])
    store = EventStore(tmp_path_factory.mktemp("rt") / "site.db")
    # Act
    store.import_events(data)
    out = store.events_frame()
    store.close()
    # Assert: same multiset, ordered by shopper then time, ties in input order
    expected = data.sort_values(["user_id", "ts_ms"], kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(out, expected, check_dtype=False)


def test_generated_ids_follow_the_published_recipe() -> None:
    # Arrange: the recipe is part of the contract, or re-importing an old file duplicates it
    import hashlib

    data = frame([("u1", "i1", "view", T0)]).assign(value=[4.5], site=["s1"])
    key = f"u1\x1fi1\x1fview\x1f{T0}\x1f4.5\x1fs1"
    expected = (
        "imp-"
        + hashlib.blake2b(b"u1", digest_size=6).hexdigest()
        + "-"
        + hashlib.blake2b(key.encode(), digest_size=10).hexdigest()
    )
    # Act
    ids, _ = deterministic_event_ids(data)
    # Assert
    assert ids == [expected]


def _recount(path: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """Both popularity tables next to a recount from the events themselves."""
    with sqlite3.connect(path) as conn:
        kept = conn.execute(
            "SELECT 'all', item_id, n FROM item_counts UNION ALL "
            "SELECT day, item_id, n FROM item_day_counts ORDER BY 1, 2"
        ).fetchall()
        recounted = conn.execute(
            "SELECT 'all', item_id, COUNT(*) FROM events GROUP BY item_id UNION ALL "
            "SELECT ts_ms / 86400000, item_id, COUNT(*) FROM events GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()
    return kept, recounted


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=st.lists(
        st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
        min_size=1,
        max_size=40,
    ),
    client_ids=st.booleans(),
    chunk_size=st.integers(1, 7),
)
@example(values=[0.1, -0.0, 5e-324, None, 1.7976931348623157e308], client_ids=False, chunk_size=2)
def test_bulk_import_stores_values_exactly_and_counts_match_the_rows(
    tmp_path_factory: pytest.TempPathFactory,
    values: list[float | None],
    client_ids: bool,
    chunk_size: int,
) -> None:
    # Arrange: rows spread over days and items; half of them imported once before
    n = len(values)
    data = frame([(f"u{i % 3}", f"i{i % 5}", "view", T0 + i * 40_000_000) for i in range(n)])
    data["value"] = [np.nan if v is None else v for v in values]
    if client_ids:
        data["event_id"] = [f"e{i}" for i in range(n)]
    path = tmp_path_factory.mktemp("exact") / "site.db"
    # Act
    with EventStore(path) as store:
        early = store.import_events(data.iloc[: n // 2], chunk_size=chunk_size)
        result = store.import_events(data, chunk_size=chunk_size)
        stored = store.events_frame()
    # Assert
    assert (early.accepted, result.accepted, result.duplicates) == (n // 2, n - n // 2, n // 2)
    by_time = stored.sort_values("ts_ms")["value"].tolist()
    for got, want in zip(by_time, values, strict=True):
        if want is None:
            assert np.isnan(got)
        else:
            assert got == want
            # SQLite keeps no negative zero in a REAL column (with any insert path): -0.0
            # comes back as 0.0; every other value keeps its exact bits, sign included.
            assert np.signbit(got) == (np.signbit(want) and want != 0)
    kept, recounted = _recount(path)
    assert kept == recounted


def test_import_failing_in_a_later_chunk_stores_nothing(tmp_path: Path) -> None:
    # Arrange: a real SQLite error in the third chunk, after two chunks were written
    path = tmp_path / "site.db"
    with EventStore(path) as store:
        store.add_events([ev("kept", item="i0")])
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON events WHEN NEW.item_id = 'boom' "
            "BEGIN SELECT RAISE(ABORT, 'boom'); END"
        )
    data = frame([(f"u{i:02d}", "i1", "view", T0 + i) for i in range(30)])
    data.loc[25, "item_id"] = "boom"
    before = (all_rows(path), _recount(path))
    # Act
    with EventStore(path) as store, pytest.raises(StoreError, match="nothing written: boom"):
        store.import_events(data, chunk_size=10)
    # Assert
    assert (all_rows(path), _recount(path)) == before


def test_other_migration_sets_share_the_file(tmp_path: Path) -> None:
    # Arrange: another module's set applied before and after the store opens
    path = tmp_path / "site.db"
    ledger = Migrations("fedrec-privacy")

    @ledger()
    def m001_ledger(db: Database) -> None:
        db.execute("CREATE TABLE privacy_ledger (round INTEGER PRIMARY KEY, eps REAL) STRICT")

    ledger.apply(Database(path))
    # Act
    store = EventStore(path)
    store.add_events([ev("e1")])
    store.close()
    reopened = EventStore(path)
    # Assert
    with sqlite3.connect(path) as conn:
        sets = conn.execute("SELECT migration_set, name FROM _sqlite_migrations").fetchall()
    assert set(sets) == {
        ("fedrec-privacy", "m001_ledger"),
        ("fedrec-edge", "m001_events"),
        ("fedrec-edge", "m002_item_day_counts"),
    }
    assert reopened.count_events() == 1
    assert reopened.integrity_check() == "ok"
    reopened.close()


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "site.db"
    path.write_bytes(b"this is not sqlite" * 100)
    # Act / Assert
    with pytest.raises(StoreError, match="file is not a database"):
        EventStore(path)
    with pytest.raises(StoreError, match="does not exist"):
        EventStore(tmp_path / "missing.db", create=False)


def test_concurrent_writers_and_readers_lose_nothing(tmp_path: Path) -> None:
    # Arrange: 4 writer threads x 50 batches, 2 reader threads reading throughout
    store = EventStore(tmp_path / "site.db", synchronous="NORMAL")
    errors: list[BaseException] = []
    done = threading.Event()

    def write(w: int) -> None:
        try:
            for b in range(50):
                batch = [
                    ev(f"w{w}-b{b}-{j}", user=f"u{j % 7}", item=f"i{j}", ts=T0 + b)
                    for j in range(5)
                ]
                store.add_events(batch)
        except BaseException as err:
            errors.append(err)

    def read() -> None:
        try:
            while not done.is_set():
                store.history("u1", 20)
                store.popularity(10)
        except BaseException as err:
            errors.append(err)

    writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    readers = [threading.Thread(target=read) for _ in range(2)]
    # Act
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    for t in readers:
        t.join()
    # Assert
    assert errors == []
    assert store.count_events() == 4 * 50 * 5
    assert sum(n for _, n in store.popularity(100)) == 4 * 50 * 5
    store.close()


def test_far_future_events_are_refused(store: EventStore) -> None:
    # Act / Assert
    with pytest.raises(EventValidationError, match="future"):
        store.add_events([ev("e1", ts=now_ms() + 2 * 86_400_000)])


def test_write_lock_held_elsewhere_is_a_clear_error_and_stores_nothing(tmp_path: Path) -> None:
    # Arrange: another connection (think: another process) holds the write lock
    store = EventStore(tmp_path / "site.db", busy_timeout_s=0.1)
    other = sqlite3.connect(tmp_path / "site.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    # Act
    with pytest.raises(StoreError, match="not writable now"):
        store.add_events([ev("e1")])
    other.execute("ROLLBACK")
    other.close()
    # Assert
    assert store.count_events() == 0
    assert store.add_events([ev("e1")]).accepted == 1
    store.close()


def test_an_sqlite_too_old_for_the_store_is_refused_with_the_versions() -> None:
    # Act / Assert: 3.37 lacks the ->> operator the bulk writes use
    with pytest.raises(StoreError, match=r"SQLite 3\.37\.2 is too old.*>= 3\.38\.0"):
        check_sqlite_version((3, 37, 2))
    check_sqlite_version((3, 38, 0))  # the minimum itself is accepted
