"""Cleaning: every rule drops what it should, counts it and names example rows."""

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from shared.cleaning import (
    DAY_MS,
    MINUTE_MS,
    CleaningConfig,
    CleaningReport,
    clean_events,
    window_counts,
)
from shared.errors import DataError

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
NOW = T0 + 10 * DAY_MS


def _raw(rows: Sequence[tuple[object, object, object, float, float]]) -> pd.DataFrame:
    """(user, item, event_type, ts_ms, value) tuples as a raw event frame."""
    return pd.DataFrame(
        {
            "user_id": pd.Series([r[0] for r in rows], dtype=object),
            "item_id": pd.Series([r[1] for r in rows], dtype=object),
            "event_type": pd.Series([r[2] for r in rows], dtype=object),
            "ts_ms": np.asarray([r[3] for r in rows], dtype=np.float64),
            "value": np.asarray([r[4] for r in rows], dtype=np.float64),
            "site": "s1",
        }
    )


def _clean(frame: pd.DataFrame, **cfg: object) -> tuple[pd.DataFrame, CleaningReport]:
    config = CleaningConfig(now_ms=NOW, **cfg)  # type: ignore[arg-type]
    return clean_events(frame, config=config, rows=np.arange(10, 10 + len(frame)), row_label="line")


def test_each_rule_drops_counts_and_gives_example_rows() -> None:
    nan = np.nan
    frame = _raw(
        [
            ("u1", "a", "view", T0, nan),  # line 10: kept
            ("u1", "a", "view", T0, nan),  # 11: exact duplicate
            ("", "a", "view", T0 + 1, nan),  # 12: missing user
            ("u1", None, "view", T0 + 2, nan),  # 13: missing item
            ("u1", "a", "view", nan, nan),  # 14: missing timestamp
            ("u1", "a", "rating", T0 + 3, nan),  # 15: rating without value
            ("u1", "a", "click", T0 + 4, nan),  # 16: unknown event type
            ("u1", "a", "view", -5, nan),  # 17: negative
            ("u1", "a", "view", 1000, nan),  # 18: before the 1995 floor
            ("u1", "a", "view", NOW + 2 * DAY_MS, nan),  # 19: in the future
            ("u1", "b", "rating", T0 + 5, 4.0),  # 20: kept
            ("u1", "b", "view", NOW + DAY_MS // 2, nan),  # 21: kept (skew within a day)
        ]
    )
    clean, report = _clean(frame)
    assert report.rows_in == 12
    assert report.rows_out == len(clean) == 3
    expected = {
        "missing_field": [12, 13, 14, 15],
        "unknown_event_type": [16],
        "negative_timestamp": [17],
        "before_floor": [18],
        "in_future": [19],
        "duplicate": [11],
    }
    for reason, lines in expected.items():
        assert report.dropped[reason] == len(lines), reason
        assert report.examples[reason] == lines, reason
    assert report.dropped["bot_shopper"] == 0
    assert sum(report.dropped.values()) == report.rows_dropped == 9
    # canonical dtypes, input order kept
    assert clean["ts_ms"].dtype == np.int64
    assert clean["item_id"].tolist() == ["a", "b", "b"]
    assert clean["value"].tolist()[1] == 4.0


def test_examples_are_capped_at_five() -> None:
    frame = _raw([("u", "a", "click", T0 + k, np.nan) for k in range(9)])
    _, report = _clean(frame)
    assert report.dropped["unknown_event_type"] == 9
    assert report.examples["unknown_event_type"] == [10, 11, 12, 13, 14]


def test_window_rule_keeps_start_and_drops_end() -> None:
    frame = _raw([("u", "a", "view", t, np.nan) for t in (T0 - 1, T0, T0 + 99, T0 + 100)])
    clean, report = _clean(frame, window_ms=(T0, T0 + 100))
    assert clean["ts_ms"].tolist() == [T0, T0 + 99]
    assert report.dropped["outside_window"] == 2
    assert report.examples["outside_window"] == [10, 13]


def test_absurd_timestamps_are_dropped_not_overflowed() -> None:
    frame = _raw([("u", "a", "view", 1e30, np.nan), ("u", "a", "view", -1e30, np.nan)])
    frame = pd.concat([frame, _raw([("u", "a", "view", T0, np.nan)])], ignore_index=True)
    clean, report = _clean(frame)
    assert len(clean) == 1
    assert (report.dropped["in_future"], report.dropped["negative_timestamp"]) == (1, 1)


def test_bot_rule_per_minute_drops_the_whole_shopper_at_limit_plus_one() -> None:
    # 61 events in one minute for "bot", exactly 60 for "human", plus older bot events
    bot = [("bot", f"i{k}", "view", T0 + k * 900, np.nan) for k in range(61)]
    bot += [("bot", "old", "view", T0 - DAY_MS, np.nan)]
    human = [("human", f"i{k}", "view", T0 + k * 900, np.nan) for k in range(60)]
    clean, report = _clean(_raw(bot + human))
    assert set(clean["user_id"]) == {"human"}
    assert report.dropped["bot_shopper"] == 62
    assert report.bot_shoppers == 1
    assert report.bot_examples == ["bot"]


def test_bot_rule_per_day_catches_a_slow_but_sustained_shopper() -> None:
    # one event a minute (never more than 1 per 60 s) but 1,001 events within 24 h
    rows = [
        ("crawler", f"i{k}", "view", T0 - 2 * DAY_MS + k * MINUTE_MS, np.nan) for k in range(1001)
    ]
    clean, report = _clean(_raw(rows))
    assert clean.empty
    assert report.bot_shoppers == 1
    kept, _ = _clean(_raw(rows), max_events_per_day=None)
    assert len(kept) == 1001


def test_duplicate_event_ids_with_different_content_are_dropped() -> None:
    frame = _raw([("u", "a", "view", T0, np.nan), ("u", "b", "view", T0 + 1, np.nan)] * 1)
    frame = pd.concat([frame, _raw([("u", "c", "view", T0 + 2, np.nan)])], ignore_index=True)
    frame["event_id"] = ["e1", "e1", ""]
    clean, report = _clean(frame)
    assert clean["item_id"].tolist() == ["a", "c"]
    assert report.dropped["duplicate_event_id"] == 1
    assert report.examples["duplicate_event_id"] == [11]
    assert "event_id" in clean.columns


def test_consecutive_repeats_are_kept_by_default_and_collapsed_on_request() -> None:
    rows = [
        ("u", "a", "view", T0, np.nan),
        ("u", "a", "cart", T0 + 1000, np.nan),
        ("u", "b", "view", T0 + 2000, np.nan),
        ("u", "a", "view", T0 + 3000, np.nan),
        ("v", "a", "view", T0 + 500, np.nan),  # another shopper: not a repeat of u's
    ]
    kept, report = _clean(_raw(rows))
    assert len(kept) == 5
    assert "collapsed_repeat" not in report.dropped
    collapsed, report = _clean(_raw(rows), collapse_repeats=True)
    assert collapsed["event_type"].tolist() == ["view", "view", "view", "view"]
    assert report.dropped["collapsed_repeat"] == 1
    assert report.examples["collapsed_repeat"] == [11]


def test_order_only_timestamps_skip_time_and_rate_rules_and_say_so() -> None:
    # positions 0..99 of one shopper: far before 1995, and 100 "events" in one ms apart
    frame = _raw([("u", f"i{k}", "view", k, np.nan) for k in range(100)])
    clean, report = clean_events(frame, timestamps="order")
    assert len(clean) == 100
    assert "before_floor" not in report.dropped
    assert "bot_shopper" not in report.dropped
    assert len(report.skipped) == 2


def test_missing_columns_are_a_data_error() -> None:
    with pytest.raises(DataError, match="site"):
        clean_events(_raw([("u", "a", "view", T0, np.nan)]).drop(columns="site"))


def test_report_round_trips_through_json_and_renders_a_table() -> None:
    frame = _raw([("u", "a", "view", T0, np.nan), ("u", "a", "view", T0, np.nan)])
    _, report = _clean(frame, window_ms=(T0, T0 + DAY_MS))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["rows_dropped"] == 1
    assert CleaningReport.from_dict(data) == report
    console = Console(record=True, width=200)
    console.print(report.to_table())
    text = console.export_text()
    assert "duplicate" in text and "2 rows in, 1 out, 1 dropped" in text
    assert "2023-11-14 22:13 UTC" in text  # the window is shown with its bounds


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 200)), max_size=40),
    st.integers(1, 50),
)
def test_window_counts_match_a_brute_force_count(pairs: list[tuple[int, int]], window: int) -> None:
    pairs.sort()
    users = np.asarray([u for u, _ in pairs], dtype=np.int64)
    ts = np.asarray([t for _, t in pairs], dtype=np.int64)
    got = window_counts(users, ts, window)
    expected = [
        sum(1 for v, s in pairs[: i + 1] if v == u and t - window < s <= t)
        for i, (u, t) in enumerate(pairs)
    ]
    assert got.tolist() == expected
