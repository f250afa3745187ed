"""Synthetic data for trying a real deployment: a catalogue and one events file per store.

`fedrec deploy local` seeds its stores directly; a compose or systemd deployment receives
data through the stores' own interfaces instead (`POST /v1/admin/import` or `fedrec edge
import`). This writes what those need: ``catalogue.json`` (the product catalogue the
coordinator's first run starts from) and ``<store>.csv`` per store (`events` format, each
store a region with its own tastes, `shared.synth`).
"""

from __future__ import annotations

from pathlib import Path

from deploy.certificates import check_store_name
from deploy.errors import DeployError


def write_demo_data(
    out: Path,
    *,
    stores: list[str],
    shoppers_per_store: int = 200,
    n_items: int = 300,
    events_per_shopper: float = 20.0,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``out/catalogue.json`` and ``out/<store>.csv``; returns name -> path."""
    from shared.readers import write_events
    from shared.synth import SynthConfig, generate_synthetic
    from shared.vocab import ItemVocab

    if not stores:
        raise DeployError("at least one store is needed")
    for store in stores:
        check_store_name(store)
    dataset = generate_synthetic(
        SynthConfig(
            n_sites=len(stores),
            shoppers_per_site=shoppers_per_store,
            n_items=n_items,
            n_categories=max(2, min(20, n_items // 15)),
            events_per_shopper=events_per_shopper,
            seed=seed,
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    written = {"catalogue": out / "catalogue.json"}
    ItemVocab.from_items(dataset.item_attributes).save(written["catalogue"])
    by_site = {str(name): frame for name, frame in dataset.events.groupby("site", sort=True)}
    # shared.synth names its sites store-01, store-02, ... in order; map them to ours.
    for synth_name, store in zip(sorted(by_site), stores, strict=True):
        events = by_site[synth_name].copy()
        events["site"] = store
        events["user_id"] = events["user_id"].str.replace(synth_name, store, regex=False)
        written[store] = write_events(events.reset_index(drop=True), out / f"{store}.csv")
    return written
