"""The simulation engine's process hygiene: SIGTERM takes the Ctrl-C path and stops everything."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from deploy.flower_processes import flower_processes_under

pytestmark = [pytest.mark.slow, pytest.mark.integration]

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from simulations.engine import SimulationEngine

    run = Path(sys.argv[1])
    with SimulationEngine(run, run / "state") as engine:
        engine.start()
        print(engine.superlink.pid, flush=True)
        time.sleep(300)
    print("cleaned up", flush=True)
    """
)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_stops_the_superlink_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # Arrange: a process holding a running simulation SuperLink
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        superlink = int(holder.stdout.readline() or 0)
        assert superlink and alive(superlink), holder.stderr.read() if holder.stderr else ""
        # Act: what systemd, `docker stop` or a CI timeout sends
        holder.send_signal(signal.SIGTERM)
        rc = holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
    # Assert: the holder unwound through the engine's cleanup, and nothing is left
    out = holder.stdout.read() if holder.stdout else ""
    assert rc != 0 and "cleaned up" not in out  # interrupted, not finished
    deadline = time.monotonic() + 10
    while alive(superlink) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(superlink)
    assert list(flower_processes_under(run / "flwr")) == []


def test_simulation_processes_get_single_threaded_openblas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ServerApp runs in a thread of flwr-simulation while its main thread forks Ray's
    # processes; with OpenBLAS's thread pool, each fork stalls numpy's LAPACK calls there
    # (the Beauty item vectors took minutes). Every process the engine starts inherits env.
    from simulations.engine import SimulationEngine

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    default = SimulationEngine(tmp_path / "a", tmp_path / "a" / "state")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    chosen = SimulationEngine(tmp_path / "b", tmp_path / "b" / "state")

    assert default.env["OPENBLAS_NUM_THREADS"] == "1"
    assert chosen.env["OPENBLAS_NUM_THREADS"] == "2"  # an operator's own choice stands
