"""Flower's simulation runtime (Ray backend) on 127.0.0.1, with every process it starts stopped.

`flwr run .` without a connection starts a *detached* simulation SuperLink on fixed ports
and leaves it running. Instead, `SimulationEngine` starts ``flower-superlink --simulation``
itself, in its own session, on a free port, with ``FLWR_HOME`` and Ray's temp dir
(``RAY_TMPDIR``, which Ray reads in ``ray._common.utils.get_default_system_temp_dir``) inside
the run directory (through a short symlink when the path is too long for Ray's Unix
sockets), writes that SuperLink as the connection in ``$FLWR_HOME/config.toml``
and submits the production apps with ``flwr run <repo> <connection> --federation-config
'num-supernodes=N ...'``: the SuperLink's SuperExec starts ``flwr-simulation``, which runs
the ServerApp and drives the ClientApp in reusable Ray actors. On exit every process that
descends from the SuperLink, and anything still carrying this run's ``FLWR_HOME`` (Flower
detaches its SuperExec and app processes into new sessions), is killed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from deploy.flower_processes import (
    FLOWER_ENV,
    ManagedProcess,
    flower_bin,
    flower_processes_under,
    format_node_config,
    free_port,
    kill_pids,
    run_id_from_log,
    start_process,
    wait_for_port,
)
from shared.federated import STATE_DIR_ENV
from simulations.errors import SimulationError

CONNECTION = "fedrec-sim"
# Ray puts Unix sockets at <tmp>/ray/session_<date>_<time>_<us>_<pid>/sockets/<name>, and
# AF_UNIX paths stop at 107 bytes (ray._private.utils.validate_socket_filepath).
RAY_TMPDIR_MAX = 38


def repo_root() -> Path:
    """The Flower app directory: the repository holding pyproject.toml and the apps."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise SimulationError(f"{root} has no pyproject.toml: cannot find the Flower app")
    return root


def ray_temp_dir(run_dir: Path) -> tuple[Path, Path | None]:
    """(RAY_TMPDIR, symlink to remove afterwards or None) for a run directory.

    Ray's files always live in ``<run>/ray``. When that path is too long for Ray's Unix
    sockets, Ray is pointed at a short symlink ``<system temp>/fedrec-ray-<hash>`` to it.
    """
    inside = run_dir.resolve() / "ray"
    if len(str(inside)) <= RAY_TMPDIR_MAX:
        return inside, None
    digest = hashlib.sha1(str(inside).encode()).hexdigest()[:10]
    link = Path(tempfile.gettempdir()) / f"fedrec-ray-{digest}"
    if len(str(link)) > RAY_TMPDIR_MAX:
        raise SimulationError(
            f"Ray's socket paths would be too long under {inside} and {link}: use a shorter "
            "--out or TMPDIR"
        )
    return link, link


