"""The Flower process harness: config strings Flower parses back, process-group cleanup."""

import sys
import time
from pathlib import Path

import psutil
import pytest
from flwr.common.config import parse_config_args

from deploy.flower_processes import (
    FlowerProcessError,
    format_node_config,
    free_port,
    run_id_from_log,
    start_process,
)


def test_config_strings_survive_flowers_parser() -> None:
    values = {
        "site-dir": "/tmp/a b/site",
        "model-config": '{"dim": 16, "max_len": 20}',
        "num-rounds": 2,
        "round-timeout": 12.5,
        "secagg": True,
        "quote": "it's",
    }
    assert parse_config_args([format_node_config(values)]) == values


def test_a_value_with_both_quotes_is_refused() -> None:
    with pytest.raises(FlowerProcessError, match="quote"):
        format_node_config({"k": 'it\'s "x"'})


def test_run_id_is_read_from_flwr_output() -> None:
    assert run_id_from_log("...\nSuccessfully started run 1234567 in x\n") == 1234567
    assert run_id_from_log("no run here") is None


def test_stop_kills_detached_descendants(tmp_path: Path) -> None:
    # Arrange: a parent whose child starts its own session (as Flower's SuperExec does)
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    proc = start_process("parent", [sys.executable, "-c", script], {}, tmp_path / "p.log")
    deadline = time.monotonic() + 20
    while not proc.descendants() and time.monotonic() < deadline:
        time.sleep(0.1)
    children = proc.descendants()
    assert children
    # Act
    proc.stop(grace=5)
    # Assert
    assert proc.poll() is not None
    for pid in children:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
