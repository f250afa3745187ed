"""The synthetic generator: determinism, the patterns it promises, and a learnable sequence."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from shared.errors import ConfigError
from shared.events import EVENT_COLUMNS, sort_events
from shared.metrics import evaluate_ranking
from shared.readers import read_dataset
from shared.sequences import build_sequences, leave_one_out
from shared.synth import SynthConfig, generate_synthetic, write_synthetic
from shared.vocab import ItemVocab

DEFAULT = SynthConfig()


@pytest.fixture(scope="module")
def synth() -> pd.DataFrame:
    return generate_synthetic(DEFAULT).events


def test_same_seed_same_log_other_seed_other_log(synth: pd.DataFrame) -> None:
    small = SynthConfig(n_sites=2, shoppers_per_site=20)
    pd.testing.assert_frame_equal(
        generate_synthetic(small).events, generate_synthetic(small).events
    )
    other = generate_synthetic(SynthConfig(n_sites=2, shoppers_per_site=20, seed=1)).events
    assert not other["item_id"].equals(generate_synthetic(small).events["item_id"])


def test_sizes_sites_and_event_types(synth: pd.DataFrame) -> None:
    assert synth["user_id"].nunique() == DEFAULT.n_sites * DEFAULT.shoppers_per_site
    assert synth["site"].nunique() == DEFAULT.n_sites
    # every shopper belongs to one site, named in its id
    assert (synth["user_id"].str.split("-u").str[0] == synth["site"]).all()
    assert synth.groupby("user_id").size().min() >= DEFAULT.min_events
    assert (
        0.5 * DEFAULT.events_per_shopper
        < synth.groupby("user_id").size().mean()
        < 1.5 * DEFAULT.events_per_shopper
    )
    share = synth["event_type"].value_counts(normalize=True)
    assert set(share.index) == {"view", "cart", "fav", "purchase", "rating"}
    assert share["view"] > 0.75  # views dominate
    assert share["cart"] > share["purchase"] > share["rating"] > 0


def test_purchases_follow_carts_and_ratings_follow_purchases(synth: pd.DataFrame) -> None:
    ev = sort_events(synth)
    prev_type = ev["event_type"].shift()
    same = (ev["user_id"] == ev["user_id"].shift()) & (ev["item_id"] == ev["item_id"].shift())
    purchases = ev["event_type"] == "purchase"
    ratings = ev["event_type"] == "rating"
    assert (same & (prev_type == "cart"))[purchases].all()
    assert (same & (prev_type == "purchase"))[ratings].all()
    assert set(ev.loc[ratings, "value"]) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert ev.loc[~ratings, "value"].isna().all()
    # views dominate the values' mass at the top: most ratings are 4 or 5
    assert (ev.loc[ratings, "value"] >= 4).mean() > 0.5


def test_timestamps_sessions_and_diurnal_rhythm(synth: pd.DataFrame) -> None:
    ev = sort_events(synth)
    same_user = ev["user_id"] == ev["user_id"].shift()
    gaps_s = (ev["ts_ms"].diff() / 1000)[same_user]
    assert (gaps_s >= 1).all()  # strictly increasing per shopper
    start = DEFAULT.start_ms
    assert ev["ts_ms"].min() >= start
    assert ev["ts_ms"].max() < start + (DEFAULT.days + 2) * 86_400_000
    within = gaps_s[gaps_s < 3600]
    assert 5 < within.median() < 300  # seconds to minutes inside a session
    assert (gaps_s > 3 * 3600).mean() > 0.05  # and hours to days between sessions
    hours = pd.to_datetime(ev["ts_ms"], unit="ms").dt.hour
    evening, night = hours.between(18, 22).mean(), hours.between(2, 5).mean()
    assert evening > 4 * night


def test_sites_have_different_category_tastes(synth: pd.DataFrame) -> None:
    attrs = generate_synthetic(SynthConfig(n_sites=1, shoppers_per_site=1)).item_attributes
    category = synth["item_id"].map(lambda i: attrs[i][0])
    mix = pd.crosstab(synth["site"], category, normalize="index").to_numpy()  # (sites, categories)
    distances = [
        0.5 * np.abs(mix[a] - mix[b]).sum() for a in range(len(mix)) for b in range(a + 1, len(mix))
    ]
    assert np.mean(distances) > 0.4  # total variation distance between sites' category mixes


def test_popularity_is_skewed_within_categories(synth: pd.DataFrame) -> None:
    attrs = generate_synthetic(SynthConfig(n_sites=1, shoppers_per_site=1)).item_attributes
    views = synth[synth["event_type"] == "view"]
    counts = views.groupby("item_id").size()
    by_cat = counts.groupby(counts.index.map(lambda i: attrs[i][0]))
    top_share = by_cat.apply(lambda c: c.max() / c.sum())
    assert top_share.median() > 3 * (DEFAULT.n_categories / DEFAULT.n_items)  # far above uniform


def test_transition_counts_beat_popularity_by_far_on_leave_one_out(synth: pd.DataFrame) -> None:
    # Arrange: full-ranking leave-one-out over every event, as the trainers use it
    vocab = ItemVocab.from_items(synth["item_id"])
    split = leave_one_out(build_sequences(synth, vocab))
    n = vocab.n_items + 1
    transitions = np.zeros((n, n), dtype=np.float32)
    popularity = np.zeros(n, dtype=np.float32)
    for seq in split.train.item_lists():
        np.add.at(popularity, seq, 1)
        np.add.at(transitions, (seq[:-1], seq[1:]), 1)
    pop, trans = torch.from_numpy(popularity), torch.from_numpy(transitions)

    def popular(items: torch.Tensor) -> torch.Tensor:
        return pop.expand(items.shape[0], -1)

    def first_order(items: torch.Tensor) -> torch.Tensor:
        return trans[items[:, -1]] + 1e-3 * pop  # popularity only breaks ties

    # Act
    pop_metrics = evaluate_ranking(popular, split.test, max_len=50)
    markov = evaluate_ranking(first_order, split.test, max_len=50)
    # Assert: the sequential signal is strong
    assert markov["n_users"] == DEFAULT.n_sites * DEFAULT.shoppers_per_site
    assert markov["ndcg@10"] > 2 * pop_metrics["ndcg@10"]
    assert markov["ndcg@10"] > 0.2


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_written_log_round_trips_through_the_events_reader(tmp_path: Path, fmt: str) -> None:
    ds = generate_synthetic(SynthConfig(n_sites=2, shoppers_per_site=15))
    paths = write_synthetic(ds, tmp_path, fmt)
    back = read_dataset(tmp_path, "events")
    assert paths["events"].name == f"events.{fmt}"
    cols = list(EVENT_COLUMNS)
    left = sort_events(back.events)[cols].astype(
        {"user_id": object, "item_id": object, "event_type": object, "site": object}
    )
    right = sort_events(ds.events)[cols].astype(
        {"user_id": object, "item_id": object, "event_type": object, "site": object}
    )
    pd.testing.assert_frame_equal(left, right)
    assert back.events["event_id"].is_unique
    assert back.item_attributes == ds.item_attributes
    # writing another type into the same directory replaces, never duplicates, the events file
    write_synthetic(ds, tmp_path, "csv" if fmt != "csv" else "jsonl")
    assert len(list(tmp_path.glob("events.*"))) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_sites": 0}, "n_sites"),
        ({"n_items": 10, "n_categories": 20}, "n_items"),
        ({"follow_prob": 1.5}, "follow_prob"),
        ({"events_per_shopper": 0}, "events_per_shopper"),
        ({"start": "someday"}, "ISO 8601"),
    ],
)
def test_bad_configs_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SynthConfig(**kwargs)  # type: ignore[arg-type]


def test_write_synthetic_refuses_unknown_formats(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="xlsx"):
        write_synthetic(
            generate_synthetic(SynthConfig(n_sites=1, shoppers_per_site=2)), tmp_path, "xlsx"
        )
