"""A/B serving at the edge: each shopper's arm model answers over HTTP; impressions are logged."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from edge_kit import client, live_server, settings_for, write_model

from edge_client.ab_serving import ExperimentServing
from edge_client.ab_site import ABSite
from edge_client.outcomes import ImpressionLog, arm_counts
from shared.ab import ArmSpec, ExperimentSpec, assign_arm

SPEC = ExperimentSpec(
    "ab-test-1", (ArmSpec("A", "v1", 1.0), ArmSpec("B", "v2", 1.0)), window_s=600.0
)


def _wait(predicate: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.05)


def test_each_shopper_is_served_by_their_arm_over_http(site: Path) -> None:
    # Arrange: v1 is CURRENT; the site received an experiment v1 vs v2
    write_model(site / "models", "v1", seed=1)
    write_model(site / "models", "v2", seed=2, current=False)
    with ABSite(site / "site.db") as ab:
        ab.upsert([SPEC])
    users = [f"u{i}" for i in range(24)]
    now = int(time.time())
    with live_server(settings_for(site)) as base, client(base) as c:
        c.post(
            "/v1/events",
            json={
                "events": [
                    {
                        "event_id": f"e{u}",
                        "user_id": u,
                        "item_id": "i3",
                        "event_type": "view",
                        "timestamp": now - 5,
                    }
                    for u in users
                ]
            },
        )
        # Act
        answers = {
            u: c.get(f"/v1/users/{u}/recommendations", params={"k": 3}).json() for u in users
        }
        first = answers[users[0]]["items"][0]["item_id"]
        c.post(
            "/v1/events",
            json={
                "event_id": "click",
                "user_id": users[0],
                "item_id": first,
                "event_type": "cart",
                "timestamp": time.time() + 1,
            },
        )
        time.sleep(1.2)  # impressions are flushed every second
    # Assert: the version answering is the shopper's arm (hash of experiment and shopper)
    for user, answer in answers.items():
        arm = assign_arm(SPEC.experiment_id, user, SPEC.weights)
        assert answer["model_version"] == SPEC.arms[arm].version, user
    assert {a["model_version"] for a in answers.values()} == {"v1", "v2"}
    log = ImpressionLog(site / "site.db")
    counts = log.query(lambda c: arm_counts(c, SPEC.experiment_id, SPEC.window_ms, 2))
    log.close()
    arm0 = assign_arm(SPEC.experiment_id, users[0], SPEC.weights)
    assert sum(c["exposed"] for c in counts) == len(users)
    assert counts[arm0]["clicked"] == counts[arm0]["carted"] == 1
    assert counts[1 - arm0]["clicked"] == 0


def test_an_experiment_goes_live_only_with_every_arm_and_stops_cleanly(site: Path) -> None:
    # Arrange: v2's model is not on the site yet
    write_model(site / "models", "v1", seed=1)
    with ABSite(site / "site.db") as ab:
        ab.upsert([SPEC])
    serving = ExperimentServing(site / "site.db", site / "models")
    # Act 1
    serving.refresh()
    waiting = (serving.live, serving.problem)
    # Act 2: the model arrives (as ab_models stores it) and the site marks the change
    write_model(site / "models", "v2", seed=2, current=False)
    with ABSite(site / "site.db") as ab:
        ab.touch()
    serving.refresh()
    live = serving.live
    # Act 3: the coordinator no longer sends it (stopped)
    with ABSite(site / "site.db") as ab:
        ab.upsert([])
    serving.refresh()
    serving.close()
    # Assert
    assert waiting[0] is None and "v2" in waiting[1]
    assert live is not None and [m.version for m in live.models] == ["v1", "v2"]
    assert serving.live is None


def test_close_waits_for_a_running_refresh_and_later_refreshes_do_nothing(site: Path) -> None:
    # Arrange: a refresh in progress on another thread holds the serving lock
    write_model(site / "models", "v1", seed=1)
    serving = ExperimentServing(site / "site.db", site / "models")
    serving.refresh()
    serving._lock.acquire()
    closer = threading.Thread(target=serving.close)
    # Act
    closer.start()
    closer.join(0.3)
    waited = closer.is_alive()
    serving._lock.release()
    closer.join(10)
    serving.refresh()  # the background loop's next turn, after the service closed it
    # Assert: close did not pull the connection from under the refresh; none is used after
    assert waited
    assert not closer.is_alive()
    assert serving.live is None
