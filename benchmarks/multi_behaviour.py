"""Multi-behaviour input and a will-purchase head against the item-only GRU, on Taobao.

Both GRUs have the same sizes, data, seed and epochs. The multi-behaviour one reads each
event's type (view, cart, fav, purchase) in its input tokens and also learns whether the next
event is a purchase (`shared.models.gru4rec`, ``n_behaviours``). The split is in time
(`shared.sequences.temporal_split`, 80 % / 90 % event quantiles). Every test shopper has all
earlier events as history. The script reports:

- **next item**: the first event at or after the test time. Ranked with seen items masked
  (the S3-Rec protocol) and without the mask ("repeat-aware": Taobao shoppers mostly come
  back to what they viewed).
- **next purchase**: the first purchase at or after the test time, with every earlier event
  (views and carts of the test window included) as history, repeat-aware.
- **will-purchase AUC**: the multi-behaviour head's logit that the next-item target is a
  purchase.

Popularity (training counts), a recency heuristic (the most recently touched items first) and
recency weighted by event type (each past event adds its type's weight, halved every h events
back; weights and h chosen on the validation window's next purchases) stand beside the GRUs.

Example: .venv/bin/python benchmarks/multi_behaviour.py --epochs 8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from shared.events import EVENT_TYPE_CODES
from shared.metrics import evaluate_ranking
from shared.models import build_model
from shared.models.gru4rec import GRU4RecConfig
from shared.readers import read_dataset
from shared.sequences import (
    N_BEHAVIOURS,
    PURCHASE_CODE,
    DataSplit,
    EvalSet,
    UserSequences,
    build_sequences,
    pad_left,
    temporal_split,
    time_split_points,
)
from shared.training import (
    default_model_config,
    default_train_config,
    evaluate_model,
    n_behaviours,
    train_model,
)
from shared.vocab import ItemVocab

DATA = Path("../shared/data/taobao_userbehavior")


def next_purchase_set(
    seqs: UserSequences, t_from_ms: int, t_until_ms: int | None = None
) -> EvalSet:
    """Each shopper's first purchase in ``[t_from_ms, t_until_ms)``, with all earlier events."""
    owner = np.repeat(np.arange(len(seqs)), seqs.lengths)
    position = np.arange(seqs.n_events) - seqs.offsets[owner]
    until = np.iinfo(np.int64).max if t_until_ms is None else t_until_ms
    in_window = (seqs.ts_ms >= t_from_ms) & (seqs.ts_ms < until)
    hit = in_window & (seqs.event_types == PURCHASE_CODE) & (position >= 1)
    users, first = np.unique(owner[hit], return_index=True)
    cut = position[np.flatnonzero(hit)[first]]
    chosen = seqs.select(users)
    return EvalSet(histories=chosen.prefixes(cut), targets=chosen.items[chosen.offsets[:-1] + cut])


def target_is_purchase(seqs: UserSequences, data: EvalSet) -> np.ndarray:
    """Whether each test target (the event right after its history) is a purchase."""
    index = {u: i for i, u in enumerate(seqs.user_ids)}
    rows = np.array([index[u] for u in data.histories.user_ids], dtype=np.int64)
    at = seqs.offsets[rows] + data.histories.lengths
    return np.asarray(seqs.event_types[at] == PURCHASE_CODE)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN with one class only."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = pd.Series(np.concatenate([pos, neg])).rank(method="average").to_numpy()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def purchase_logits(model: torch.nn.Module, data: EvalSet) -> np.ndarray:
    """The will-purchase logit after each shopper's history (a multi-behaviour model)."""
    n_items = int(model.config.n_items)  # type: ignore[union-attr,arg-type]
    max_len = int(model.config.max_len)  # type: ignore[union-attr,arg-type]
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(pad_left(data.histories.token_lists(n_items), max_len))
        h = model.encode(x)[:, -1, :]  # type: ignore[operator]  # (B, H)
        return model.purchase_head(h).squeeze(-1).numpy()  # type: ignore[operator]


