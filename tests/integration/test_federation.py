"""Real Flower processes on 127.0.0.1: a SuperLink, three SuperNodes, `flwr run` of this app.

One insecure federation serves the tests of this module, in order (each arranges the sites
it needs): two DP rounds with a site sending NaN and every edge service hot-swapping to the
new version; a SecAgg+ round whose aggregate must equal the sites' weighted average; a
site killed mid-round. Every process is stopped by the fixture, even on failure, and the
fixture proves nothing is left running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import torch
from sites import TINY_MODEL, make_sites

from coordinator.registry import Registry
from deploy.flower_processes import (
    LocalFederation,
    ManagedProcess,
    flower_processes_under,
    free_port,
    start_process,
    wait_for_port,
)
from shared.artifacts import WEIGHTS_FILE, verify_model_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
FEDREC = Path(sys.executable).parent / "fedrec"


@dataclass
class Cluster:
    """The running federation and where its data and state live."""

    fed: LocalFederation
    catalogue: Path
    sites: list[Path]
    state: Path

    def run_config(self, **overrides: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "catalogue": str(self.catalogue),
            "model-config": TINY_MODEL,
            "batch-size": 16,
            "learning-rate": 0.01,
            "min-sites": 3,
            "quorum": 2,
            "round-timeout": 90.0,
            "state-dir": str(self.state),
        }
        return {**base, **overrides}

    def registry(self) -> Registry:
        return Registry(self.state / "coordinator" / "coordinator.db", create=False)

    def use_sites(self, **faults: str) -> None:
        """(Re)start the SuperNodes so that each site runs with the given fault ("" = none)."""
        for site in self.sites:
            fault = faults.get(site.name.replace("-", "_"), "")
            proc = self.fed.supernodes.get(site.name)
            if proc is not None and getattr(proc, "fault", "") == fault and proc.poll() is None:
                continue
            if proc is not None:
                self.fed.stop_supernode(site.name)
            node_config: dict[str, str] = {"site-dir": str(site)}
            if fault:
                node_config["fault"] = fault
            started = self.fed.start_supernode(site.name, node_config)
            started.fault = fault  # type: ignore[attr-defined]
        self.fed.wait_for_nodes(len(self.sites))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("federation")
    catalogue, sites = make_sites(root / "data")
    state = root / "state"
    fed = LocalFederation(
        root / "flower",
        extra_env={"FEDREC_STATE_DIR": str(state), "FEDREC_ALLOW_FAULT_INJECTION": "1"},
    )
    try:
        fed.start_superlink()
        yield Cluster(fed, catalogue, sites, state)
    finally:
        fed.stop_all()
    left = list(flower_processes_under(fed.flwr_home))
    assert not left, f"processes left running: {left}"


def last_run_rounds(registry: Registry) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run = registry.runs()[0]
    rounds = [r for r in registry.rounds() if r["run_id"] == run["id"]]
    return run, sorted(rounds, key=lambda r: r["number"])


def start_edge_service(site: Path, log_dir: Path) -> tuple[ManagedProcess, str]:
    port = free_port()
    proc = start_process(
        f"edge-{site.name}",
        [
            str(FEDREC),
            "edge",
            "serve",
            "--db",
            str(site / "site.db"),
            "--model-dir",
            str(site / "models"),
            "--port",
            str(port),
            "--dev",
        ],
        {**os.environ, "FEDREC_EDGE_POLL_INTERVAL_S": "0.5"},
        log_dir / f"edge-{site.name}.log",
    )
    wait_for_port("127.0.0.1", port, 60, proc)
    return proc, f"http://127.0.0.1:{port}"


def clientapp_running(proc: ManagedProcess) -> bool:
    """True while one of the SuperNode's descendants is a ClientApp process."""
    for pid in proc.descendants():
        try:
            if "flwr-clientapp" in " ".join(psutil.Process(pid).cmdline()):
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def served_version(url: str) -> str | None:
    body = httpx.get(f"{url}/v1/model", timeout=10).json()
    return body.get("version")


