"""The A/B replay: the better of two model versions wins with a significant result."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from edge_client.ab_site import ABSite
from simulations.ab_replay import ABReplayConfig, run_ab_replay, split_holdout
from simulations.cli import app as sim_cli
from simulations.errors import SimulationError


def test_holdout_keeps_each_shoppers_newest_events() -> None:
    events = pd.DataFrame(
        {
            "user_id": ["a"] * 10 + ["b"] * 3,
            "item_id": [str(i) for i in range(13)],
            "event_type": "view",
            "ts_ms": [10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 1, 2, 3],
            "value": float("nan"),
            "site": "s",
        }
    )
    past, held = split_holdout(events, 0.2)
    assert sorted(held["ts_ms"].tolist()) == [9, 10]  # a's newest 2 of 10; b has too few
    assert len(past) == 11 and set(past["user_id"]) == {"a", "b"}


def test_a_trained_gru_beats_popularity_significantly(tmp_path: Path) -> None:
    # Arrange: 2 synthetic sites; control = popularity, candidate = a GRU trained 10 epochs
    cfg = ABReplayConfig(
        out_dir=tmp_path / "run",
        arms=("pop", "gru:10"),
        n_sites=2,
        shoppers_per_site=90,
        n_items=80,
        events_per_shopper=25.0,
        model_config={"dim": 32, "hidden": 32, "max_len": 20},
        train_config={"batch_size": 32, "lr": 5e-3},
    )
    # Act
    payload = run_ab_replay(cfg)
    # Assert: the GRU arm wins on CTR with p < 0.05, every site reported exact counts
    win = payload["winner"]["ctr"]
    assert win["arm"] == "B" and win["significant"], payload["arms"]
    assert win["p_values_vs_best"]["A"] < 0.01
    offline = {m["arm"]: m["offline_ndcg@10"] for m in payload["replay"]["arm_models"]}
    assert offline["B"] > offline["A"]  # the better model offline is the one that wins live
    ctr = [arm["ctr"]["rate"] for arm in payload["arms"]]
    assert ctr[1] > ctr[0]
    assert len(payload["sites"]) == 2 and all(s["epsilon"] == 0 for s in payload["sites"])
    exposed = sum(arm["counts"]["exposed"] for arm in payload["arms"])
    assert 0 < exposed <= 180
    replay = payload["replay"]
    impressions = sum(site["impressions"] for site in replay["sites"].values())
    assert sum(arm["counts"]["impressions"] for arm in payload["arms"]) == impressions
    assert (
        json.loads((tmp_path / "run" / "ab_replay.json").read_text())["winner"] == payload["winner"]
    )
    for site in replay["sites"]:  # each site's release is recorded in its own site.db
        with ABSite(tmp_path / "run" / "sites" / site / "site.db") as ab:
            assert len(ab.releases(payload["experiment_id"])) == 1


def test_bad_settings_are_refused() -> None:
    with pytest.raises(SimulationError, match="one traffic weight per arm"):
        ABReplayConfig(out_dir=Path("x"), arms=("pop", "gru"), split=(1.0,))
    result = CliRunner().invoke(
        sim_cli, ["ab", "--arms", "pop,nonsense", "--out", "/nonexistent/x"]
    )
    assert result.exit_code != 0


def test_sim_ab_help() -> None:
    result = CliRunner().invoke(sim_cli, ["ab", "--help"])
    assert result.exit_code == 0 and "Example: fedrec sim ab" in result.output
