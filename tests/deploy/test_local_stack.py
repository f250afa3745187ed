"""`fedrec deploy local|status|down` and the stack's security, with real processes on 127.0.0.1.

One stack — a SuperLink with TLS and SuperNode authentication, three SuperNodes and three
edge services, started with `fedrec deploy local --sites 3` — serves every test of this
module, in file order: health and layout, the edge admin token, intruders (an unregistered
key, a wrong CA), a revoked store, then a federated DP round that every store must serve
before `fedrec deploy down` must leave nothing running. The fixture stops the stack even
when a test fails and proves that no process of it is left.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from deploy.certificates import PkiLayout, create_ca, create_store_key
from deploy.errors import DeployError
from deploy.flower_processes import flower_bin, flower_processes_under, free_port
from deploy.local_stack import LocalStack, stack_processes
from deploy.registration import FlowerAdmin, write_connection

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
FEDREC = str(Path(sys.executable).parent / "fedrec")
SCRIPTS = REPO / "deploy" / "scripts"
TINY_MODEL = '{"dim": 16, "hidden": 16, "max_len": 20, "dropout": 0.0}'
STORES = ["store-01", "store-02", "store-03"]
# What a refused SuperNode logs (Flower's exit code 305, SUPERNODE_CONNECTION_ERROR); the
# process itself exits with status 1.
REFUSED = "Failed to activate SuperNode"


def fedrec(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> Any:
    """Run the `fedrec` command; returns the CompletedProcess (text)."""
    return subprocess.run(
        [FEDREC, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        check=False,
    )


@dataclass
class Stack:
    """The running stack: its state dir and what `fedrec deploy local --json` reported."""

    root: Path
    report: dict[str, Any]

    @property
    def pki(self) -> PkiLayout:
        return PkiLayout(self.root / "pki")

    def component(self, name: str) -> dict[str, Any]:
        return next(c for c in self.report["components"] if c["name"] == name)

    def edge_url(self, store: str) -> str:
        return f"http://127.0.0.1:{self.component(f'edge-{store}')['ports']['http']}"

    @property
    def superlink_address(self) -> str:
        return f"127.0.0.1:{self.component('superlink')['ports']['api']}"

    def admin(self) -> FlowerAdmin:
        return LocalStack(self.root).admin()

    def online_nodes(self) -> set[int]:
        return {i for i, n in self.admin().nodes().items() if n.get("status") == "online"}

    def start_supernode(
        self, name: str, key: Path, ca: Path, site: Path, *extra: str
    ) -> subprocess.Popen[bytes]:
        """A SuperNode this test starts itself (the test stops it)."""
        site.mkdir(parents=True, exist_ok=True)
        (site / "models").mkdir(exist_ok=True)
        env = {**LocalStack(self.root)._env(), "FLWR_HOME": str(site / "flwr")}
        with (self.root / "logs" / f"test-{name}.log").open("ab") as log:
            return subprocess.Popen(
                [
                    flower_bin("flower-supernode"),
                    "--superlink",
                    self.superlink_address,
                    "--root-certificates",
                    str(ca),
                    "--auth-supernode-private-key",
                    str(key),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"site-dir='{site}'",
                    *extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill a process a test started, with everything it spawned."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [*children]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
    proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("deploy") / "stack"
    try:
        up = fedrec(
            "deploy", "local", "--sites", "3", "--state-dir", str(root), "--json", timeout=300
        )
        assert up.returncode == 0, up.stderr[-4000:]
        yield Stack(root, json.loads(up.stdout))
    finally:
        fedrec("deploy", "down", "--state-dir", str(root), timeout=120)
        LocalStack(root).down(timeout=5)  # a second, in-process sweep; a no-op when clean
        assert not stack_processes(root)


def test_local_returns_once_everything_is_healthy(stack: Stack) -> None:
    # Assert: `deploy local` reported every component healthy, and `deploy status` agrees
    kinds = [c["kind"] for c in stack.report["components"]]
    assert sorted(kinds) == ["edge"] * 3 + ["superlink"] + ["supernode"] * 3
    assert stack.report["healthy"] and all(c["healthy"] for c in stack.report["components"])
    status = fedrec("deploy", "status", "--state-dir", str(stack.root), "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    now = json.loads(status.stdout)
    assert now["healthy"] and len(now["components"]) == 7
    assert all(c["running"] and c["healthy"] for c in now["components"])
    ports = [p for c in now["components"] for p in c["ports"].values()]
    assert len(set(ports)) == len(ports)
    for comp in now["components"]:
        assert Path(comp["log"]).is_file() and Path(comp["log"]).parent == stack.root / "logs"
    # each SuperNode is its store's registered node
    registry = json.loads((stack.root / "stores.json").read_text())["stores"]
    for store in STORES:
        node = stack.component(f"supernode-{store}")
        assert f"node {registry[store]['node_id']} online" in next(
            c["detail"] for c in now["components"] if c["name"] == node["name"]
        )
    # admin tokens: one per store, distinct, owner-only
    tokens = set()
    for store in STORES:
        path = stack.pki.store_token(store)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        tokens.add(path.read_text().strip())
    assert len(tokens) == 3 and all(len(t) >= 32 for t in tokens)
    assert stat.S_IMODE(stack.pki.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE((stack.pki.root / "stores").stat().st_mode) == 0o700
    # each store has its own data: disjoint shoppers
    from edge_client.store import EventStore

    shoppers = []
    for store in STORES:
        db = EventStore(stack.root / "sites" / store / "site.db", create=False)
        try:
            frame = db.events_frame()
        finally:
            db.close()
        assert len(frame) > 100
        shoppers.append(set(frame["user_id"]))
    assert not (shoppers[0] & shoppers[1]) and not (shoppers[1] & shoppers[2])


def test_superlink_speaks_only_tls(stack: Stack) -> None:
    # Act: plain HTTP to the SuperLink's port
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{stack.superlink_address}/health", timeout=5)
    # Assert: HTTPS verified against the federation's CA answers
    import ssl

    ctx = ssl.create_default_context(cafile=str(stack.pki.ca_cert))
    assert httpx.get(f"https://{stack.superlink_address}/health", verify=ctx).status_code == 200


def test_edge_admin_endpoints_answer_401_without_the_token(stack: Stack) -> None:
    for store in STORES:
        base = stack.edge_url(store)
        spec = httpx.get(f"{base}/openapi.json").json()
        operations = [
            (method.upper(), path.replace("{user_id}", "some-shopper"))
            for path, item in spec["paths"].items()
            if path.startswith("/v1/admin/")
            for method in item
        ]
        assert len(operations) >= 4
        for method, path in operations:
            # Act / Assert: no token -> 401, a wrong token -> 403
            bare = httpx.request(method, f"{base}{path}", timeout=10)
            assert bare.status_code == 401, (store, method, path, bare.text)
            wrong = httpx.request(
                method, f"{base}{path}", headers={"Authorization": "Bearer " + "x" * 43}
            )
            assert wrong.status_code == 403, (store, method, path, wrong.text)
        # the right token (from the 0600 file) is accepted
        token = stack.pki.store_token(store).read_text().strip()
        ok = httpx.post(
            f"{base}/v1/admin/model/reload", headers={"Authorization": f"Bearer {token}"}
        )
        assert ok.status_code == 200, ok.text


def test_edge_refuses_to_start_with_a_default_token_outside_dev_mode(tmp_path: Path) -> None:
    # Act: edge services with an empty and a default token, without --dev
    procs = []
    for i, token in enumerate(["", "changethis"]):
        env = {**os.environ, "FEDREC_EDGE_ADMIN_TOKEN": token}
        env.pop("FEDREC_EDGE_DEV", None)
        argv = [FEDREC, "edge", "serve", "--db", str(tmp_path / f"{i}.db")]
        argv += ["--model-dir", str(tmp_path / f"m{i}"), "--port", str(free_port())]
        procs.append(
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    # Assert: each stops before listening, with the reason, exit status 1
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, (out, err)
        assert b"refusing to start" in err and b"FEDREC_EDGE_ADMIN_TOKEN" in err


def run_script(name: str, *args: str, stack: Stack) -> subprocess.CompletedProcess[str]:
    """One of deploy/scripts against the stack (its Flower home and store registry)."""
    env = {**os.environ, "FEDREC": FEDREC, "FEDREC_DEPLOY_DIR": str(stack.root)}
    return subprocess.run(
        [str(SCRIPTS / name), *args], capture_output=True, text=True, env=env, check=False,
        timeout=60,
    )  # fmt: skip


@dataclass
class ExtraNodes:
    """SuperNodes the tests start besides the stack's, and what they need to know of them."""

    procs: dict[str, subprocess.Popen[bytes]]
    other_ca: Path
    site: Path


