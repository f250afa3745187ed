"""Admit and revoke stores on a SuperLink, and remember which key is which store.

Flower 1.42 identifies a SuperNode by its public key: `flwr supernode register` adds a key
and answers a node id; `flwr supernode unregister <node-id>` marks that node
``unregistered`` — its running SuperNode is refused at its next request (401) and stops, a
restart is refused at activation, and the key can never be registered again ("Public key
already in use"): a revoked store that should come back gets a new key. `flwr supernode
list` does not show the name given at registration, so `StoreRegistry` (a small JSON file)
keeps name, node id and key fingerprint together.

`FlowerAdmin` runs the `flwr` CLI with a given Flower home (its ``config.toml`` names the
connection) and parses its JSON output; `flwr` answers exit status 0 with
``"success": false`` on a refused request, which is checked here.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deploy.certificates import check_store_name, public_key_fingerprint
from deploy.errors import DeployError

DEFAULT_CONNECTION = "fedrec"


def write_connection(
    flwr_home: Path,
    name: str,
    address: str,
    *,
    root_certificates: Path | None,
    make_default: bool = True,
) -> Path:
    """Add or replace connection ``name`` in ``<flwr_home>/config.toml``; keep the others.

    ``root_certificates`` is the CA certificate (or bundle) the SuperLink's certificate is
    checked against; None writes ``insecure = true`` (development only).
    """
    path = flwr_home / "config.toml"
    current: dict[str, Any] = {}
    if path.exists():
        try:
            current = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise DeployError(f"cannot read {path}: {err}") from err
    section = dict(current.get("superlink", {}))
    connections = {k: v for k, v in section.items() if isinstance(v, dict)}
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(root_certificates.resolve())
    connections[name] = entry
    default = name if make_default else section.get("default", name)
    lines = ["[superlink]", f"default = {_toml_value(default)}", ""]
    for conn, values in connections.items():
        lines.append(f"[superlink.{conn}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    flwr_home.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".config.toml.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)
    return path


def _toml_value(value: object) -> str:
    """A TOML value: booleans, numbers, strings, arrays and (inline) tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


class FlowerAdmin:
    """The `flwr` CLI against one SuperLink connection of one Flower home."""

    def __init__(
        self,
        flwr_home: Path,
        connection: str = DEFAULT_CONNECTION,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        from deploy.flower_processes import FLOWER_ENV, flower_bin

        self.flwr_home = flwr_home.resolve()
        self.connection = connection
        self.timeout = timeout
        self.flwr = flower_bin("flwr")
        self.env = {**os.environ, **FLOWER_ENV, **(env or {}), "FLWR_HOME": str(self.flwr_home)}

    def _call(self, *args: str) -> dict[str, Any]:
        argv = [self.flwr, *args, self.connection, "--format", "json"]
        try:
            result = subprocess.run(
                argv,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as err:
            raise DeployError(
                f"`flwr {' '.join(args[:2])}` timed out after {self.timeout} s"
            ) from err
        try:
            payload = json.loads(result.stdout)
        except json.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict) or result.returncode != 0 or not payload.get("success"):
            detail = (payload.get("error-message") if isinstance(payload, dict) else None) or (
                result.stdout + result.stderr
            ).strip()[-1500:]
            raise DeployError(
                f"`flwr {' '.join(args[:2])}` against connection {self.connection!r} failed: "
                f"{detail}"
            )
        return payload

    def register(self, public_key: Path, name: str) -> int:
        """Register a store's OpenSSH public key; returns the SuperLink's node id."""
        payload = self._call("supernode", "register", str(public_key), "--name", name)
        return int(payload["node-id"])

    def unregister(self, node_id: int) -> None:
        """Unregister (revoke) a node: it is refused from its next request on."""
        self._call("supernode", "unregister", str(node_id))

    def nodes(self) -> dict[int, dict[str, Any]]:
        """Every node the SuperLink knows, by node id (``status``: registered, online, ...)."""
        payload = self._call("supernode", "list")
        nodes = payload.get("nodes", [])
        return {int(n["node-id"]): dict(n) for n in nodes} if isinstance(nodes, list) else {}


@dataclass
class StoreRecord:
    """One store as the coordinator knows it."""

    name: str
    node_id: int
    fingerprint: str
    public_key: str
    registered_at: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        """Registered and not revoked."""
        return self.revoked_at is None


class StoreRegistry:
    """``stores.json``: name -> node id, key fingerprint, registration and revocation times."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, StoreRecord]:
        """Every record, by store name (empty when the file does not exist yet)."""
        if not self.path.exists():
            return {}
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return {name: StoreRecord(**rec) for name, rec in raw["stores"].items()}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DeployError(f"{self.path} is not a store registry: {err}") from err

    def save(self, records: Mapping[str, StoreRecord]) -> None:
        """Write every record atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"stores": {name: asdict(rec) for name, rec in sorted(records.items())}}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.path)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def register_store(
    admin: FlowerAdmin, registry: StoreRegistry, name: str, public_key: Path
) -> StoreRecord:
    """Admit a store: register its key on the SuperLink and record it.

    Idempotent for the same key (an active record whose node the SuperLink still knows is
    returned as is); a different key for an active store name is refused — revoke first.
    """
    check_store_name(name)
    fingerprint = public_key_fingerprint(public_key)
    records = registry.load()
    known = records.get(name)
    if known is not None and not known.active and known.fingerprint == fingerprint:
        raise DeployError(
            f"the key {fingerprint} of store {name} was revoked at {known.revoked_at}; a revoked "
            "key cannot be registered again: create a new key (fedrec deploy pki store-key)"
        )
    if known is not None and known.active:
        if known.fingerprint != fingerprint:
            raise DeployError(
                f"store {name} is registered with another key ({known.fingerprint}); "
                f"revoke it first (fedrec deploy store revoke {name})"
            )
        if known.node_id in admin.nodes():
            return known
    node_id = admin.register(public_key, name)
    record = StoreRecord(name, node_id, fingerprint, str(public_key.resolve()), _now())
    records[name] = record
    registry.save(records)
    return record


