"""Online SQLite backups: consistent while a writer keeps writing (WAL), integrity-checked."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from deploy.backup import backup_name, backup_sqlite, prune_backups
from deploy.errors import DeployError


def make_db(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, batch INTEGER, payload TEXT)")
    con.commit()
    con.close()


def test_backup_of_a_live_wal_database_is_a_consistent_snapshot(tmp_path: Path) -> None:
    # Arrange: a writer that commits batches of 50 rows as fast as it can
    db = tmp_path / "site.db"
    make_db(db)
    stop = threading.Event()
    committed = [0]

    def writer() -> None:
        con = sqlite3.connect(db, timeout=30)
        batch = 0
        while not stop.is_set():
            with con:
                con.executemany(
                    "INSERT INTO events (batch, payload) VALUES (?, ?)",
                    [(batch, "x" * 200)] * 50,
                )
            batch += 1
            committed[0] = batch
        con.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while committed[0] < 20:
            time.sleep(0.01)
        # Act: three backups while the writer runs
        results = [backup_sqlite(db, tmp_path / "out" / f"b{i}.db") for i in range(3)]
    finally:
        stop.set()
        thread.join()
    # Assert: each copy is whole batches only (a snapshot), passes integrity, is one file
    for result in results:
        assert result.integrity == "ok" and result.bytes > 0
        con = sqlite3.connect(result.destination)
        rows, batches = con.execute("SELECT count(*), count(DISTINCT batch) FROM events").fetchone()
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        con.close()
        assert rows == 50 * batches and batches >= 20
        assert not Path(result.destination + "-wal").exists()
    assert not list((tmp_path / "out").glob(".*partial"))


def test_backup_leaves_the_source_untouched_when_it_is_not_in_wal(tmp_path: Path) -> None:
    db = tmp_path / "plain.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (x)")
    con.execute("INSERT INTO t VALUES (1)")
    con.commit()
    con.close()
    before = db.read_bytes()
    result = backup_sqlite(db, tmp_path / "copy.db")
    assert result.integrity == "ok" and db.read_bytes() == before


def test_missing_or_corrupt_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="does not exist"):
        backup_sqlite(tmp_path / "nope.db", tmp_path / "out.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DeployError, match="failed"):
        backup_sqlite(junk, tmp_path / "out.db")
    assert not (tmp_path / "out.db").exists()


def test_prune_keeps_the_newest_of_each_database(tmp_path: Path) -> None:
    names = [
        "store-01-site-20261101T000000Z.db",
        "store-01-site-20261102T000000Z.db",
        "store-01-site-20261103T000000Z.db",
        "coordinator-coordinator-20261101T000000Z.db",
    ]
    for name in names:
        (tmp_path / name).write_text("x")
    removed = prune_backups(tmp_path, keep=2)
    assert [p.name for p in removed] == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
    assert backup_name(tmp_path / "store-09" / "site.db").startswith("store-09-site-")