@pytest.fixture(scope="module")
def extra(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExtraNodes]:
    """Three more SuperNodes, started together so that their start-up times overlap.

    ``unregistered``: a well-formed key the SuperLink never registered, the right CA.
    ``wrong-ca``: store-01's registered key, but trusting another CA (so it must fail at
    TLS, before authentication). ``store-09``: a fourth store admitted with the scripts
    (`create-store-keys.sh`, `register-stores.sh`), which must come online.
    """
    tmp = tmp_path_factory.mktemp("extra")
    key = create_store_key(tmp / "intruder.key", tmp / "intruder.pub", name="intruder")
    create_ca(tmp / "other-ca.crt", tmp / "other-ca.key", common_name="not the federation")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        procs["unregistered"] = stack.start_supernode(
            "unregistered", key.private_key, stack.pki.ca_cert, tmp / "site-a"
        )
        procs["wrong-ca"] = stack.start_supernode(
            "wrong-ca",
            stack.pki.store_private_key("store-01"),
            tmp / "other-ca.crt",
            tmp / "site-b",
            "--max-retries",
            "1",
            "--max-wait-time",
            "5",
        )
        made = run_script("create-store-keys.sh", str(stack.pki.root), "store-09", stack=stack)
        assert made.returncode == 0, made.stderr
        registered = run_script("register-stores.sh", str(stack.pki.root), "store-09", stack=stack)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        procs["store-09"] = stack.start_supernode(
            "store-09", stack.pki.store_private_key("store-09"), stack.pki.ca_cert, tmp / "site-9"
        )
        yield ExtraNodes(procs, tmp / "other-ca.crt", tmp / "site-9")
    finally:
        for proc in procs.values():
            stop(proc)


