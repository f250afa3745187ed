"""`fedrec deploy local|status|down`: the whole secured stack as processes on this machine.

One SuperLink (TLS with a CA made here, SuperNode authentication on), one SuperNode per
store (each with its own registered key) and one edge service per store (its own port and
admin token), every store with its own site directory seeded with synthetic data (each
store a region with its own tastes, `shared.synth`). `LocalStack.up` returns once every
component is healthy; the processes then run on their own (each in its own session) until
`LocalStack.down`, which can be called from another process: what was started is recorded
in ``stack.json`` with each process's id and start time, and every process carries
``FEDREC_DEPLOY_STACK=<state dir>`` in its environment so that nothing it spawned (Flower's
SuperExec, ServerApp and ClientApp processes) escapes the sweep.

State directory layout (default ``state/deploy``)::

    stack.json          the running components: pids, ports, logs (removed by `down`)
    stores.json         store name -> SuperLink node id and key fingerprint
    pki/                CA, SuperLink certificate, stores/<name>.key|.pub|.admin-token
                        (private keys and tokens 0600, stores/ 0700)
    sites/catalogue.json, sites/<name>/{site.db, models/}   the stores' data
    flwr/config.toml    FLWR_HOME: connection "fedrec" (TLS, this CA)
    coordinator/        the registry written by federated runs (`fedrec coordinator`)
    superlink.db        the SuperLink's state (registered nodes, runs)
    logs/*.log          one log per process

`fedrec coordinator run --state-dir <state dir> -c fedrec` runs rounds against it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy.certificates import PkiLayout, ensure_token, init_pki
from deploy.errors import DeployError, StackError
from deploy.registration import (
    DEFAULT_CONNECTION,
    FlowerAdmin,
    StoreRegistry,
    register_stores,
    write_connection,
)

STACK_FILE = "stack.json"
STACK_ENV = "FEDREC_DEPLOY_STACK"
LOOPBACK = "127.0.0.1"
MAX_SITES = 99
# With --base-port B: SuperLink B, SuperNode i B+100+i, edge service i B+200+i (i = 1..N).
SUPERNODE_OFFSET = 100
EDGE_OFFSET = 200


@dataclass(frozen=True)
class LocalStackConfig:
    """How many stores, where they listen and how much synthetic data each gets."""

    sites: int = 3
    base_port: int | None = None  # None: the OS picks free ports
    shoppers_per_site: int = 40
    n_items: int = 60
    events_per_shopper: float = 8.0
    seed: int = 0
    epsilon_budget: float = 10.0
    delta: float = 1e-5
    startup_timeout: float = 180.0

    def __post_init__(self) -> None:
        if not 1 <= self.sites <= MAX_SITES:
            raise StackError(f"sites must be between 1 and {MAX_SITES}, got {self.sites}")
        if self.base_port is not None and not 1024 <= self.base_port <= 65535 - EDGE_OFFSET - 99:
            raise StackError(
                f"base port must be between 1024 and {65535 - EDGE_OFFSET - 99}, "
                f"got {self.base_port}"
            )
        if self.startup_timeout <= 0:
            raise StackError("startup timeout must be positive")

    def store_names(self) -> list[str]:
        """``store-01``, ``store-02``, ... (the names `shared.synth` gives its sites)."""
        return [f"store-{i:02d}" for i in range(1, self.sites + 1)]


@dataclass
class Component:
    """One process of the stack, as recorded in ``stack.json``."""

    name: str
    kind: str  # superlink | supernode | edge
    pid: int
    create_time: float
    ports: dict[str, int]
    log: str
    site: str | None = None
    node_id: int | None = None


@dataclass(frozen=True)
class ComponentStatus:
    """A component's process state and health right now."""

    name: str
    kind: str
    site: str | None
    pid: int
    ports: dict[str, int]
    log: str
    running: bool
    healthy: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


