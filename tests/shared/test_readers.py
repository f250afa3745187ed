"""Readers: every format, timestamp variants, round-trips, real files and every error path."""

import json
import string
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import DataError
from shared.events import EVENT_COLUMNS, sort_events
from shared.readers import (
    TAOBAO_WINDOW_MS,
    describe_dataset,
    read_dataset,
    write_events,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} (real datasets) not present")

T0 = 1_600_000_000  # 2020-09-13T12:26:40Z, Unix seconds


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _canonical(frame: pd.DataFrame) -> pd.DataFrame:
    """Sorted, object-typed copy for comparing frames whatever their string dtype."""
    out = sort_events(frame)[list(EVENT_COLUMNS)].copy()
    for c in ("user_id", "item_id", "event_type", "site"):
        out[c] = out[c].astype(object)
    return out.reset_index(drop=True)


# ---------------------------------------------------------------- events format

ID = st.text(
    alphabet=string.ascii_letters + string.digits + "-_:.,\" '", min_size=1, max_size=8
).filter(lambda s: s == s.strip())
EVENT = st.tuples(
    ID,
    ID,
    st.sampled_from(["view", "cart", "fav", "purchase", "rating"]),
    st.integers(946_684_800_000, 1_700_000_000_000),  # 2000 .. 2023 in ms
    st.integers(1, 5),
    st.sampled_from(["", "store-1", "store 2"]),
)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=st.lists(EVENT, min_size=1, max_size=25, unique_by=lambda r: (r[0], r[3])))
def test_events_round_trip_through_every_file_type(
    tmp_path: Path, suffix: str, rows: list[tuple[str, str, str, int, int, str]]
) -> None:
    # Arrange: one event per (shopper, ms) so that no cleaning rule applies
    frame = pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event_type": [r[2] for r in rows],
            "ts_ms": np.asarray([r[3] for r in rows], dtype=np.int64),
            "value": [float(r[4]) if r[2] == "rating" else np.nan for r in rows],
            "site": [r[5] for r in rows],
        }
    )
    path = tmp_path / f"log{suffix}"
    # Act
    write_events(frame, path)
    back = read_dataset(path, "events")
    # Assert
    pd.testing.assert_frame_equal(_canonical(back.events), _canonical(frame))
    assert back.info["cleaning"]["rows_dropped"] == 0  # type: ignore[index]
    assert back.timestamps == "real"


@pytest.mark.parametrize(
    ("header", "cell", "expected_ms"),
    [
        ("timestamp", str(T0), T0 * 1000),
        ("timestamp", f"{T0}.25", T0 * 1000 + 250),
        ("timestamp", "2020-09-13T12:26:40Z", T0 * 1000),
        ("timestamp", "2020-09-13T20:26:40+08:00", T0 * 1000),
        ("timestamp", "2020-09-13 12:26:40", T0 * 1000),  # naive = UTC
        ("timestamp", "2020-09-13T12:26:40.5", T0 * 1000 + 500),
        ("timestamp_ms", str(T0 * 1000 + 7), T0 * 1000 + 7),
        ("ts_ms", str(T0 * 1000 + 7), T0 * 1000 + 7),
    ],
)
def test_events_csv_timestamp_variants(
    tmp_path: Path, header: str, cell: str, expected_ms: int
) -> None:
    path = _write(tmp_path / "e.csv", f"user_id,item_id,event_type,{header}\nu,i,view,{cell}\n")
    ds = read_dataset(path, "events")
    assert ds.events["ts_ms"].tolist() == [expected_ms]


