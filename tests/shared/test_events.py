"""The canonical event schema: dtype checks, the stable tie-break and EventDataset."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import DataError
from shared.events import (
    EVENT_COLUMNS,
    EVENT_TYPE_CODES,
    EventDataset,
    EventType,
    check_event_frame,
    empty_events,
    sort_events,
)


def _frame(users: list[str], ts: list[int], kind: str = "view") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": users,
            "item_id": [f"i{k}" for k in range(len(users))],
            "event_type": kind,
            "ts_ms": np.asarray(ts, dtype=np.int64),
            "value": np.nan,
            "site": "",
        }
    )


def test_empty_events_has_canonical_columns_and_passes_the_check() -> None:
    events = empty_events()
    assert tuple(events.columns) == EVENT_COLUMNS
    assert events["ts_ms"].dtype == np.int64
    check_event_frame(events)


def test_event_type_codes_start_at_one_and_cover_every_type() -> None:
    assert sorted(EVENT_TYPE_CODES.values()) == list(range(1, len(EventType) + 1))
    assert set(EVENT_TYPE_CODES) == {t.value for t in EventType}


def test_check_refuses_a_missing_column() -> None:
    with pytest.raises(DataError, match="site"):
        check_event_frame(_frame(["a"], [1]).drop(columns="site"))


def test_check_refuses_float_timestamps() -> None:
    frame = _frame(["a"], [1])
    frame["ts_ms"] = frame["ts_ms"].astype(float)
    with pytest.raises(DataError, match="int64"):
        check_event_frame(frame)


def test_check_refuses_unknown_event_types() -> None:
    with pytest.raises(DataError, match="click"):
        check_event_frame(_frame(["a"], [1], kind="click"))


def test_event_dataset_counts_users_and_items_and_validates() -> None:
    ds = EventDataset(events=_frame(["a", "a", "b"], [1, 2, 3]), name="x", timestamps="real")
    assert (ds.n_users, ds.n_items) == (2, 3)
    with pytest.raises(DataError):
        EventDataset(events=_frame(["a"], [1], kind="bogus"), name="x", timestamps="real")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 3)), min_size=1, max_size=30))
def test_sort_events_orders_by_user_then_time_and_keeps_input_order_on_ties(
    rows: list[tuple[str, int]],
) -> None:
    # Arrange: item ids record the input position
    frame = _frame([u for u, _ in rows], [t for _, t in rows])
    frame["item_id"] = [str(k) for k in range(len(rows))]
    # Act
    out = sort_events(frame)
    # Assert: sorted by (user, ts), and equal (user, ts) keep input order
    keys = list(zip(out["user_id"], out["ts_ms"], out["item_id"].astype(int), strict=True))
    assert keys == sorted(keys)
    assert list(out.index) == list(range(len(rows)))
