"""Event-log cleaning that drops bad rows and reports every drop with its reason and row numbers.

`clean_events` takes an event log in canonical column layout whose cells may still be missing
or wrong (readers build one per file), and returns the clean log in canonical dtypes plus a
`CleaningReport`. Nothing is dropped silently: every rule has a counter, a few example source
row numbers, and its threshold in `CleaningReport.rules`.

Rules, applied in this order (a row is counted under the first rule it breaks):

1. ``missing_field``: empty ``user_id``, ``item_id``, ``event_type`` or ``ts_ms``, or a
   ``rating`` event without a finite ``value``.
2. ``unknown_event_type``: an event type outside ``view|cart|fav|purchase|rating``.
3. Impossible timestamps (real timestamps only): ``negative_timestamp``; ``before_floor``
   (before `CleaningConfig.min_ts_ms`, default 1995-01-01 UTC); ``in_future`` (more than
   `CleaningConfig.max_future_ms` after ``now``); ``outside_window`` (outside a dataset's
   known collection window, when one is given).
4. ``duplicate``: a row equal in every column to an earlier row (the first one is kept);
   ``duplicate_event_id``: a row whose ``event_id`` an earlier, different row already used.
5. ``bot_shopper``: every event of a shopper whose rate is humanly implausible: more than
   `CleaningConfig.max_events_per_minute` events in some 60 s window, or more than
   `CleaningConfig.max_events_per_day` events in some 24 h window (sliding windows).
6. ``collapsed_repeat`` (only with `CleaningConfig.collapse_repeats`): an event on the same
   item as the shopper's previous event. Consecutive repeats are real behaviour (view, then
   cart, then purchase of one item), so they are kept unless asked.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import pandas as pd
from rich.table import Table

from shared.errors import DataError
from shared.events import EVENT_COLUMNS, EVENT_TYPE_CODES, MAX_FUTURE_SKEW_MS, EventType

# E-commerce logs cannot predate 1995 (Amazon and eBay opened that year); ml-100k starts 1997.
DEFAULT_MIN_TS_MS = 788_918_400_000  # 1995-01-01T00:00:00Z
MINUTE_MS = 60_000
DAY_MS = 86_400_000
N_EXAMPLES = 5

REASONS: dict[str, str] = {
    "missing_field": "empty user_id, item_id, event_type or timestamp, or rating without value",
    "unknown_event_type": "event type not in view|cart|fav|purchase|rating",
    "negative_timestamp": "timestamp before 1970-01-01",
    "before_floor": "timestamp before the floor",
    "in_future": "timestamp more than the allowed skew after now",
    "outside_window": "timestamp outside the dataset's collection window",
    "duplicate": "exact duplicate of an earlier row",
    "duplicate_event_id": "event_id already used by a different earlier row",
    "bot_shopper": "all events of a shopper with a bot-like event rate",
    "collapsed_repeat": "same item as the shopper's previous event (collapse_repeats)",
}


@dataclass(frozen=True)
class CleaningConfig:
    """Thresholds of the cleaning rules; ``None`` switches a rule off."""

    min_ts_ms: int | None = DEFAULT_MIN_TS_MS
    # Reference time for ``in_future``; None = the wall clock when cleaning runs.
    now_ms: int | None = None
    max_future_ms: int | None = MAX_FUTURE_SKEW_MS
    # Known collection window [start, end) in ms, e.g. Taobao's 9 days.
    window_ms: tuple[int, int] | None = None
    # One event per second sustained for a minute is beyond a human; the busiest real
    # shoppers in the datasets here reach 30/min (ml-100k) and 14/min (Taobao).
    max_events_per_minute: int | None = 60
    # The busiest real day here is 737 ratings (ml-100k user 405); Taobao peaks at 219.
    max_events_per_day: int | None = 1000
    collapse_repeats: bool = False


@dataclass(frozen=True)
class CleaningReport:
    """What cleaning dropped, per reason, with example source rows."""

    rows_in: int
    rows_out: int
    # What the example numbers count: "line" (1-based line of a text file) or "row".
    row_label: str
    dropped: dict[str, int]
    examples: dict[str, list[int]]
    bot_shoppers: int = 0
    bot_examples: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rules: dict[str, object] = field(default_factory=dict)

    @property
    def rows_dropped(self) -> int:
        """Total number of rows removed."""
        return self.rows_in - self.rows_out

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready form."""
        out = asdict(self)
        out["rows_dropped"] = self.rows_dropped
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> CleaningReport:
        """Inverse of `to_dict`."""
        fields = {k: v for k, v in data.items() if k != "rows_dropped"}
        return cls(**fields)  # type: ignore[arg-type]

    def _rule_text(self, reason: str) -> str:
        """The rule's description with the threshold it ran with."""
        r = self.rules

        def when(key: str) -> str:
            ms = r.get(key)
            if not isinstance(ms, int):
                return "?"
            return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")

        extra = {
            "before_floor": f" ({when('min_ts_ms')})",
            "in_future": f" ({_hours(r.get('max_future_ms'))} h after {when('now_ms')})",
            "outside_window": "",
            "bot_shopper": (
                f" (> {r.get('max_events_per_minute')} per 60 s"
                f" or > {r.get('max_events_per_day')} per 24 h)"
            ),
        }.get(reason, "")
        window = r.get("window_ms")
        if reason == "outside_window" and isinstance(window, list | tuple):
            fmt = "%Y-%m-%d %H:%M UTC"
            start, end = (datetime.fromtimestamp(int(w) / 1000, UTC).strftime(fmt) for w in window)
            extra = f" [{start}, {end})"
        return REASONS[reason] + extra

    def to_table(self) -> Table:
        """A rich table: one line per rule with its count and example rows."""
        title = (
            f"cleaning: {self.rows_in:,} rows in, {self.rows_out:,} out, "
            f"{self.rows_dropped:,} dropped"
        )
        table = Table(title=title, title_justify="left")
        table.add_column("reason")
        table.add_column("rows", justify="right")
        table.add_column(f"example {self.row_label}s")
        table.add_column("rule")
        for reason, count in self.dropped.items():
            examples = ", ".join(str(r) for r in self.examples.get(reason, []))
            rule = self._rule_text(reason)
            if reason == "bot_shopper" and self.bot_shoppers:
                rule += f" ({self.bot_shoppers} shopper(s): {', '.join(self.bot_examples)})"
            table.add_row(reason, f"{count:,}", examples, rule)
        for skipped in self.skipped:
            table.add_row("[dim]skipped[/]", "", "", f"[dim]{skipped}[/]")
        return table