def test_two_dp_rounds_reject_nan_and_reach_every_edge_service(cluster: Cluster) -> None:
    # Arrange: store-03 sends NaN weights; every site runs its edge service
    cluster.use_sites(store_03="nan")
    services = [start_edge_service(site, cluster.fed.log_dir) for site in cluster.sites]
    try:
        # Act
        outcome = cluster.fed.run(REPO, cluster.run_config(**{"num-rounds": 2}), timeout=420)
        # Assert: the run and both rounds completed without the poisoned update
        assert outcome.succeeded, outcome.log[-3000:]
        registry = cluster.registry()
        run, rounds = last_run_rounds(registry)
        assert run["status"] == "completed", run
        assert [r["status"] for r in rounds] == ["completed", "completed"]
        for r in rounds:
            assert (r["sites_accepted"], r["sites_rejected"]) == (2, 1), r
            results = {
                s["site"]: s for s in registry.site_results(r["number"]) if s["phase"] == "train"
            }
            assert results["store-03"]["outcome"] == "rejected"
            assert "non-finite" in results["store-03"]["reason"]
            assert results["store-01"]["epsilon"] > 0
        assert "store-03" in outcome.log and "rejected the update" in outcome.log
        newest = registry.head()
        assert newest is not None and newest.published and newest.round == rounds[-1]["number"]
        assert newest.epsilon_max is not None and newest.epsilon_max > 0
        # Every site stored the new version (verified files, ONNX included) and serves it
        for site in cluster.sites:
            meta = verify_model_dir(site / "models" / newest.version)
            assert meta.privacy.epsilon == pytest.approx(newest.epsilon_max)
            assert (site / "models" / "CURRENT").read_text().strip() == newest.version
        deadline = time.monotonic() + 60
        for _, url in services:
            while served_version(url) != newest.version and time.monotonic() < deadline:
                time.sleep(0.5)
            assert served_version(url) == newest.version
        # No detached SuperLink: the only one under this FLWR_HOME is the one we started
        superlinks = [
            pid
            for pid in flower_processes_under(cluster.fed.flwr_home)
            if "flower-superlink" in " ".join(psutil.Process(pid).cmdline())
        ]
        assert cluster.fed.superlink is not None
        assert superlinks == [cluster.fed.superlink.pid]
        # The acceptance commands print valid JSON about this run
        for args in (["status"], ["models", "list"], ["privacy"]):
            result = subprocess.run(
                [str(FEDREC), "coordinator", *args, "--json", "--state-dir", str(cluster.state)],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            json.loads(result.stdout)
    finally:
        for proc, _ in services:
            proc.stop()


def test_secagg_round_equals_the_weighted_average_of_the_sites(cluster: Cluster) -> None:
    from coordinator.federation import load_catalogue
    from edge_client.federated_site import Site, load_split, local_config
    from edge_client.local_training import train_local
    from shared.artifacts import load_model_dir
    from shared.federated import RoundInstructions
    from shared.models import config_dict

    # Arrange: three honest sites, no DP noise, so the aggregate can be recomputed here
    cluster.use_sites()
    number = Registry(cluster.state / "coordinator" / "coordinator.db").next_round_number()
    config = cluster.run_config(
        **{
            "num-rounds": 1,
            "secagg": True,
            "privacy-mode": "none",
            "fraction-evaluate": 0.0,
            "secagg-max-weight": 100.0,
        }
    )
    # Act
    outcome = cluster.fed.run(REPO, config, timeout=420)
    # Assert
    assert outcome.succeeded, outcome.log[-3000:]
    run, rounds = last_run_rounds(cluster.registry())
    assert run["secagg"] == 1 and [r["status"] for r in rounds] == ["completed"], rounds
    secure = cluster.registry().head()
    assert secure is not None and secure.parent is not None and secure.round == number
    start = cluster.registry().model(secure.parent)
    got = torch.load(Path(secure.path) / WEIGHTS_FILE, weights_only=True)
    model, vocab, _ = load_model_dir(Path(start.path))
    assert vocab == load_catalogue(cluster.catalogue)
    total, expected = 0, {k: torch.zeros_like(v, dtype=torch.float64) for k, v in got.items()}
    for site_dir in cluster.sites:
        site = Site.from_node_config({"site-dir": str(site_dir)})
        instr = RoundInstructions(
            server_round=number,
            model_version=start.version,
            model_kind="gru",
            model_config=config_dict(model),
            catalogue=vocab,
            privacy_mode="none",
            local_epochs=1,
            batch_size=16,
            learning_rate=0.01,
            seed=number,
        )
        split, _, _ = load_split(site, vocab)
        result = train_local(model, split.train, local_config(site, instr))
        total += result.num_examples
        for k, v in result.state_dict.items():
            expected[k] += result.num_examples * v.double()
    start_weights = model.state_dict()
    for k in got:
        mean = (expected[k] / total).float()
        assert not torch.allclose(got[k], start_weights[k]), f"{k} did not change"
        np.testing.assert_allclose(got[k].numpy(), mean.numpy(), atol=2e-4, err_msg=k)


def test_a_site_killed_mid_round_does_not_stall_it(cluster: Cluster) -> None:
    # Arrange: store-03 hangs in training; it will be killed while the round waits for it
    cluster.use_sites(store_03="slow")
    timeout = 45.0
    registry_path = cluster.state / "coordinator" / "coordinator.db"
    before = cluster.registry().next_round_number()
    killed = threading.Event()

    def kill_when_training() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            registry = Registry(registry_path)
            rows = registry.rounds(limit=1)
            registry.close()
            proc = cluster.fed.supernodes["store-03"]
            if (
                rows
                and rows[0]["number"] >= before
                and rows[0]["status"] == "running"
                and proc.descendants()
            ):
                time.sleep(2.0)  # its ClientApp has the message and sleeps in training
                cluster.fed.stop_supernode("store-03", crash=True)
                killed.set()
                return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_when_training, daemon=True)
    killer.start()
    # Act
    outcome = cluster.fed.run(
        REPO,
        cluster.run_config(**{"num-rounds": 1, "round-timeout": timeout, "fraction-evaluate": 0.0}),
        timeout=300,
    )
    killer.join(timeout=10)
    # Assert: the round completed with the two live sites, within its timeout
    assert killed.is_set(), "the slow site was never seen training"
    assert outcome.succeeded, outcome.log[-3000:]
    _, rounds = last_run_rounds(cluster.registry())
    assert [r["status"] for r in rounds] == ["completed"]
    assert rounds[0]["sites_accepted"] == 2
    assert rounds[0]["seconds"] < timeout + 30
    outcomes = [
        (s["site"], s["outcome"]) for s in cluster.registry().site_results(rounds[0]["number"])
    ]
    # The crashed node is booked once: "timeout" if the round gave up first, "failed" if the
    # SuperLink noticed the missing heartbeats first and answered for it (an error reply
    # whose source is the SuperLink, node 1: it must not become a fourth site).
    assert len(outcomes) == 3, outcomes
    assert sorted(o for _, o in outcomes)[:2] == ["accepted", "accepted"], outcomes
    assert sorted(o for _, o in outcomes)[2] in {"failed", "timeout"}, outcomes
    assert "node-1" not in {name for name, _ in outcomes}, outcomes
    assert {"store-01", "store-02"} <= {name for name, _ in outcomes}