def test_events_jsonl_accepts_numbers_strings_and_numeric_ids(tmp_path: Path) -> None:
    lines = [
        {"user_id": 7, "item_id": 12, "event_type": "view", "timestamp": T0},
        {
            "user_id": "7",
            "item_id": "13",
            "event_type": "rating",
            "timestamp": "2020-09-13T12:26:41Z",
            "value": 4,
        },
        {
            "user_id": 7.0,
            "item_id": "14",
            "event_type": "cart",
            "timestamp": float(T0 + 2),
            "site": "s",
        },
    ]
    path = _write(tmp_path / "e.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    ev = read_dataset(path, "events").events
    assert ev["user_id"].tolist() == ["7", "7", "7"]
    assert ev["item_id"].tolist() == ["12", "13", "14"]
    assert ev["ts_ms"].tolist() == [T0 * 1000, T0 * 1000 + 1000, T0 * 1000 + 2000]
    assert ev["value"].tolist()[1] == 4.0
    assert ev["site"].tolist() == ["", "", "s"]


@pytest.mark.parametrize("tz", [None, "UTC", "Asia/Shanghai"])
def test_events_parquet_native_timestamp_column(tmp_path: Path, tz: str | None) -> None:
    when = pd.Timestamp("2020-09-13 12:26:40")
    when = when.tz_localize("UTC").tz_convert(tz) if tz else when
    table = pa.table(
        {
            "user_id": pa.array([1, 2], pa.int64()),
            "item_id": ["a", "b"],
            "event_type": ["view", "fav"],
            "timestamp": pa.array([when, when + pd.Timedelta(seconds=1)]),
        }
    )
    pq.write_table(table, tmp_path / "e.parquet")
    ev = read_dataset(tmp_path / "e.parquet", "events").events
    assert ev["ts_ms"].tolist() == [T0 * 1000, T0 * 1000 + 1000]
    assert ev["user_id"].tolist() == ["1", "2"]


def test_events_missing_cells_and_unknown_types_are_cleaned_and_reported(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "e.csv",
        "user_id,item_id,event_type,timestamp,value,category\n"
        f"u,i,view,{T0},,x\n"
        f"u,,view,{T0 + 1},,x\n"
        f"u,i,click,{T0 + 2},,x\n"
        f"u,i,rating,{T0 + 3},,x\n"
        f"u,i,rating,{T0 + 4},5,x\n",
    )
    ds = read_dataset(path, "events")
    report = ds.info["cleaning"]
    assert len(ds.events) == 2
    assert report["dropped"]["missing_field"] == 2  # type: ignore[index]
    assert report["examples"]["missing_field"] == [3, 5]  # type: ignore[index]  # file lines
    assert report["examples"]["unknown_event_type"] == [4]  # type: ignore[index]
    assert ds.info["ignored_columns"] == ["category"]


def test_events_directory_with_catalogue_gives_item_attributes(tmp_path: Path) -> None:
    _write(tmp_path / "events.csv", f"user_id,item_id,event_type,timestamp\nu,i1,view,{T0}\n")
    _write(tmp_path / "catalogue.csv", "item_id,category,brand\ni1,c1,acme\ni2,c2,\n")
    ds = read_dataset(tmp_path, "events")
    assert ds.item_attributes == {"i1": ["category:c1", "brand:acme"], "i2": ["category:c2"]}


# ---------------------------------------------------------------- other formats (small files)


def test_s3rec_reads_sequences_in_order_with_attributes_beside(tmp_path: Path) -> None:
    path = _write(tmp_path / "Toy.txt", "1 5 3 9\n\n2 3 5\n")
    _write(tmp_path / "Toy_item2attributes.json", json.dumps({"5": [1, 2], "3": [2], "9": []}))
    ds = read_dataset(path, "s3rec")
    assert ds.timestamps == "order"
    assert ds.events["item_id"].tolist() == ["5", "3", "9", "3", "5"]
    assert ds.events["ts_ms"].tolist() == [0, 1, 2, 0, 1]
    assert ds.item_attributes["5"] == ["attr:1", "attr:2"]
    assert "positions" not in str(ds.info["cleaning"])  # order-only skips are listed by name
    assert ds.info["cleaning"]["skipped"]  # type: ignore[index]


def test_sasrec_pairs_give_positions_per_user_even_when_interleaved(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.txt", "1 10\n1 11\n2 10\n1 12\n")
    ev = read_dataset(path, "sasrec").events
    assert list(zip(ev["user_id"], ev["item_id"], ev["ts_ms"], strict=True)) == [
        ("1", "10", 0),
        ("1", "11", 1),
        ("2", "10", 0),
        ("1", "12", 2),
    ]


def _ml100k(tmp_path: Path, data: str, items: str | None = None) -> Path:
    _write(tmp_path / "u.data", data)
    if items is not None:
        (tmp_path / "u.item").write_bytes(items.encode("latin-1"))
    return tmp_path


def test_ml100k_ratings_ties_by_item_id_and_genres_titles(tmp_path: Path) -> None:
    flags = ["0"] * 19
    action = flags.copy()
    action[1] = "1"
    items = (
        "1|Toy Story (1995)|01-Jan-1995||http://x|"
        + "|".join(["0"] * 3 + ["1", "1"] + ["0"] * 14)
        + "\n"
        "2|Amélie (2001)|01-Jan-2001||http://y|" + "|".join(action) + "\n"
    )
    data = f"5\t2\t4\t{T0}\n5\t1\t3\t{T0}\n6\t1\t5\t{T0 - 10}\n"
    ds = read_dataset(_ml100k(tmp_path, data, items), "ml100k")
    ev = ds.events
    assert list(zip(ev["user_id"], ev["item_id"], ev["value"], strict=True)) == [
        ("5", "1", 3.0),  # equal timestamps: item 1 before item 2
        ("5", "2", 4.0),
        ("6", "1", 5.0),
    ]
    assert set(ev["event_type"]) == {"rating"}
    assert ds.item_attributes["1"] == [
        "genre:Animation",
        "genre:Children's",
        "title:Toy Story (1995)",
        "year:1995",
    ]
    assert ds.item_attributes["2"] == ["genre:Action", "title:Amélie (2001)", "year:2001"]
    # the u.data file itself is accepted too
    assert len(read_dataset(tmp_path / "u.data", "ml100k").events) == 3


def test_taobao_maps_behaviours_window_categories_and_cut_off_lines(tmp_path: Path) -> None:
    inside = TAOBAO_WINDOW_MS[0] // 1000 + 3600
    path = _write(
        tmp_path / "ub.csv",
        f"1,100,7,pv,{inside}\n"
        f"1,100,7,cart,{inside + 1}\n"
        f"1,101,8,fav,{inside + 2}\n"
        f"1,101,8,buy,{inside + 3}\n"
        f"1,102,8,click,{inside + 4}\n"
        f"1,103,9,pv,{TAOBAO_WINDOW_MS[1] // 1000}\n"
        "2,104,9,pv\n",
    )
    ds = read_dataset(path, "taobao")
    assert ds.events["event_type"].tolist() == ["view", "cart", "fav", "purchase"]
    report = ds.info["cleaning"]
    assert report["examples"]["unknown_event_type"] == [5]  # type: ignore[index]
    assert report["examples"]["outside_window"] == [6]  # type: ignore[index]
    assert report["examples"]["missing_field"] == [7]  # type: ignore[index]
    assert ds.item_attributes["101"] == ["category:8"]


# ---------------------------------------------------------------- error paths


@pytest.mark.parametrize(
    ("name", "text", "fmt", "match"),
    [
        ("e.csv", "", "events", "is empty"),
        ("e.csv", "user_id,item_id,event_type,timestamp\n", "events", "holds no events"),
        ("e.csv", "user_id,item_id,timestamp\nu,i,1\n", "events", "missing column.*event_type"),
        ("e.csv", "user_id,item_id,event_type\nu,i,view\n", "events", "missing column.*timestamp"),
        (
            "e.csv",
            f"user_id,item_id,event_type,timestamp\nu,i,view,{T0}\nu,i\n",
            "events",
            r"e\.csv:3: 2 field",
        ),
        (
            "e.csv",
            f"user_id,item_id,event_type,timestamp\nu,i,view,{T0}\nu,i,view,yesterday\n",
            "events",
            r"e\.csv:3: timestamp 'yesterday'",
        ),
        (
            "e.csv",
            "user_id,item_id,event_type,ts_ms\nu,i,view,2020-01-01\n",
            "events",
            r"e\.csv:2: ts_ms .* milliseconds",
        ),
        (
            "e.csv",
            f"user_id,item_id,event_type,timestamp,value\nu,i,rating,{T0},five\n",
            "events",
            r"e\.csv:2: value 'five'",
        ),
        (
            "e.csv",
            f"user_id,item_id,event_type,timestamp\nu,i,view,{T0 * 1000}\n",
            "events",
            "timestamp_ms",
        ),
        (
            "e.csv",
            "user_id,user_id,item_id,event_type,timestamp\nu,u,i,view,1\n",
            "events",
            "repeats a column",
        ),
        (
            "e.csv",
            "user_id,item_id,event_type,timestamp\nu,i,view,1000\n",
            "events",
            "no events left after cleaning.*before_floor: 1",
        ),
        ("e.jsonl", '{"user_id": "u"}\n{oops\n', "events", r"e\.jsonl:2: not valid JSON"),
        ("e.jsonl", "[1, 2]\n", "events", r"e\.jsonl:1: expected one JSON object"),
        (
            "e.jsonl",
            f'{{"user_id": ["u"], "item_id": "i", "event_type": "view", "timestamp": {T0}}}\n',
            "events",
            "user_id must be a string or number",
        ),
        (
            "e.jsonl",
            '{"user_id": "u", "item_id": "i", "event_type": "view", "timestamp": true}\n',
            "events",
            "true/false",
        ),
        ("e.parquet", "not parquet at all", "events", "not a readable Parquet file"),
        ("e.txt", "x", "events", "cannot tell the file type"),
        ("s.txt", "1 2 3\n1 4 5\n", "s3rec", r"s\.txt:2: user 1 already has a sequence on line 1"),
        ("s.txt", "1 2\n1 3\n", "s3rec", "use format sasrec"),
        ("s.txt", "1 2\n7\n", "s3rec", r"s\.txt:2: expected 'user item1"),
        ("s.txt", "", "s3rec", "holds no events"),
        (
            "p.txt",
            "1 2\n1 2 3\n",
            "sasrec",
            r"p\.txt:2: expected 'user item', got 3 field\(s\) \(a sequence file",
        ),
        ("t.csv", "1 2 3 4 5\n", "taobao", r"t\.csv:1: expected 5 comma-separated fields"),
        ("t.csv", "1,2,3,pv,1511544070,9\n", "taobao", "got 6"),
        ("t.csv", "1,2,3,pv,1511544070\n1,2,3,pv,soon\n", "taobao", r"t\.csv:2: timestamp 'soon'"),
    ],
)
def test_bad_files_raise_one_clear_data_error(
    tmp_path: Path, name: str, text: str, fmt: str, match: str
) -> None:
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError, match=match) as info:
        read_dataset(path, fmt)
    assert str(path) in str(info.value)  # every message names the file


@pytest.mark.parametrize(
    ("data", "items", "match"),
    [
        ("1\t2\t3\n", None, r"u\.data:1: expected 'user<TAB>item<TAB>rating<TAB>unix_ts'"),
        (f"1\t2\tfive\t{T0}\n", None, r"u\.data:1: rating 'five' is not an integer"),
        (f"1\t2\t3\t{T0}\n", "1|Toy|x\n", r"u\.item:1: expected 24"),
        (
            f"1\t2\t3\t{T0}\n",
            "1|T|d||u|" + "|".join(["2"] * 19) + "\n",
            "genre flags must be 0 or 1",
        ),
    ],
)
def test_bad_ml100k_files(tmp_path: Path, data: str, items: str | None, match: str) -> None:
    with pytest.raises(DataError, match=match):
        read_dataset(_ml100k(tmp_path, data, items), "ml100k")


def test_missing_inputs_and_wrong_kinds_of_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_dataset(tmp_path / "nope.csv", "events")
    with pytest.raises(DataError, match="unknown format 'csv'"):
        read_dataset(tmp_path, "csv")
    with pytest.raises(DataError, match="is a directory"):
        read_dataset(tmp_path, "s3rec")
    with pytest.raises(DataError, match=r"no events.*file"):
        read_dataset(tmp_path, "events")
    with pytest.raises(DataError, match=r"u\.data not found"):
        read_dataset(tmp_path, "ml100k")


def test_non_utf8_text_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_bytes(b"1 2 3\n2 \xff 4\n")
    with pytest.raises(DataError, match=r"s\.txt:2: not utf-8"):
        read_dataset(path, "s3rec")


def test_bad_item2attributes_file_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "B.txt", "1 2 3\n")
    _write(tmp_path / "B_item2attributes.json", "[1, 2]")
    with pytest.raises(DataError, match="item2attributes"):
        read_dataset(path, "s3rec")