@dataclass
class DownReport:
    """What `LocalStack.down` stopped and whether anything had to be killed."""

    stopped: list[str] = field(default_factory=list)
    killed_pids: list[int] = field(default_factory=list)
    stray_pids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


@dataclass(frozen=True)
class StackLayout:
    """Paths inside a local stack's state directory."""

    root: Path

    @property
    def manifest(self) -> Path:
        """``stack.json``."""
        return self.root / STACK_FILE

    @property
    def pki(self) -> PkiLayout:
        """CA, SuperLink certificate and store keys."""
        return PkiLayout(self.root / "pki")

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of every process and of admin commands."""
        return self.root / "flwr"

    @property
    def sites(self) -> Path:
        """Where the stores' site directories and the catalogue live."""
        return self.root / "sites"

    @property
    def logs(self) -> Path:
        """One log file per process."""
        return self.root / "logs"

    @property
    def stores(self) -> StoreRegistry:
        """Store name -> node id."""
        return StoreRegistry(self.root / "stores.json")

    def token_file(self, store: str) -> Path:
        """A store's edge admin token (mode 0600)."""
        return self.pki.store_token(store)

    def site_dir(self, store: str) -> Path:
        """A store's site directory (site.db, models/)."""
        return self.sites / store


def default_state_dir() -> Path:
    """``$FEDREC_DEPLOY_DIR`` or ``<project state>/deploy``."""
    env = os.environ.get("FEDREC_DEPLOY_DIR")
    if env:
        return Path(env).resolve()
    from shared.federated import default_state_dir as project_state

    return (project_state() / "deploy").resolve()


def fedrec_bin() -> str:
    """The `fedrec` console script of the running interpreter's environment."""
    candidate = Path(sys.executable).parent / "fedrec"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("fedrec")
    if found is None:
        raise StackError(f"the fedrec command is not installed (looked next to {sys.executable})")
    return found


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when nothing listens on ``host:port`` and it can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _tls_context(ca_cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_cert))


def _is_alive(pid: int, create_time: float) -> bool:
    """True when ``pid`` is still the process that was started (not a reused id, not a zombie)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - create_time) < 0.5 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stack_processes(root: Path) -> list[int]:
    """Pids of live processes that carry this stack's environment marker."""
    import psutil

    target = str(root.resolve())
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid == me or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(STACK_ENV) == target:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _log_tail(path: Path, n_chars: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n_chars:]
    except OSError:
        return ""