def recency_scores(n_items: int):  # type: ignore[no-untyped-def]
    """A score function ranking the history's items newest first, everything else after."""

    def score(inputs: torch.Tensor) -> torch.Tensor:  # (B, T) item ids, left-padded
        b, t = inputs.shape
        out = torch.zeros((b, n_items + 1))
        position = torch.arange(1, t + 1, dtype=torch.float32).expand(b, t)  # later = larger
        out.scatter_reduce_(1, inputs, position, reduce="amax")
        out[:, 0] = 0.0
        return out

    return score


def weighted_recency_scores(  # type: ignore[no-untyped-def]
    n_items: int, weights: np.ndarray, half_life: float
):
    """Recency that reads event types: scores from behaviour tokens.

    Each past event of an item adds its type's weight, halved every ``half_life`` events back.
    """
    w = torch.from_numpy(np.asarray(weights, dtype=np.float32))  # (N_BEHAVIOURS + 1,)

    def score(tokens: torch.Tensor) -> torch.Tensor:  # (B, T) tokens, left-padded
        b, t = tokens.shape
        items, codes = tokens % (n_items + 1), tokens // (n_items + 1)
        age = torch.arange(t - 1, -1, -1, dtype=torch.float32).expand(b, t)
        contribution = w[codes] * torch.pow(0.5, age / half_life) * (items > 0)
        out = torch.zeros((b, n_items + 1))
        out.scatter_add_(1, items, contribution)
        out[:, 0] = 0.0
        return out

    return score


def fit_weighted_recency(n_items: int, valid: EvalSet, max_len: int) -> tuple[np.ndarray, float]:
    """Type weights and half-life with the best validation next-purchase NDCG@10 (grid)."""
    tokens = valid.histories.token_lists(n_items)
    best: tuple[float, np.ndarray, float] = (-1.0, np.ones(N_BEHAVIOURS + 1), 1.0)
    for cart in (1.0, 2.0, 4.0, 8.0):
        for fav in (1.0, 2.0, 4.0):
            for bought in (0.25, 1.0):
                for half_life in (1.0, 3.0, 10.0, 30.0):
                    weights = np.ones(N_BEHAVIOURS + 1)
                    weights[0] = 0.0
                    weights[EVENT_TYPE_CODES["cart"]] = cart
                    weights[EVENT_TYPE_CODES["fav"]] = fav
                    weights[PURCHASE_CODE] = bought
                    m = evaluate_ranking(
                        weighted_recency_scores(n_items, weights, half_life),
                        valid,
                        max_len,
                        inputs=tokens,
                        mask_history=False,
                    )
                    if m["ndcg@10"] > best[0]:
                        best = (m["ndcg@10"], weights, half_life)
    return best[1], best[2]


def popularity_scores(counts: np.ndarray):  # type: ignore[no-untyped-def]
    """A score function giving every shopper the training counts."""
    row = torch.from_numpy(counts.astype(np.float32))

    def score(inputs: torch.Tensor) -> torch.Tensor:
        return row.expand(inputs.shape[0], -1)

    return score


def evaluate_all(
    score_model: Any,
    sets: dict[str, tuple[EvalSet, bool]],
    max_len: int,
    tokens_of: int = 0,
) -> dict[str, float]:
    """NDCG@10 and HR@10 of a model (nn.Module) or score function on each named set.

    A score function reads item ids, or with ``tokens_of`` (n_items) behaviour tokens.
    """
    out: dict[str, float] = {}
    for name, (data, mask) in sets.items():
        if isinstance(score_model, torch.nn.Module):
            m = evaluate_model(score_model, data, mask_history=mask)
        else:
            inputs = data.histories.token_lists(tokens_of) if tokens_of else None
            m = evaluate_ranking(score_model, data, max_len, mask_history=mask, inputs=inputs)
        out[f"{name} ndcg@10"] = m["ndcg@10"]
        out[f"{name} n"] = m["n_users"]
        out[f"{name} hr@10"] = m["hr@10"]
    return out


