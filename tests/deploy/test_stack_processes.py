"""How `LocalStack.down` stops processes, with stand-in processes instead of Flower (fast)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from deploy.errors import StackError
from deploy.local_stack import Component, LocalStack, LocalStackConfig, stack_processes

# A process that ignores SIGTERM and leaves a grandchild in a session of its own (as Flower's
# SuperExec does), which a process-group kill cannot reach.
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print("ready", flush=True)
time.sleep(120)
"""


def wait_for(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_down_kills_what_ignores_sigterm_and_what_escaped_the_group(tmp_path: Path) -> None:
    # Arrange
    stack = LocalStack(tmp_path)
    components: list[Component] = []
    comp = stack._spawn(
        components,
        name="edge-store-01",
        kind="edge",
        argv=[sys.executable, "-c", STUBBORN],
        env=stack._env(),
        ports={"http": 1},
    )
    wait_for(lambda: "\nready\n" in Path(comp.log).read_text())  # not the argv header line
    marked = stack_processes(tmp_path)
    assert comp.pid in marked and len(marked) == 2  # the process and its detached child
    # Act
    started = time.monotonic()
    report = stack.down(timeout=1.0)
    # Assert: SIGKILL after the grace period, the escaped grandchild swept, nothing left
    assert time.monotonic() - started < 15
    assert report.stopped == ["edge-store-01"] and report.killed_pids == [comp.pid]
    assert report.stray_pids  # the detached grandchild
    assert not stack_processes(tmp_path)
    assert not (tmp_path / "stack.json").exists()
    for pid in marked:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_recycled_pid_is_never_killed(tmp_path: Path) -> None:
    # Arrange: a manifest naming this very process, but with another start time (the pid of
    # a stack process that ended long ago, now reused by someone else)
    me = psutil.Process(os.getpid())
    record = Component("superlink", "superlink", me.pid, me.create_time() - 1000, {}, "x.log")
    (tmp_path / "stack.json").write_text(json.dumps({"components": [record.__dict__]}))
    stack = LocalStack(tmp_path)
    # Act
    statuses = stack.status()
    report = stack.down(timeout=1.0)
    # Assert: reported as not running, left alone (this test is still alive to check)
    assert [s.running for s in statuses] == [False]
    assert report.killed_pids == [] and report.stopped == []


def test_up_refuses_while_a_stack_runs_and_bad_configs(tmp_path: Path) -> None:
    me = psutil.Process(os.getpid())
    record = Component("superlink", "superlink", me.pid, me.create_time(), {}, "x.log")
    (tmp_path / "stack.json").write_text(json.dumps({"components": [record.__dict__]}))
    with pytest.raises(StackError, match="already running"):
        LocalStack(tmp_path).up(LocalStackConfig(sites=1))
    for bad in ({"sites": 0}, {"sites": 100}, {"base_port": 80}, {"startup_timeout": 0}):
        with pytest.raises(StackError):
            LocalStackConfig(**bad)  # type: ignore[arg-type]
    (tmp_path / "stack.json").write_text("{broken")
    with pytest.raises(StackError, match="not a stack manifest"):
        LocalStack(tmp_path).components()