def test_write_events_refuses_unknown_types_and_leaves_no_temp_file(tmp_path: Path) -> None:
    frame = read_dataset(_write(tmp_path / "s.txt", "1 2 3\n"), "s3rec").events
    with pytest.raises(DataError, match="unknown event file type"):
        write_events(frame, tmp_path / "out.xlsx")
    write_events(frame, tmp_path / "out.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "s.txt"]


# ---------------------------------------------------------------- the real datasets


@needs_data
def test_real_beauty_counts_and_attributes() -> None:
    ds = read_dataset(DATA / "amazon_s3rec" / "Beauty.txt", "s3rec")
    assert (ds.n_users, ds.n_items, len(ds.events)) == (22_363, 12_101, 198_502)
    assert set(ds.item_attributes) == set(ds.events["item_id"])  # every item has attributes
    assert len({a for attrs in ds.item_attributes.values() for a in attrs}) == 637
    stats = describe_dataset(ds)
    assert (stats["seq_len_median"], stats["seq_len_mean"], stats["seq_len_max"]) == (
        6.0,
        8.88,
        204,
    )


@needs_data
def test_real_video_games_sasrec_counts() -> None:
    ds = read_dataset(DATA / "amazon_games_sasrec" / "Video.txt", "sasrec")
    assert (ds.n_users, ds.n_items, len(ds.events)) == (31_013, 23_715, 287_107)


@needs_data
def test_real_ml100k_counts_time_range_and_item_text() -> None:
    ds = read_dataset(DATA / "ml-100k", "ml100k")
    assert (ds.n_users, ds.n_items, len(ds.events)) == (943, 1_682, 100_000)
    assert ds.info["cleaning"]["rows_dropped"] == 0  # type: ignore[index]  # no real rater is a bot
    ts = ds.events["ts_ms"]
    assert datetime.fromtimestamp(ts.min() / 1000, UTC).isoformat() == "1997-09-20T03:05:10+00:00"
    assert datetime.fromtimestamp(ts.max() / 1000, UTC).isoformat() == "1998-04-22T23:10:38+00:00"
    assert ds.events["value"].value_counts().to_dict() == {
        4.0: 34_174,
        3.0: 27_145,
        5.0: 21_201,
        2.0: 11_370,
        1.0: 6_110,
    }
    assert len(ds.item_attributes) == 1_682
    assert all(any(a.startswith("title:") for a in v) for v in ds.item_attributes.values())


@needs_data
def test_real_taobao_slices_lose_exactly_the_39_rows_outside_the_window() -> None:
    head = read_dataset(DATA / "taobao_userbehavior" / "UserBehavior_head.csv", "taobao")
    tail = read_dataset(DATA / "taobao_userbehavior" / "UserBehavior_tail.csv", "taobao")
    report = head.info["cleaning"]
    assert (report["rows_in"], head.n_users) == (84_287, 814)  # type: ignore[index]
    assert report["dropped"]["outside_window"] == 35  # type: ignore[index]
    assert report["rows_dropped"] == 35  # type: ignore[index]  # nothing else: no bots, no duplicates
    assert tail.info["cleaning"]["dropped"]["outside_window"] == 4  # type: ignore[index]
    assert head.events["event_type"].value_counts().to_dict() == {
        "view": 75_658, "cart": 4_494, "fav": 2_351, "purchase": 1_749,
    }  # fmt: skip
    assert len(head.item_attributes) == 55_233
