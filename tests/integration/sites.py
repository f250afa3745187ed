"""Tiny synthetic sites for the integration tests: a catalogue and a few hundred events each."""

from __future__ import annotations

from pathlib import Path

from deploy.demo_sites import write_demo_sites

# Small enough for 2 CPU cores, big enough that every shopper has held-out items.
TINY_MODEL = '{"dim": 16, "hidden": 16, "max_len": 20, "dropout": 0.0}'
SITE_NAMES = ["store-01", "store-02", "store-03"]


def make_sites(root: Path) -> tuple[Path, list[Path]]:
    """``root/catalogue.json`` and three sites of 40 shoppers (~8 events each), 60 items."""
    return write_demo_sites(root, n_sites=3, shoppers_per_site=40, n_items=60, names=SITE_NAMES)
