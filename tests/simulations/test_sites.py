"""Simulated sites: the edge's own store, the global catalogue, the site's node config."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_client.federated_site import Site
from edge_client.store import EventStore
from shared.synth import SynthConfig, generate_synthetic
from shared.vocab import ItemVocab
from simulations.engine import RAY_TMPDIR_MAX, ray_temp_dir, run_id_from_log
from simulations.errors import SimulationError
from simulations.partition import partition_uniform, shoppers
from simulations.sites import NODE_CONFIG_FILE, write_sites


def test_sites_hold_their_shoppers_events_in_the_edge_store(tmp_path: Path) -> None:
    data = generate_synthetic(SynthConfig(n_sites=2, shoppers_per_site=10, n_items=40, seed=2))
    part = partition_uniform(shoppers(data.events), 3, seed=0)

    layout = write_sites(data, part, tmp_path / "sites", node_config={"epsilon-budget": 4.0})

    assert ItemVocab.load(layout.catalogue) == ItemVocab.from_items(data.events["item_id"])
    assert sum(layout.events_per_site) == len(data.events)
    for i, site_dir in enumerate(layout.site_dirs):
        assert site_dir.name == f"site-{i:03d}" and (site_dir / "models").is_dir()
        store = EventStore(site_dir / "site.db", create=False)
        try:
            frame = store.events_frame()
        finally:
            store.close()
        assert set(frame["user_id"]) == set(part.assignment[part.assignment == i].index)
        assert (frame["site"] == part.names[i]).all()
        assert len(frame) == layout.events_per_site[i]
    with pytest.raises(SimulationError, match="not empty"):
        write_sites(data, part, tmp_path / "sites")


def test_a_simulated_supernode_reads_the_sites_node_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = generate_synthetic(SynthConfig(n_sites=2, shoppers_per_site=5, n_items=40, seed=3))
    part = partition_uniform(shoppers(data.events), 2, seed=0)
    write_sites(
        data,
        part,
        tmp_path / "sites",
        node_config={"epsilon-budget": 2.5, "delta": 1e-6},
    )
    monkeypatch.setenv("FEDREC_STATE_DIR", str(tmp_path))

    site = Site.from_node_config({"partition-id": 1, "num-partitions": 2})

    assert site.root == (tmp_path / "sites" / "site-001").resolve()
    assert (site.name, site.epsilon_budget, site.delta) == ("site-001", 2.5, 1e-6)
    (site.root / NODE_CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(Exception, match="JSON object"):
        Site.from_node_config({"partition-id": 1})


def test_ray_temp_dir_stays_short_enough_for_unix_sockets(tmp_path: Path) -> None:
    short = Path("/tmp/r")
    deep = tmp_path / ("x" * 60)

    link_dir, link = ray_temp_dir(deep)

    assert ray_temp_dir(short) == (short / "ray", None)
    assert link is not None and link_dir == link and len(str(link)) <= RAY_TMPDIR_MAX
    assert ray_temp_dir(deep) == (link_dir, link)  # stable: the run finds it again


def test_run_id_is_read_from_flwr_run_output() -> None:
    assert run_id_from_log("x\nSuccessfully started run 8957492059\nmore") == 8957492059
    assert run_id_from_log("Using SuperLink: sim") is None
