"""Start and stop real Flower processes (SuperLink, SuperNodes, `flwr run`) on this machine.

Used by the integration tests, by `fedrec coordinator run` and later by `fedrec deploy local`.
Every process is started in its own session (process group) with a Flower home inside a
state directory, runtime dependency installation and telemetry disabled; `stop` kills the
whole group (the SuperLink's ServerApp and the SuperNodes' ClientApp subprocesses included),
and `LocalFederation` is a context manager that stops everything it started even when the
body raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from shared.errors import FedrecError


class FlowerProcessError(FedrecError):
    """A Flower process did not start, did not answer in time or failed."""


# Environment every Flower process gets: nothing installed at run time (uv could fetch a CUDA
# torch), nothing sent home, no update check against the network.
FLOWER_ENV: dict[str, str] = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
}

FINISHED_PREFIX = "finished"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, process: ManagedProcess) -> None:
    """Block until ``host:port`` accepts TCP connections; raise if the process died first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerProcessError(
                f"{process.name} exited with code {process.poll()} before listening on "
                f"{host}:{port}; log: {process.log_path}\n{process.log_tail()}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise FlowerProcessError(
        f"{process.name} did not listen on {host}:{port} within {timeout:.0f} s; "
        f"log: {process.log_path}"
    )


def flower_bin(name: str) -> str:
    """Path of a Flower console script next to the running interpreter (the venv's)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FlowerProcessError(f"{name} is not installed (looked next to {sys.executable})")
    return found


@dataclass
class ManagedProcess:
    """A process this harness started, in its own process group, logging to a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        """The process id (also its process-group id)."""
        return self.popen.pid

    def poll(self) -> int | None:
        """Exit code, or None while it runs."""
        return self.popen.poll()

    def log_tail(self, n_chars: int = 4000) -> str:
        """The end of the process's log (stdout and stderr)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-n_chars:]
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group (children included)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def descendants(self) -> list[int]:
        """Pids of every live descendant, detached ones included.

        Flower starts its SuperExec and app processes in new sessions, out of reach of
        the process group.
        """
        import psutil

        try:
            return [c.pid for c in psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, grace: float = 10.0) -> int | None:
        """Stop the process, its group and every descendant; returns the exit code.

        SIGTERM first, then SIGKILL after ``grace`` seconds.
        """
        children = self.descendants()
        if self.popen.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.popen.wait(timeout=grace)
        # Children that outlived their parent (a ClientApp mid-training) still hold the group.
        self.kill(signal.SIGKILL)
        kill_pids(children)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.popen.returncode


def start_process(
    name: str, argv: list[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None
) -> ManagedProcess:
    """Start ``argv`` in a new session, stdout+stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    try:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as err:
        log.close()
        raise FlowerProcessError(f"cannot start {name}: {err}") from err
    return ManagedProcess(name=name, popen=popen, log_path=log_path, _log=log)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a SuperLink's TLS setup: the CA that signed it, its certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class RunOutcome:
    """What `flwr run` reported: the run id, its final status and the streamed log."""

    run_id: int
    status: str
    log: str
    seconds: float

    @property
    def succeeded(self) -> bool:
        """True when the SuperLink recorded the run as finished and completed."""
        return self.status == "finished:completed"


