"""Ranking metrics by full ranking over the catalogue (S3-Rec protocol) or 99 sampled negatives.

Ranks are 0-based and pessimistic: an item scored equal to the target counts as ranked above
it, so a model that gives every item the same score gets no credit by luck of tie order.
Items of the shopper's history are masked before ranking (S3-Rec:
``rating_pred[train_matrix > 0] = 0``); a target that is also in the history is therefore
ranked last, exactly as in that protocol.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from shared.errors import DataError
from shared.sequences import EvalSet, pad_left

DEFAULT_KS: tuple[int, ...] = (5, 10, 20)
SAMPLED_NEGATIVES = 99


class EvaluationError(DataError, ValueError):
    """Data or settings that cannot be evaluated (a `ValueError` too, for plain callers)."""


def full_ranks(scores: torch.Tensor, targets: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all items, history and padding masked.

    scores (B, V) float, targets (B,) int64, history (B, L) int64 left-padded with 0 -> (B,).
    """
    return _ranks_of_targets(_mask_seen(scores, history), targets)


def _mask_seen(scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """A float32 copy of the scores with padding and the history's items at -inf."""
    s = scores.float().clone()  # (B, V)
    s[:, 0] = float("-inf")
    s.scatter_(1, history, float("-inf"))
    return s


def _ranks_of_targets(masked: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pessimistic 0-based ranks of the targets in already-masked scores (B, V) -> (B,)."""
    t = masked.gather(1, targets[:, None])  # (B, 1)
    above = (masked > t).sum(dim=1)
    tied = (masked == t).sum(dim=1) - 1  # the target itself is not a competitor
    return above + tied


def sampled_ranks(
    scores: torch.Tensor,
    targets: torch.Tensor,
    history: torch.Tensor,
    generator: np.random.Generator,
    n_negatives: int = SAMPLED_NEGATIVES,
) -> torch.Tensor:
    """0-based rank of each target among itself and ``n_negatives`` uniform negatives.

    Negatives are drawn without replacement from items the shopper never interacted with
    (history and target excluded), as S3-Rec's ``generate_test.py`` does.
    """
    n_items = scores.shape[1] - 1
    ranks = torch.empty(len(targets), dtype=torch.int64)
    for row in range(len(targets)):
        seen = set(history[row].tolist()) | {int(targets[row]), 0}
        if n_items - (len(seen) - 1) < n_negatives:
            raise EvaluationError(
                f"catalogue too small for {n_negatives} sampled negatives "
                f"({n_items} items, {len(seen) - 1} seen by one shopper); use full ranking"
            )
        negatives: list[int] = []
        while len(negatives) < n_negatives:
            draw = generator.integers(1, n_items + 1, size=2 * n_negatives)
            for item in draw.tolist():
                if item not in seen:
                    seen.add(item)
                    negatives.append(item)
                    if len(negatives) == n_negatives:
                        break
        cand = scores[row, negatives].float()
        t = scores[row, targets[row]].float()
        ranks[row] = int((cand >= t).sum())  # pessimistic: ties rank above the target
    return ranks


def hit_rate(ranks: torch.Tensor, k: int) -> float:
    """HR@K (= Recall@K with one target): share of targets ranked in the top K."""
    return float((ranks < k).float().mean()) if len(ranks) else 0.0


def ndcg(ranks: torch.Tensor, k: int) -> float:
    """NDCG@K with one relevant item: 1 / log2(rank + 2) inside the top K, else 0."""
    if not len(ranks):
        return 0.0
    gain = 1.0 / torch.log2(ranks.double() + 2.0)
    return float(torch.where(ranks < k, gain, torch.zeros_like(gain)).mean())


def mrr(ranks: torch.Tensor, k: int) -> float:
    """MRR@K: 1 / (rank + 1) inside the top K, else 0."""
    if not len(ranks):
        return 0.0
    rr = 1.0 / (ranks.double() + 1.0)
    return float(torch.where(ranks < k, rr, torch.zeros_like(rr)).mean())


def ranking_metrics(ranks: torch.Tensor, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """``{"hr@K", "ndcg@K", "mrr@K"}`` for every K."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate(ranks, k)
        out[f"ndcg@{k}"] = ndcg(ranks, k)
        out[f"mrr@{k}"] = mrr(ranks, k)
    return out


def catalogue_coverage(top_items: torch.Tensor, n_items: int) -> float:
    """Share of the catalogue that appears in at least one top-K list; top_items (B, K)."""
    if n_items <= 0:
        return 0.0
    distinct = torch.unique(top_items[top_items > 0])
    return float(len(distinct)) / n_items


def recommendation_effect(ratings: Sequence[float]) -> float:
    """R = sum(r_i * [r_i > 0]) / N over the ratings of the N recommended items.

    Unrated recommended items count with r_i = 0 (they are in N but add nothing).
    """
    if not ratings:
        return 0.0
    return sum(r for r in ratings if r > 0) / len(ratings)


def user_interest(ratings: Sequence[float]) -> float:
    """I_u = sum(r_i * [r_i > 0]) / M over the M items a shopper rated (4,3,1,5,2 -> 3)."""
    if not ratings:
        return 0.0
    return sum(r for r in ratings if r > 0) / len(ratings)


ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # items (B, T) -> last-position logits (B, V)


@torch.no_grad()
def evaluate_ranking(
    score_fn: ScoreFn,
    data: EvalSet,
    max_len: int,
    ks: Iterable[int] = DEFAULT_KS,
    mode: str = "full",
    batch_size: int = 512,
    seed: int = 0,
    trim: bool = False,
    inputs: list[np.ndarray] | None = None,
    mask_history: bool = True,
) -> dict[str, float]:
    """Rank every target of ``data`` with ``score_fn``; metrics plus ``n_users``.

    ``mode`` is ``"full"`` (whole catalogue) or ``"sampled"`` (99 uniform negatives). The
    model sees the last ``max_len`` history items, left-padded by `pad_left`; the whole
    history is masked. With ``trim`` the inputs are padded only to the longest history of
    their batch (at most ``max_len``) and, in full mode, shoppers are batched by history
    length; this is exact only for models whose scores do not depend on the amount of left
    padding (every model in `shared.models`), and several times faster on short histories.
    """
    if mode not in {"full", "sampled"}:
        raise EvaluationError(f"unknown evaluation mode {mode!r}; expected full or sampled")
    ks = tuple(ks)
    rng = np.random.default_rng(seed)
    if not mask_history and mode != "full":
        raise EvaluationError("sampled evaluation always masks the history")
    histories = data.histories.item_lists()
    model_inputs = histories if inputs is None else inputs
    if len(model_inputs) != len(histories):
        raise EvaluationError("inputs must hold one array per evaluated shopper")
    lengths = data.histories.lengths
    # Metrics are means over shoppers, so the order they are scored in does not matter.
    order = np.argsort(lengths, kind="stable") if trim and mode == "full" else None
    all_ranks: list[torch.Tensor] = []
    top_lists: list[torch.Tensor] = []
    n_scored = 0
    for start in range(0, len(data), batch_size):
        rows = np.arange(start, min(start + batch_size, len(data)))
        if order is not None:
            rows = order[rows]
        hist = [histories[i] for i in rows]
        longest = max(1, int(lengths[rows].max()))
        width = min(max_len, longest) if trim else max_len
        batch = torch.from_numpy(pad_left([model_inputs[i] for i in rows], width))  # (B, width)
        # (B, longest) full history; only padding (0) when seen items are not masked
        if mask_history:
            masked = torch.from_numpy(pad_left(hist, longest))
        else:
            masked = torch.zeros((len(rows), 1), dtype=torch.int64)
        targets = torch.from_numpy(data.targets[rows])
        scores = score_fn(batch)  # (B, V)
        n_scored = scores.shape[1] - 1
        if mode == "full":
            s = _mask_seen(scores, masked)
            all_ranks.append(_ranks_of_targets(s, targets))
            top_lists.append(torch.topk(s, min(max(ks), n_scored), dim=1).indices)
        else:
            all_ranks.append(sampled_ranks(scores, targets, masked, rng))
    ranks = torch.cat(all_ranks) if all_ranks else torch.zeros(0, dtype=torch.int64)
    out = ranking_metrics(ranks, ks)
    out["n_users"] = float(len(ranks))
    if top_lists:
        out[f"coverage@{max(ks)}"] = catalogue_coverage(torch.cat(top_lists), n_scored)
    if not math.isfinite(sum(out.values())):
        raise EvaluationError("non-finite metric: the model produced NaN or infinite scores")
    return out
