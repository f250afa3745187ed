"""Readers for every supported input format; each returns an `EventDataset` in canonical form.

Formats (see ../shared/data/DATASETS.md for the public datasets):

- ``s3rec``: ``user item1 item2 ...`` per line, chronological (S3-Rec's Beauty, Sports).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from shared.errors import DataError
from shared.events import EventDataset, EventType

FORMATS: tuple[str, ...] = ("s3rec",)


def read_s3rec(path: Path) -> EventDataset:
    """S3-Rec sequence file; timestamps are the within-user positions (order only)."""
    users: list[str] = []
    items: list[str] = []
    positions: list[int] = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise DataError(f"{path}:{line_no}: expected 'user item1 item2 ...'")
            users.extend([parts[0]] * (len(parts) - 1))
            items.extend(parts[1:])
            positions.extend(range(len(parts) - 1))
    if not users:
        raise DataError(f"{path} holds no events")
    events = pd.DataFrame(
        {
            "user_id": users,
            "item_id": items,
            "event_type": EventType.VIEW.value,
            "ts_ms": np.asarray(positions, dtype=np.int64),
            "value": np.nan,
            "site": "",
        }
    )
    return EventDataset(events=events, name=path.stem, timestamps="order", info={"format": "s3rec"})


def read_dataset(path: Path, fmt: str) -> EventDataset:
    """Read ``path`` in format ``fmt``; raises `DataError` with one clear reason."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.is_dir():
        raise DataError(f"{path} is a directory; give the data file")
    return read_s3rec(path)
