"""Synthetic multi-site shopping logs with the structure a sequential recommender can learn.

What the generator puts in (all drawn from one seeded numpy Generator, so a config and seed
always give the same log):

- **Catalogue**: ``n_items`` items spread evenly over ``n_categories`` categories; within a
  category, popularity follows Zipf's law (weight ``1 / rank**zipf_exponent``). The category is
  a public item attribute (``category:c07``).
- **Regional tastes**: every site draws a category preference from a Dirichlet
  (``site_taste_alpha``; small = peaked); each shopper's taste is a Dirichlet around its site's
  (``shopper_taste_strength``).
- **Sequential patterns**: every item has ``successors`` likely next items, most in its own
  category (``successor_same_category``), preferred with weights 1/2, 1/4, ... . At each step a
  shopper follows a successor of the current item with probability ``follow_prob`` (one drawn by
  those weights; if already viewed, the next successor not yet viewed), otherwise jumps:
  category by taste, item by popularity (avoiding items already viewed when it can).
- **Event types**: every step is a ``view``; then ``fav`` (``fav_prob``), ``cart``
  (``cart_prob``), ``purchase`` after a cart (``purchase_prob``) and a ``rating`` 1-5 with
  ``value`` after a purchase (``rating_prob``).
- **Timestamps**: sessions of geometric length (``session_views``) with seconds-to-minutes
  between events, spread over ``days`` days from ``start``, session starts following a
  diurnal rhythm (lunch and evening peaks, quiet nights).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from shared.errors import ConfigError
from shared.events import EventDataset, EventType

SYNTH_FORMATS: dict[str, str] = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl"}
RATING_PROBS = np.array([0.05, 0.08, 0.17, 0.35, 0.35])  # ratings 1..5, skewed high
_HOURS = np.arange(24) + 0.5
# Relative activity by hour of day: a lunch bump, an evening peak, a quiet night.
HOURLY_ACTIVITY = (
    0.08
    + 0.6 * np.exp(-((_HOURS - 12.5) ** 2) / (2 * 1.5**2))
    + 1.0 * np.exp(-((_HOURS - 20.5) ** 2) / (2 * 2.0**2))
)


@dataclass(frozen=True)
class SynthConfig:
    """Size, structure and seed of a synthetic log (defaults: 5 sites x 200 shoppers)."""

    n_sites: int = 5
    shoppers_per_site: int = 200
    n_items: int = 1000
    n_categories: int = 20
    events_per_shopper: float = 50.0  # mean; lengths are log-normal, at least min_events
    min_events: int = 5
    seed: int = 0
    start: str = "2024-01-01"  # ISO date (UTC) of the first possible session
    days: int = 28
    zipf_exponent: float = 1.1
    site_taste_alpha: float = 0.2
    shopper_taste_strength: float = 20.0
    successors: int = 3
    successor_same_category: float = 0.9
    follow_prob: float = 0.8
    session_views: float = 8.0  # mean views per session
    fav_prob: float = 0.04
    cart_prob: float = 0.08
    purchase_prob: float = 0.5
    rating_prob: float = 0.4

    def __post_init__(self) -> None:
        counts = {
            "n_sites": self.n_sites,
            "shoppers_per_site": self.shoppers_per_site,
            "n_categories": self.n_categories,
            "successors": self.successors,
            "days": self.days,
            "min_events": self.min_events,
        }
        for name, value in counts.items():
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.n_items < 2 * self.n_categories or self.n_items <= self.successors:
            raise ConfigError(
                f"n_items ({self.n_items}) must be at least 2 per category "
                f"({self.n_categories} categories) and more than successors ({self.successors})"
            )
        probs = {
            "successor_same_category": self.successor_same_category,
            "follow_prob": self.follow_prob,
            "fav_prob": self.fav_prob,
            "cart_prob": self.cart_prob,
            "purchase_prob": self.purchase_prob,
            "rating_prob": self.rating_prob,
        }
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {p}")
        positive = {
            "events_per_shopper": self.events_per_shopper,
            "zipf_exponent": self.zipf_exponent,
            "site_taste_alpha": self.site_taste_alpha,
            "shopper_taste_strength": self.shopper_taste_strength,
            "session_views": self.session_views,
        }
        for name, x in positive.items():
            if not x > 0:
                raise ConfigError(f"{name} must be positive, got {x}")
        self.start_ms  # noqa: B018 -- validates the date now rather than mid-generation

    @property
    def start_ms(self) -> int:
        """``start`` as Unix milliseconds (a date without zone is UTC)."""
        try:
            when = datetime.fromisoformat(self.start)
        except ValueError as err:
            raise ConfigError(f"start {self.start!r} is not an ISO 8601 date") from err
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return int(when.timestamp() * 1000)

    def site_names(self) -> list[str]:
        """Names of the sites: ``store-01``, ``store-02``, ..."""
        return [f"store-{s + 1:02d}" for s in range(self.n_sites)]


@dataclass(frozen=True)
class _Catalogue:
    """Items, their categories, popularity and successors."""

    category: np.ndarray  # (I,) category of each item
    by_category: np.ndarray  # (I,) item ids ordered by category
    cat_start: np.ndarray  # (C + 1,) offsets of each category in by_category
    shifted_cdf: np.ndarray  # (I,) c + within-category popularity CDF, aligned to by_category
    successors: np.ndarray  # (I, K) preferred next items, best first


def _build_catalogue(cfg: SynthConfig, rng: np.random.Generator) -> _Catalogue:
    category = np.arange(cfg.n_items) % cfg.n_categories
    rng.shuffle(category)
    by_category = np.argsort(category, kind="stable")
    cat_start = np.searchsorted(category[by_category], np.arange(cfg.n_categories + 1))
    weight = np.empty(cfg.n_items)
    shifted_cdf = np.empty(cfg.n_items)
    for c in range(cfg.n_categories):
        members = slice(cat_start[c], cat_start[c + 1])
        ranks = rng.permutation(cat_start[c + 1] - cat_start[c]) + 1
        w = 1.0 / ranks**cfg.zipf_exponent
        weight[by_category[members]] = w / w.sum()
        cdf = np.cumsum(w) / w.sum()
        cdf[-1] = 1.0
        shifted_cdf[members] = c + cdf
    # Successors: mostly popular items of the same category, never the item itself.
    global_p = weight / weight.sum()
    successors = np.empty((cfg.n_items, cfg.successors), dtype=np.int64)
    for item in range(cfg.n_items):
        c = category[item]
        peers = by_category[cat_start[c] : cat_start[c + 1]]
        chosen: list[int] = []
        while len(chosen) < cfg.successors:
            if rng.random() < cfg.successor_same_category and len(peers) > len(chosen) + 1:
                cand = int(rng.choice(peers, p=weight[peers] / weight[peers].sum()))
            else:
                cand = int(rng.choice(cfg.n_items, p=global_p))
            if cand != item and cand not in chosen:
                chosen.append(cand)
        successors[item] = chosen
    return _Catalogue(category, by_category, cat_start, shifted_cdf, successors)


def _session_starts(cfg: SynthConfig, rng: np.random.Generator, n_sessions: int) -> np.ndarray:
    """Sorted session start offsets in seconds: uniform days, diurnal hours."""
    day = rng.integers(0, cfg.days, size=n_sessions)
    hour = rng.choice(24, size=n_sessions, p=HOURLY_ACTIVITY / HOURLY_ACTIVITY.sum())
    second = rng.integers(0, 3600, size=n_sessions)
    return np.sort(day * 86_400 + hour * 3600 + second)


def generate_synthetic(config: SynthConfig | None = None) -> EventDataset:
    """A deterministic synthetic event log of several sites; see the module docstring."""
    cfg = config or SynthConfig()
    rng = np.random.default_rng(cfg.seed)
    cat = _build_catalogue(cfg, rng)
    succ = cat.successors.tolist()
    follow_order = 0.5 ** np.arange(cfg.successors)
    follow_cdf = np.cumsum(follow_order) / follow_order.sum()
    site_taste = rng.dirichlet(np.full(cfg.n_categories, cfg.site_taste_alpha), size=cfg.n_sites)
    sigma = 0.6
    mu = math.log(cfg.events_per_shopper) - sigma**2 / 2
    rating_cdf = np.cumsum(RATING_PROBS)
    start_ms = cfg.start_ms
    kinds = (EventType.VIEW.value, EventType.FAV.value, EventType.CART.value)
    purchase, rating = EventType.PURCHASE.value, EventType.RATING.value

    users: list[str] = []
    items: list[int] = []
    types: list[str] = []
    stamps: list[int] = []
    values: list[float] = []
    sites: list[str] = []
    for s, site in enumerate(cfg.site_names()):
        for k in range(cfg.shoppers_per_site):
            user = f"{site}-u{k + 1:04d}"
            taste = rng.dirichlet(cfg.shopper_taste_strength * site_taste[s] + 0.01)
            taste_cdf = np.cumsum(taste)
            taste_cdf[-1] = 1.0
            n_events = max(cfg.min_events, round(rng.lognormal(mu, sigma)))
            # Enough pre-drawn randomness for n_events views (extras only shorten the walk).
            u = rng.random((n_events, 11))
            jump_cat = np.searchsorted(taste_cdf, u[:, :3], side="right")
            jump_pos = np.searchsorted(cat.shifted_cdf, jump_cat + u[:, 3:6], side="right")
            # Three jump candidates per step, so that an already viewed item can be avoided.
            jumps = cat.by_category[np.minimum(jump_pos, cfg.n_items - 1)].tolist()
            first_choice = np.searchsorted(follow_cdf, u[:, 6], side="right").tolist()
            follow = (u[:, 7] < cfg.follow_prob).tolist()
            extras = u[:, 8].tolist()
            side = u[:, 9].tolist()
            stars = np.searchsorted(rating_cdf, u[:, 10], side="right") + 1
            n_sessions = max(1, round(n_events / cfg.session_views))
            starts = _session_starts(cfg, rng, n_sessions)
            session_of_step = np.sort(rng.integers(0, n_sessions, size=n_events)).tolist()
            gaps = np.clip(rng.lognormal(math.log(40.0), 1.0, size=3 * n_events), 2, 1800)
            gap_list = gaps.astype(np.int64).tolist()

            seen: set[int] = set()
            walk: list[tuple[int, str, float]] = []  # (item, event type, value)
            step_of_event: list[int] = []
            current = -1
            step = 0
            while len(walk) < n_events and step < n_events:
                nxt = -1
                if current >= 0 and follow[step]:
                    options = succ[current]
                    order = options[first_choice[step] :] + options[: first_choice[step]]
                    nxt = next((o for o in order if o not in seen), -1)
                if nxt < 0:
                    candidates = jumps[step]
                    nxt = next((j for j in candidates if j not in seen), candidates[0])
                current = nxt
                seen.add(current)
                walk.append((current, kinds[0], math.nan))
                step_of_event.append(step)
                x, y = extras[step], side[step]
                if x < cfg.fav_prob:
                    walk.append((current, kinds[1], math.nan))
                    step_of_event.append(step)
                if y < cfg.cart_prob:
                    walk.append((current, kinds[2], math.nan))
                    step_of_event.append(step)
                    # Reuse the uniform draw, rescaled, for the purchase and rating decisions.
                    z = y / cfg.cart_prob
                    if z < cfg.purchase_prob:
                        walk.append((current, purchase, math.nan))
                        step_of_event.append(step)
                        if z / cfg.purchase_prob < cfg.rating_prob:
                            walk.append((current, rating, float(min(stars[step], 5))))
                            step_of_event.append(step)
                step += 1

            # Timestamps: each step's session start plus accumulated gaps; strictly increasing.
            t_prev = -1
            last_session = -1
            for e, (item, kind, value) in enumerate(walk):
                sess = session_of_step[step_of_event[e]]
                if sess != last_session:
                    t = max(int(starts[sess]) * 1000, t_prev + 60_000)
                    last_session = sess
                else:
                    gap = gap_list[e % len(gap_list)]
                    t = t_prev + (gap if kind == kinds[0] else min(gap, 30)) * 1000
                t = max(t, t_prev + 1000)
                t_prev = t
                users.append(user)
                items.append(item + 1)
                types.append(kind)
                stamps.append(start_ms + t)
                values.append(value)
                sites.append(site)

    events = pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype=object),
            "item_id": pd.Series([str(i) for i in items], dtype=object),
            "event_type": pd.Series(types, dtype=object),
            "ts_ms": np.asarray(stamps, dtype=np.int64),
            "value": np.asarray(values, dtype=np.float64),
            "site": pd.Series(sites, dtype=object),
        }
    )
    attributes = {str(i + 1): [f"category:c{c:02d}"] for i, c in enumerate(cat.category)}
    return EventDataset(
        events=events,
        name=f"synthetic-seed{cfg.seed}",
        timestamps="real",
        item_attributes=attributes,
        info={"format": "synthetic", "config": asdict(cfg)},
    )


def write_synthetic(dataset: EventDataset, out_dir: Path, fmt: str = "parquet") -> dict[str, Path]:
    """Write ``events.<fmt>`` (with an ``event_id`` per event), ``catalogue.csv`` and the config.

    The directory reads back with ``read_dataset(out_dir, "events")``: the events reader
    finds ``events.<fmt>`` and takes item categories from ``catalogue.csv``.
    """
    from shared.readers import CATALOGUE_FILE, write_events

    if fmt not in SYNTH_FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; expected one of {', '.join(SYNTH_FORMATS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for other in SYNTH_FORMATS.values():
        # A stale events file of another type would make the directory ambiguous to read.
        (out_dir / f"events{other}").unlink(missing_ok=True)
    events = dataset.events.copy()
    events["event_id"] = [f"e{i:08d}" for i in range(len(events))]
    paths = {"events": write_events(events, out_dir / f"events{SYNTH_FORMATS[fmt]}")}
    catalogue = pd.DataFrame(
        {
            "item_id": list(dataset.item_attributes),
            "category": [
                next((a.split(":", 1)[1] for a in attrs if a.startswith("category:")), "")
                for attrs in dataset.item_attributes.values()
            ],
        }
    )
    paths["catalogue"] = out_dir / CATALOGUE_FILE
    catalogue.to_csv(paths["catalogue"], index=False)
    paths["config"] = out_dir / "synth_config.json"
    paths["config"].write_text(json.dumps(dataset.info.get("config", {}), indent=2) + "\n")
    return paths
