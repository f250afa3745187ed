"""The design's indicators R and I_u, from a site's impressions and ratings (hand-computed)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from edge_kit import client, live_server, settings_for, write_model
from typer.testing import CliRunner

from edge_client.cli import app as edge_cli
from edge_client.outcomes import DAY_MS, ImpressionLog, indicators
from edge_client.store import Event, EventStore
from shared.metrics import recommendation_effect, user_interest

NOW = 1_700_000_000_000 + 40 * DAY_MS


def _rating(eid: str, user: str, item: str, value: float, ts: int) -> Event:
    return Event(eid, user, item, "rating", ts, value)


@pytest.fixture
def rated_site(tmp_path: Path) -> Path:
    """Impressions and ratings whose R and I_u are computed by hand in the tests."""
    db = tmp_path / "site.db"
    store = EventStore(db)
    log = ImpressionLog(db)
    t = NOW - 10 * DAY_MS
    log.record("u1", ["a", "b", "c"], source="model", shown_ms=t)
    log.record("u1", ["a"], source="model", shown_ms=t + 5)  # same pair again: counted once
    log.record("u2", ["a", "d"], source="model", shown_ms=t + 1000)
    log.record("u9", ["z"], source="popularity", shown_ms=NOW - 31 * DAY_MS)  # outside 30 days
    store.add_events(
        [
            _rating("r1", "u1", "a", 4.0, t + 100),
            _rating("r2", "u1", "a", 3.0, t + 200),  # the latest rating of a pair counts
            _rating("r3", "u1", "b", -1.0, t + 300),  # r <= 0 adds nothing, still in N and M
            _rating("r4", "u2", "a", 5.0, t - 1),  # before it was recommended: not R
            _rating("r5", "u2", "d", 2.0, t + 2000),
            *[
                _rating(f"s{n}", "u3", f"x{n}", v, t + n)  # the example: I_u = 3
                for n, v in enumerate([4.0, 3.0, 1.0, 5.0, 2.0])
            ],
            _rating("old", "u4", "x1", 5.0, NOW - 31 * DAY_MS),  # outside 30 days
            Event("v1", "u1", "c", "view", t + 50),
            Event("v2", "u1", "c", "cart", t + 60),
            Event("v3", "u2", "d", "purchase", t + 1500),
        ]
    )
    log.close()
    store.close()
    return db


def test_recommendation_effect_and_user_interest_by_hand(rated_site: Path) -> None:
    # Arrange
    log = ImpressionLog(rated_site)
    # Act
    ind = log.query(lambda c: indicators(c, NOW, 30.0))
    log.close()
    # Assert R: pairs (u1,a)=3 (latest), (u1,b)=-1, (u1,c)=0, (u2,a)=0 (rated before), (u2,d)=2
    assert ind.recommended_pairs == 5
    assert ind.recommendation_effect == pytest.approx((3 + 0 + 0 + 0 + 2) / 5)
    assert ind.recommendation_effect == pytest.approx(recommendation_effect([3, -1, 0, 0, 2]))
    # implicit: strongest later event, view 1 fav 2 cart 3 purchase 4 (ratings are not events
    # of that scale): (u1,c) carted = 3, (u2,d) bought = 4
    assert ind.recommendation_effect_implicit == pytest.approx((3 + 4) / 5)
    # Assert I_u: u1 {a: 3, b: -1} -> 1.5, u2 {a: 5, d: 2} -> 3.5, u3 -> 3 (u4 is outside)
    assert ind.raters == 3
    assert user_interest([4, 3, 1, 5, 2]) == 3.0
    expected = (user_interest([3, -1]) + user_interest([5, 2]) + user_interest([4, 3, 1, 5, 2])) / 3
    assert ind.user_interest == pytest.approx(expected) == pytest.approx((1.5 + 3.5 + 3.0) / 3)
    # implicit I_u: u1 {c: cart 3}, u2 {d: purchase 4}
    assert ind.active_shoppers == 2
    assert ind.user_interest_implicit == pytest.approx((3 + 4) / 2)


def test_the_window_decides_what_counts(rated_site: Path) -> None:
    log = ImpressionLog(rated_site)
    # Act: a 5-day window ending now holds none of it; ending at the ratings holds u1 and u2
    empty = log.query(lambda c: indicators(c, NOW, 5.0))
    early = log.query(lambda c: indicators(c, NOW - 10 * DAY_MS + 250, 1.0))
    log.close()
    # Assert
    assert (empty.recommended_pairs, empty.recommendation_effect, empty.raters) == (0, 0.0, 0)
    assert empty.user_interest == 0.0
    # until t+250: u1's three pairs were shown (u2's at t+1000 not yet); of their ratings
    # only r1, r2 of (u1,a) fall in the window, the latest being 3
    assert early.recommended_pairs == 3
    assert early.recommendation_effect == pytest.approx(3 / 3)


def test_forgetting_a_shopper_deletes_their_impressions(rated_site: Path) -> None:
    # Arrange
    store = EventStore(rated_site)
    log = ImpressionLog(rated_site)
    before = log.count()
    # Act
    store.forget("u1")
    store.forget("u9")  # a shopper with impressions and no events
    after = log.count()
    items = log.query(lambda c: c.execute("SELECT COUNT(*) FROM rec_impression_items").fetchone())
    log.close()
    store.close()
    # Assert
    assert (before, after) == (4, 1)
    assert items == (2,)  # u2's two items; the rest went with their impressions


def test_metrics_and_edge_status_report_r_and_iu(site: Path) -> None:
    # Arrange: u1 is recommended items over HTTP, then rates two of them
    write_model(site / "models", "v1")
    now = time.time()
    with live_server(settings_for(site)) as base, client(base) as c:
        c.post(
            "/v1/events",
            json={
                "event_id": "e0",
                "user_id": "u1",
                "item_id": "i3",
                "event_type": "view",
                "timestamp": now - 10,
            },
        )
        shown = c.get("/v1/users/u1/recommendations", params={"k": 4}).json()["items"]
        time.sleep(0.05)
        later = time.time()
        c.post(
            "/v1/events",
            json={
                "events": [
                    {
                        "event_id": "r1",
                        "user_id": "u1",
                        "item_id": shown[0]["item_id"],
                        "event_type": "rating",
                        "value": 5,
                        "timestamp": later,
                    },
                    {
                        "event_id": "r2",
                        "user_id": "u1",
                        "item_id": shown[1]["item_id"],
                        "event_type": "rating",
                        "value": 3,
                        "timestamp": later,
                    },
                ]
            },
        )
        time.sleep(1.5)  # the impression is flushed within a second
        # Act
        text = c.get("/metrics").text
    status = CliRunner().invoke(
        edge_cli,
        ["status", "--db", str(site / "site.db"), "--model-dir", str(site / "models"), "--json"],
    )
    # Assert: N = 4 pairs, R = (5 + 3) / 4; I_u of u1 = (5 + 3) / 2
    values = dict(re.findall(r"^(fedrec_edge_\w+(?:\{[^}]*\})?) ([-\d.e+]+)$", text, re.M))
    assert float(values['fedrec_edge_recommendation_effect{ratings="explicit"}']) == 2.0
    assert float(values['fedrec_edge_user_interest{ratings="explicit"}']) == 4.0
    assert float(values["fedrec_edge_indicator_recommended_pairs"]) == 4.0
    assert float(values["fedrec_edge_indicator_raters"]) == 1.0
    assert status.exit_code == 0, status.output
    ind = json.loads(status.output)["indicators"]
    assert ind["recommendation_effect"] == 2.0 and ind["user_interest"] == 4.0
