"""Recent popularity for new shoppers: day counts kept exact by every write, ranking, cache."""

from __future__ import annotations

import importlib.util
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from edge_client.popularity import SitePopularity, all_time_reason, recent_reason
from edge_client.store import DAY_MS, Event, EventStore
from shared.events import EVENT_COLUMNS, empty_events

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000  # 2023-11-14 22:13 UTC
DAY0 = T0 // DAY_MS * DAY_MS  # that day's midnight


def day_counts(path: Path) -> dict[tuple[int, str], int]:
    with sqlite3.connect(path) as conn:
        return {(d, i): n for d, i, n in conn.execute("SELECT * FROM item_day_counts")}


def counted_from_events(path: Path) -> dict[tuple[int, str], int]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            f"SELECT ts_ms / {DAY_MS}, item_id, COUNT(*) FROM events GROUP BY 1, 2"
        ).fetchall()
    return {(d, i): n for d, i, n in rows}


def random_frame(rng: np.random.Generator, n: int, users: int = 12) -> pd.DataFrame:
    data = pd.DataFrame(
        {
            "user_id": [f"u{k}" for k in rng.integers(0, users, n)],
            "item_id": [f"i{k}" for k in rng.zipf(1.6, n) % 40],
            "event_type": rng.choice(["view", "cart", "purchase"], n),
            "ts_ms": (DAY0 + rng.integers(0, 20 * DAY_MS, n)).astype(np.int64),
            "value": np.nan,
            "site": "",
        }
    )
    return pd.concat([empty_events(), data], ignore_index=True)[list(EVENT_COLUMNS)]


def test_day_counts_stay_exact_through_every_write_and_delete(tmp_path: Path) -> None:
    # Arrange
    rng = np.random.default_rng(0)
    path = tmp_path / "site.db"
    store = EventStore(path)
    first, second = random_frame(rng, 300), random_frame(rng, 200)
    checks: list[bool] = []
    # Act: every path that writes or deletes events, checking after each
    steps: list[Any] = [
        lambda: store.import_events(first),  # all new: counted in memory
        lambda: store.import_events(pd.concat([first.iloc[:50], second])),  # some duplicates
        lambda: store.add_events(
            [Event(f"e{k}", "u1", f"i{k % 3}", "view", DAY0 + 25 * DAY_MS) for k in range(9)]
        ),
        lambda: store.forget("u3"),
        lambda: store.apply_retention(max_age_days=10, now=DAY0 + 26 * DAY_MS),
        lambda: store.apply_retention(max_events_per_user=5),
    ]
    for step in steps:
        step()
        checks.append(day_counts(path) == counted_from_events(path))
    total = store.count_events()
    store.close()
    # Assert
    assert checks == [True] * len(steps)
    assert 0 < total < 500
    assert all(n > 0 for n in day_counts(path).values())  # emptied buckets are removed


def test_the_migration_fills_day_counts_of_a_store_that_predates_them(tmp_path: Path) -> None:
    # Arrange: a store as the first schema left it (no day counts, migration not applied)
    path = tmp_path / "site.db"
    with EventStore(path) as store:
        store.import_events(random_frame(np.random.default_rng(1), 120))
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE item_day_counts")
        conn.execute("DELETE FROM _sqlite_migrations WHERE name = 'm002_item_day_counts'")
    # Act
    EventStore(path).close()
    # Assert
    assert day_counts(path) == counted_from_events(path) and day_counts(path)


def test_recent_popularity_counts_the_newest_days_and_breaks_ties_by_item(
    tmp_path: Path,
) -> None:
    # Arrange: "old" was popular 30 days ago; "a" and "b" tie over the last 7 days
    with EventStore(tmp_path / "site.db") as store:
        old = [Event(f"o{k}", f"u{k}", "old", "view", DAY0) for k in range(5)]
        recent = [
            Event("r1", "u1", "b", "view", DAY0 + 30 * DAY_MS),
            Event("r2", "u2", "a", "view", DAY0 + 27 * DAY_MS),
            Event("r3", "u3", "c", "view", DAY0 + 20 * DAY_MS),  # 10 days before the newest
        ]
        store.add_events(old + recent)
        # Act
        week = store.recent_popularity(10, days=7)
        month = store.recent_popularity(10, days=31)
        today = store.recent_popularity(10, days=1)
    # Assert
    assert week == [("a", 1), ("b", 1)]
    assert month == [("old", 5), ("a", 1), ("b", 1), ("c", 1)]
    assert today == [("b", 1)]


