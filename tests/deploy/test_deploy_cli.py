"""`fedrec deploy` commands that need no running stack (typer's CliRunner, real files/HTTP)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy.cli import app as deploy_app
from deploy.errors import DeployError
from shared.cli import app

runner = CliRunner()


def run(*args: str) -> tuple[int, str, BaseException | None]:
    result = runner.invoke(app, ["deploy", *args])
    return result.exit_code, result.stdout, result.exception


def test_every_command_has_help_with_an_example() -> None:
    def commands(typer_app: object, prefix: list[str]) -> Iterator[list[str]]:
        for cmd in typer_app.registered_commands:  # type: ignore[attr-defined]
            yield [*prefix, cmd.name or cmd.callback.__name__]
        for group in typer_app.registered_groups:  # type: ignore[attr-defined]
            yield from commands(group.typer_instance, [*prefix, group.name])

    names = list(commands(deploy_app, []))
    assert len(names) >= 14
    for name in names:
        code, out, _ = run(*name, "--help")
        assert code == 0 and "Example:" in out, name


def test_pki_init_show_store_key_and_server_rotation(tmp_path: Path) -> None:
    pki = str(tmp_path / "pki")
    # Act 1: everything at once
    code, out, err = run(
        "pki", "init", "--dir", pki, "--host", "superlink", "--host", "127.0.0.1",
        "--store", "store-01", "--json",
    )  # fmt: skip
    assert code == 0, err
    created = json.loads(out)
    assert created["superlink"]["dns_names"] == ["superlink"]
    assert [s["name"] for s in created["stores"]] == ["store-01"]
    # Act 2: one more store, then rotate the SuperLink certificate for a new name
    code, out, err = run("pki", "store-key", "store-02", "--dir", pki, "--json")
    assert code == 0, err
    assert json.loads(out)["fingerprint"].startswith("SHA256:")
    code, out, err = run("pki", "server", "--dir", pki, "--host", "new.example.com", "--json")
    assert code == 0, err
    assert json.loads(out)["serial"] != created["superlink"]["serial"]
    # Assert: show checks the rotated certificate against the CA and lists both stores
    code, out, err = run("pki", "show", "--dir", pki, "--host", "new.example.com", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert [s["name"] for s in shown["stores"]] == ["store-01", "store-02"]
    assert shown["superlink"]["dns_names"] == ["new.example.com"]
    code, _, err = run("pki", "show", "--dir", pki, "--host", "superlink")
    assert code != 0 and "does not name" in str(err)
    # the CA is never replaced by accident
    code, _, err = run("pki", "ca", "--dir", pki)
    assert code != 0 and isinstance(err, DeployError) and "already exists" in str(err)


def test_ca_bundle_and_connection(tmp_path: Path) -> None:
    for name in ("old", "new"):
        assert run("pki", "ca", "--dir", str(tmp_path / name))[0] == 0
    code, _, err = run(
        "pki", "ca-bundle", str(tmp_path / "old/ca.crt"), str(tmp_path / "new/ca.crt"),
        "-o", str(tmp_path / "bundle.crt"),
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "bundle.crt").read_text().count("BEGIN CERTIFICATE") == 2
    home = str(tmp_path / "flwr")
    code, _, err = run(
        "connection", "fedrec", "--address", "c.example.com:9091",
        "--ca", str(tmp_path / "bundle.crt"), "--flwr-home", home,
    )  # fmt: skip
    assert code == 0, err
    assert "root-certificates" in (tmp_path / "flwr/config.toml").read_text()
    code, _, err = run("connection", "fedrec", "--address", "x:1", "--flwr-home", home)
    assert code != 0 and "exactly one of --ca" in str(err)


REPLIES = {"/ok": (200, b"{}"), "/notready": (200, b'{"ready": false}'), "/down": (503, b"")}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = REPLIES.get(self.path, (404, b""))
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def http_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_exit_status_follows_the_answer(http_server: str) -> None:
    assert run("healthcheck", f"{http_server}/ok")[0] == 0
    for path, reason in [("/notready", "not ready"), ("/down", "HTTP 503")]:
        code, _, err = run("healthcheck", f"{http_server}{path}")
        assert code != 0 and reason in str(err)
    code, _, err = run("healthcheck", "http://127.0.0.1:1/health", "--timeout", "2")
    assert code != 0 and "ConnectError" in str(err)


def test_backup_command_copies_and_prunes(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "store-01" / "site.db"
    db.parent.mkdir()
    con = sqlite3.connect(db)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t (x)")
    con.commit()
    code, out, err = run("backup", str(db), "-o", str(tmp_path / "bk"), "--json")
    con.close()
    assert code == 0, err
    (result,) = json.loads(out)["backups"]
    assert result["integrity"] == "ok" and Path(result["destination"]).exists()


def test_status_and_down_without_a_stack(tmp_path: Path) -> None:
    code, out, _ = run("status", "--state-dir", str(tmp_path), "--json")
    assert code == 1 and json.loads(out) == {
        "state_dir": str(tmp_path.resolve()),
        "healthy": False,
        "components": [],
    }
    code, out, err = run("down", "--state-dir", str(tmp_path), "--json")
    assert code == 0, err
    assert json.loads(out)["stopped"] == []
    code, _, err = run("down", "--state-dir", str(tmp_path), "--purge")
    assert code != 0 and "does not look like a local stack" in str(err)
    assert tmp_path.exists()


def test_store_key_alone_makes_an_owner_only_stores_directory(tmp_path: Path) -> None:
    import stat

    code, out, err = run("pki", "store-key", "store-05", "--dir", str(tmp_path), "--json")
    assert code == 0, err
    made = json.loads(out)
    assert stat.S_IMODE((tmp_path / "stores").stat().st_mode) == 0o700
    for key in ("private_key", "admin_token"):
        assert stat.S_IMODE(Path(made[key]).stat().st_mode) == 0o600


def test_demo_data_is_what_the_stores_and_the_coordinator_read(tmp_path: Path) -> None:
    from shared.readers import read_dataset
    from shared.vocab import ItemVocab

    code, _, err = run(
        "demo-data", "--stores", "2", "--shoppers", "10", "--items", "40", "-o", str(tmp_path)
    )
    assert code == 0, err
    vocab = ItemVocab.load(tmp_path / "catalogue.json")
    users = []
    for store in ("store-01", "store-02"):
        # the reader behind `fedrec edge import` and POST /v1/admin/import
        events = read_dataset(tmp_path / f"{store}.csv", "events").events
        assert set(events["site"]) == {store} and len(events) >= 50
        assert all(item in vocab for item in set(events["item_id"]))
        users.append(set(events["user_id"]))
    assert not users[0] & users[1]
