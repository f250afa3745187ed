"""TLS (a CA made here) and SuperNode authentication: registered sites train, others are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_node_key, make_tls
from sites import TINY_MODEL, make_sites

from coordinator.registry import Registry
from deploy.flower_processes import LocalFederation, flower_processes_under, format_node_config
from shared.artifacts import verify_model_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
FEDREC = Path(sys.executable).parent / "fedrec"


def test_dp_round_over_tls_with_authenticated_supernodes(tmp_path: Path) -> None:
    # Arrange: a CA, a SuperLink certificate, one registered key per site
    catalogue, sites = make_sites(tmp_path / "data")
    state = tmp_path / "state"
    fed = LocalFederation(
        tmp_path / "flower",
        tls=make_tls(tmp_path / "tls"),
        supernode_auth=True,
        extra_env={"FEDREC_STATE_DIR": str(state)},
    )
    with fed:
        fed.start_superlink()
        for site in sites:
            private, public = make_node_key(tmp_path / "keys", site.name)
            fed.register_supernode(public, name=site.name)
            fed.start_supernode(site.name, {"site-dir": str(site)}, private_key=private)
        fed.wait_for_nodes(len(sites))
        # Act 1: a SuperNode whose key was never registered tries to join
        intruder_key, _ = make_node_key(tmp_path / "keys", "intruder")
        intruder = fed.start_supernode(
            "intruder", {"site-dir": str(sites[0])}, private_key=intruder_key, wait=False
        )
        code = intruder.popen.wait(timeout=120)
        # Assert 1: it was refused and never became a node
        assert code != 0, intruder.log_tail()
        assert len([n for n in fed.list_nodes() if n.get("status") == "online"]) == len(sites)
        # Act 2: two DP rounds over TLS, through the admin CLI (it runs `flwr run`)
        run_config = format_node_config(
            {
                "catalogue": str(catalogue),
                "model-config": TINY_MODEL,
                "batch-size": 16,
                "learning-rate": 0.01,
                "min-sites": 3,
                "quorum": 3,
                "round-timeout": 120.0,
            }
        )
        result = subprocess.run(
            [
                str(FEDREC),
                "coordinator",
                "run",
                "--connection",
                fed.connection,
                "--rounds",
                "2",
                "--app",
                str(REPO),
                "--flwr-home",
                str(fed.flwr_home),
                "--state-dir",
                str(state),
                "--run-config",
                run_config,
                "--json",
            ],
            env=fed.env,
            capture_output=True,
            text=True,
            timeout=420,
            check=False,
        )
        # Assert 2: both rounds completed with every site, the privacy cost composed over
        # them, and every site serves the result
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout)["last_run"]["status"] == "completed"
        registry = Registry(state / "coordinator" / "coordinator.db", create=False)
        rounds = registry.rounds()
        assert [(r["status"], r["sites_accepted"]) for r in rounds] == [("completed", 3)] * 2
        trained = [m for m in registry.models() if m.round is not None]
        newest = registry.head()
        assert newest is not None and newest.published and newest.epsilon_max
        first = min(trained, key=lambda m: m.round or 0)
        assert len(trained) == 2
        assert first.epsilon_max is not None and newest.epsilon_max > first.epsilon_max
        for site in sites:
            verify_model_dir(site / "models" / newest.version)
            assert (site / "models" / "CURRENT").read_text().strip() == newest.version
    assert not list(flower_processes_under(fed.flwr_home))