def test_new_shoppers_get_recent_items_first_then_all_time_with_reasons(
    tmp_path: Path,
) -> None:
    # Arrange
    with EventStore(tmp_path / "site.db") as store:
        store.add_events(
            [Event(f"o{k}", f"u{k}", "old", "view", DAY0) for k in range(5)]
            + [Event(f"n{k}", f"v{k}", "new", "view", DAY0 + 30 * DAY_MS) for k in range(2)]
            + [Event("m1", "w1", "mid", "cart", DAY0 + 29 * DAY_MS)]
        )
        popularity = SitePopularity(store, window_days=7)
        # Act
        answer = popularity.top(3)
        without_new = popularity.top(2, exclude={"new"})
        all_time = SitePopularity(store).top(2)
    # Assert
    assert answer == [
        ("new", 2, recent_reason(2, 7)),
        ("mid", 1, recent_reason(1, 7)),
        ("old", 5, all_time_reason(5)),  # topped up from all-time counts
    ]
    assert [item for item, _, _ in without_new] == ["mid", "old"]
    assert all_time == [("old", 5, all_time_reason(5)), ("new", 2, all_time_reason(2))]
    assert recent_reason(2, 7) == "trending at this store (2 events in the last 7 days)"


def test_the_recent_ranking_is_cached_until_refreshed(tmp_path: Path) -> None:
    # Arrange: a clock the test moves; one popularity refreshed inline, one by its owner
    now = [0.0]
    with EventStore(tmp_path / "site.db") as store:
        store.add_events([Event("e1", "u1", "a", "view", DAY0)])
        inline = SitePopularity(store, window_days=7, refresh_s=30, clock=lambda: now[0])
        owned = SitePopularity(
            store, window_days=7, refresh_s=30, refresh_inline=False, clock=lambda: now[0]
        )
        first = (inline.top(1), owned.top(1))
        store.add_events([Event(f"b{k}", f"u{k}", "b", "view", DAY0) for k in range(3)])
        # Act
        cached = (inline.top(1), owned.top(1))
        now[0] = 31.0
        inline_later, owned_later = inline.top(1), owned.top(1)
        owned.refresh()
        owned_refreshed = owned.top(1)
    # Assert
    assert [a[0][0] for a in first] == ["a", "a"]
    assert [a[0][0] for a in cached] == ["a", "a"]  # within refresh_s: the cache
    assert inline_later[0][0] == "b" and owned_later[0][0] == "a"
    assert owned.stale() is False and owned_refreshed[0][0] == "b"


def test_the_benchmark_ranks_like_the_edge(tmp_path: Path) -> None:
    # Arrange: benchmarks/new_shoppers.py replays with its own counts; they must agree
    spec = importlib.util.spec_from_file_location(
        "new_shoppers", REPO / "benchmarks" / "new_shoppers.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    events = random_frame(np.random.default_rng(2), 400)
    with EventStore(tmp_path / "site.db") as store:
        store.import_events(events)
        edge = [item for item, _, _ in SitePopularity(store, window_days=5).top(10)]
    items = sorted(events["item_id"].unique())
    index = {item: k for k, item in enumerate(items)}
    codes = events["item_id"].map(index).to_numpy()
    days = events["ts_ms"].to_numpy() // DAY_MS
    # Act: the benchmark's counts for the same window
    all_time = np.bincount(codes, minlength=len(items))
    recent = np.bincount(codes[days > days.max() - 5], minlength=len(items))
    ranked = [items[k] for k in bench.top_k(recent, all_time, 10)]
    # Assert: the same ten items in the same order (ties by item id as a string there too)
    assert ranked == edge


@pytest.mark.parametrize("days", [0, None])
def test_no_window_means_all_time_counts(tmp_path: Path, days: int | None) -> None:
    with EventStore(tmp_path / "site.db") as store:
        store.add_events([Event("e1", "u1", "a", "view", DAY0)])
        assert SitePopularity(store, window_days=days).top(1) == [("a", 1, all_time_reason(1))]


def test_the_service_waits_for_a_running_refresh_before_closing_the_store(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: every background refresh takes 0.3 s, and the service stops during one
    from edge_kit import client, live_server, settings_for

    from edge_client.errors import StoreError

    outcomes: list[str] = []
    original = SitePopularity.refresh

    def slow_refresh(self: SitePopularity) -> None:
        time.sleep(0.3)
        try:
            original(self)
            outcomes.append("ok")
        except StoreError as err:  # the store was closed under the refresh
            outcomes.append(f"failed: {err}")

    monkeypatch.setattr(SitePopularity, "refresh", slow_refresh)
    settings = settings_for(site, popularity_refresh_s=0.05)
    # Act
    with live_server(settings) as base, client(base) as c:
        assert c.get("/healthz").status_code == 200
        time.sleep(0.2)  # a refresh is under way when the server is told to stop
    time.sleep(0.6)  # what a refresh left running would still do
    # Assert: every refresh finished on an open store
    assert outcomes and set(outcomes) == {"ok"}
