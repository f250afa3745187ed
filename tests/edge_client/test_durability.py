"""A server process killed with SIGKILL mid-ingestion loses no acknowledged event."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from edge_kit import TOKEN, free_port

from edge_client.store import EventStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BATCH = 50


def start_server(site: Path, port: int) -> subprocess.Popen[bytes]:
    fedrec = Path(sys.executable).with_name("fedrec")
    env = {**os.environ, "FEDREC_EDGE_ADMIN_TOKEN": TOKEN}
    return subprocess.Popen(
        [
            str(fedrec),
            "edge",
            "serve",
            "--db",
            str(site / "site.db"),
            "--model-dir",
            str(site / "models"),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server did not become ready")


def test_sigkill_during_ingestion_loses_no_acknowledged_event(tmp_path: Path) -> None:
    # Arrange
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(tmp_path, port)
    acked: list[int] = []
    sent: list[int] = []
    lock = threading.Lock()
    counter = iter(range(1_000_000))

    def ingest() -> None:
        with httpx.Client(base_url=base, timeout=5) as c:
            while True:
                with lock:
                    b = next(counter)
                    sent.append(b)
                events = [
                    {
                        "event_id": f"b{b}-{j}",
                        "user_id": f"u{j % 13}",
                        "item_id": f"i{(b + j) % 97}",
                        "event_type": "view",
                        "timestamp": 1_700_000_000 + b,
                    }
                    for j in range(BATCH)
                ]
                try:
                    r = c.post("/v1/events", json={"events": events})
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 200:
                    with lock:
                        acked.append(b)

    try:
        wait_ready(base, proc)
        writers = [threading.Thread(target=ingest) for _ in range(3)]
        for w in writers:
            w.start()
        deadline = time.monotonic() + 30
        while len(acked) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        # Act: no warning, no shutdown hook, mid-stream
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        for w in writers:
            w.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Assert: the file is sound, every acknowledged batch is complete, no batch is partial
    db = tmp_path / "site.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = [r[0] for r in conn.execute("SELECT event_id FROM events")]
        counted = conn.execute("SELECT COALESCE(SUM(n), 0) FROM item_counts").fetchone()[0]
    per_batch: dict[int, int] = {}
    for eid in ids:
        b = int(eid.split("-")[0][1:])
        per_batch[b] = per_batch.get(b, 0) + 1
    assert len(acked) >= 40
    assert all(per_batch.get(b) == BATCH for b in acked)
    assert set(per_batch.values()) == {BATCH}
    assert counted == len(ids)  # popularity counts committed with their events
    # ... and the store reopens, and a new server serves from it
    store = EventStore(db)
    assert store.count_events() == len(ids)
    store.close()
    port = free_port()
    proc = start_server(tmp_path, port)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        recs = httpx.get(f"http://127.0.0.1:{port}/v1/users/u1/recommendations").json()
        assert recs["source"] == "popularity" and len(recs["items"]) == 10
    finally:
        proc.terminate()
        proc.wait(timeout=15)