class SimulationEngine:
    """A simulation SuperLink and the `flwr run` submitted to it; a context manager.

    Parameters
    ----------
    run_dir
        ``flwr/`` (FLWR_HOME), ``logs/`` and the SuperLink database go here.
    state_dir
        ``FEDREC_STATE_DIR`` of every process: simulated SuperNode ``partition-id`` N
        trains on ``<state_dir>/sites/site-NNN``.
    """

    def __init__(self, run_dir: Path, state_dir: Path) -> None:
        self.run_dir = run_dir.resolve()
        self.flwr_home = self.run_dir / "flwr"
        self.log_dir = self.run_dir / "logs"
        self.ray_files = self.run_dir / "ray"
        self.ray_tmp, self.ray_link = ray_temp_dir(self.run_dir)
        self.port = 0
        self.superlink: ManagedProcess | None = None
        self.flwr_run: ManagedProcess | None = None
        self.run_id: int | None = None
        env = {**os.environ, **FLOWER_ENV}
        env["FLWR_HOME"] = str(self.flwr_home)
        env["RAY_TMPDIR"] = str(self.ray_tmp)
        env[STATE_DIR_ENV] = str(state_dir.resolve())
        # The SuperLink starts `flower-superexec` and that `flwr-simulation`, by name.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # Ray's notice about accelerator variables is noise on a CPU-only simulation.
        env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        # The ServerApp runs in a thread of flwr-simulation while its main thread forks Ray's
        # processes; every fork stops and restarts OpenBLAS's thread pool, so a LAPACK call
        # there ran 30x slower (3 SVDs of 12,101 x 637: 73.7 s beside forks, 2.5 s without,
        # 3.3 s single-threaded beside forks; docs/results.md, section 5). Numpy needs no
        # BLAS threads here: torch has its own, and each site is its own process.
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        self.env = env

    def __enter__(self) -> SimulationEngine:
        # SIGTERM (systemd, docker stop, a CI timeout, `kill`) would end Python at once and
        # leave the detached SuperLink, SuperExec and Ray behind: make it take the Ctrl-C
        # path instead, which stops the Flower run and then every process (`close`).
        self._sigterm_before: Any = None
        if threading.current_thread() is threading.main_thread():
            self._sigterm_before = signal.signal(signal.SIGTERM, _interrupt)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        restore = self._sigterm_before is not None
        if restore:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut cleanup
        try:
            self.close()
        finally:
            if restore:
                signal.signal(signal.SIGTERM, self._sigterm_before)

    # ------------------------------------------------------------------ SuperLink
    def start(self, timeout: float = 90.0) -> None:
        """Start ``flower-superlink --simulation`` and make it this FLWR_HOME's connection."""
        if self.superlink is not None:
            raise SimulationError("the simulation SuperLink is already running")
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.ray_files.mkdir(parents=True, exist_ok=True)
        if self.ray_link is not None:
            if self.ray_link.is_symlink():
                self.ray_link.unlink()  # left by an earlier, killed run of this directory
            self.ray_link.symlink_to(self.ray_files, target_is_directory=True)
        self.port = free_port()
        argv = [
            flower_bin("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.flwr_home / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]
        self.superlink = start_process(
            "superlink", argv, self.env, self.log_dir / "superlink.log", cwd=self.run_dir
        )
        try:
            wait_for_port("127.0.0.1", self.port, timeout, self.superlink)
        except Exception as err:
            raise SimulationError(f"the simulation SuperLink did not start: {err}") from err
        config = (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        (self.flwr_home / "config.toml").write_text(config, encoding="utf-8")

    # ------------------------------------------------------------------ runs
    def submit(
        self,
        run_config: Mapping[str, str | int | float | bool],
        *,
        num_supernodes: int,
        actors: int,
        app_dir: Path | None = None,
    ) -> ManagedProcess:
        """``flwr run <app> <connection> --stream`` with a simulation of ``num_supernodes``.

        ``actors`` ClientApps run at a time, one CPU each (Ray actors, reused across
        SuperNodes and rounds). Returns the `flwr run` process, which ends with the run.
        """
        if self.superlink is None:
            raise SimulationError("start the simulation SuperLink first")
        if self.flwr_run is not None:
            raise SimulationError("a run was already submitted to this engine")
        federation = {
            "num-supernodes": num_supernodes,
            "client-resources-num-cpus": 1,
            "init-args-num-cpus": actors,
        }
        app = app_dir or repo_root()
        argv = [
            flower_bin("flwr"),
            "run",
            str(app),
            CONNECTION,
            "--stream",
            "--federation-config",
            format_node_config(federation),
            "--run-config",
            format_node_config(run_config),
        ]
        self.flwr_run = start_process(
            "flwr-run", argv, self.env, self.log_dir / "flwr-run.log", cwd=app
        )
        return self.flwr_run

    def run_log(self, n_chars: int = 1 << 20) -> str:
        """The end of the `flwr run` log (the ServerApp's streamed output)."""
        return self.flwr_run.log_tail(n_chars) if self.flwr_run is not None else ""

    def current_run_id(self) -> int | None:
        """The Flower run id, once `flwr run` has printed it."""
        if self.run_id is None:
            self.run_id = run_id_from_log(self.run_log(1 << 16))
        return self.run_id

    def stop_run(self) -> None:
        """Ask the SuperLink to stop the run (``flwr stop``); best effort."""
        run_id = self.current_run_id()
        if run_id is None or self.superlink is None or self.superlink.poll() is not None:
            return
        argv = [flower_bin("flwr"), "stop", str(run_id), CONNECTION]
        try:
            subprocess.run(
                argv,
                env=self.env,
                capture_output=True,
                timeout=30,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return

    # ------------------------------------------------------------------ processes
    def pids(self) -> list[int]:
        """Every live process this engine is responsible for (for memory sampling)."""
        started = [p for p in (self.superlink, self.flwr_run) if p is not None]
        pids = {p.pid for p in started if p.poll() is None}
        for proc in started:
            pids.update(proc.descendants())
        return sorted(pids)

    def leftovers(self) -> list[int]:
        """Processes still carrying this run's FLWR_HOME or Ray temp dir (should be none)."""
        return sorted(set(flower_processes_under(self.flwr_home)) | set(_ray_processes(self)))

    def close(self) -> None:
        """Stop the run, then every process started here, detached ones included."""
        started = [p for p in (self.flwr_run, self.superlink) if p is not None]
        children = {p.pid: p.descendants() for p in started}
        for proc in started:
            if proc.poll() is None:
                proc.kill(signal.SIGTERM)
        for proc in started:
            proc.stop(grace=15.0)
            kill_pids(children[proc.pid])
        kill_pids(self.leftovers())
        if self.ray_link is not None and self.ray_link.is_symlink():
            self.ray_link.unlink()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so that every `finally` and `__exit__` runs."""
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _ray_processes(engine: SimulationEngine) -> Iterator[int]:
    """Pids of live processes whose RAY_TMPDIR is this engine's."""
    import psutil

    target = str(engine.ray_tmp)
    me = os.getpid()
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != me and proc.environ().get("RAY_TMPDIR") == target:
                yield int(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def describe_env(engine: SimulationEngine) -> dict[str, Any]:
    """Where the engine keeps its state (for config.json)."""
    return {
        "flwr_home": str(engine.flwr_home),
        "ray_tmpdir": str(engine.ray_tmp),
        "ray_files": str(engine.ray_files),
        "connection": CONNECTION,
    }