class LocalStack:
    """A SuperLink, N SuperNodes and N edge services on 127.0.0.1, recorded in a state dir."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.layout = StackLayout((state_dir or default_state_dir()).resolve())
        self.root = self.layout.root
        self._children: list[subprocess.Popen[bytes]] = []

    # ------------------------------------------------------------------ environment
    def _env(self) -> dict[str, str]:
        from deploy.flower_processes import FLOWER_ENV

        env = {**os.environ, **FLOWER_ENV}
        env["FLWR_HOME"] = str(self.layout.flwr_home)
        env["FEDREC_STATE_DIR"] = str(self.root)
        env["RAY_TMPDIR"] = str(self.root / "ray")
        env[STACK_ENV] = str(self.root)
        # Flower's SuperLink/SuperNode start `flower-superexec` and the apps by name.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        for key in [k for k in env if k.startswith("FEDREC_EDGE_")]:
            del env[key]  # each edge service gets exactly its own settings
        return env

    def admin(self) -> FlowerAdmin:
        """The `flwr` CLI against this stack's SuperLink."""
        return FlowerAdmin(self.layout.flwr_home, DEFAULT_CONNECTION, env=self._env())

    # ------------------------------------------------------------------ manifest
    def components(self) -> list[Component]:
        """What ``stack.json`` records (empty when the stack is not up)."""
        path = self.layout.manifest
        if not path.exists():
            return []
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return [Component(**c) for c in raw["components"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StackError(f"{path} is not a stack manifest: {err}") from err

    def _save(self, components: list[Component]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        payload = {
            "state_dir": str(self.root),
            "connection": DEFAULT_CONNECTION,
            "components": [asdict(c) for c in components],
        }
        tmp = self.layout.manifest.with_name(f".{STACK_FILE}.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.layout.manifest)

    def _spawn(
        self,
        components: list[Component],
        *,
        name: str,
        kind: str,
        argv: list[str],
        env: dict[str, str],
        ports: dict[str, int],
        site: str | None = None,
        node_id: int | None = None,
    ) -> Component:
        """Start ``argv`` in its own session, logging to ``logs/<name>.log``; record it at once."""
        import psutil

        log_path = self.layout.logs / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            log.flush()
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.root,
                    start_new_session=True,
                )
            except OSError as err:
                raise StackError(f"cannot start {name}: {err}") from err
        # Kept only so that Python reaps it if it exits while this process lives; the stack
        # outlives this process and `down` (possibly from another process) stops it by pid.
        self._children.append(popen)
        try:
            created = psutil.Process(popen.pid).create_time()
        except psutil.NoSuchProcess:
            created = 0.0
        component = Component(name, kind, popen.pid, created, ports, str(log_path), site, node_id)
        components.append(component)
        self._save(components)
        return component

    # ------------------------------------------------------------------ up
    def up(
        self, config: LocalStackConfig, *, progress: Callable[[str], None] | None = None
    ) -> list[ComponentStatus]:
        """Start everything and return once every component is healthy.

        Keys, tokens and site data of an earlier run in the same state directory are reused
        (the stack restarts where it stopped). On any failure everything started is stopped
        again and `StackError` names the component, with the end of its log.
        """
        say = progress or (lambda _msg: None)
        running = [c for c in self.components() if _is_alive(c.pid, c.create_time)]
        if running:
            raise StackError(
                f"a stack is already running from {self.root} ({len(running)} processes); "
                "see `fedrec deploy status` or stop it with `fedrec deploy down`"
            )
        strays = stack_processes(self.root)
        if strays:
            raise StackError(
                f"processes of an earlier stack in {self.root} still run (pids {strays}); "
                "stop them with `fedrec deploy down`"
            )
        self.layout.manifest.unlink(missing_ok=True)
        stores = config.store_names()
        ports = self._ports(config)  # before anything is written: a busy port is refused early
        self._prepare(config, stores, say)
        components: list[Component] = []
        try:
            self._start_all(config, stores, ports, components, say)
            say("waiting until every component is healthy")
            return self._wait_healthy(config.startup_timeout)
        except BaseException:
            self.down()
            raise

    def _prepare(
        self, config: LocalStackConfig, stores: list[str], say: Callable[[str], None]
    ) -> None:
        """PKI, tokens, sites and the Flower connection, each created only when missing."""
        layout = self.layout
        layout.root.mkdir(parents=True, exist_ok=True)
        existing = sorted(p.name for p in layout.sites.glob("store-*") if p.is_dir())
        if existing and existing != stores:
            raise StackError(
                f"{layout.sites} holds {len(existing)} stores ({', '.join(existing)}), not "
                f"{config.sites}; use the same --sites, another --state-dir, or "
                "`fedrec deploy down --purge` to start from scratch"
            )
        say(f"certificates and store keys in {layout.pki.root}")
        init_pki(layout.pki.root, hosts=[LOOPBACK, "localhost"], stores=stores)
        if not existing:
            from deploy.demo_sites import write_demo_sites

            say(f"seeding {config.sites} stores with synthetic data in {layout.sites}")
            write_demo_sites(
                layout.sites,
                n_sites=config.sites,
                shoppers_per_site=config.shoppers_per_site,
                n_items=config.n_items,
                events_per_shopper=config.events_per_shopper,
                seed=config.seed,
                names=stores,
            )

    def _ports(self, config: LocalStackConfig) -> dict[str, int]:
        from deploy.flower_processes import free_port

        names = ["superlink"]
        for store in config.store_names():
            names += [f"supernode-{store}", f"edge-{store}"]
        if config.base_port is None:
            chosen: dict[str, int] = {}
            while len(chosen) < len(names):
                port = free_port()
                if port not in chosen.values():
                    chosen[names[len(chosen)]] = port
            return chosen
        base = config.base_port
        ports = {"superlink": base}
        for i, store in enumerate(config.store_names(), start=1):
            ports[f"supernode-{store}"] = base + SUPERNODE_OFFSET + i
            ports[f"edge-{store}"] = base + EDGE_OFFSET + i
        busy = [f"{n}:{p}" for n, p in ports.items() if not port_is_free(p)]
        if busy:
            raise StackError(f"ports already in use on {LOOPBACK}: {', '.join(busy)}")
        return ports

    def _start_all(
        self,
        config: LocalStackConfig,
        stores: list[str],
        ports: dict[str, int],
        components: list[Component],
        say: Callable[[str], None],
    ) -> None:
        from deploy.flower_processes import flower_bin, format_node_config

        layout = self.layout
        pki = layout.pki
        env = self._env()
        link_port = ports["superlink"]
        write_connection(
            layout.flwr_home,
            DEFAULT_CONNECTION,
            f"{LOOPBACK}:{link_port}",
            root_certificates=pki.ca_cert,
        )
        say(f"starting the SuperLink on {LOOPBACK}:{link_port} (TLS, SuperNode authentication)")
        superlink = self._spawn(
            components,
            name="superlink",
            kind="superlink",
            argv=[
                flower_bin("flower-superlink"),
                "--host",
                LOOPBACK,
                "--port",
                str(link_port),
                "--ssl-ca-certfile",
                str(pki.ca_cert),
                "--ssl-certfile",
                str(pki.superlink_cert),
                "--ssl-keyfile",
                str(pki.superlink_key),
                "--enable-supernode-auth",
                "--database",
                str(layout.root / "superlink.db"),
                "--disable-runtime-dependency-installation",
            ],
            env=env,
            ports={"api": link_port},
        )
        # Edge services need no SuperLink: they start while it does (2 cores: it adds up).
        say(f"starting {len(stores)} edge services")
        for store in stores:
            edge_port = ports[f"edge-{store}"]
            edge_env = {
                **env,
                "FEDREC_EDGE_ADMIN_TOKEN": ensure_token(layout.token_file(store)),
                "FEDREC_EDGE_POLL_INTERVAL_S": "1.0",
            }
            self._spawn(
                components,
                name=f"edge-{store}",
                kind="edge",
                argv=[
                    fedrec_bin(),
                    "edge",
                    "serve",
                    "--db",
                    str(layout.site_dir(store) / "site.db"),
                    "--model-dir",
                    str(layout.site_dir(store) / "models"),
                    "--host",
                    LOOPBACK,
                    "--port",
                    str(edge_port),
                    "--log-level",
                    "info",
                ],
                env=edge_env,
                ports={"http": edge_port},
                site=store,
            )

        self._wait_for(
            lambda: self._probe_superlink(superlink)[0],
            superlink,
            config.startup_timeout,
            "answer on /health over TLS",
        )
        say(f"registering {len(stores)} store keys")
        records = register_stores(
            self.admin(), layout.stores, {s: pki.store_public_key(s) for s in stores}
        )
        say(f"starting {len(stores)} SuperNodes")
        for store in stores:
            node_port = ports[f"supernode-{store}"]
            node_config: dict[str, str | int | float | bool] = {
                "site-dir": str(layout.site_dir(store)),
                "site-name": store,
                "epsilon-budget": config.epsilon_budget,
                "delta": config.delta,
                "device": "cpu",
            }
            self._spawn(
                components,
                name=f"supernode-{store}",
                kind="supernode",
                argv=[
                    flower_bin("flower-supernode"),
                    "--superlink",
                    f"{LOOPBACK}:{link_port}",
                    "--root-certificates",
                    str(pki.ca_cert),
                    "--auth-supernode-private-key",
                    str(pki.store_private_key(store)),
                    "--host",
                    LOOPBACK,
                    "--port",
                    str(node_port),
                    "--node-config",
                    format_node_config(node_config),
                ],
                env=env,
                ports={"runtime": node_port},
                site=store,
                node_id=records[store].node_id,
            )

    def _wait_for(
        self, check: Callable[[], bool], component: Component, timeout: float, what: str
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _is_alive(component.pid, component.create_time):
                raise StackError(
                    f"{component.name} exited before it was healthy; log {component.log}:\n"
                    f"{_log_tail(Path(component.log))}"
                )
            if check():
                return
            time.sleep(0.3)
        raise StackError(
            f"{component.name} did not {what} within {timeout:.0f} s; log {component.log}:\n"
            f"{_log_tail(Path(component.log))}"
        )

    def _wait_healthy(self, timeout: float) -> list[ComponentStatus]:
        deadline = time.monotonic() + timeout
        statuses = self.status()
        while time.monotonic() < deadline:
            dead = [s for s in statuses if not s.running]
            if dead:
                first = dead[0]
                raise StackError(
                    f"{first.name} exited before it was healthy; log {first.log}:\n"
                    f"{_log_tail(Path(first.log))}"
                )
            if all(s.healthy for s in statuses):
                return statuses
            time.sleep(0.5)
            statuses = self.status()
        sick = [s for s in statuses if not s.healthy]
        names = ", ".join(f"{s.name} ({s.detail})" for s in sick)
        raise StackError(
            f"not healthy within {timeout:.0f} s: {names}; log {sick[0].log}:\n"
            f"{_log_tail(Path(sick[0].log))}"
        )

    # ------------------------------------------------------------------ status
    def _probe_superlink(self, comp: Component) -> tuple[bool, str]:
        import httpx

        url = f"https://{LOOPBACK}:{comp.ports['api']}/health"
        try:
            response = httpx.get(url, verify=_tls_context(self.layout.pki.ca_cert), timeout=3.0)
        except httpx.HTTPError as err:
            return False, f"{url}: {type(err).__name__}"
        if response.status_code != 200:
            return False, f"{url}: HTTP {response.status_code}"
        return True, "TLS ok, SuperNode auth on"

    def _probe_http(self, url: str) -> tuple[bool, dict[str, Any] | None, str]:
        import httpx

        try:
            response = httpx.get(url, timeout=3.0)
        except httpx.HTTPError as err:
            return False, None, f"{url}: {type(err).__name__}"
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200:
            return False, body if isinstance(body, dict) else None, f"HTTP {response.status_code}"
        return True, body if isinstance(body, dict) else None, "ok"

    def status(self) -> list[ComponentStatus]:
        """Every recorded component: running, healthy, and what its health check saw.

        SuperLink: ``/health`` over TLS checked against the CA. SuperNode: its local
        ``/health`` and its node ``online`` on the SuperLink. Edge service: ``/readyz``.
        """
        components = sorted(
            self.components(),
            key=lambda c: (c.kind != "superlink", c.site or "", c.kind != "supernode"),
        )
        if not components:
            return []
        alive = {c.name: _is_alive(c.pid, c.create_time) for c in components}

        def probe(comp: Component) -> tuple[bool, str]:
            if not alive[comp.name]:
                return False, "not running"
            if comp.kind == "superlink":
                return self._probe_superlink(comp)
            if comp.kind == "supernode":
                ok, _, detail = self._probe_http(
                    f"http://{LOOPBACK}:{comp.ports['runtime']}/health"
                )
                return ok, f"local /health {detail}"
            ok, body, detail = self._probe_http(f"http://{LOOPBACK}:{comp.ports['http']}/readyz")
            if ok and body is not None:
                version = body.get("model_version")
                return bool(body.get("ready")), f"ready, serving {version or 'popularity'}"
            return False, f"/readyz {detail}"

        with ThreadPoolExecutor(max_workers=min(16, len(components))) as pool:
            probes = dict(
                zip([c.name for c in components], pool.map(probe, components), strict=True)
            )
        nodes: dict[int, dict[str, Any]] | None = None
        superlink_ok = any(c.kind == "superlink" and probes[c.name][0] for c in components)
        if superlink_ok and any(c.kind == "supernode" and probes[c.name][0] for c in components):
            try:
                nodes = self.admin().nodes()
            except DeployError as err:
                nodes = None
                probes["superlink"] = (probes["superlink"][0], f"node listing failed: {err}")
        out = []
        for comp in components:
            healthy, detail = probes[comp.name]
            if comp.kind == "supernode" and healthy:
                node = (nodes or {}).get(comp.node_id or -1)
                node_status = str(node.get("status")) if node else "unknown to the SuperLink"
                healthy = node_status == "online"
                detail = f"node {comp.node_id} {node_status}"
            out.append(
                ComponentStatus(
                    name=comp.name,
                    kind=comp.kind,
                    site=comp.site,
                    pid=comp.pid,
                    ports=comp.ports,
                    log=comp.log,
                    running=alive[comp.name],
                    healthy=healthy,
                    detail=detail,
                )
            )
        return out

    # ------------------------------------------------------------------ down
    def down(self, *, timeout: float = 15.0, purge: bool = False) -> DownReport:
        """Stop every process of the stack: SIGTERM to each group, SIGKILL after ``timeout``.

        Edge services and SuperNodes go first, then the SuperLink; then every process still
        carrying this stack's environment marker (Flower's app processes) is killed. Raises
        `StackError` if anything survives. ``purge`` also deletes the state directory.
        """
        import psutil

        report = DownReport()
        components = self.components()
        order = sorted(components, key=lambda c: c.kind == "superlink")
        live: list[tuple[Component, psutil.Process]] = []
        for comp in order:
            if _is_alive(comp.pid, comp.create_time):
                with contextlib.suppress(psutil.NoSuchProcess):
                    live.append((comp, psutil.Process(comp.pid)))
        tree: dict[int, list[psutil.Process]] = {}
        for comp, proc in live:
            with contextlib.suppress(psutil.NoSuchProcess):
                tree[comp.pid] = proc.children(recursive=True)
        for wave in (("edge", "supernode"), ("superlink",)):
            members = [(c, p) for c, p in live if c.kind in wave]
            for comp, _ in members:
                _signal_group(comp.pid, signal.SIGTERM)
            _, still = psutil.wait_procs([p for _, p in members], timeout=timeout)
            for proc in still:
                _signal_group(proc.pid, signal.SIGKILL)
                report.killed_pids.append(proc.pid)
            psutil.wait_procs(still, timeout=5)
            for comp, _ in members:
                _signal_group(comp.pid, signal.SIGKILL)  # whatever is left in its group
                report.stopped.append(comp.name)
        leftovers = [p for children in tree.values() for p in children]
        report.stray_pids += _kill_all(leftovers)
        strays = [
            psutil.Process(pid) for pid in stack_processes(self.root) if psutil.pid_exists(pid)
        ]
        report.stray_pids += _kill_all(strays)
        survivors = stack_processes(self.root)
        if survivors:
            raise StackError(f"processes of the stack survived SIGKILL: {survivors}")
        self.layout.manifest.unlink(missing_ok=True)
        if purge and self.root.exists():
            self._purge()
        return report

    def _purge(self) -> None:
        markers = [self.layout.pki.root, self.layout.sites, self.layout.flwr_home]
        if not any(m.exists() for m in markers):
            raise StackError(f"{self.root} does not look like a local stack; not deleting it")
        shutil.rmtree(self.root)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill_all(procs: list[Any]) -> list[int]:
    """SIGKILL each live process (psutil.Process) and wait for it; returns the pids killed."""
    import psutil

    killed = []
    for proc in procs:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            proc.kill()
            killed.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(procs, timeout=10)
    return killed