def _hours(ms: object) -> str:
    return f"{ms / 3_600_000:g}" if isinstance(ms, int) else "?"


def _is_missing(col: pd.Series) -> np.ndarray:
    """True where a cell is null or a blank string."""
    missing = col.isna().to_numpy()
    if col.dtype.kind in "fiub":
        return missing
    text = col.astype(object).where(~missing, "").astype(str).str.strip()
    return missing | (text == "").to_numpy()


def window_counts(users: np.ndarray, ts: np.ndarray, window_ms: int) -> np.ndarray:
    """Events of the same shopper in ``(ts - window_ms, ts]`` for each event.

    ``users`` (N,) int codes and ``ts`` (N,) int64 must be sorted by user, then time.
    """
    n = len(ts)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # Shift every shopper onto its own stretch of one line so that one searchsorted serves all.
    span = int(ts.max()) - int(ts.min()) + window_ms + 1
    codes = users - users.min()
    if int(codes.max()) + 1 > (2**62) // span:
        raise DataError("timestamps span too wide to check event rates")
    key = codes.astype(np.int64) * span + (ts - ts.min())
    first = np.searchsorted(key, key - window_ms, side="right")
    return np.arange(n, dtype=np.int64) - first + 1


class _Dropper:
    """Keeps the surviving-row mask and the per-reason counts and examples."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows
        self.keep = np.ones(len(rows), dtype=bool)
        self.dropped: dict[str, int] = {}
        self.examples: dict[str, list[int]] = {}

    def drop(self, reason: str, bad: np.ndarray) -> None:
        hit = bad & self.keep
        self.dropped[reason] = int(hit.sum())
        self.examples[reason] = [int(r) for r in self.rows[np.flatnonzero(hit)[:N_EXAMPLES]]]
        self.keep &= ~hit


def clean_events(
    events: pd.DataFrame,
    *,
    timestamps: Literal["real", "order"] = "real",
    config: CleaningConfig | None = None,
    rows: np.ndarray | None = None,
    row_label: str = "row",
) -> tuple[pd.DataFrame, CleaningReport]:
    """Drop bad rows of ``events`` and report each drop; returns (clean events, report).

    ``events`` has the columns of `EVENT_COLUMNS` (plus optionally ``event_id``) but cells may
    be missing; ``ts_ms`` is numeric (NaN = missing). ``rows`` gives each row's number in the
    source (default 1..N). With ``timestamps="order"`` (positions, not times) the timestamp
    and rate rules are skipped and say so in the report. The clean log keeps the input order.
    """
    cfg = config or CleaningConfig()
    absent = [c for c in EVENT_COLUMNS if c not in events.columns]
    if absent:
        raise DataError(f"event log lacks column(s) {absent}; expected {list(EVENT_COLUMNS)}")
    n = len(events)
    src_rows = np.arange(1, n + 1) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(src_rows) != n:
        raise DataError("row numbers do not match the events")
    frame = events.reset_index(drop=True)
    has_event_id = "event_id" in frame.columns
    d = _Dropper(src_rows)
    skipped: list[str] = []

    # 1-2. missing fields, unknown event types
    values = pd.to_numeric(frame["value"], errors="coerce").to_numpy(dtype=np.float64)
    raw_kinds = frame["event_type"].astype(object).where(~_is_missing(frame["event_type"]), "")
    kinds = raw_kinds.astype(str).str.strip().to_numpy(dtype=object)
    missing = (
        _is_missing(frame["user_id"])
        | _is_missing(frame["item_id"])
        | (kinds == "")
        | _is_missing(frame["ts_ms"])
        | ((kinds == EventType.RATING.value) & ~np.isfinite(values))
    )
    d.drop("missing_field", missing)
    d.drop("unknown_event_type", ~np.isin(kinds, list(EVENT_TYPE_CODES)))

    ts_float = pd.to_numeric(frame["ts_ms"], errors="coerce").to_numpy(dtype=np.float64)
    # Clip first: an absurd float must become an impossible timestamp, not an overflow.
    ts_float = np.clip(np.nan_to_num(ts_float), -(2.0**62), 2.0**62)
    ts = np.where(d.keep, np.rint(ts_float), 0).astype(np.int64)

    # 3. impossible timestamps
    now_ms = cfg.now_ms if cfg.now_ms is not None else int(time.time() * 1000)
    d.drop("negative_timestamp", ts < 0)
    if timestamps == "real":
        if cfg.min_ts_ms is not None:
            d.drop("before_floor", ts < cfg.min_ts_ms)
        if cfg.max_future_ms is not None:
            d.drop("in_future", ts > now_ms + cfg.max_future_ms)
        if cfg.window_ms is not None:
            start, end = cfg.window_ms
            d.drop("outside_window", (ts < start) | (ts >= end))
    else:
        skipped.append("timestamp floor, future and window rules (order-only timestamps)")

    clean = pd.DataFrame(
        {
            "user_id": frame["user_id"].astype(object).astype(str).str.strip(),
            "item_id": frame["item_id"].astype(object).astype(str).str.strip(),
            "event_type": kinds,
            "ts_ms": ts,
            "value": values,
            "site": frame["site"].astype(object).where(~_is_missing(frame["site"]), "").astype(str),
        }
    )
    if has_event_id:
        eid = frame["event_id"].astype(object)
        clean["event_id"] = eid.where(~_is_missing(frame["event_id"]), "").astype(str)

    # 4. duplicates (NaN values compare equal here, as pandas' duplicated does)
    live = np.flatnonzero(d.keep)
    dup = np.zeros(n, dtype=bool)
    dup[live] = clean.iloc[live].duplicated(keep="first").to_numpy()
    d.drop("duplicate", dup)
    if has_event_id:
        live = np.flatnonzero(d.keep)
        ids = clean["event_id"].to_numpy(dtype=object)[live]
        reused = pd.Series(ids).duplicated(keep="first").to_numpy() & (ids != "")
        dup_id = np.zeros(n, dtype=bool)
        dup_id[live] = reused
        d.drop("duplicate_event_id", dup_id)

    # 5. bot-like shoppers
    bot_users: list[str] = []
    bot_rules = [(MINUTE_MS, cfg.max_events_per_minute), (DAY_MS, cfg.max_events_per_day)]
    if timestamps == "real" and any(limit is not None for _, limit in bot_rules):
        live = np.flatnonzero(d.keep)
        user_codes, user_names = pd.factorize(clean["user_id"].to_numpy(dtype=object)[live])
        order = np.lexsort((ts[live], user_codes))
        u_sorted, t_sorted = user_codes[order], ts[live][order]
        flagged = np.zeros(len(user_names), dtype=bool)
        for window, limit in bot_rules:
            if limit is not None:
                counts = window_counts(u_sorted, t_sorted, window)
                flagged[np.unique(u_sorted[counts > limit])] = True
        bot = np.zeros(n, dtype=bool)
        bot[live] = flagged[user_codes]
        bot_users = [str(u) for u in user_names[flagged]]
        d.drop("bot_shopper", bot)
    elif timestamps == "order":
        skipped.append("bot-rate rule (order-only timestamps)")
    else:
        d.drop("bot_shopper", np.zeros(n, dtype=bool))

    # 6. optional collapse of consecutive repeats of one item
    if cfg.collapse_repeats:
        live = np.flatnonzero(d.keep)
        sub = clean.iloc[live]
        codes, _ = pd.factorize(sub["user_id"].to_numpy(dtype=object))
        order = np.lexsort((np.arange(len(live)), sub["ts_ms"].to_numpy(), codes))
        u = sub["user_id"].to_numpy(dtype=object)[order]
        it = sub["item_id"].to_numpy(dtype=object)[order]
        repeat_sorted = np.r_[False, (u[1:] == u[:-1]) & (it[1:] == it[:-1])]
        repeat = np.zeros(n, dtype=bool)
        repeat[live[order]] = repeat_sorted
        d.drop("collapsed_repeat", repeat)

    out = clean[d.keep].reset_index(drop=True)
    report = CleaningReport(
        rows_in=n,
        rows_out=len(out),
        row_label=row_label,
        dropped=d.dropped,
        examples=d.examples,
        bot_shoppers=len(bot_users),
        bot_examples=bot_users[:N_EXAMPLES],
        skipped=skipped,
        rules={
            "timestamps": timestamps,
            "min_ts_ms": cfg.min_ts_ms,
            "now_ms": now_ms,
            "max_future_ms": cfg.max_future_ms,
            "window_ms": list(cfg.window_ms) if cfg.window_ms else None,
            "max_events_per_minute": cfg.max_events_per_minute,
            "max_events_per_day": cfg.max_events_per_day,
            "collapse_repeats": cfg.collapse_repeats,
        },
    )
    return out, report
