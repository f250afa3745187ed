"""The edge service over real HTTP (uvicorn on 127.0.0.1) with real SQLite and ORT."""

from __future__ import annotations

import hashlib
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pytest
import torch
from edge_kit import MAX_LEN, TOKEN, client, live_server, settings_for, write_model

from edge_client.errors import SettingsError
from edge_client.settings import load_settings
from shared.onnx_export import ServingGraph
from shared.sequences import serving_input

if TYPE_CHECKING:
    from shared.models import SequentialModel

pytestmark = pytest.mark.integration

T = 1_700_000_000  # Unix seconds


def event(
    eid: str, user: str = "u1", item: str = "i1", kind: str = "view", ts: object = T
) -> dict[str, Any]:
    return {"event_id": eid, "user_id": user, "item_id": item, "event_type": kind, "timestamp": ts}


def store_fingerprint(db: Path) -> tuple[int, str]:
    """Row count and a hash of every stored row and popularity count."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT * FROM events ORDER BY seq").fetchall()
        counts = conn.execute("SELECT * FROM item_counts ORDER BY item_id").fetchall()
    return len(rows), hashlib.sha256(repr((rows, counts)).encode()).hexdigest()


@pytest.fixture(scope="module")
def shared_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    site = tmp_path_factory.mktemp("site")
    (site / "models").mkdir()
    with live_server(settings_for(site)) as base:
        with client(base) as c:
            c.post("/v1/events", json={"events": [event("seed1"), event("seed2", item="i2")]})
        yield base, site / "site.db"


def test_single_and_batch_events_are_stored_and_retries_reported(site: Path) -> None:
    with live_server(settings_for(site)) as base, client(base) as c:
        # Act
        one = c.post("/v1/events", json=event("e1", kind="purchase", item="i9"))
        batch = c.post(
            "/v1/events",
            json={
                "events": [
                    event("e2", item="i2", ts="2023-11-14T22:14:00Z"),
                    event("e3", item="i3", ts=T + 0.25),
                    {**event("e4", item="i4", kind="rating"), "value": 4.5, "site": "store-7"},
                    event("e1", kind="purchase", item="i9"),
                ]
            },
        )
        # Assert
        assert one.status_code == 200 and one.json()["accepted"] == 1
        assert batch.json() == {"accepted": 3, "duplicates": 1, "duplicate_ids": ["e1"]}
    with sqlite3.connect(site / "site.db") as conn:
        rows = conn.execute(
            "SELECT event_id, ts_ms, value, site FROM events ORDER BY seq"
        ).fetchall()
    assert rows == [
        ("e1", T * 1000, None, ""),
        ("e2", 1_700_000_040_000, None, ""),
        ("e3", T * 1000 + 250, None, ""),
        ("e4", T * 1000, 4.5, "store-7"),
    ]


def _chunked(size: int) -> Iterator[bytes]:
    block = b" " * 65536
    for _ in range(size // len(block)):
        yield block


HOSTILE: list[tuple[str, dict[str, Any], int, str]] = [
    (
        "malformed JSON",
        {"content": b'{"event_id": "e1", ', "ctype": "application/json"},
        400,
        "malformed JSON",
    ),
    (
        "invalid UTF-8",
        {"content": b'{"event_id": "\xff\xfe"}', "ctype": "application/json"},
        400,
        "parsing",
    ),
    (
        "deeply nested",
        {"content": b"[" * 100_000 + b"]" * 100_000, "ctype": "application/json"},
        400,
        "pars",
    ),
    (
        "not JSON at all",
        {"content": b"user=u1", "ctype": "application/x-www-form-urlencoded"},
        415,
        "application/json",
    ),
    ("a JSON list", {"json": [event("x1")]}, 422, "valid dictionary"),
    ("user id not a string", {"json": event("x1", user=12)}, 422, "valid string"),  # type: ignore[arg-type]
    ("timestamp a list", {"json": event("x1", ts=[1, 2])}, 422, "Unix seconds"),
    ("timestamp a boolean", {"json": event("x1", ts=True)}, 422, "Unix seconds"),
    ("timestamp a numeric string", {"json": event("x1", ts="1700000000")}, 422, "ISO 8601"),
    ("unknown event type", {"json": event("x1", kind="teleport")}, 422, "'view'"),
    ("negative timestamp", {"json": event("x1", ts=-1)}, 422, "before 1970"),
    ("far-future timestamp", {"json": event("x1", ts=T * 100)}, 422, "future"),
    ("milliseconds sent as seconds", {"json": event("x1", ts=T * 1000)}, 422, "not milliseconds"),
    ("far-future ISO", {"json": event("x1", ts="2999-01-01T00:00:00Z")}, 422, "future"),
    ("rating without value", {"json": event("x1", kind="rating")}, 422, "needs a numeric value"),
    ("value on a view", {"json": {**event("x1"), "value": 3}}, 422, "only for rating"),
    ("unknown field", {"json": {**event("x1"), "price": 3}}, 422, "Extra inputs"),
    (
        "missing field",
        {"json": {k: v for k, v in event("x1").items() if k != "item_id"}},
        422,
        "Field required",
    ),
    ("SQL in user id", {"json": event("x1", user="u1'; DROP TABLE events; --")}, 422, "pattern"),
    ("SQL in item id", {"json": event("x1", item="1 OR 1=1")}, 422, "pattern"),
    ("SQL in event id", {"json": event("x'); DELETE FROM events; --")}, 422, "pattern"),
    ("emoji id", {"json": event("x1", item="🛒")}, 422, "pattern"),
    ("right-to-left override", {"json": event("x1", user="u\u202e1")}, 422, "pattern"),
    ("NUL byte", {"json": event("x1", user="u\x001")}, 422, "pattern"),
    ("Cyrillic homoglyph", {"json": event("x1", user="\u0430dmin")}, 422, "pattern"),
    ("site with spaces", {"json": {**event("x1"), "site": "store 7"}}, 422, "pattern"),
    ("id of 129 characters", {"json": event("x1", user="u" * 129)}, 422, "at most 128"),
    ("id of a megabyte", {"json": event("x" * 1_000_000)}, 422, "at most 128"),
    ("empty batch", {"json": {"events": []}}, 422, "at least 1"),
    (
        "batch over 10,000",
        {"json": {"events": [event(f"b{i}") for i in range(10_001)]}},
        422,
        "at most 10000",
    ),
    ("events not a list", {"json": {"events": "all"}}, 422, "valid list"),
    (
        "one bad row spoils the batch",
        {"json": {"events": [event("g1"), event("g2"), event("g3", ts=-5), event("g4")]}},
        422,
        "before 1970",
    ),
    (
        "10 MB body with Content-Length",
        {"content": b" " * 10_000_000, "ctype": "application/json"},
        413,
        "exceeds",
    ),
    (
        "10 MB body streamed (chunked)",
        {"stream": 10_000_000, "ctype": "application/json"},
        413,
        "exceeds",
    ),
]


@pytest.mark.parametrize(
    ("case", "request_kw", "status", "reason"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_hostile_input_gets_a_4xx_with_a_reason_and_changes_nothing(
    shared_site: tuple[str, Path], case: str, request_kw: dict[str, Any], status: int, reason: str
) -> None:
    # Arrange
    base, db = shared_site
    before = store_fingerprint(db)
    kw: dict[str, Any] = {}
    if "json" in request_kw:
        kw["json"] = request_kw["json"]
    elif "stream" in request_kw:
        kw["content"] = _chunked(request_kw["stream"])
    else:
        kw["content"] = request_kw["content"]
    if "ctype" in request_kw:
        kw["headers"] = {"content-type": request_kw["ctype"]}
    # Act
    with client(base) as c:
        response = c.post("/v1/events", **kw)
    # Assert
    assert response.status_code == status, response.text[:300]
    body = response.json()
    text = body["detail"] + " ".join(e["reason"] for e in body.get("errors", []))
    assert reason in text, text[:300]
    assert store_fingerprint(db) == before
    with client(base) as c:
        assert c.get("/healthz").status_code == 200  # still serving


def test_refused_batch_names_each_bad_row(shared_site: tuple[str, Path]) -> None:
    base, _ = shared_site
    batch = [event("r0"), event("r1", kind="nope"), event("r2"), event("r3", user="a b", ts=-1)]
    with client(base) as c:
        body = c.post("/v1/events", json={"events": batch}).json()
    assert [(e["row"], e["field"]) for e in body["errors"]] == [
        (1, "event_type"),
        (3, "user_id"),
        (3, "timestamp"),
    ]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/v1/users/u1'%20OR%201=1/recommendations", "pattern"),
        (f"/v1/users/{'u' * 129}/recommendations", "at most 128"),
        ("/v1/users/u1/recommendations?k=0", "greater than or equal to 1"),
        ("/v1/users/u1/recommendations?k=101", "less than or equal to 100"),
        ("/v1/users/u1/recommendations?k=ten", "valid integer"),
    ],
)
def test_bad_recommendation_requests_are_422(
    shared_site: tuple[str, Path], path: str, reason: str
) -> None:
    base, _ = shared_site
    with client(base) as c:
        response = c.get(path)
    assert response.status_code == 422
    assert reason in response.json()["errors"][0]["reason"]


def test_real_time_purchase_and_history_change_the_next_answer(site: Path) -> None:
    """End to end over HTTP: what a shopper just did shapes the very next answer."""
    # Arrange: popularity first (no model), then a real model
    with live_server(settings_for(site)) as base, client(base) as c:
        c.post(
            "/v1/events",
            json={"events": [event(f"p{i}", user=f"s{i}", item="i9") for i in range(3)]},
        )
        c.post("/v1/events", json=event("q1", user="s9", item="i4"))
        cold = c.get("/v1/users/u1/recommendations", params={"k": 10}).json()
        # Act 1: u1 buys the most popular item
        c.post("/v1/events", json=event("e1", user="u1", item="i9", kind="purchase"))
        after_purchase = c.get("/v1/users/u1/recommendations", params={"k": 10}).json()
        model = write_model(site / "models", "v1")
        deadline = time.monotonic() + 10
        while c.get("/v1/model").json()["mode"] != "model" and time.monotonic() < deadline:
            time.sleep(0.05)
        # Act 2: u1 views two more items; each answer must reflect the newest event
        answers: list[dict[str, Any]] = []
        for eid, item in (("e2", "i3"), ("e3", "i17")):
            c.post("/v1/events", json=event(eid, user="u1", item=item, ts=T + len(answers) + 1))
            answers.append(c.get("/v1/users/u1/recommendations", params={"k": 5}).json())
    # Assert
    assert cold["items"][0] == {
        "item_id": "i9",
        "score": 3.0,
        "reason": "trending at this store (3 events in the last 14 days)",
    }
    assert cold["model_version"] is None
    assert "i9" not in [i["item_id"] for i in after_purchase["items"]]
    histories = [[9, 3], [9, 3, 17]]
    for answer, history in zip(answers, histories, strict=True):
        graph = ServingGraph(cast("SequentialModel", model), 5).eval()
        items = torch.from_numpy(serving_input(np.asarray(history), MAX_LEN))
        with torch.inference_mode():
            _, ids = graph(items, torch.tensor([[9]]))
        assert [i["item_id"] for i in answer["items"]] == [f"i{j}" for j in ids[0].tolist()]
        assert answer["model_version"] == "v1" and answer["source"] == "model"
        # each reason names an item of this history (explanations: test_explain.py)
        named = [re.search(r"\bi(\d+)\b", i["reason"]) for i in answer["items"]]
        assert all(m is not None and int(m.group(1)) in history for m in named)


def test_admin_endpoints_need_the_bearer_token(site: Path, admin: dict[str, str]) -> None:
    with live_server(settings_for(site)) as base, client(base) as c:
        c.post(
            "/v1/events",
            json={"events": [event("e1"), event("e2", item="i2"), event("e3", user="u2")]},
        )
        # Act
        missing = c.delete("/v1/admin/users/u1")
        wrong = c.delete("/v1/admin/users/u1", headers={"Authorization": "Bearer nope"})
        basic = c.delete("/v1/admin/users/u1", headers={"Authorization": "Basic dTE6cHc="})
        right = c.delete("/v1/admin/users/u1", headers=admin)
        recs = c.get("/v1/users/u2/recommendations").json()
    # Assert
    assert (missing.status_code, wrong.status_code, basic.status_code) == (401, 403, 401)
    assert right.json() == {"user_id": "u1", "deleted_events": 2}
    assert [i["item_id"] for i in recs["items"]] == ["i1"]  # u1's events are gone


def test_admin_bulk_import_reload_and_retention(site: Path, admin: dict[str, str]) -> None:
    csv = (
        "event_id,user_id,item_id,event_type,timestamp\n"
        "c1,u1,i1,view,1700000000\n"
        "c2,u1,i2,purchase,2023-11-14T22:14:00Z\n"
        "c3,u2,i2,view,1700000100\n"
    )
    # The background poll would race the explicit reload for the new CURRENT: keep it asleep.
    with live_server(settings_for(site, poll_interval_s=3600)) as base, client(base) as c:
        # Act
        imported = c.post(
            "/v1/admin/import", content=csv, headers={**admin, "content-type": "text/csv"}
        )
        again = c.post(
            "/v1/admin/import", content=csv, headers={**admin, "content-type": "text/csv"}
        )
        bad_type = c.post(
            "/v1/admin/import", content=csv, headers={**admin, "content-type": "text/html"}
        )
        bad_ids = c.post(
            "/v1/admin/import",
            content=(
                "user_id,item_id,event_type,timestamp\n"
                "u1,i1,view,1700000000\nu 2,i1,view,1700000009\n"
            ),
            headers={**admin, "content-type": "text/csv"},
        )
        junk = c.post(
            "/v1/admin/import", content="a,b\n1,2\n", headers={**admin, "content-type": "text/csv"}
        )
        no_model = c.post("/v1/admin/model/reload", headers=admin)
        write_model(site / "models", "v7", current=False)
        (site / "models" / "CURRENT").write_text("v7\n")
        reloaded = c.post("/v1/admin/model/reload", headers=admin)
        retention = c.post("/v1/admin/retention", json={"max_events_per_user": 1}, headers=admin)
    # Assert
    assert imported.status_code == 200, imported.text
    assert (imported.json()["accepted"], again.json()["duplicates"]) == (3, 3)
    assert imported.json()["cleaning"]["rows_in"] == 3
    assert bad_type.status_code == 415
    assert junk.status_code == 422 and "missing column" in junk.json()["detail"]
    assert bad_ids.status_code == 422
    assert [(e["row"], e["field"]) for e in bad_ids.json()["errors"]] == [(1, "user_id")]
    assert no_model.json()["status"] == "no-model"
    assert reloaded.json() == {"status": "swapped", "version": "v7", "reason": ""}
    assert retention.json() == {"deleted_by_age": 0, "deleted_by_cap": 1}


def test_hot_swap_while_serving_and_rejection_of_a_corrupt_version(site: Path) -> None:
    # Arrange
    models = site / "models"
    write_model(models, "v1", seed=1)
    statuses: list[int] = []
    versions: set[str | None] = set()
    stop = threading.Event()
    with live_server(settings_for(site)) as base:
        with client(base) as c:
            c.post("/v1/events", json={"events": [event("e1", item="i2"), event("e2", item="i5")]})

        def hammer() -> None:
            with client(base) as hc:
                while not stop.is_set():
                    r = hc.get("/v1/users/u1/recommendations")
                    statuses.append(r.status_code)
                    versions.add(r.json().get("model_version"))

        workers = [threading.Thread(target=hammer) for _ in range(3)]
        for w in workers:
            w.start()
        try:
            with client(base) as c:
                # Act 1: a new version appears
                write_model(models, "v2", seed=2)
                deadline = time.monotonic() + 10
                while c.get("/v1/model").json()["version"] != "v2" and time.monotonic() < deadline:
                    time.sleep(0.05)
                served_v2 = c.get("/v1/model").json()
                # Act 2: a corrupt version is named
                write_model(models, "v3", seed=3, current=False)
                data = (models / "v3" / "model.onnx").read_bytes()
                (models / "v3" / "model.onnx").write_bytes(data[: len(data) // 2])
                (models / "CURRENT").write_text("v3\n")
                deadline = time.monotonic() + 10
                while (
                    c.get("/v1/model").json()["last_rejection"] is None
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.05)
                after = c.get("/v1/model").json()
                metrics = c.get("/metrics").text
        finally:
            stop.set()
            for w in workers:
                w.join()
    # Assert
    assert served_v2["version"] == "v2"
    assert after["version"] == "v2" and after["last_rejection"]["version"] == "v3"
    assert "corrupt" in after["last_rejection"]["reason"]
    assert len(statuses) > 10 and set(statuses) == {200}
    assert {"v1", "v2"} <= versions and "v3" not in versions
    assert "fedrec_edge_model_swaps_total 2.0" in metrics
    assert "fedrec_edge_model_rejections_total 1.0" in metrics
    assert 'fedrec_edge_model_info{version="v2"} 1.0' in metrics


def test_health_readiness_metrics_and_docs(shared_site: tuple[str, Path]) -> None:
    base, _ = shared_site
    with client(base) as c:
        c.get("/v1/users/seed-user/recommendations")
        ready = c.get("/readyz").json()
        metrics = c.get("/metrics").text
        docs = c.get("/docs")
        spec = c.get("/openapi.json").json()
    assert ready == {"ready": True, "mode": "popularity", "model_version": None, "db": True}
    assert (
        'fedrec_edge_http_request_duration_seconds_bucket{le="0.001",method="GET",route="/v1/users/{user_id}/recommendations",status="200"}'
        in metrics
    )
    assert 'fedrec_edge_events_total{outcome="accepted"}' in metrics
    assert 'fedrec_edge_model_info{version="popularity"} 1.0' in metrics
    assert "fedrec_edge_store_events" in metrics
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    body = spec["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]
    assert set(body["examples"]) == {"single", "batch"}


def test_unsafe_admin_token_refuses_to_start_unless_dev(tmp_path: Path) -> None:
    for token in ("", "changethis", "short"):
        with pytest.raises(SettingsError, match=r"refusing to start|at least 16"):
            load_settings(db=tmp_path / "s.db", model_dir=tmp_path / "m", admin_token=token)
    dev = load_settings(db=tmp_path / "s.db", model_dir=tmp_path / "m", dev=True)
    assert dev.token == "changethis"
    assert load_settings(admin_token=TOKEN).token == TOKEN


def test_body_limit_refuses_before_reading_the_whole_body(shared_site: tuple[str, Path]) -> None:
    # A client declaring 10 MB gets 413 after sending only the headers.
    base, _ = shared_site
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000\r\n\r\n"
        )
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413")


def test_concurrent_writers_and_readers_over_http(site: Path) -> None:
    # Arrange: 4 writers post 20 batches of 25 events each while 4 readers ask for answers
    write_model(site / "models", "v1")
    statuses: list[int] = []
    accepted: list[int] = []
    done = threading.Event()
    with live_server(settings_for(site)) as base:

        def writer(w: int) -> None:
            with client(base) as c:
                for b in range(20):
                    batch = [
                        event(f"w{w}-{b}-{j}", user=f"u{j % 5}", item=f"i{1 + (b + j) % 40}")
                        for j in range(25)
                    ]
                    r = c.post("/v1/events", json={"events": batch})
                    statuses.append(r.status_code)
                    accepted.append(r.json()["accepted"])

        def reader() -> None:
            with client(base) as c:
                while not done.is_set():
                    r = c.get("/v1/users/u1/recommendations")
                    statuses.append(r.status_code)

        writers = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        readers = [threading.Thread(target=reader) for _ in range(4)]
        # Act
        for t in writers + readers:
            t.start()
        for t in writers:
            t.join()
        done.set()
        for t in readers:
            t.join()
    # Assert
    assert set(statuses) == {200} and len(statuses) > 80
    assert sum(accepted) == 4 * 20 * 25
    assert store_fingerprint(site / "site.db")[0] == 4 * 20 * 25
