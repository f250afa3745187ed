"""Split a dataset's shoppers into simulated sites: uniform, Dirichlet non-IID, natural, one each.

Every splitter puts each shopper in exactly one site (a shopper's history stays where it
was recorded), so the union of the sites' leave-one-out splits is the global leave-one-out
split and federated results compare like for like with centralized training on it.

- ``uniform``: shoppers shuffled and dealt into sites of equal size (IID).
- ``dirichlet``: label skew as in Hsu et al., "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification" (2019): each shopper gets a label (the
  item category they interact with most, or their region), and the shoppers of every label
  are spread over the sites with proportions drawn from Dirichlet(alpha); a small alpha
  gives each site few labels, a large one approaches uniform.
- ``natural``: the data's own sites (its ``site`` column; a shopper seen at several goes to
  the one with most of their events), else contiguous ranges of shopper ids (Taobao's
  slices are shoppers by id).
- ``one-per-site``: every shopper is a site (app mode: one device, one shopper), optionally
  a seeded sample of them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import pandas as pd

from simulations.errors import PartitionError

Split = Literal["uniform", "dirichlet", "natural", "one-per-site"]
LabelBy = Literal["category", "region"]
SPLITS: tuple[str, ...] = ("uniform", "dirichlet", "natural", "one-per-site")
OTHER = "other"  # the label of items outside the most common groups


def site_dir_name(index: int) -> str:
    """The directory of site ``index``: what a simulated SuperNode's partition-id maps to."""
    return f"site-{index:03d}"


@dataclass(frozen=True)
class Partition:
    """Which site each shopper belongs to (site indices 0..n_sites-1)."""

    method: str
    assignment: pd.Series  # index: user_id (str); values: site index (int64)
    n_sites: int
    names: tuple[str, ...]  # the sites' public names (their node config's site-name)
    alpha: float | None = None
    labels: pd.Series | None = None  # user_id -> label, for the Dirichlet split
    info: dict[str, Any] = field(default_factory=dict)
    complete: bool = True  # False: a sample of the shoppers (the others are in no site)

    def __post_init__(self) -> None:
        if len(self.names) != self.n_sites:
            raise PartitionError(f"{len(self.names)} names for {self.n_sites} sites")
        if not self.assignment.index.is_unique:
            raise PartitionError("a shopper is assigned to more than one site")
        values = self.assignment.to_numpy()
        if len(values) and (values.min() < 0 or values.max() >= self.n_sites):
            raise PartitionError("a shopper is assigned to a site that does not exist")

    def sizes(self) -> np.ndarray:
        """Shoppers per site, (n_sites,)."""
        return np.bincount(self.assignment.to_numpy(dtype=np.int64), minlength=self.n_sites)

    def site_events(self, events: pd.DataFrame) -> Iterator[tuple[int, pd.DataFrame]]:
        """(site index, that site's events) for every site, in site order.

        A sample's unsampled shoppers are left out; otherwise every event must belong to a
        shopper of the partition.
        """
        site_of = events["user_id"].astype(str).map(self.assignment)
        if site_of.isna().any():
            if self.complete:
                raise PartitionError("some events belong to shoppers outside the partition")
            events, site_of = events[site_of.notna()], site_of.dropna()
        groups = {
            int(cast(Any, s)): frame
            for s, frame in events.groupby(site_of.to_numpy(dtype=np.int64))
        }
        for site in range(self.n_sites):
            yield site, groups.get(site, events.iloc[0:0])

    def describe(self) -> dict[str, Any]:
        """Sizes and skew, JSON-ready (for config.json and the report)."""
        sizes = self.sizes()
        out: dict[str, Any] = {
            "method": self.method,
            "n_sites": self.n_sites,
            "shoppers": int(sizes.sum()),
            "shoppers_per_site": {
                "min": int(sizes.min()),
                "median": float(np.median(sizes)),
                "mean": float(sizes.mean()),
                "max": int(sizes.max()),
            },
            "alpha": self.alpha,
        }
        if self.labels is not None:
            out["n_labels"] = int(self.labels.nunique())
            out["label_skew"] = label_skew(self.assignment, self.labels)
        out.update(self.info)
        return out


def _default_names(n_sites: int) -> tuple[str, ...]:
    return tuple(site_dir_name(i) for i in range(n_sites))