def main() -> None:
    """Split, train both GRUs, score every model, print JSON lines and a table."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--data",
        type=Path,
        nargs="+",
        default=[DATA / "UserBehavior_head.csv", DATA / "UserBehavior_tail.csv"],
        help="Taobao UserBehavior CSV slices (read and concatenated)",
    )
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--purchase-weight", type=float, default=1.0)
    ap.add_argument("--dim", type=int, default=None, help="embedding and GRU size (tuned: 256)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--no-gru", action="store_true", help="baselines only (no training)")
    args = ap.parse_args()

    events = pd.concat([read_dataset(p, "taobao").events for p in args.data], ignore_index=True)
    vocab = ItemVocab.from_items(events["item_id"].astype(str))
    seqs = build_sequences(events, vocab)
    t_valid, t_test = time_split_points(seqs, 0.8, 0.9)
    split: DataSplit = temporal_split(seqs, t_valid, t_test, timestamps="real")
    purchase_set = next_purchase_set(seqs, t_test)
    sets = {
        "next item, masked": (split.test, True),
        "next item, repeat-aware": (split.test, False),
        "next purchase, repeat-aware": (purchase_set, False),
    }
    header: dict[str, Any] = {
        "events": len(events),
        "shoppers": len(seqs),
        "items": vocab.n_items,
        "train events": split.train.n_events,
        "test shoppers": len(split.test),
        "next-purchase shoppers": len(purchase_set),
        "purchase share of training events": float(
            (split.train.event_types == PURCHASE_CODE).mean()
        ),
    }
    print(json.dumps(header), flush=True)
    max_len = GRU4RecConfig.max_len
    counts = np.bincount(split.train.items, minlength=vocab.n_items + 1).astype(np.float64)
    counts[0] = 0
    rows: dict[str, dict[str, float]] = {
        "popularity": evaluate_all(popularity_scores(counts), sets, max_len),
        "recency (history, newest first)": evaluate_all(
            recency_scores(vocab.n_items), sets, max_len
        ),
    }
    weights, half_life = fit_weighted_recency(
        vocab.n_items, next_purchase_set(seqs, t_valid, t_test), max_len
    )
    rows["recency weighted by event type (fit on validation)"] = evaluate_all(
        weighted_recency_scores(vocab.n_items, weights, half_life), sets, max_len, vocab.n_items
    )
    header["weighted recency"] = {"weights": weights.tolist(), "half_life": half_life}
    print(json.dumps({"weighted recency": header["weighted recency"]}), flush=True)
    is_purchase = target_is_purchase(seqs, split.test)
    train_config = replace(
        default_train_config("gru"),
        epochs=args.epochs,
        patience=args.epochs,
        threads=args.threads,
        seed=args.seed,
        mask_history=False,
        purchase_weight=args.purchase_weight,
    )
    grus = () if args.no_gru else (("GRU, item ids", 0), ("GRU, multi-behaviour", N_BEHAVIOURS))
    for name, behaviours in grus:
        config = default_model_config(
            "gru", vocab.n_items, n_behaviours=behaviours, dim=args.dim, hidden=args.dim
        )
        model = build_model("gru", config)
        start = time.perf_counter()
        result = train_model(model, split, train_config)
        row = evaluate_all(model, sets, max_len)
        row["train s"] = time.perf_counter() - start
        row["best epoch"] = float(result.best_epoch)
        if n_behaviours(model):
            row["will-purchase AUC"] = auc(purchase_logits(model, split.test), is_purchase)
        rows[name] = row
        print(json.dumps({"model": name, **row}), flush=True)

    columns = [
        "next item, masked ndcg@10",
        "next item, repeat-aware ndcg@10",
        "next purchase, repeat-aware ndcg@10",
        "next purchase, repeat-aware hr@10",
        "will-purchase AUC",
    ]
    print("\n| model | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, row in rows.items():
        cells = [f"{row[c]:.4f}" if c in row else "" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"data": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
