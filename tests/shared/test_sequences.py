"""Per-shopper sequences (CSR), leave-one-out, the time-based split and left padding."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import DataError
from shared.sequences import (
    UserSequences,
    build_sequences,
    leave_one_out,
    next_item_examples,
    pad_left,
    serving_input,
    temporal_split,
    time_split_points,
)
from shared.vocab import ItemVocab

BASE_MS = 1_700_000_000_000  # 2023-11-14, a real wall-clock time

SEQUENCES = st.lists(st.lists(st.integers(1, 30), max_size=8), max_size=10)


def _seqs(lists: list[list[int]], stamps: list[list[int]] | None = None) -> UserSequences:
    lengths = [len(s) for s in lists]
    flat = [i for s in lists for i in s]
    ts = [t for s in stamps for t in s] if stamps is not None else list(range(len(flat)))
    return UserSequences(
        user_ids=tuple(f"u{k}" for k in range(len(lists))),
        offsets=np.r_[0, np.cumsum(lengths)].astype(np.int64),
        items=np.asarray(flat, dtype=np.int64),
        event_types=np.ones(len(flat), dtype=np.int8),
        ts_ms=np.asarray(ts, dtype=np.int64),
    )


def _as_dict(seqs: UserSequences) -> dict[str, list[int]]:
    return {u: seqs.items_of(k).tolist() for k, u in enumerate(seqs.user_ids)}


@settings(max_examples=60, deadline=None)
@given(SEQUENCES, st.data())
def test_select_returns_exactly_the_chosen_shoppers(
    lists: list[list[int]], data: st.DataObject
) -> None:
    seqs = _seqs(lists)
    chosen = data.draw(st.lists(st.integers(0, max(len(lists) - 1, 0)), max_size=len(lists)))
    chosen = chosen if lists else []
    picked = seqs.select(np.asarray(chosen, dtype=np.int64))
    assert picked.user_ids == tuple(seqs.user_ids[c] for c in chosen)
    for k, c in enumerate(chosen):
        assert picked.items_of(k).tolist() == lists[c]
        assert picked.ts_ms[picked.offsets[k] : picked.offsets[k + 1]].tolist() == (
            seqs.ts_ms[seqs.offsets[c] : seqs.offsets[c + 1]].tolist()
        )


@settings(max_examples=60, deadline=None)
@given(SEQUENCES, st.integers(0, 10))
def test_truncate_drops_the_last_events_and_keeps_every_shopper(
    lists: list[list[int]], drop: int
) -> None:
    cut = _seqs(lists).truncate(drop)
    assert cut.user_ids == _seqs(lists).user_ids
    assert cut.lengths.tolist() == [max(len(s) - drop, 0) for s in lists]
    assert [cut.items_of(k).tolist() for k in range(len(lists))] == [
        s[: max(len(s) - drop, 0)] for s in lists
    ]


@settings(max_examples=60, deadline=None)
@given(SEQUENCES, st.sets(st.integers(1, 30)))
def test_without_items_removes_exactly_those_items_and_keeps_order_and_shoppers(
    lists: list[list[int]], dropped: set[int]
) -> None:
    seqs = _seqs(lists)
    flags = np.zeros(31, dtype=bool)
    flags[list(dropped)] = True
    kept = seqs.without_items(flags)
    assert kept.user_ids == seqs.user_ids
    for k, s in enumerate(lists):
        rows = [
            t
            for t, i in zip(seqs.ts_ms[seqs.offsets[k] : seqs.offsets[k + 1]], s, strict=True)
            if i not in dropped
        ]
        assert kept.items_of(k).tolist() == [i for i in s if i not in dropped]
        assert kept.ts_ms[kept.offsets[k] : kept.offsets[k + 1]].tolist() == rows


@settings(max_examples=60, deadline=None)
@given(SEQUENCES, st.integers(3, 5))
def test_leave_one_out_properties(lists: list[list[int]], min_events: int) -> None:
    seqs = _seqs(lists)
    split = leave_one_out(seqs, min_events=min_events)
    full = _as_dict(seqs)
    train = _as_dict(split.train)
    test_hist = _as_dict(split.test.histories)
    valid_hist = _as_dict(split.valid.histories)
    evaluated = [u for u, s in full.items() if len(s) >= min_events]
    # every evaluated shopper, and only those, is in valid and test
    assert list(test_hist) == evaluated == list(valid_hist)
    for k, u in enumerate(evaluated):
        s = full[u]
        # the test target is the last item; its history is everything before it
        assert split.test.targets[k] == s[-1]
        assert test_hist[u] == s[:-1]
        # the validation target is the second-last; train holds neither target
        assert split.valid.targets[k] == s[-2]
        assert valid_hist[u] == s[:-2]
        assert train[u] == s[:-2]
    # shoppers too short to evaluate train on everything
    assert {u: s for u, s in train.items() if u not in evaluated} == {
        u: s for u, s in full.items() if u not in evaluated
    }
    assert split.kind == "leave-one-out"


def test_leave_one_out_refuses_fewer_than_three_events() -> None:
    with pytest.raises(DataError):
        leave_one_out(_seqs([[1, 2, 3]]), min_events=2)


def test_build_sequences_sorts_by_time_breaks_ties_by_input_order_and_drops_unknown_items() -> None:
    events = pd.DataFrame(
        {
            "user_id": ["b", "a", "a", "a", "a"],
            "item_id": ["1", "3", "2", "9", "1"],
            "event_type": ["view", "view", "cart", "view", "purchase"],
            "ts_ms": np.asarray([5, 20, 10, 10, 10], dtype=np.int64),
            "value": np.nan,
            "site": "",
        }
    )
    vocab = ItemVocab(["1", "2", "3"])  # item 9 is not in the catalogue
    seqs = build_sequences(events, vocab)
    assert seqs.user_ids == ("a", "b")
    # ties at ts 10 keep input order (2 then 1); 9 is dropped; 3 (ts 20) comes last
    assert [vocab.decode(seqs.items_of(k)) for k in range(2)] == [["2", "1", "3"], ["1"]]
    assert seqs.ts_ms.tolist() == [10, 10, 20, 5]
    assert seqs.event_types.tolist() == [2, 4, 1, 1]


def _brute_temporal(
    lists: list[list[int]], stamps: list[list[int]], tv: int, tt: int
) -> tuple[
    dict[str, list[int]], list[tuple[str, list[int], int]], list[tuple[str, list[int], int]]
]:
    train, valid, test = {}, [], []
    for k, (items, ts) in enumerate(zip(lists, stamps, strict=True)):
        u = f"u{k}"
        before_v = [i for i, t in zip(items, ts, strict=True) if t < tv]
        if before_v:
            train[u] = before_v
        in_v = [j for j, t in enumerate(ts) if tv <= t < tt]
        if in_v and before_v:
            valid.append((u, before_v, items[in_v[0]]))
        after = [j for j, t in enumerate(ts) if t >= tt]
        if after and after[0] > 0:
            test.append((u, items[: after[0]], items[after[0]]))
    return train, valid, test


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 20)), max_size=8), max_size=8),
    st.integers(0, 20),
    st.integers(1, 10),
)
def test_temporal_split_matches_its_definition(
    raw: list[list[tuple[int, int]]], tv_offset: int, gap: int
) -> None:
    # Arrange: sequences sorted by time, as build_sequences gives them
    rows = [sorted(r, key=lambda p: p[1]) for r in raw]
    lists = [[i for i, _ in r] for r in rows]
    stamps = [[BASE_MS + 1000 * t for _, t in r] for r in rows]
    tv, tt = BASE_MS + 1000 * tv_offset, BASE_MS + 1000 * (tv_offset + gap)
    # Act
    split = temporal_split(_seqs(lists, stamps), tv, tt, timestamps="real")
    # Assert
    train, valid, test = _brute_temporal(lists, stamps, tv, tt)
    assert _as_dict(split.train) == train
    assert all(t < tv for t in split.train.ts_ms)
    got_valid = [
        (u, split.valid.histories.items_of(k).tolist(), int(split.valid.targets[k]))
        for k, u in enumerate(split.valid.histories.user_ids)
    ]
    got_test = [
        (u, split.test.histories.items_of(k).tolist(), int(split.test.targets[k]))
        for k, u in enumerate(split.test.histories.user_ids)
    ]
    assert got_valid == valid
    assert got_test == test
    assert split.kind == "temporal"


def test_temporal_split_hand_made_case() -> None:
    s = 1000
    seqs = _seqs([[1, 2, 3, 4, 5]], [[BASE_MS + s * t for t in (1, 2, 5, 6, 9)]])
    split = temporal_split(seqs, BASE_MS + 5 * s, BASE_MS + 8 * s, timestamps="real")
    assert split.train.items.tolist() == [1, 2]
    assert (split.valid.histories.items.tolist(), split.valid.targets.tolist()) == ([1, 2], [3])
    assert (split.test.histories.items.tolist(), split.test.targets.tolist()) == ([1, 2, 3, 4], [5])


def test_temporal_split_refuses_order_only_timestamps() -> None:
    seqs = _seqs([[1, 2, 3]])  # positions 0, 1, 2
    with pytest.raises(DataError, match="wall-clock"):
        temporal_split(seqs, 1, 2, timestamps="order")
    with pytest.raises(DataError, match="positions"):
        temporal_split(seqs, 1, 2, timestamps="real")


def test_temporal_split_refuses_bad_split_times() -> None:
    seqs = _seqs([[1, 2]], [[BASE_MS, BASE_MS + 1]])
    with pytest.raises(DataError, match="before"):
        temporal_split(seqs, BASE_MS + 5, BASE_MS + 5, timestamps="real")


def test_time_split_points_take_quantiles_of_all_events() -> None:
    stamps = [[BASE_MS + t for t in range(0, 50)], [BASE_MS + t for t in range(50, 100)]]
    seqs = _seqs([list(range(1, 51)), list(range(1, 51))], stamps)
    tv, tt = time_split_points(seqs, 0.8, 0.9)
    assert (tv - BASE_MS, tt - BASE_MS) == (80, 90)
    with pytest.raises(DataError, match="valid_quantile < test_quantile"):
        time_split_points(seqs, 0.9, 0.8)
    flat = _seqs([[1, 2, 3]], [[BASE_MS] * 3])
    with pytest.raises(DataError, match="coincide"):
        time_split_points(flat)


def test_pad_left_keeps_the_last_items_oldest_first() -> None:
    out = pad_left([np.array([1, 2, 3, 4]), np.array([5]), np.array([], dtype=np.int64)], 3)
    assert out.tolist() == [[2, 3, 4], [0, 0, 5], [0, 0, 0]]
    assert serving_input(np.array([7, 8]), 4).tolist() == [[0, 0, 7, 8]]


def test_next_item_examples_shift_targets_by_one() -> None:
    inputs, targets = next_item_examples(_seqs([[1, 2, 3], [4], [5, 6]]), 3)
    assert inputs.tolist() == [[0, 1, 2], [0, 0, 5]]
    assert targets.tolist() == [[0, 2, 3], [0, 0, 6]]