def _sorted_ids(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Distinct ids in a deterministic order: numeric when every id is digits, else text."""
    unique = sorted({str(i) for i in ids})
    if unique and all(i.isdigit() for i in unique):
        unique.sort(key=lambda i: (len(i.lstrip("0")), i.lstrip("0"), i))
    return np.asarray(unique, dtype=object)


def shoppers(events: pd.DataFrame) -> np.ndarray:
    """The distinct shoppers of an event log, in a deterministic order."""
    return _sorted_ids(events["user_id"].astype(str).to_numpy())


def _check_counts(n_users: int, n_sites: int, per_site: int = 1) -> None:
    if n_sites < 1:
        raise PartitionError(f"the number of sites must be >= 1, got {n_sites}")
    if n_users < n_sites * per_site:
        raise PartitionError(
            f"{n_users} shoppers cannot fill {n_sites} sites with at least {per_site} each"
        )


def partition_uniform(users: Sequence[str] | np.ndarray, n_sites: int, seed: int) -> Partition:
    """Shoppers shuffled and dealt into ``n_sites`` sites whose sizes differ by at most one."""
    ids = _sorted_ids(users)
    _check_counts(len(ids), n_sites)
    rng = np.random.default_rng(seed)
    site = np.empty(len(ids), dtype=np.int64)
    for s, part in enumerate(np.array_split(rng.permutation(len(ids)), n_sites)):
        site[part] = s
    return Partition("uniform", pd.Series(site, index=ids), n_sites, _default_names(n_sites))


def partition_dirichlet(
    labels: pd.Series, n_sites: int, alpha: float, seed: int, min_shoppers: int = 1
) -> Partition:
    """Label skew: each label's shoppers spread over the sites with Dirichlet(alpha) shares.

    ``labels`` maps user_id -> label. A site left with fewer than ``min_shoppers`` gets
    shoppers moved from the largest sites (a site must have someone to train on).
    """
    if not alpha > 0 or not np.isfinite(alpha):
        raise PartitionError(f"alpha must be a positive number, got {alpha}")
    labels = labels.copy()
    labels.index = labels.index.astype(str)
    labels = labels.loc[_sorted_ids(labels.index.to_numpy())]
    _check_counts(len(labels), n_sites, min_shoppers)
    rng = np.random.default_rng(seed)
    site = np.empty(len(labels), dtype=np.int64)
    values = labels.astype(str).to_numpy()
    for label in sorted(set(values)):
        members = np.flatnonzero(values == label)
        rng.shuffle(members)
        shares = rng.dirichlet(np.full(n_sites, float(alpha)))
        if not np.isfinite(shares).all() or shares.sum() <= 0:
            # Tiny alphas can underflow every gamma draw: the limit is one site per label.
            shares = np.eye(n_sites)[rng.integers(n_sites)]
        cuts = np.minimum((np.cumsum(shares)[:-1] * len(members)).astype(np.int64), len(members))
        for s, part in enumerate(np.split(members, cuts)):
            site[part] = s
    _fill_small_sites(site, n_sites, min_shoppers, rng)
    return Partition(
        "dirichlet",
        pd.Series(site, index=labels.index),
        n_sites,
        _default_names(n_sites),
        alpha=float(alpha),
        labels=labels.astype(str),
    )


def _fill_small_sites(
    site: np.ndarray, n_sites: int, min_shoppers: int, rng: np.random.Generator
) -> None:
    """Move random shoppers from the largest sites until every site has ``min_shoppers``."""
    sizes = np.bincount(site, minlength=n_sites)
    while sizes.min() < min_shoppers:
        small, large = int(sizes.argmin()), int(sizes.argmax())
        donor = rng.choice(np.flatnonzero(site == large))
        site[donor] = small
        sizes[large] -= 1
        sizes[small] += 1


def partition_natural(events: pd.DataFrame, n_sites: int | None = None) -> Partition:
    """The data's own sites (``site`` column), else ``n_sites`` contiguous shopper-id ranges."""
    site_col = events["site"].astype(str)
    if len(events) and (site_col != "").all() and site_col.nunique() >= 2:
        names = sorted(site_col.unique())
        if n_sites is not None and n_sites != len(names):
            raise PartitionError(
                f"the data has {len(names)} sites in its 'site' column, not {n_sites}; "
                "leave --sites out or choose another split"
            )
        # Each shopper goes to the site holding most of their events (ties: first by name).
        counts = (
            pd.DataFrame({"user": events["user_id"].astype(str), "site": site_col})
            .value_counts()
            .reset_index(name="n")
            .sort_values(["user", "n", "site"], ascending=[True, False, True], kind="stable")
            .drop_duplicates("user")
        )
        index = {name: i for i, name in enumerate(names)}
        assignment = pd.Series(
            counts["site"].map(index).to_numpy(dtype=np.int64), index=counts["user"].to_numpy()
        )
        assignment = assignment.loc[_sorted_ids(assignment.index.to_numpy())]
        split_shoppers = int((events.groupby("user_id")["site"].nunique() > 1).sum())
        return Partition(
            "natural",
            assignment,
            len(names),
            tuple(names),
            info={"key": "site column", "shoppers_at_several_sites": split_shoppers},
        )
    if n_sites is None:
        raise PartitionError("the data has no 'site' column: give the number of sites")
    ids = shoppers(events)
    _check_counts(len(ids), n_sites)
    site = np.empty(len(ids), dtype=np.int64)
    for s, part in enumerate(np.array_split(np.arange(len(ids)), n_sites)):
        site[part] = s
    return Partition(
        "natural",
        pd.Series(site, index=ids),
        n_sites,
        _default_names(n_sites),
        info={"key": "shopper id ranges"},
    )


def partition_one_per_site(
    users: Sequence[str] | np.ndarray, n_sites: int | None, seed: int
) -> Partition:
    """Each shopper a site of their own; ``n_sites`` < shoppers takes a seeded sample."""
    ids = _sorted_ids(users)
    n = len(ids) if n_sites is None else n_sites
    _check_counts(len(ids), n)
    if n < len(ids):
        rng = np.random.default_rng(seed)
        ids = ids[np.sort(rng.choice(len(ids), size=n, replace=False))]
    return Partition(
        "one-per-site",
        pd.Series(np.arange(n, dtype=np.int64), index=ids),
        n,
        _default_names(n),
        info={"sampled_from": len(_sorted_ids(users))},
        complete=n == len(_sorted_ids(users)),
    )


def item_groups(item_attributes: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Each item's group: its attribute that the most catalogue items share.

    For Amazon's ``attr:`` ids (brand and category levels) that is the item's broadest
    category; for Taobao and the synthetic data, its one ``category:``.
    """
    frequency = Counter(a for attrs in item_attributes.values() for a in set(attrs))
    groups: dict[str, str] = {}
    for item, attrs in item_attributes.items():
        if attrs:
            groups[str(item)] = min(attrs, key=lambda a: (-frequency[a], a))
    return groups


def shopper_labels(
    events: pd.DataFrame,
    item_attributes: Mapping[str, Sequence[str]] | None,
    by: LabelBy = "category",
    max_groups: int = 10,
) -> pd.Series:
    """Each shopper's label for the Dirichlet split (user_id -> label).

    ``category``: the item group (`item_groups`) most of the shopper's events fall in, among
    the ``max_groups`` groups with most events (the rest are ``other``). ``region``: the
    site (``site`` column) holding most of the shopper's events.
    """
    users = events["user_id"].astype(str)
    if by == "region":
        site_col = events["site"].astype(str)
        if (site_col == "").all():
            raise PartitionError("labels by region need a 'site' column in the data")
        frame = pd.DataFrame({"user": users, "label": site_col})
    elif by == "category":
        if not item_attributes:
            raise PartitionError(
                "labels by category need item attributes (categories) in the data; "
                "use --label-by region or another split"
            )
        groups = item_groups(item_attributes)
        group = events["item_id"].astype(str).map(groups).fillna(OTHER)
        top = [g for g in group.value_counts().index if g != OTHER][:max_groups]
        group = group.where(group.isin(top), OTHER)
        frame = pd.DataFrame({"user": users, "label": group})
    else:
        raise PartitionError(f"unknown label kind {by!r}; use category or region")
    counts = frame.value_counts().reset_index(name="n")
    # Prefer a real group over "other" on ties, then the most events, then the name.
    counts["is_other"] = counts["label"] == OTHER
    counts = counts.sort_values(
        ["user", "n", "is_other", "label"], ascending=[True, False, True, True], kind="stable"
    ).drop_duplicates("user")
    return pd.Series(counts["label"].to_numpy(), index=counts["user"].to_numpy(), name="label")


def label_skew(assignment: pd.Series, labels: pd.Series) -> float:
    """Mean total-variation distance between each site's label mix and the global one.

    Weighted by site size; 0 = every site looks like the whole, near 1 = sites hold labels
    that are rare overall. Sampling noise keeps it above 0 for small sites.
    """
    frame = pd.DataFrame({"site": assignment, "label": labels.reindex(assignment.index)})
    if frame["label"].isna().any():
        raise PartitionError("every assigned shopper needs a label")
    table = pd.crosstab(frame["site"], frame["label"]).to_numpy(dtype=np.float64)
    sizes = table.sum(axis=1)
    site_mix = table / sizes[:, None]
    overall = table.sum(axis=0) / table.sum()
    distance = 0.5 * np.abs(site_mix - overall).sum(axis=1)
    return float((distance * sizes).sum() / sizes.sum())


def make_partition(
    events: pd.DataFrame,
    split: Split,
    n_sites: int | None,
    *,
    seed: int = 0,
    alpha: float = 0.5,
    item_attributes: Mapping[str, Sequence[str]] | None = None,
    label_by: LabelBy = "category",
    max_groups: int = 10,
) -> Partition:
    """The partition ``split`` names (see the module docstring)."""
    if split == "uniform":
        if n_sites is None:
            raise PartitionError("the uniform split needs the number of sites")
        return partition_uniform(shoppers(events), n_sites, seed)
    if split == "dirichlet":
        if n_sites is None:
            raise PartitionError("the dirichlet split needs the number of sites")
        labels = shopper_labels(events, item_attributes, label_by, max_groups)
        part = partition_dirichlet(labels, n_sites, alpha, seed)
        return Partition(
            part.method,
            part.assignment,
            part.n_sites,
            part.names,
            alpha=part.alpha,
            labels=part.labels,
            info={"label_by": label_by, "max_groups": max_groups},
        )
    if split == "natural":
        return partition_natural(events, n_sites)
    if split == "one-per-site":
        return partition_one_per_site(shoppers(events), n_sites, seed)
    raise PartitionError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
