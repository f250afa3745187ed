"""Write simulated sites: one directory per site, laid out exactly like a real edge's.

``<root>/site-NNN/site.db`` holds the site's events, written through the edge's own
`edge_client.store.EventStore` (same schema, same validation, same migrations);
``models/`` is where the ClientApp stores every version it receives; ``node-config.json``
is what a real site passes to its SuperNode with ``--node-config`` (site name, ε budget,
δ, device), which a simulated SuperNode cannot be given (Flower's simulation engine sets
only ``partition-id``). ``<root>/catalogue.json`` is the global vocabulary: the dataset's
item set, the public product catalogue.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from shared.events import EventDataset
from shared.vocab import ItemVocab
from simulations.errors import SimulationError
from simulations.partition import Partition, site_dir_name

CATALOGUE_FILE = "catalogue.json"
# Read by `edge_client.federated_site.Site.from_node_config` for simulated SuperNodes.
NODE_CONFIG_FILE = "node-config.json"


@dataclass(frozen=True)
class SiteLayout:
    """Where the simulated sites were written."""

    root: Path
    catalogue: Path
    site_dirs: tuple[Path, ...]
    events_per_site: tuple[int, ...]


def catalogue_of(events: pd.DataFrame) -> ItemVocab:
    """The global vocabulary: every item of the dataset (as `shared.training.prepare_split`)."""
    return ItemVocab.from_items(events["item_id"].astype(str))


def write_sites(
    dataset: EventDataset,
    partition: Partition,
    root: Path,
    *,
    node_config: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> SiteLayout:
    """Write ``root/catalogue.json`` and one site directory per site of ``partition``.

    Each event's ``site`` becomes its site's name. ``node_config`` (e.g. ``epsilon-budget``,
    ``delta``) is written into every site's node-config file beside its name. ``root`` must
    not hold sites already: events are never mixed into an existing store.
    """
    from edge_client.store import EventStore

    if root.exists() and any(root.iterdir()):
        raise SimulationError(f"{root} is not empty; simulated sites need a fresh directory")
    root.mkdir(parents=True, exist_ok=True)
    vocab = catalogue_of(dataset.events)
    catalogue = root / CATALOGUE_FILE
    vocab.save(catalogue)
    dirs: list[Path] = []
    counts: list[int] = []
    for site, events in partition.site_events(dataset.events):
        site_dir = root / site_dir_name(site)
        (site_dir / "models").mkdir(parents=True)
        frame = events.reset_index(drop=True).copy()
        frame["site"] = partition.names[site][:64]
        store = EventStore(site_dir / "site.db")
        try:
            if len(frame):
                store.import_events(frame)
        finally:
            store.close()
        config = {"site-name": partition.names[site], **(node_config or {})}
        (site_dir / NODE_CONFIG_FILE).write_text(
            json.dumps(config, indent=2, sort_keys=True), encoding="utf-8"
        )
        dirs.append(site_dir)
        counts.append(len(frame))
        if progress is not None:
            progress(site + 1)
    return SiteLayout(root, catalogue, tuple(dirs), tuple(counts))