class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1, all stopped on exit.

    Parameters
    ----------
    state_dir
        Everything goes here: ``flwr/`` (FLWR_HOME), ``logs/``, the SuperLink database.
    tls
        Serve the SuperLink over TLS with these files; None = ``--insecure``.
    supernode_auth
        Start the SuperLink with ``--enable-supernode-auth`` (nodes must be registered).
    extra_env
        Added to every process's environment (e.g. ``FEDREC_STATE_DIR``).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        tls: TlsFiles | None = None,
        supernode_auth: bool = False,
        extra_env: Mapping[str, str] | None = None,
        connection: str = "fedrec",
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.flwr_home = self.state_dir / "flwr"
        self.log_dir = self.state_dir / "logs"
        self.tls = tls
        self.supernode_auth = supernode_auth
        self.connection = connection
        self.port = 0
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[str, ManagedProcess] = {}
        self._started: list[ManagedProcess] = []
        self.env = {**os.environ, **FLOWER_ENV, **(extra_env or {})}
        self.env["FLWR_HOME"] = str(self.flwr_home)
        # The SuperLink starts `flower-superexec` (and that `flwr-serverapp`) by name.
        bin_dir = str(Path(sys.executable).parent)
        self.env["PATH"] = os.pathsep.join([bin_dir, self.env.get("PATH", "")])
        # Ray (simulation only) would otherwise write to /tmp/ray.
        self.env["RAY_TMPDIR"] = str(self.state_dir / "ray")

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        """Stop every process this federation started, SuperNodes first.

        Then anything still running with this federation's FLWR_HOME (only processes it
        started have it) is killed too.
        """
        # Ask every process at once, so their graceful exits overlap, then reap each.
        children = {p.pid: p.descendants() for p in self._started}
        for proc in reversed(self._started):
            if proc.poll() is None:
                proc.kill(signal.SIGTERM)
        for proc in reversed(self._started):
            proc.stop()
            kill_pids(children[proc.pid])
        kill_pids(list(flower_processes_under(self.flwr_home)))

    def running_pids(self) -> list[int]:
        """Pids of processes started here that are still alive."""
        return [p.pid for p in self._started if p.poll() is None]

    @property
    def address(self) -> str:
        """host:port of the SuperLink's HTTP API (Fleet, Control and ServerApp runtime)."""
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ SuperLink
    def start_superlink(self, timeout: float = 60.0) -> ManagedProcess:
        """Start ``flower-superlink`` and write the connection into FLWR_HOME/config.toml."""
        if self.superlink is not None:
            raise FlowerProcessError("this federation already has a SuperLink")
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv = [
            flower_bin("flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.state_dir / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]
        if self.tls is None:
            argv.append("--insecure")
        else:
            argv += [
                "--ssl-ca-certfile",
                str(self.tls.ca_cert),
                "--ssl-certfile",
                str(self.tls.server_cert),
                "--ssl-keyfile",
                str(self.tls.server_key),
            ]
        if self.supernode_auth:
            argv.append("--enable-supernode-auth")
        proc = start_process("superlink", argv, self.env, self.log_dir / "superlink.log")
        self._started.append(proc)
        self.superlink = proc
        wait_for_port("127.0.0.1", self.port, timeout, proc)
        self.write_connection()
        return proc

    def write_connection(self) -> Path:
        """Make this SuperLink the default connection of FLWR_HOME's config.toml."""
        lines = ["[superlink]", f'default = "{self.connection}"', ""]
        lines.append(f"[superlink.{self.connection}]")
        lines.append(f'address = "{self.address}"')
        if self.tls is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.tls.ca_cert}"')
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    # ------------------------------------------------------------------ SuperNodes
    def register_supernode(self, public_key: Path, name: str | None = None) -> str:
        """``flwr supernode register`` a public key (OpenSSH format); returns the CLI output."""
        argv = [flower_bin("flwr"), "supernode", "register", str(public_key), self.connection]
        if name:
            argv += ["--name", name]
        result = self._flwr(argv, timeout=60)
        if result.returncode != 0:
            raise FlowerProcessError(
                f"flwr supernode register failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout

    def start_supernode(
        self,
        name: str,
        node_config: Mapping[str, str | int | float] | None = None,
        *,
        private_key: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        wait: bool = True,
        timeout: float = 60.0,
    ) -> ManagedProcess:
        """Start ``flower-supernode`` connected to this SuperLink.

        ``node_config`` values reach the ClientApp as ``context.node_config``. With
        ``wait``, returns once the node's local runtime API listens (it has started; it
        registers with the SuperLink right after).
        """
        if self.superlink is None:
            raise FlowerProcessError("start the SuperLink first")
        if name in self.supernodes:
            raise FlowerProcessError(f"a SuperNode named {name!r} is already running")
        port = free_port()
        argv = [
            flower_bin("flower-supernode"),
            "--superlink",
            self.address,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-retries",
            "5",
            "--max-wait-time",
            "30",
        ]
        if self.tls is None:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(self.tls.ca_cert)]
        if private_key is not None:
            argv += ["--auth-supernode-private-key", str(private_key)]
        if node_config:
            argv += ["--node-config", format_node_config(node_config)]
        env = {**self.env, **(extra_env or {})}
        proc = start_process(f"supernode-{name}", argv, env, self.log_dir / f"{name}.log")
        self._started.append(proc)
        self.supernodes[name] = proc
        if wait:
            wait_for_port("127.0.0.1", port, timeout, proc)
        return proc

    def stop_supernode(self, name: str, *, crash: bool = False) -> None:
        """Stop one SuperNode and its ClientApp.

        ``crash`` kills it without warning (a site losing power); otherwise it is asked to
        stop (SIGTERM) and leaves the federation.
        """
        proc = self.supernodes.pop(name)
        if crash:
            children = proc.descendants()
            proc.kill(signal.SIGKILL)
            kill_pids(children)
            proc.popen.wait(timeout=30)
        else:
            proc.stop()

    def wait_for_nodes(self, count: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Block until the SuperLink lists at least ``count`` online nodes; returns them."""
        deadline = time.monotonic() + timeout
        nodes: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            nodes = [n for n in self.list_nodes() if str(n.get("status", "")) == "online"]
            if len(nodes) >= count:
                return nodes
            time.sleep(0.5)
        raise FlowerProcessError(
            f"only {len(nodes)} of {count} SuperNodes came online within {timeout:.0f} s"
        )

    def list_nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list --format json`` of this SuperLink."""
        result = self._flwr(
            [flower_bin("flwr"), "supernode", "list", self.connection, "--format", "json"],
            timeout=60,
        )
        if result.returncode != 0:
            raise FlowerProcessError(f"flwr supernode list failed: {result.stderr}")
        payload = json.loads(result.stdout)
        nodes = payload.get("nodes", [])
        return [dict(n) for n in nodes] if isinstance(nodes, list) else []

    # ------------------------------------------------------------------ runs
    def run(
        self,
        app_dir: Path,
        run_config: Mapping[str, str | int | float | bool] | None = None,
        *,
        timeout: float = 300.0,
    ) -> RunOutcome:
        """``flwr run app_dir <connection> --stream``; returns when the run has finished.

        The run is stopped (``flwr stop``) when it outlives ``timeout`` and an error raised.
        """
        argv = [flower_bin("flwr"), "run", str(app_dir), self.connection, "--stream"]
        if run_config:
            argv += ["--run-config", format_node_config(run_config)]
        started = time.monotonic()
        log_path = self.log_dir / f"flwr-run-{int(time.time() * 1000)}.log"
        proc = start_process("flwr-run", argv, self.env, log_path, cwd=app_dir)
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run_id = run_id_from_log(proc.log_tail(1 << 20))
            if run_id is not None:
                self._flwr([flower_bin("flwr"), "stop", str(run_id), self.connection], timeout=30)
            proc.stop()
            raise FlowerProcessError(
                f"flwr run did not finish within {timeout:.0f} s; log: {log_path}"
            ) from None
        finally:
            proc.stop()
        text = proc.log_tail(1 << 22)
        run_id = run_id_from_log(text)
        if run_id is None:
            raise FlowerProcessError(f"flwr run did not start a run:\n{text[-4000:]}")
        status = self.wait_run_finished(
            run_id, timeout=max(5.0, timeout - (time.monotonic() - started))
        )
        return RunOutcome(run_id, status, text, time.monotonic() - started)

    def run_status(self, run_id: int) -> str:
        """The SuperLink's status of a run, e.g. ``running`` or ``finished:completed``."""
        result = self._flwr(
            [
                flower_bin("flwr"),
                "ls",
                self.connection,
                "--run-id",
                str(run_id),
                "--format",
                "json",
            ],
            timeout=60,
        )
        if result.returncode != 0:
            raise FlowerProcessError(f"flwr ls failed: {result.stdout}{result.stderr}")
        runs = json.loads(result.stdout).get("runs", [])
        if not runs:
            raise FlowerProcessError(f"the SuperLink does not know run {run_id}")
        return str(runs[0].get("status", ""))

    def wait_run_finished(self, run_id: int, timeout: float = 60.0) -> str:
        """Poll the run's status until it is ``finished:*``; returns that status."""
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            status = self.run_status(run_id)
            if status.startswith(FINISHED_PREFIX):
                return status
            time.sleep(0.5)
        raise FlowerProcessError(f"run {run_id} still '{status}' after {timeout:.0f} s")

    def _flwr(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                argv,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as err:
            raise FlowerProcessError(f"{' '.join(argv[:3])} timed out after {timeout} s") from err


def format_node_config(values: Mapping[str, str | int | float | bool]) -> str:
    """``key=value`` pairs as Flower's --node-config/--run-config parse them (TOML values).

    Flower splits the string with a regular expression before TOML-parsing each value, so a
    string value may hold one kind of quote, not both.
    """
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, int | float):
            parts.append(f"{key}={value}")
        elif "'" not in str(value) and "\n" not in str(value):
            # A TOML literal string: Flower's parser splits on quotes, and JSON values
            # (model-config) are full of double quotes.
            parts.append(f"{key}='{value}'")
        elif '"' not in str(value) and "\\" not in str(value):
            parts.append(f'{key}="{value}"')
        else:
            raise FlowerProcessError(f"{key}: a value cannot hold both quote characters")
    return " ".join(parts)


def run_id_from_log(text: str) -> int | None:
    """The run id ``flwr run`` printed ("Successfully started run N"), if it has."""
    marker = "Successfully started run "
    idx = text.find(marker)
    if idx < 0:
        return None
    digits = ""
    for ch in text[idx + len(marker) :]:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def kill_pids(pids: list[int]) -> None:
    """SIGKILL each pid that is still alive (and wait for it when it is our child)."""
    import psutil

    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.kill()
            proc.wait(timeout=10)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            continue


def flower_processes_under(flwr_home: Path) -> Iterator[int]:
    """Pids of live processes whose FLWR_HOME is ``flwr_home`` (to prove nothing was left)."""
    import psutil

    target = str(flwr_home.resolve())
    me = os.getpid()
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != me and proc.environ().get("FLWR_HOME") == target:
                yield int(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