def test_supernode_with_an_unregistered_key_is_refused(stack: Stack, extra: ExtraNodes) -> None:
    # Act: wait for the SuperNode with the unregistered key
    code = extra.procs["unregistered"].wait(timeout=120)
    # Assert: refused at activation, and no node was added
    assert code != 0
    assert REFUSED in (stack.root / "logs" / "test-unregistered.log").read_text()
    registry = json.loads((stack.root / "stores.json").read_text())["stores"]
    assert stack.online_nodes() <= {registry[s]["node_id"] for s in [*STORES, "store-09"]}


def test_clients_trusting_another_ca_cannot_connect(
    stack: Stack, extra: ExtraNodes, tmp_path: Path
) -> None:
    other_ca = extra.other_ca
    # Act 1: an admin client (flwr) and a plain HTTPS client trusting the other CA
    home = tmp_path / "flwr"
    write_connection(home, "fedrec", stack.superlink_address, root_certificates=other_ca)
    with pytest.raises(DeployError, match=r"(?i)certificate|ssl|connect"):
        FlowerAdmin(home).nodes()
    import ssl

    ctx = ssl.create_default_context(cafile=str(other_ca))
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://{stack.superlink_address}/health", verify=ctx)
    # Act 2: the SuperNode with a registered key but the other CA
    code = extra.procs["wrong-ca"].wait(timeout=120)
    # Assert: it gave up without ever connecting (never got a node id)
    assert code != 0
    log = (stack.root / "logs" / "test-wrong-ca.log").read_text(errors="replace")
    assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log
    assert "SuperNode ID" not in log


