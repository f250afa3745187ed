"""Readers for every supported input format; each returns a cleaned `EventDataset`.

Formats (see ../shared/data/DATASETS.md for the public datasets, docs/data.md for details):

- ``events``: a generic event log, CSV, JSONL or Parquet (chosen by extension), columns
  ``user_id, item_id, event_type`` and one timestamp column, optional ``value``, ``site``,
  ``event_id``. Timestamp rule: a ``ts_ms`` or ``timestamp_ms`` column holds Unix
  milliseconds; a ``timestamp`` column holds Unix seconds (int or float) or ISO 8601 strings
  (without a zone = UTC). A ``catalogue.csv`` beside the file (``item_id`` plus attribute
  columns) gives public item attributes.
- ``s3rec``: ``user item1 item2 ...`` per line, chronological (S3-Rec's Beauty, Sports);
  ``<name>_item2attributes.json`` beside it gives item attributes.
- ``sasrec``: ``user item`` per line, grouped by user, chronological (SASRec's Video.txt).
- ``ml100k``: MovieLens 100K, a directory or its ``u.data``; ``rating`` events with ``value``;
  genres and titles from ``u.item`` (latin-1) as item attributes.
- ``taobao``: Taobao UserBehavior, ``user_id,item_id,category_id,behavior_type,unix_ts``, no
  header; pv/cart/fav/buy -> view/cart/fav/purchase; the category is an item attribute.

Item attributes are strings ``kind:value`` (``attr:17``, ``genre:Action``, ``category:2520377``).
Every reader runs `shared.cleaning.clean_events` and stores its report in
``info["cleaning"]``; any unreadable input raises `DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from shared.cleaning import CleaningConfig, clean_events
from shared.errors import DataError
from shared.events import EVENT_COLUMNS, EventDataset, EventType

FORMATS: tuple[str, ...] = ("events", "s3rec", "sasrec", "ml100k", "taobao")
EVENT_FILE_SUFFIXES: dict[str, str] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
# Timestamp columns of the `events` format, in order of preference, and their unit.
TIMESTAMP_COLUMNS: dict[str, str] = {"ts_ms": "ms", "timestamp_ms": "ms", "timestamp": "auto"}
# As Unix seconds, 1e11 is the year 5138: a `timestamp` column above it holds milliseconds.
SECONDS_CEILING = 1e11
CATALOGUE_FILE = "catalogue.csv"

TAOBAO_BEHAVIOURS: dict[str, str] = {
    "pv": EventType.VIEW.value,
    "cart": EventType.CART.value,
    "fav": EventType.FAV.value,
    "buy": EventType.PURCHASE.value,
}
# The official UserBehavior window is 2017-11-25 .. 2017-12-03 in China time (UTC+8).
_CST = timezone(timedelta(hours=8))
TAOBAO_WINDOW_MS: tuple[int, int] = (
    int(datetime(2017, 11, 25, tzinfo=_CST).timestamp() * 1000),
    int(datetime(2017, 12, 4, tzinfo=_CST).timestamp() * 1000),
)
ML100K_GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


# ---------------------------------------------------------------- shared plumbing


def _objects(cells: Sequence[object] | np.ndarray) -> pd.Series:
    """Cells as an object Series (no type inference: ids stay as given)."""
    out = np.empty(len(cells), dtype=object)
    out[:] = list(cells)
    return pd.Series(out, dtype=object)


def _raw_frame(
    users: Sequence[object] | np.ndarray,
    items: Sequence[object] | np.ndarray,
    kinds: Sequence[object] | str,
    ts_ms: np.ndarray,
    value: np.ndarray | float = np.nan,
    site: Sequence[object] | str = "",
) -> pd.DataFrame:
    """A frame in canonical column layout whose cells may still be missing."""
    return pd.DataFrame(
        {
            "user_id": _objects(users),
            "item_id": _objects(items),
            "event_type": kinds if isinstance(kinds, str) else _objects(kinds),
            "ts_ms": ts_ms,
            "value": value,
            "site": site if isinstance(site, str) else _objects(site),
        }
    )


def _finish(
    raw: pd.DataFrame,
    *,
    path: Path,
    fmt: str,
    name: str,
    timestamps: Literal["real", "order"],
    rows: np.ndarray,
    row_label: str,
    cleaning: CleaningConfig,
    item_attributes: dict[str, list[str]] | None = None,
    info: dict[str, object] | None = None,
) -> EventDataset:
    """Clean ``raw``, refuse an empty result, and wrap it as an `EventDataset`."""
    if len(raw) == 0:
        raise DataError(f"{path} holds no events")
    events, report = clean_events(
        raw, timestamps=timestamps, config=cleaning, rows=rows, row_label=row_label
    )
    if len(events) == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in report.dropped.items() if v)
        raise DataError(f"{path}: no events left after cleaning ({reasons})")
    return EventDataset(
        events=events,
        name=name,
        timestamps=timestamps,
        item_attributes=item_attributes or {},
        info={"format": fmt, "path": str(path), **(info or {}), "cleaning": report.to_dict()},
    )


def _open_text(path: Path, encoding: str = "utf-8") -> list[str]:
    """All lines of a text file; undecodable bytes or I/O errors become `DataError`."""
    try:
        return path.read_text(encoding=encoding).splitlines()
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not {encoding} text ({err.reason})") from err
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err


def _where(path: Path, label: str, row: int) -> str:
    """``file:line`` for text files, ``file, row N`` for Parquet."""
    return f"{path}:{row}" if label == "line" else f"{path}, row {row}"


def _int_field(text: str, path: Path, line: int, what: str) -> int:
    try:
        return int(text)
    except ValueError as err:
        raise DataError(f"{path}:{line}: {what} {text!r} is not an integer") from err


# ---------------------------------------------------------------- s3rec / sasrec


def _read_item2attributes(path: Path) -> dict[str, list[str]]:
    """S3-Rec's ``{"item": [attr, ...]}`` file as ``attr:<id>`` strings."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable item2attributes JSON file ({err})") from err
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DataError(f'{path}: expected {{"item": [attribute, ...], ...}}')
    return {str(k): [f"attr:{a}" for a in v] for k, v in data.items()}


