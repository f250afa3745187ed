"""Ranking metrics and the design's indicators against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from shared.metrics import (
    catalogue_coverage,
    evaluate_ranking,
    full_ranks,
    hit_rate,
    mrr,
    ndcg,
    ranking_metrics,
    recommendation_effect,
    sampled_ranks,
    user_interest,
)
from shared.sequences import EvalSet, UserSequences


def _eval_set(histories: list[list[int]], targets: list[int]) -> EvalSet:
    lengths = [len(h) for h in histories]
    flat = np.asarray([i for h in histories for i in h], dtype=np.int64)
    seqs = UserSequences(
        user_ids=tuple(f"u{i}" for i in range(len(histories))),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=flat,
        event_types=np.ones(len(flat), dtype=np.int8),
        ts_ms=np.arange(len(flat), dtype=np.int64),
    )
    return EvalSet(histories=seqs, targets=np.asarray(targets, dtype=np.int64))


def test_hit_ndcg_mrr_by_hand() -> None:
    # Arrange: ranks 0, 2 and 10 (0-based)
    ranks = torch.tensor([0, 2, 10])
    # Act / Assert
    assert hit_rate(ranks, 1) == pytest.approx(1 / 3)
    assert hit_rate(ranks, 3) == pytest.approx(2 / 3)
    assert hit_rate(ranks, 11) == pytest.approx(1.0)
    assert ndcg(ranks, 3) == pytest.approx((1.0 + 1.0 / math.log2(4)) / 3)  # (1 + 0.5) / 3
    assert ndcg(ranks, 20) == pytest.approx((1.0 + 0.5 + 1.0 / math.log2(12)) / 3)
    assert mrr(ranks, 3) == pytest.approx((1.0 + 1 / 3) / 3)
    assert mrr(ranks, 10) == pytest.approx((1.0 + 1 / 3) / 3)  # rank 10 is outside the top 10


def test_empty_ranks_give_zero_not_nan() -> None:
    empty = torch.zeros(0, dtype=torch.int64)
    assert ranking_metrics(empty, (10,)) == {"hr@10": 0.0, "ndcg@10": 0.0, "mrr@10": 0.0}


def test_full_ranks_mask_history_and_padding() -> None:
    # Arrange: 5 items; the shopper saw items 1 and 2, which score highest
    scores = torch.tensor([[9.0, 8.0, 7.0, 3.0, 2.0, 1.0]])  # column 0 is padding
    history = torch.tensor([[0, 1, 2]])  # left-padded
    # Act
    rank_of_3 = full_ranks(scores, torch.tensor([3]), history)
    rank_of_5 = full_ranks(scores, torch.tensor([5]), history)
    # Assert: padding and seen items are not competitors
    assert rank_of_3.tolist() == [0]
    assert rank_of_5.tolist() == [2]


def test_full_ranks_are_pessimistic_on_ties() -> None:
    # Arrange: all four items tie
    scores = torch.zeros((1, 5))
    # Act
    rank = full_ranks(scores, torch.tensor([2]), torch.zeros((1, 1), dtype=torch.int64))
    # Assert: the three tied competitors count as ranked above the target
    assert rank.tolist() == [3]
    assert hit_rate(rank, 3) == 0.0


def test_target_in_history_is_ranked_last() -> None:
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0]])
    rank = full_ranks(scores, torch.tensor([1]), torch.tensor([[1]]))
    assert rank.tolist() == [3]  # n_items = 3, so the worst 0-based rank is 3


def test_sampled_ranks_count_only_sampled_negatives() -> None:
    # Arrange: 200 items scored by index; the target is item 150, history {1, 2}
    scores = torch.arange(201, dtype=torch.float32)[None, :]
    target = torch.tensor([150])
    history = torch.tensor([[1, 2]])
    rng = np.random.default_rng(0)
    # Act
    rank = sampled_ranks(scores, target, history, rng, n_negatives=99)
    # Assert: recompute with the same draws by hand
    rng = np.random.default_rng(0)
    seen = {0, 1, 2, 150}
    negatives: list[int] = []
    while len(negatives) < 99:
        for item in rng.integers(1, 201, size=198).tolist():
            if item not in seen:
                seen.add(item)
                negatives.append(item)
                if len(negatives) == 99:
                    break
    assert rank.item() == sum(n > 150 for n in negatives)
    assert not {1, 2, 150} & set(negatives)


def test_sampled_ranks_refuse_a_too_small_catalogue() -> None:
    scores = torch.zeros((1, 51))
    with pytest.raises(ValueError, match="too small"):
        sampled_ranks(scores, torch.tensor([1]), torch.tensor([[2]]), np.random.default_rng(0))


def test_catalogue_coverage() -> None:
    top = torch.tensor([[1, 2], [2, 3], [0, 3]])  # padding does not count
    assert catalogue_coverage(top, 10) == pytest.approx(0.3)
    assert catalogue_coverage(top, 0) == 0.0


def test_user_interest_of_the_design_example() -> None:
    # The design's worked example: ratings 4, 3, 1, 5, 2 -> I_u = 15 / 5 = 3
    assert user_interest([4, 3, 1, 5, 2]) == pytest.approx(3.0)
    assert user_interest([4, 0, 2]) == pytest.approx(2.0)  # a zero counts in M, adds nothing
    assert user_interest([]) == 0.0


def test_recommendation_effect() -> None:
    # Ten recommended items, three rated 5, 4, 3 by the shopper, the rest unrated (0)
    ratings = [5.0, 4.0, 3.0] + [0.0] * 7
    assert recommendation_effect(ratings) == pytest.approx(1.2)
    assert recommendation_effect([-1.0, 2.0]) == pytest.approx(1.0)  # negatives add nothing
    assert recommendation_effect([]) == 0.0


def test_evaluate_ranking_full_mode_end_to_end() -> None:
    # Arrange: 6 items; a score function that always prefers high indices
    data = _eval_set([[6], [1, 2], [3]], targets=[5, 6, 1])

    def score_fn(items: torch.Tensor) -> torch.Tensor:
        return torch.arange(7, dtype=torch.float32).repeat(items.shape[0], 1)

    # Act
    out = evaluate_ranking(score_fn, data, max_len=4, ks=(1, 5))
    # Assert: ranks are 0 (6 masked), 0, and 4 (items 6, 5, 4, 2 above 1; 3 masked)
    assert out["n_users"] == 3
    assert out["hr@1"] == pytest.approx(2 / 3)
    assert out["hr@5"] == pytest.approx(1.0)
    assert out["ndcg@5"] == pytest.approx((1 + 1 + 1 / math.log2(6)) / 3)
    assert out["mrr@5"] == pytest.approx((1 + 1 + 1 / 5) / 3)
    top2 = evaluate_ranking(score_fn, data, max_len=4, ks=(2,))
    assert top2["coverage@2"] == pytest.approx(3 / 6)  # top-2 lists: {5, 4}, {6, 5}, {6, 5}


def test_evaluate_ranking_masks_the_whole_history_not_only_the_model_window() -> None:
    # Arrange: a history longer than max_len that contains the best-scored item early on
    data = _eval_set([[9, 1, 2, 3]], targets=[8])

    def score_fn(items: torch.Tensor) -> torch.Tensor:
        assert items.shape[1] == 2  # the model sees only the last max_len items
        return torch.arange(10, dtype=torch.float32).repeat(items.shape[0], 1)

    # Act
    out = evaluate_ranking(score_fn, data, max_len=2, ks=(1,))
    # Assert: item 9 is masked although it is outside the model's window
    assert out["hr@1"] == 1.0


def test_evaluate_ranking_sampled_mode_is_seeded() -> None:
    data = _eval_set([[1, 2]] * 4, targets=[150, 10, 200, 3])

    def score_fn(items: torch.Tensor) -> torch.Tensor:
        return torch.arange(201, dtype=torch.float32).repeat(items.shape[0], 1)

    a = evaluate_ranking(score_fn, data, max_len=5, ks=(1,), mode="sampled", seed=3)
    b = evaluate_ranking(score_fn, data, max_len=5, ks=(1,), mode="sampled", seed=3)
    assert a == b
    assert a["hr@1"] == pytest.approx(0.25)  # only item 200 beats every sampled negative
    with pytest.raises(ValueError, match="mode"):
        evaluate_ranking(score_fn, data, max_len=5, mode="popular")


def test_trimmed_evaluation_equals_padded_for_a_padding_invariant_model() -> None:
    # Arrange: a score function that only reads the real items (like every model here)
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 30, size=n).tolist() for n in rng.integers(1, 12, size=50)]
    data = _eval_set(histories, targets=rng.integers(1, 30, size=50).tolist())
    weights = torch.from_numpy(rng.normal(size=(31, 31)).astype(np.float32))
    widths: list[int] = []

    def score_fn(items: torch.Tensor) -> torch.Tensor:
        widths.append(items.shape[1])
        return (weights[items] * (items > 0)[..., None]).sum(dim=1)  # real items' rows summed

    # Act
    padded = evaluate_ranking(score_fn, data, max_len=8, batch_size=16)
    trimmed = evaluate_ranking(score_fn, data, max_len=8, batch_size=16, trim=True)
    # Assert
    assert trimmed == pytest.approx(padded)
    assert min(widths) < 8  # short batches really were cut