def test_a_revoked_store_cannot_rejoin(stack: Stack, extra: ExtraNodes) -> None:
    # Arrange: store-09, admitted with the scripts by the fixture, comes online
    node_id = json.loads((stack.root / "stores.json").read_text())["stores"]["store-09"]["node_id"]
    proc = extra.procs["store-09"]
    log = stack.root / "logs" / "test-store-09.log"
    deadline = time.monotonic() + 90
    while "SuperNode ID" not in log.read_text(errors="replace"):  # printed once activated
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "store-09 never came online"
        time.sleep(0.5)
    assert node_id in stack.online_nodes()
    # Act 1: revoke it while it runs
    revoked = run_script("revoke-store.sh", "store-09", stack=stack)
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    # Assert 1: the running SuperNode is refused and stops
    proc.wait(timeout=90)
    listing = fedrec("deploy", "store", "list", "--state-dir", str(stack.root), "--json")
    row = next(r for r in json.loads(listing.stdout) if r["store"] == "store-09")
    assert row["status"] == "unregistered" and row["revoked_at"]
    # Act 2: it restarts with the same key
    key = stack.pki.store_private_key("store-09")
    again = stack.start_supernode("store-09-again", key, stack.pki.ca_cert, extra.site)
    try:
        code = again.wait(timeout=120)
    finally:
        stop(again)
    # Assert 2: refused; and its key cannot be registered again
    assert code != 0 and REFUSED in (stack.root / "logs" / "test-store-09-again.log").read_text()
    assert node_id not in stack.online_nodes()
    reuse = fedrec(
        "deploy",
        "store",
        "register",
        "store-09",
        "--key",
        str(stack.pki.store_public_key("store-09")),
        "--state-dir",
        str(stack.root),
    )
    assert reuse.returncode == 1 and "revoked" in reuse.stderr


def test_dp_round_reaches_every_store_then_down_leaves_nothing(stack: Stack) -> None:
    # Act 1: one federated round with DP-SGD at every store, through `fedrec coordinator run`
    run = fedrec(
        "coordinator", "run", "--state-dir", str(stack.root), "-c", "fedrec", "-n", "1",
        "--app", str(REPO), "--json",
        "--run-config", "min-sites=3 quorum=3 batch-size=16 learning-rate=0.01 round-timeout=120.0",
        "--run-config", f"model-config='{TINY_MODEL}' privacy-mode='store'",
        timeout=420,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout)
    # Assert 1: the round completed with all three stores, with a DP guarantee
    assert report["last_run"]["status"] == "completed"
    (round_,) = report["recent_rounds"]
    assert round_["status"] == "completed" and round_["sites_accepted"] == 3
    assert round_["epsilon_max"] and 0 < round_["epsilon_max"] < 10
    version = report["published_version"]
    assert version and version == round_["model_version"]
    # Assert 2: every store's edge service serves the new version (hot swap, no restart)
    for store in STORES:
        deadline = time.monotonic() + 60
        while True:
            model = httpx.get(f"{stack.edge_url(store)}/v1/model", timeout=10).json()
            if model.get("version") == version or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert model["mode"] == "model" and model["version"] == version, (store, model)
        assert model["privacy"]["epsilon"] > 0 and model["privacy"]["delta"] > 0
    status = fedrec("coordinator", "status", "--state-dir", str(stack.root), "--json")
    assert status.returncode == 0
    assert {s["site"] for s in json.loads(status.stdout)["sites"]} == set(STORES)
    pids = [c["pid"] for c in stack.report["components"]]
    # Act 2
    down = fedrec("deploy", "down", "--state-dir", str(stack.root), "--json", timeout=180)
    # Assert 3: nothing of the stack is left
    assert down.returncode == 0, down.stderr
    assert len(json.loads(down.stdout)["stopped"]) == 7
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not stack_processes(stack.root)
    assert not list(flower_processes_under(stack.root / "flwr"))
    after = fedrec("deploy", "status", "--state-dir", str(stack.root), "--json")
    assert after.returncode == 1 and json.loads(after.stdout)["components"] == []