def read_s3rec(path: Path, cleaning: CleaningConfig | None = None) -> EventDataset:
    """S3-Rec sequence file; timestamps are the within-user positions (order only)."""
    users: list[str] = []
    items: list[str] = []
    positions: list[int] = []
    first_line: dict[str, int] = {}
    rows: list[int] = []
    for line_no, line in enumerate(_open_text(path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DataError(f"{path}:{line_no}: expected 'user item1 item2 ...'")
        user = parts[0]
        if user in first_line:
            hint = " (a 'user item' pair file? use format sasrec)" if len(parts) == 2 else ""
            raise DataError(
                f"{path}:{line_no}: user {user} already has a sequence on line "
                f"{first_line[user]}; s3rec files hold one line per user{hint}"
            )
        first_line[user] = line_no
        users.extend([user] * (len(parts) - 1))
        items.extend(parts[1:])
        positions.extend(range(len(parts) - 1))
        rows.extend([line_no] * (len(parts) - 1))
    raw = _raw_frame(users, items, EventType.VIEW.value, np.asarray(positions, dtype=np.int64))
    attr_path = path.with_name(f"{path.stem}_item2attributes.json")
    attributes = _read_item2attributes(attr_path) if attr_path.is_file() else {}
    return _finish(
        raw,
        path=path,
        fmt="s3rec",
        name=path.stem,
        timestamps="order",
        rows=np.asarray(rows, dtype=np.int64),
        row_label="line",
        cleaning=cleaning or CleaningConfig(),
        item_attributes=attributes,
        info={"attributes_file": str(attr_path) if attributes else None},
    )


def read_sasrec(path: Path, cleaning: CleaningConfig | None = None) -> EventDataset:
    """SASRec pair file (``user item`` per line, chronological); order-only timestamps."""
    users: list[str] = []
    items: list[str] = []
    rows: list[int] = []
    for line_no, line in enumerate(_open_text(path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            hint = " (a sequence file? use format s3rec)" if len(parts) > 2 else ""
            raise DataError(
                f"{path}:{line_no}: expected 'user item', got {len(parts)} field(s){hint}"
            )
        users.append(parts[0])
        items.append(parts[1])
        rows.append(line_no)
    # Position within the user's lines = time order (lines of a user need not be adjacent).
    positions = pd.Series(users, dtype=object).groupby(users, sort=False).cumcount().to_numpy()
    raw = _raw_frame(users, items, EventType.VIEW.value, positions.astype(np.int64))
    return _finish(
        raw,
        path=path,
        fmt="sasrec",
        name=path.stem,
        timestamps="order",
        rows=np.asarray(rows, dtype=np.int64),
        row_label="line",
        cleaning=cleaning or CleaningConfig(),
    )


# ---------------------------------------------------------------- MovieLens 100K


def _read_ml100k_items(item_path: Path) -> dict[str, list[str]]:
    """Genres, title and release year of each movie from ``u.item`` (and ``u.genre``)."""
    genre_path = item_path.with_name("u.genre")
    genres = list(ML100K_GENRES)
    if genre_path.is_file():
        genres = [g.split("|")[0] for g in _open_text(genre_path, "latin-1") if g.strip()]
    attributes: dict[str, list[str]] = {}
    for line_no, line in enumerate(_open_text(item_path, "latin-1"), start=1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != 5 + len(genres):
            raise DataError(
                f"{item_path}:{line_no}: expected {5 + len(genres)} '|'-separated fields "
                f"(id|title|release|video release|url|{len(genres)} genre flags), got {len(parts)}"
            )
        flags = parts[5:]
        if not all(f in {"0", "1"} for f in flags):
            raise DataError(f"{item_path}:{line_no}: genre flags must be 0 or 1")
        attrs = [f"genre:{g}" for g, f in zip(genres, flags, strict=True) if f == "1"]
        if parts[1]:
            attrs.append(f"title:{parts[1]}")
        if len(parts[2]) >= 4 and parts[2][-4:].isdigit():
            attrs.append(f"year:{parts[2][-4:]}")
        attributes[parts[0]] = attrs
    return attributes


def read_ml100k(path: Path, cleaning: CleaningConfig | None = None) -> EventDataset:
    """MovieLens 100K ratings as ``rating`` events; ties in time broken by item id."""
    data_path = path / "u.data" if path.is_dir() else path
    if not data_path.is_file():
        raise DataError(f"{path} is not an ml-100k directory: {data_path.name} not found")
    users: list[str] = []
    items: list[int] = []
    ratings: list[float] = []
    stamps: list[int] = []
    rows: list[int] = []
    for line_no, line in enumerate(_open_text(data_path, "latin-1"), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 4:
            raise DataError(
                f"{data_path}:{line_no}: expected 'user<TAB>item<TAB>rating<TAB>unix_ts', "
                f"got {len(parts)} tab-separated field(s)"
            )
        users.append(parts[0].strip())
        items.append(_int_field(parts[1].strip(), data_path, line_no, "item id"))
        ratings.append(float(_int_field(parts[2].strip(), data_path, line_no, "rating")))
        stamps.append(_int_field(parts[3].strip(), data_path, line_no, "timestamp"))
        rows.append(line_no)
    # u.data is unsorted and has many equal timestamps: fix the order as (user, time, item).
    order = np.lexsort(
        (
            np.asarray(items),
            np.asarray(stamps),
            pd.factorize(np.asarray(users, dtype=object), sort=True)[0],
        )
    )
    raw = _raw_frame(
        np.asarray(users, dtype=object)[order],
        np.asarray([str(i) for i in items], dtype=object)[order],
        EventType.RATING.value,
        np.asarray(stamps, dtype=np.int64)[order] * 1000,
        value=np.asarray(ratings)[order],
    )
    item_path = data_path.with_name("u.item")
    attributes = _read_ml100k_items(item_path) if item_path.is_file() else {}
    return _finish(
        raw,
        path=data_path,
        fmt="ml100k",
        name="ml-100k",
        timestamps="real",
        rows=np.asarray(rows, dtype=np.int64)[order],
        row_label="line",
        cleaning=cleaning or CleaningConfig(),
        item_attributes=attributes,
        info={"attributes_file": str(item_path) if attributes else None},
    )


# ---------------------------------------------------------------- Taobao UserBehavior


def read_taobao(path: Path, cleaning: CleaningConfig | None = None) -> EventDataset:
    """Taobao UserBehavior CSV; rows outside the official 9-day window are cleaned away.

    A row with fewer than five fields (a cut-off line) counts as missing fields; more than
    five, or a non-integer timestamp, is a format error.
    """
    users: list[str] = []
    items: list[str] = []
    kinds: list[str] = []
    stamps: list[float] = []
    rows: list[int] = []
    categories: dict[str, list[str]] = {}
    for line_no, line in enumerate(_open_text(path), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) > 5 or (not rows and len(parts) != 5):
            raise DataError(
                f"{path}:{line_no}: expected 5 comma-separated fields "
                f"(user_id,item_id,category_id,behavior_type,unix_ts), got {len(parts)}"
            )
        parts += [""] * (5 - len(parts))
        user, item, category, behaviour, stamp = parts
        users.append(user)
        items.append(item)
        kinds.append(TAOBAO_BEHAVIOURS.get(behaviour, behaviour))
        stamps.append(
            math.nan if not stamp else _int_field(stamp, path, line_no, "timestamp") * 1000
        )
        rows.append(line_no)
        if item and category:
            known = categories.setdefault(item, [])
            if f"category:{category}" not in known:
                known.append(f"category:{category}")
    config = cleaning or default_cleaning("taobao")
    return _finish(
        _raw_frame(users, items, kinds, np.asarray(stamps, dtype=np.float64)),
        path=path,
        fmt="taobao",
        name=path.stem,
        timestamps="real",
        rows=np.asarray(rows, dtype=np.int64),
        row_label="line",
        cleaning=config,
        item_attributes=categories,
    )


# ---------------------------------------------------------------- generic event logs


def _timestamps_to_ms(
    cells: Sequence[object], unit: str, column: str, path: Path, rows: np.ndarray, label: str
) -> np.ndarray:
    """Timestamp cells -> float64 ms (NaN = missing); unparseable cells raise `DataError`.

    ``unit`` "ms": numbers are milliseconds. ``unit`` "auto": numbers (or numeric strings)
    are Unix seconds, other strings ISO 8601 (naive = UTC).
    """
    series = _objects(cells)
    text = series.where(series.notna(), "").astype(str).str.strip()
    blank = (text == "").to_numpy() | series.isna().to_numpy()
    if series.map(lambda v: isinstance(v, bool)).any():
        raise DataError(f"{path}: column {column} holds true/false, not timestamps")
    numeric = pd.to_numeric(text.where(~blank, "nan"), errors="coerce").to_numpy(np.float64)
    out = np.full(len(series), np.nan)
    is_num = ~blank & np.isfinite(numeric)
    if unit == "ms":
        out[is_num] = numeric[is_num]
        bad = ~blank & ~is_num
    else:
        seconds = numeric[is_num]
        if len(seconds) and float(np.median(seconds)) > SECONDS_CEILING:
            raise DataError(
                f"{path}: column {column} holds values like {seconds[0]:.0f}, which as Unix "
                "seconds are after the year 5000; name the column timestamp_ms or ts_ms if "
                "they are milliseconds"
            )
        out[is_num] = seconds * 1000.0
        iso = ~blank & ~is_num
        if iso.any():
            parsed = pd.to_datetime(text[iso], format="ISO8601", utc=True, errors="coerce")
            ms = parsed.dt.as_unit("ms")
            ok = ms.notna().to_numpy()
            vals = np.full(len(ms), np.nan)
            vals[ok] = ms[ok].astype("int64").to_numpy(dtype=np.float64)
            out[iso] = vals
        bad = iso & np.isnan(out)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        what = "a number of milliseconds" if unit == "ms" else "Unix seconds or ISO 8601"
        raise DataError(
            f"{_where(path, label, int(rows[i]))}: {column} {text.iloc[i]!r} is not {what} "
            f"({int(bad.sum())} such row(s))"
        )
    return out


def _values_to_float(
    cells: Sequence[object], path: Path, rows: np.ndarray, label: str
) -> np.ndarray:
    """``value`` cells -> float64 (blank = NaN); anything non-numeric raises `DataError`."""
    series = _objects(cells)
    text = series.where(series.notna(), "").astype(str).str.strip()
    blank = (text == "").to_numpy()
    out = pd.to_numeric(text.where(~blank, "nan"), errors="coerce").to_numpy(np.float64)
    bad = ~blank & ~np.isfinite(out)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{_where(path, label, int(rows[i]))}: value {text.iloc[i]!r} is not a number"
        )
    return out


def _id_cell(value: object, path: Path, row: int, label: str, column: str) -> object:
    """A JSON cell as an id string (None stays None, integral floats lose their .0)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataError(f"{_where(path, label, row)}: {column} must be a string or number")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _read_event_columns(path: Path, kind: str) -> tuple[dict[str, list[object]], np.ndarray, str]:
    """Columns of an event file as lists of cells, plus each row's source number and label."""
    if kind == "csv":
        try:
            with path.open(encoding="utf-8", newline="") as fh:
                reader = csv.reader(fh)
                header = next(reader, None)
                if header is None:
                    raise DataError(f"{path} is empty")
                header = [h.strip() for h in header]
                columns: dict[str, list[object]] = {h: [] for h in header}
                rows: list[int] = []
                for record in reader:
                    if not record or all(not c.strip() for c in record):
                        continue
                    if len(record) != len(header):
                        raise DataError(
                            f"{path}:{reader.line_num}: {len(record)} field(s), "
                            f"the header has {len(header)}"
                        )
                    for name, cell in zip(header, record, strict=True):
                        columns[name].append(cell)
                    rows.append(reader.line_num)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason})") from err
        except csv.Error as err:
            raise DataError(f"{path}: not a readable CSV file ({err})") from err
        if len(set(header)) != len(header):
            raise DataError(f"{path}: the header repeats a column name: {header}")
        return columns, np.asarray(rows, dtype=np.int64), "line"
    if kind == "jsonl":
        columns = {}
        rows = []
        for line_no, line in enumerate(_open_text(path), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: expected one JSON object per line")
            for name in obj.keys() - columns.keys():
                columns[name] = [None] * len(rows)
            for name, cells in columns.items():
                cells.append(obj.get(name))
            rows.append(line_no)
        return columns, np.asarray(rows, dtype=np.int64), "line"
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from err
    columns = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_timestamp(col.type):
            # Naive timestamps are UTC; tz-aware ones become UTC.
            ms = col.cast(pa.timestamp("ms", tz=col.type.tz)).cast(pa.int64())
            columns[name] = [None if v is None else f"{v}" for v in ms.to_pylist()]
            columns.setdefault("__ms_columns__", []).append(name)
        elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            columns[name] = col.to_pylist()
        else:
            try:
                columns[name] = col.cast(pa.string()).to_pylist()
            except pa.ArrowException as err:
                raise DataError(f"{path}: column {name} of type {col.type} is not text") from err
    return columns, np.arange(1, table.num_rows + 1, dtype=np.int64), "row"


def _read_catalogue(path: Path) -> dict[str, list[str]]:
    """``catalogue.csv`` (``item_id`` + attribute columns) as ``column:value`` strings."""
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            records = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: not a readable catalogue CSV ({err})") from err
    if records and "item_id" not in records[0]:
        raise DataError(f"{path}: the catalogue needs an item_id column")
    return {
        r["item_id"]: [f"{k}:{v}" for k, v in r.items() if k != "item_id" and v] for r in records
    }


def find_event_file(directory: Path) -> Path:
    """The one ``events.{parquet,csv,jsonl}`` file of a directory (as `write_synthetic` makes)."""
    found = [
        directory / f"events{s}"
        for s in EVENT_FILE_SUFFIXES
        if (directory / f"events{s}").is_file()
    ]
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise DataError(f"{directory} is a directory with {what} events.{{parquet,csv,jsonl}} file")
    return found[0]


def read_events(path: Path, cleaning: CleaningConfig | None = None) -> EventDataset:
    """A generic event log (CSV, JSONL or Parquet by extension) in the `events` format."""
    if path.is_dir():
        path = find_event_file(path)
    kind = EVENT_FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: cannot tell the file type from {path.suffix or 'no extension'!r}; "
            f"expected one of {', '.join(EVENT_FILE_SUFFIXES)}"
        )
    columns, rows, label = _read_event_columns(path, kind)
    ms_columns = columns.pop("__ms_columns__", [])
    if not rows.size:
        raise DataError(f"{path} holds no events")
    required = ["user_id", "item_id", "event_type"]
    missing = [c for c in required if c not in columns]
    ts_column = next((c for c in TIMESTAMP_COLUMNS if c in columns), None)
    if missing or ts_column is None:
        needs = missing + ([] if ts_column else ["timestamp (or ts_ms / timestamp_ms)"])
        raise DataError(f"{path}: missing column(s) {', '.join(needs)}; found {sorted(columns)}")
    unit = "ms" if ts_column in ms_columns else TIMESTAMP_COLUMNS[ts_column]
    ids = {
        c: columns[c]
        if kind == "csv"  # CSV cells are strings already
        else [_id_cell(v, path, int(r), label, c) for v, r in zip(columns[c], rows, strict=True)]
        for c in ("user_id", "item_id", "event_type", "site", "event_id")
        if c in columns
    }
    raw = _raw_frame(
        ids["user_id"],
        ids["item_id"],
        ids["event_type"],
        _timestamps_to_ms(columns[ts_column], unit, ts_column, path, rows, label),
        value=_values_to_float(columns["value"], path, rows, label)
        if "value" in columns
        else np.nan,
        site=ids.get("site", ""),
    )
    if "event_id" in ids:
        raw["event_id"] = pd.Series(ids["event_id"], dtype=object)
    catalogue = path.with_name(CATALOGUE_FILE)
    attributes = _read_catalogue(catalogue) if catalogue.is_file() else {}
    ignored = sorted(set(columns) - {*EVENT_COLUMNS, ts_column, "event_id"})
    return _finish(
        raw,
        path=path,
        fmt="events",
        name=path.stem if path.stem != "events" else path.parent.name,
        timestamps="real",
        rows=rows,
        row_label=label,
        cleaning=cleaning or CleaningConfig(),
        item_attributes=attributes,
        info={
            "file_type": kind,
            "timestamp_column": ts_column,
            "ignored_columns": ignored,
            "attributes_file": str(catalogue) if attributes else None,
        },
    )


def write_events(events: pd.DataFrame, path: Path) -> Path:
    """Write a canonical event log in the `events` format (type by extension), atomically.

    Columns ``user_id, item_id, event_type, ts_ms, value, site`` (+ ``event_id`` when
    present); `read_events` reads the file back to the same events.
    """
    kind = EVENT_FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown event file type; use one of {', '.join(EVENT_FILE_SUFFIXES)}"
        )
    columns = [*EVENT_COLUMNS, *(["event_id"] if "event_id" in events.columns else [])]
    frame = events[columns].copy()
    for c in columns:
        if c not in {"ts_ms", "value"}:
            frame[c] = frame[c].astype(str)
    frame["ts_ms"] = frame["ts_ms"].astype(np.int64)
    frame["value"] = frame["value"].astype(np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if kind == "csv":
            frame.to_csv(tmp, index=False, float_format="%.17g")
        elif kind == "jsonl":
            frame.to_json(tmp, orient="records", lines=True, double_precision=15)
        else:
            frame.to_parquet(tmp, index=False)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- entry points


def default_cleaning(fmt: str) -> CleaningConfig:
    """The cleaning rules a format is read with unless told otherwise."""
    if fmt == "taobao":
        return CleaningConfig(window_ms=TAOBAO_WINDOW_MS)
    return CleaningConfig()


def read_dataset(path: Path, fmt: str, *, cleaning: CleaningConfig | None = None) -> EventDataset:
    """Read ``path`` in format ``fmt``; raises `DataError` with one clear reason.

    ``cleaning`` overrides the format's default cleaning thresholds (the Taobao reader's
    default adds the dataset's collection window).
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.is_dir() and fmt not in {"ml100k", "events"}:
        raise DataError(f"{path} is a directory; give the data file")
    readers = {
        "events": read_events,
        "s3rec": read_s3rec,
        "sasrec": read_sasrec,
        "ml100k": read_ml100k,
        "taobao": read_taobao,
    }
    return readers[fmt](path, cleaning or default_cleaning(fmt))


def describe_dataset(dataset: EventDataset) -> dict[str, object]:
    """Summary numbers of a dataset: sizes, sequence lengths, event types, time range."""
    ev = dataset.events
    lengths = ev.groupby("user_id", sort=False).size().to_numpy()
    counts = ev["event_type"].value_counts()
    out: dict[str, object] = {
        "name": dataset.name,
        "format": dataset.info.get("format"),
        "users": dataset.n_users,
        "items": dataset.n_items,
        "events": len(ev),
        "seq_len_median": float(np.median(lengths)),
        "seq_len_mean": round(float(lengths.mean()), 2),
        "seq_len_max": int(lengths.max()),
        "event_types": {t.value: int(counts.get(t.value, 0)) for t in EventType},
        "sites": int(ev["site"].replace("", np.nan).nunique()),
        "timestamps": dataset.timestamps,
        "items_with_attributes": len(dataset.item_attributes),
    }
    if dataset.timestamps == "real":
        first, last = int(ev["ts_ms"].min()), int(ev["ts_ms"].max())
        out["time_first"] = datetime.fromtimestamp(first / 1000, UTC).isoformat()
        out["time_last"] = datetime.fromtimestamp(last / 1000, UTC).isoformat()
    out["cleaning"] = dataset.info.get("cleaning")
    return out