def register_stores(
    admin: FlowerAdmin, registry: StoreRegistry, keys: Mapping[str, Path]
) -> dict[str, StoreRecord]:
    """`register_store` for many stores at once: one node listing, registrations in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    records = registry.load()
    # Listing costs a `flwr` call; a store never recorded needs no listing.
    recorded = [r for name, r in records.items() if name in keys and r.active]
    nodes = admin.nodes() if recorded else {}
    todo: dict[str, tuple[Path, str]] = {}
    for name, public_key in keys.items():
        check_store_name(name)
        fingerprint = public_key_fingerprint(public_key)
        known = records.get(name)
        if known is not None and known.active and known.fingerprint != fingerprint:
            raise DeployError(f"store {name} is registered with another key; revoke it first")
        if known is not None and not known.active and known.fingerprint == fingerprint:
            raise DeployError(f"the key of store {name} was revoked; create a new key")
        if known is None or not known.active or known.node_id not in nodes:
            todo[name] = (public_key, fingerprint)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(todo)))) as pool:
        futures = {name: pool.submit(admin.register, key, name) for name, (key, _) in todo.items()}
        errors: list[DeployError] = []
        for name, future in futures.items():
            try:
                node_id = future.result()
            except DeployError as err:
                errors.append(err)
                continue
            key, fingerprint = todo[name]
            records[name] = StoreRecord(name, node_id, fingerprint, str(key.resolve()), _now())
    if len(errors) < len(todo):
        registry.save(records)  # keep the ones that worked, even when another failed
    if errors:
        raise errors[0]
    return {name: records[name] for name in keys}


def revoke_store(admin: FlowerAdmin, registry: StoreRegistry, name: str) -> StoreRecord:
    """Revoke a store: unregister its node on the SuperLink and record when.

    Its SuperNode is refused from its next request on (it stops within a heartbeat), and
    its key cannot be registered again.
    """
    records = registry.load()
    record = records.get(name)
    if record is None:
        raise DeployError(f"store {name} is not in {registry.path}")
    if not record.active:
        raise DeployError(f"store {name} was already revoked at {record.revoked_at}")
    node = admin.nodes().get(record.node_id)
    if node is not None and node.get("status") != "unregistered":
        admin.unregister(record.node_id)
    record.revoked_at = _now()
    registry.save(records)
    return record


def store_statuses(admin: FlowerAdmin, registry: StoreRegistry) -> list[dict[str, Any]]:
    """Each recorded store with the SuperLink's view of its node (status, last online)."""
    nodes = admin.nodes()
    rows = []
    for name, rec in sorted(registry.load().items()):
        node = nodes.get(rec.node_id, {})
        rows.append(
            {
                "store": name,
                "node_id": rec.node_id,
                "fingerprint": rec.fingerprint,
                "registered_at": rec.registered_at,
                "revoked_at": rec.revoked_at,
                "status": str(node.get("status", "unknown to the SuperLink")),
                "online_at": node.get("online-at"),
            }
        )
    return rows
