"""Behaviour events: the one schema every reader, store and model agrees on.

An event log in memory is a pandas DataFrame with the columns of `EVENT_COLUMNS`:

- ``user_id`` (str): the shopper, opaque; never leaves a site.
- ``item_id`` (str): the product's raw catalogue id.
- ``event_type`` (str): one of `EventType`.
- ``ts_ms`` (int64): milliseconds since the Unix epoch (UTC). Datasets that only give an
  order (S3-Rec, SASRec files) carry the position in the user's sequence instead, and say so in
  `EventDataset.timestamps`.
- ``value`` (float64): the rating for ``rating`` events, NaN otherwise.
- ``site`` (str): the store or app the event was recorded at ("" when unknown).

Rows with equal ``(user_id, ts_ms)`` keep their input order: `sort_events` is stable, which
is the deterministic tie-break every sequence is built with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import numpy as np
import pandas as pd

from shared.errors import DataError


class EventType(StrEnum):
    """What a shopper did with an item."""

    VIEW = "view"
    CART = "cart"
    FAV = "fav"
    PURCHASE = "purchase"
    RATING = "rating"


# Integer codes for model inputs; 0 is padding, like item index 0.
EVENT_TYPE_CODES: dict[str, int] = {t.value: i + 1 for i, t in enumerate(EventType)}

EVENT_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "event_type", "ts_ms", "value", "site")

# Timestamps outside this window are impossible for e-commerce behaviour logs.
MIN_TS_MS = 0
MAX_FUTURE_SKEW_MS = 24 * 3600 * 1000  # one day of clock skew is tolerated


def empty_events() -> pd.DataFrame:
    """An event log with no rows and the canonical dtypes."""
    return pd.DataFrame(
        {
            "user_id": pd.Series([], dtype=object),
            "item_id": pd.Series([], dtype=object),
            "event_type": pd.Series([], dtype=object),
            "ts_ms": pd.Series([], dtype=np.int64),
            "value": pd.Series([], dtype=np.float64),
            "site": pd.Series([], dtype=object),
        }
    )


def check_event_frame(events: pd.DataFrame) -> None:
    """Raise `DataError` unless ``events`` has the canonical columns and dtypes."""
    missing = [c for c in EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise DataError(f"event log lacks column(s) {missing}; expected {list(EVENT_COLUMNS)}")
    if events["ts_ms"].dtype != np.int64:
        raise DataError(f"column ts_ms must be int64 milliseconds, got {events['ts_ms'].dtype}")
    unknown = set(events["event_type"].unique()) - set(EVENT_TYPE_CODES)
    if unknown:
        raise DataError(f"unknown event type(s) {sorted(map(str, unknown))}")


def sort_events(events: pd.DataFrame) -> pd.DataFrame:
    """Events ordered by shopper then time; equal timestamps keep their input order."""
    return events.sort_values(["user_id", "ts_ms"], kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class EventDataset:
    """A cleaned event log plus what is known about where it came from."""

    events: pd.DataFrame
    name: str
    # "real": ts_ms are wall-clock times; "order": only the within-user order is known.
    timestamps: Literal["real", "order"]
    # Public item side information (categories, attribute ids), raw item id -> features.
    item_attributes: dict[str, list[str]] = field(default_factory=dict)
    # Free-form provenance (source path, format, cleaning report as a dict).
    info: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_event_frame(self.events)

    @property
    def n_users(self) -> int:
        """Number of distinct shoppers."""
        return int(self.events["user_id"].nunique())

    @property
    def n_items(self) -> int:
        """Number of distinct items that occur in the events."""
        return int(self.events["item_id"].nunique())
