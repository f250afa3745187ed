"""The site splitters: every shopper in exactly one site, skew, natural keys, one per site."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.errors import PartitionError
from simulations.partition import (
    item_groups,
    label_skew,
    make_partition,
    partition_dirichlet,
    partition_natural,
    partition_one_per_site,
    partition_uniform,
    shopper_labels,
)


def _events(
    users: list[str], items_per_user: int = 3, sites: list[str] | None = None
) -> pd.DataFrame:
    rows = []
    for u, user in enumerate(users):
        for k in range(items_per_user):
            rows.append(
                {
                    "user_id": user,
                    "item_id": str((u * 7 + k) % 50 + 1),
                    "event_type": "view",
                    "ts_ms": 1_700_000_000_000 + k * 1000,
                    "value": float("nan"),
                    "site": sites[u] if sites else "",
                }
            )
    return pd.DataFrame(rows)


def _assert_partition_of(users: list[str], part_assignment: pd.Series, n_sites: int) -> None:
    assert sorted(part_assignment.index) == sorted(set(users))  # everyone, nobody twice
    assert part_assignment.index.is_unique
    assert part_assignment.between(0, n_sites - 1).all()


user_lists = st.lists(
    st.text(alphabet="abcdef0123456789", min_size=1, max_size=6),
    min_size=1,
    max_size=120,
    unique=True,
)


@given(users=user_lists, data=st.data())
@settings(max_examples=60, deadline=None)
def test_uniform_puts_every_shopper_in_exactly_one_site_of_even_size(
    users: list[str], data: st.DataObject
) -> None:
    n_sites = data.draw(st.integers(1, len(users)))
    seed = data.draw(st.integers(0, 1000))

    part = partition_uniform(users, n_sites, seed)

    _assert_partition_of(users, part.assignment, n_sites)
    sizes = part.sizes()
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
    assert part.assignment.equals(
        partition_uniform(list(reversed(users)), n_sites, seed).assignment
    )


@given(users=user_lists, data=st.data())
@settings(max_examples=60, deadline=None)
def test_dirichlet_puts_every_shopper_in_exactly_one_nonempty_site(
    users: list[str], data: st.DataObject
) -> None:
    n_sites = data.draw(st.integers(1, len(users)))
    alpha = data.draw(st.sampled_from([0.001, 0.1, 1.0, 1000.0]))
    n_labels = data.draw(st.integers(1, 6))
    labels = pd.Series([f"L{i % n_labels}" for i in range(len(users))], index=users)

    part = partition_dirichlet(labels, n_sites, alpha, seed=data.draw(st.integers(0, 99)))

    _assert_partition_of(users, part.assignment, n_sites)
    assert part.sizes().min() >= 1


@given(users=user_lists, data=st.data())
@settings(max_examples=40, deadline=None)
def test_natural_ranges_and_one_per_site_cover_every_shopper(
    users: list[str], data: st.DataObject
) -> None:
    n_sites = data.draw(st.integers(1, len(users)))
    events = _events(users, items_per_user=1)

    ranges = partition_natural(events, n_sites)
    single = partition_one_per_site(users, None, seed=0)

    _assert_partition_of(users, ranges.assignment, n_sites)
    assert ranges.sizes().min() >= 1
    _assert_partition_of(users, single.assignment, len(users))
    assert (single.sizes() == 1).all()


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    users = [f"u{i}" for i in range(3000)]
    labels = pd.Series([f"L{i % 10}" for i in range(3000)], index=users)

    def mean_skew(alpha: float) -> float:
        return float(
            np.mean(
                [
                    label_skew(partition_dirichlet(labels, 10, alpha, seed).assignment, labels)
                    for seed in range(3)
                ]
            )
        )

    skews = [mean_skew(a) for a in (100.0, 1.0, 0.05)]

    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5


def test_natural_split_uses_the_site_column_and_the_majority_site() -> None:
    events = _events(["a", "b", "c"], items_per_user=2, sites=["s1", "s2", "s2"])
    extra = events.iloc[[0]].assign(site="s2")  # "a" also once at s2: stays at s1 (2 vs 1)
    events = pd.concat([events, events.iloc[[1]], extra], ignore_index=True)

    part = partition_natural(events)

    assert part.names == ("s1", "s2")
    assert part.assignment.to_dict() == {"a": 0, "b": 1, "c": 1}
    assert part.info["shoppers_at_several_sites"] == 1
    with pytest.raises(PartitionError, match="has 2 sites"):
        partition_natural(events, 3)


def test_one_per_site_samples_reproducibly() -> None:
    users = [f"u{i:03d}" for i in range(50)]

    first = partition_one_per_site(users, 10, seed=3)
    again = partition_one_per_site(users, 10, seed=3)

    assert first.n_sites == 10 and (first.sizes() == 1).all()
    assert list(first.assignment.index) == list(again.assignment.index)
    assert set(first.assignment.index) <= set(users)
    assert first.info["sampled_from"] == 50 and not first.complete
    events = _events(users)
    pieces = dict(first.site_events(events))
    assert [len(p) for p in pieces.values()] == [3] * 10  # unsampled shoppers are left out
    with pytest.raises(PartitionError, match="outside the partition"):
        dict(partition_uniform(users[:10], 2, seed=0).site_events(events))


def test_site_events_give_every_event_to_its_shoppers_site() -> None:
    users = [f"u{i}" for i in range(20)]
    events = _events(users)
    part = partition_uniform(users, 4, seed=1)

    pieces = dict(part.site_events(events))

    assert sum(len(p) for p in pieces.values()) == len(events)
    for site, frame in pieces.items():
        assert (frame["user_id"].map(part.assignment) == site).all()


def test_labels_by_category_take_each_shoppers_dominant_broad_category() -> None:
    attributes = {
        "1": ["attr:skin", "attr:brandA"],
        "2": ["attr:skin", "attr:brandB"],
        "3": ["attr:hair", "attr:brandA"],
        "4": ["attr:hair"],
        "5": ["attr:skin"],
        "6": ["attr:hair"],
    }
    events = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "b", "b"],
            "item_id": ["1", "2", "3", "3", "4"],
            "event_type": "view",
            "ts_ms": np.arange(5, dtype=np.int64),
            "value": np.nan,
            "site": "",
        }
    )

    groups = item_groups(attributes)
    labels = shopper_labels(events, attributes, "category")

    assert groups["1"] == "attr:skin" and groups["3"] == "attr:hair"
    assert labels.to_dict() == {"a": "attr:skin", "b": "attr:hair"}
    with pytest.raises(PartitionError, match="item attributes"):
        shopper_labels(events, {}, "category")
    with pytest.raises(PartitionError, match="site"):
        shopper_labels(events, attributes, "region")


def test_impossible_partitions_are_refused_with_a_reason() -> None:
    users = ["a", "b"]
    with pytest.raises(PartitionError, match="cannot fill 3 sites"):
        partition_uniform(users, 3, seed=0)
    with pytest.raises(PartitionError, match="alpha"):
        partition_dirichlet(pd.Series(["x", "y"], index=users), 2, 0.0, seed=0)
    with pytest.raises(PartitionError, match="unknown split"):
        make_partition(_events(users), "random", 2)  # type: ignore[arg-type]
