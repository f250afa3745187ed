"""The coordinator registry: rounds, site results, versions, publication, app accounting."""

import json
from pathlib import Path

import pytest

from coordinator.errors import RegistryError
from coordinator.registry import ModelVersion, Registry, RoundSummary, SiteResult
from coordinator.reports import privacy_report, status_report


def _version(name: str, round_: int | None = 1, parent: str | None = None) -> ModelVersion:
    return ModelVersion(
        version=name,
        round=round_,
        parent=parent,
        sha256="ab" * 32,
        path=f"/models/{name}",
        kind="gru",
        n_items=10,
        metrics={"hr@10": 0.1},
        privacy_mode="store",
        epsilon_max=1.5,
        epsilon_mean=1.0,
        delta=1e-5,
    )


def _summary(status: str = "completed", version: str | None = "v1") -> RoundSummary:
    return RoundSummary(
        status=status,
        sites_asked=3,
        sites_answered=3,
        sites_accepted=2,
        sites_rejected=1,
        sites_refused=0,
        sites_failed=0,
        bytes_down=300,
        bytes_up=200,
        seconds=1.5,
        train_metrics={"train-loss": 2.0},
        model_version=version,
    )


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "coordinator.db")


def test_missing_registry_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no coordinator registry"):
        Registry(tmp_path / "absent.db", create=False)
    assert not (tmp_path / "absent.db").exists()


def test_round_numbers_continue_across_runs(registry: Registry) -> None:
    run1 = registry.start_run(
        11, {}, mode="rounds", privacy_mode="store", strategy="fedavg", secagg=False
    )
    assert registry.next_round_number() == 1
    registry.start_round(run1, 1, 3, 100)
    run2 = registry.start_run(
        12, {}, mode="rounds", privacy_mode="store", strategy="fedavg", secagg=False
    )
    assert registry.next_round_number() == 2
    registry.start_round(run2, 2, 3, 100)
    assert [r["number"] for r in registry.rounds()] == [2, 1]


def test_site_results_update_the_sites_table(registry: Registry) -> None:
    # Arrange
    run = registry.start_run(
        1, {}, mode="rounds", privacy_mode="store", strategy="fedavg", secagg=False
    )
    rid = registry.start_round(run, 1, 2, 10)
    # Act
    registry.record_site_result(
        rid,
        SiteResult(
            "store-a",
            2**63 + 5,
            "train",
            "accepted",
            num_examples=40,
            epsilon=0.7,
            delta=1e-5,
            epsilon_budget=8.0,
            new_events=12,
        ),
    )
    registry.record_site_result(rid, SiteResult("store-b", 9, "train", "rejected", "NaN"))
    registry.finish_round(rid, _summary())
    # Assert
    sites = {s["name"]: s for s in registry.sites()}
    assert sites["store-a"]["epsilon_spent"] == 0.7
    assert sites["store-a"]["node_id"] == str(2**63 + 5)  # unsigned 64-bit ids survive
    assert sites["store-a"]["rounds_trained"] == 1
    assert sites["store-b"]["rounds_trained"] == 0
    assert registry.site_epsilons() == [0.7]
    assert registry.site_name_for_node(9) == "store-b"
    assert registry.site_name_for_node(123) == "node-123"
    assert [r["outcome"] for r in registry.site_results(1)] == ["accepted", "rejected"]
    assert registry.round_by_number(1)["train_metrics"] == {"train-loss": 2.0}


def test_publish_and_rollback(registry: Registry) -> None:
    registry.add_model(_version("v1"))
    registry.add_model(_version("v2", 2, "v1"))
    registry.add_model(_version("v3", 3, "v2"))
    with pytest.raises(RegistryError, match="nothing is published"):
        registry.rollback()
    registry.publish("v1")
    registry.publish("v3")
    assert registry.published() is not None and registry.published().version == "v3"  # type: ignore[union-attr]
    # Act: roll back goes to the version published before
    back = registry.rollback()
    # Assert
    assert back.version == "v1"
    assert [m.version for m in registry.models() if m.published] == ["v1"]
    assert registry.publications()[0]["action"] == "rollback"
    assert registry.rollback("v2").version == "v2"
    with pytest.raises(RegistryError, match="unknown model version"):
        registry.publish("v9")


def test_duplicate_versions_are_refused(registry: Registry) -> None:
    registry.add_model(_version("v1"))
    with pytest.raises(RegistryError, match="already registered"):
        registry.add_model(_version("v1"))


def test_app_accountant_segments_compose(registry: Registry) -> None:
    cfg_a = {"population_size": 100, "target_delta": 1e-5}
    assert registry.app_accountant_state(cfg_a) is None
    registry.save_app_accountant(cfg_a, {"s": 1}, 1.0, 1e-5, 2)
    assert registry.app_accountant_state(cfg_a) == {"s": 1}
    registry.save_app_accountant(cfg_a, {"s": 2}, 1.5, 1e-5, 3)
    # A new configuration closes the old segment; both count.
    cfg_b = {"population_size": 200, "target_delta": 1e-5}
    assert registry.app_accountant_state(cfg_b) is None
    registry.save_app_accountant(cfg_b, {"s": 3}, 0.5, 1e-5, 1)
    eps, delta, releases = registry.app_privacy_spent()
    assert eps == pytest.approx(2.0)
    assert delta == pytest.approx(2e-5)
    assert releases == 4


def test_reports_are_json_serialisable(registry: Registry) -> None:
    run = registry.start_run(
        1, {"a": 1}, mode="rounds", privacy_mode="store", strategy="fedavg", secagg=False
    )
    rid = registry.start_round(run, 1, 1, 1)
    registry.record_site_result(
        rid, SiteResult("s", 1, "train", "accepted", epsilon=1.0, epsilon_budget=4.0)
    )
    registry.finish_round(rid, _summary())
    registry.add_model(_version("v1"))
    registry.publish("v1")
    registry.finish_run(run, "completed")
    # Act
    status = json.loads(json.dumps(status_report(registry)))
    privacy = json.loads(json.dumps(privacy_report(registry)))
    # Assert
    assert status["last_run"]["status"] == "completed"
    assert status["published_version"] == "v1"
    assert status["sites"][0]["share_of_budget"] == 0.25
    assert privacy["store_mode"]["sites"][0]["epsilon_spent"] == 1.0
    assert privacy["versions"][0]["epsilon_max"] == 1.5
