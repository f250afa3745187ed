"""Synthetic sites for trying the federation: ``<state>/sites/site-NNN/`` and a catalogue.

`flwr run .` under Flower's simulation engine maps simulated SuperNode ``partition-id`` N
to ``<state>/sites/site-NNN`` (`edge_client.federated_site.Site.from_node_config`), and a
run without a ``catalogue`` falls back to ``<state>/sites/catalogue.json``; this module
writes both, so `fedrec coordinator demo-sites && flwr run .` trains end to end.
"""

from __future__ import annotations

from pathlib import Path

from shared.errors import ConfigError
from shared.synth import SynthConfig, generate_synthetic
from shared.vocab import ItemVocab

CATALOGUE_FILE = "catalogue.json"


def sites_root(state_dir: Path) -> Path:
    """Where simulated sites live under a state directory."""
    return state_dir / "sites"


def write_demo_sites(
    root: Path,
    *,
    n_sites: int = 3,
    shoppers_per_site: int = 40,
    n_items: int = 60,
    events_per_shopper: float = 8.0,
    seed: int = 0,
    names: list[str] | None = None,
) -> tuple[Path, list[Path]]:
    """Write ``root/catalogue.json`` and one site directory (site.db, models/) per site.

    Sites are named ``site-000``, ``site-001``... unless ``names`` is given. Existing site
    directories are refused rather than mixed with new events.
    """
    from edge_client.store import EventStore

    names = names or [f"site-{i:03d}" for i in range(n_sites)]
    if len(names) != n_sites:
        raise ConfigError(f"{len(names)} names for {n_sites} sites")
    clash = [n for n in names if (root / n).exists()]
    if clash:
        raise ConfigError(f"{root / clash[0]} already exists; choose another state dir")
    dataset = generate_synthetic(
        SynthConfig(
            n_sites=n_sites,
            shoppers_per_site=shoppers_per_site,
            n_items=n_items,
            n_categories=max(2, min(20, n_items // 15)),
            events_per_shopper=events_per_shopper,
            min_events=5,
            seed=seed,
        )
    )
    root.mkdir(parents=True, exist_ok=True)
    catalogue = root / CATALOGUE_FILE
    ItemVocab.from_items(dataset.item_attributes).save(catalogue)
    dirs = []
    for name, (_, events) in zip(names, dataset.events.groupby("site", sort=True), strict=True):
        site_dir = root / name
        (site_dir / "models").mkdir(parents=True)
        store = EventStore(site_dir / "site.db")
        try:
            store.import_events(events.reset_index(drop=True))
        finally:
            store.close()
        dirs.append(site_dir)
    return catalogue, dirs
