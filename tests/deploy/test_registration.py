"""Flower connections, the store registry and the admission/revocation bookkeeping.

The SuperLink side of registration is exercised with real processes in
test_local_stack.py; here `FakeSuperLink` stands in for it so that each bookkeeping rule
(idempotency, a second key, a revoked key, partial failures) is checked on its own.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from flwr.cli.flower_config import parse_superlink_connection

from deploy.certificates import create_store_key
from deploy.errors import DeployError
from deploy.registration import (
    FlowerAdmin,
    StoreRegistry,
    register_store,
    register_stores,
    revoke_store,
    store_statuses,
    write_connection,
)


class FakeSuperLink:
    """Registers keys like Flower does: a key is usable once, even after unregistration."""

    def __init__(self, fail_for: str | None = None) -> None:
        self.keys: dict[bytes, int] = {}
        self.status: dict[int, str] = {}
        self.fail_for = fail_for
        self.calls: list[str] = []

    def register(self, public_key: Path, name: str) -> int:
        self.calls.append(f"register {name}")
        if name == self.fail_for:
            raise DeployError(f"`flwr supernode register` failed for {name}")
        blob = public_key.read_bytes().split()[1]
        if blob in self.keys:
            raise DeployError("[code: 23] Public key already in use.")
        node_id = 1000 + len(self.keys)
        self.keys[blob] = node_id
        self.status[node_id] = "registered"
        return node_id

    def unregister(self, node_id: int) -> None:
        self.calls.append(f"unregister {node_id}")
        self.status[node_id] = "unregistered"

    def nodes(self) -> dict[int, dict[str, Any]]:
        self.calls.append("list")
        return {i: {"node-id": str(i), "status": s} for i, s in self.status.items()}


def key(tmp_path: Path, name: str, suffix: str = "") -> Path:
    return create_store_key(
        tmp_path / f"{name}{suffix}.key", tmp_path / f"{name}{suffix}.pub", name=name
    ).public_key


def test_connection_is_what_flower_reads_and_others_are_kept(tmp_path: Path) -> None:
    # Arrange: an existing config.toml with Flower's simulation connection
    (tmp_path / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        "options.num-supernodes = 10\n"
    )
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    # Act
    write_connection(tmp_path, "fedrec", "coordinator.example.com:9091", root_certificates=ca)
    write_connection(tmp_path, "dev", "127.0.0.1:9091", root_certificates=None, make_default=False)
    # Assert: Flower's own parser reads ours, the simulation connection survived
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["superlink"]["default"] == "fedrec"
    ours = parse_superlink_connection(config["superlink"]["fedrec"], "fedrec")
    assert ours.address == "coordinator.example.com:9091"
    assert ours.root_certificates == str(ca.resolve()) and not ours.insecure
    assert parse_superlink_connection(config["superlink"]["dev"], "dev").insecure is True
    local = parse_superlink_connection(config["superlink"]["local"], "local")
    assert local.address == ":local:" and local.options is not None


def test_registration_is_idempotent_per_key(tmp_path: Path) -> None:
    link, registry = FakeSuperLink(), StoreRegistry(tmp_path / "stores.json")
    pub = key(tmp_path, "store-01")
    first = register_store(link, registry, "store-01", pub)  # type: ignore[arg-type]
    again = register_store(link, registry, "store-01", pub)  # type: ignore[arg-type]
    assert first == again and link.calls.count("register store-01") == 1
    assert registry.load()["store-01"].node_id == first.node_id


def test_another_key_for_an_active_store_is_refused(tmp_path: Path) -> None:
    link, registry = FakeSuperLink(), StoreRegistry(tmp_path / "stores.json")
    register_store(link, registry, "store-01", key(tmp_path, "store-01"))  # type: ignore[arg-type]
    with pytest.raises(DeployError, match="revoke it first"):
        register_store(link, registry, "store-01", key(tmp_path, "store-01", "-b"))  # type: ignore[arg-type]


def test_revocation_is_recorded_and_the_key_stays_revoked(tmp_path: Path) -> None:
    link, registry = FakeSuperLink(), StoreRegistry(tmp_path / "stores.json")
    pub = key(tmp_path, "store-02")
    record = register_store(link, registry, "store-02", pub)  # type: ignore[arg-type]
    # Act
    revoked = revoke_store(link, registry, "store-02")  # type: ignore[arg-type]
    # Assert
    assert revoked.revoked_at and not registry.load()["store-02"].active
    assert link.status[record.node_id] == "unregistered"
    with pytest.raises(DeployError, match="already revoked"):
        revoke_store(link, registry, "store-02")  # type: ignore[arg-type]
    with pytest.raises(DeployError, match="cannot be registered again"):
        register_store(link, registry, "store-02", pub)  # type: ignore[arg-type]
    # a new key re-admits the store under a new node id
    fresh = register_store(link, registry, "store-02", key(tmp_path, "store-02", "-new"))  # type: ignore[arg-type]
    assert fresh.active and fresh.node_id != record.node_id
    rows = store_statuses(link, registry)  # type: ignore[arg-type]
    assert [(r["store"], r["status"]) for r in rows] == [("store-02", "registered")]
    with pytest.raises(DeployError, match="not in"):
        revoke_store(link, registry, "store-77")  # type: ignore[arg-type]


def test_batch_registration_keeps_what_worked_when_one_fails(tmp_path: Path) -> None:
    link, registry = FakeSuperLink(fail_for="store-02"), StoreRegistry(tmp_path / "stores.json")
    keys = {n: key(tmp_path, n) for n in ("store-01", "store-02", "store-03")}
    # Act
    with pytest.raises(DeployError, match="store-02"):
        register_stores(link, registry, keys)  # type: ignore[arg-type]
    # Assert: the two that worked are recorded (else their keys would be "in use" forever)
    assert sorted(registry.load()) == ["store-01", "store-03"]
    assert "list" not in link.calls  # nothing recorded before: no listing needed
    # and a retry registers only the missing one
    link.fail_for = None
    records = register_stores(link, registry, keys)  # type: ignore[arg-type]
    assert sorted(records) == sorted(keys)
    assert link.calls.count("register store-01") == 1


def test_a_lost_superlink_database_means_registering_again(tmp_path: Path) -> None:
    registry = StoreRegistry(tmp_path / "stores.json")
    pub = key(tmp_path, "store-01")
    old = register_store(FakeSuperLink(), registry, "store-01", pub)  # type: ignore[arg-type]
    new_link = FakeSuperLink()  # a SuperLink started on an empty database
    new = register_store(new_link, registry, "store-01", pub)  # type: ignore[arg-type]
    assert new.node_id in new_link.status and new.registered_at >= old.registered_at


def test_a_corrupt_registry_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "stores.json").write_text("{not json")
    with pytest.raises(DeployError, match="not a store registry"):
        StoreRegistry(tmp_path / "stores.json").load()


def test_flwr_errors_become_one_clear_error(tmp_path: Path) -> None:
    # A real `flwr` call against a connection where nothing listens.
    write_connection(tmp_path, "fedrec", "127.0.0.1:1", root_certificates=None)
    with pytest.raises(DeployError, match=r"flwr supernode list.*'fedrec' failed"):
        FlowerAdmin(tmp_path, timeout=60).nodes()
