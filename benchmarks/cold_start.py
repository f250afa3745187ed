"""Cold-start items: NDCG@10 on items no shopper interacted with in training, against popularity.

Protocol (one run, every model on the same split):

1. Read a dataset with item attributes (Amazon Beauty/Sports: brand and categories, S3-Rec's
   ``*_item2attributes.json``) and build the leave-one-out split (`shared.training.prepare_split`).
2. Pick ``--cold-share`` of the items that have attributes (seeded) as *new arrivals*: every
   event of theirs is removed from training, validation and every history, as if the items
   had just been added to the catalogue. Test shoppers whose last item is a new arrival form
   the **cold** test set; the rest the **warm** one.
3. Score the cold test set two ways: ranking only the new arrivals (the "new in" shelf: which
   new item will this shopper take?) and ranking the whole catalogue.

Models:

- ``popularity``: log(1 + training count). A new item has count 0, so among new arrivals it
  cannot tell them apart (ties are ranked pessimistically, `shared.metrics`: it scores 0).
- ``attribute-popularity``: a new item scores the mean, over its attributes, of the mean
  log-count of the known items carrying that attribute: the best a shop can do with the
  catalogue alone.
- ``gru-id``: the production GRU4Rec (`shared.models.gru4rec`) with learned id tables. A new
  item's rows were never a positive, so it knows nothing about it.
- ``gru-attributes``: the same GRU with both item tables set from the public attributes
  (`shared.item_vectors.init_item_tables`) and frozen, so a new item gets the vector its
  attributes give it; its output bias, which training cannot learn, is the attribute mean of
  the known items' learned biases (as ``attribute-popularity`` does with counts).

Prints one JSON line per model and a table; the figures go to docs/cold_start.md.

Example:
    .venv/bin/python benchmarks/cold_start.py --data ../shared/data/amazon_s3rec/Beauty.txt \\
        --time-budget 600
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.item_vectors import attribute_matrix, attribute_mean, init_item_tables
from shared.metrics import evaluate_ranking
from shared.models import build_model
from shared.models.gru4rec import GRU4Rec
from shared.models.popularity import Popularity
from shared.readers import read_dataset
from shared.sequences import DataSplit, EvalSet
from shared.training import (
    default_model_config,
    default_train_config,
    last_position_scores,
    prepare_split,
    train_model,
)

NEG = -1e9  # score of an item outside the candidate set


def eval_subset(data: EvalSet, rows: np.ndarray, drop: np.ndarray) -> EvalSet:
    """The shoppers at ``rows``, their histories without the dropped items."""
    return EvalSet(
        histories=data.histories.select(rows).without_items(drop), targets=data.targets[rows]
    )


def cold_split(split: DataSplit, cold: np.ndarray) -> tuple[DataSplit, EvalSet, EvalSet]:
    """(training split without the cold items, cold test set, warm test set)."""
    warm_valid = np.flatnonzero(~cold[split.valid.targets])
    train_split = DataSplit(
        train=split.train.without_items(cold),
        valid=eval_subset(split.valid, warm_valid, cold),
        test=eval_subset(split.test, np.flatnonzero(~cold[split.test.targets]), cold),
        kind=split.kind + "+cold-items-held-out",
    )
    cold_test = eval_subset(split.test, np.flatnonzero(cold[split.test.targets]), cold)
    return train_split, cold_test, train_split.test


def score_fn(model: torch.nn.Module, candidates: np.ndarray | None) -> Any:
    """Last-position scores, restricted to ``candidates`` ((V + 1,) bool) when given."""
    base = last_position_scores(model)
    if candidates is None:
        return base
    outside = torch.from_numpy(~candidates)

    def score(items: torch.Tensor) -> torch.Tensor:
        s = base(items)
        return s.masked_fill(outside, NEG)

    return score


def evaluate(
    model: torch.nn.Module, data: EvalSet, candidates: np.ndarray | None
) -> dict[str, float]:
    """NDCG@10, HR@10 and shoppers of ``model`` on ``data`` (full ranking, history masked)."""
    model.eval()
    max_len = int(model.config.max_len)  # type: ignore[union-attr,arg-type]
    with torch.no_grad():
        # trim: exact for every model here (invariant to left padding, shared.training)
        out = evaluate_ranking(score_fn(model, candidates), data, max_len, trim=True)
    return {k: round(float(v), 5) for k, v in out.items() if k in ("ndcg@10", "hr@10", "n_users")}


def main() -> None:
    """Hold items out, train and score every model, print JSON lines and a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/amazon_s3rec/Beauty.txt"))
    ap.add_argument("--format", default="s3rec")
    ap.add_argument(
        "--cold-share", type=float, default=0.1, help="share of attributed items held out"
    )
    ap.add_argument("--time-budget", type=float, default=600.0, help="seconds per GRU training")
    ap.add_argument("--epochs", type=int, default=None, help="override the GRU's epochs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated model names to run (default all)")
    args = ap.parse_args()

    started = time.perf_counter()
    dataset = read_dataset(args.data, args.format)
    vocab, split = prepare_split(dataset.events)
    attrs, _ = attribute_matrix(vocab, dataset.item_attributes)
    with_attrs = np.flatnonzero(attrs.any(axis=1))
    rng = np.random.default_rng(args.seed)
    chosen = rng.choice(with_attrs, size=round(args.cold_share * len(with_attrs)), replace=False)
    cold = np.zeros(vocab.n_items + 1, dtype=bool)
    cold[chosen] = True
    train_split, cold_test, warm_test = cold_split(split, cold)
    known = ~cold
    known[0] = False
    counts = np.bincount(train_split.train.items, minlength=vocab.n_items + 1).astype(np.float64)
    header = {
        "dataset": args.data.name,
        "items": vocab.n_items,
        "items_with_attributes": len(with_attrs),
        "cold_items": int(cold.sum()),
        "cold_test_shoppers": len(cold_test),
        "warm_test_shoppers": len(warm_test),
        "cold_items_with_a_training_event": int((counts[cold] > 0).sum()),
    }
    print(json.dumps({"setup": header}), flush=True)

    wanted = {m for m in args.only.split(",") if m}
    rows: list[dict[str, Any]] = []

    def report(name: str, model: torch.nn.Module, seconds: float) -> None:
        row = {
            "model": name,
            "cold_among_new": evaluate(model, cold_test, cold),
            "cold_full_catalogue": evaluate(model, cold_test, None),
            "warm_full_catalogue": evaluate(model, warm_test, None),
            "train_seconds": round(seconds, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    log_counts = np.log1p(counts)
    for name in ("popularity", "attribute-popularity"):
        if wanted and name not in wanted:
            continue
        pop = build_model("pop", {"n_items": vocab.n_items, "max_len": 50})
        assert isinstance(pop, Popularity)
        pop.fit_counts(train_split.train.items)
        if name == "attribute-popularity":
            scores = np.where(known, log_counts, attribute_mean(log_counts, known, attrs))
            scores[0] = 0.0
            with torch.no_grad():
                pop.head.bias.copy_(torch.from_numpy(scores).float())
        report(name, pop, 0.0)

    train_config = replace(
        default_train_config("gru"),
        time_budget_s=args.time_budget,
        threads=args.threads,
        seed=args.seed,
        **({"epochs": args.epochs} if args.epochs else {}),
    )
    for name in ("gru-id", "gru-attributes"):
        if wanted and name not in wanted:
            continue
        torch.manual_seed(args.seed)
        model = build_model("gru", default_model_config("gru", vocab.n_items))
        assert isinstance(model, GRU4Rec)
        if name == "gru-attributes":
            init_item_tables(model, vocab, dataset.item_attributes, ("input", "output"))
            model.item_emb.weight.requires_grad_(False)
            model.head.weight.requires_grad_(False)
        t0 = time.perf_counter()
        train_model(model, train_split, train_config)
        seconds = time.perf_counter() - t0
        if name == "gru-attributes":
            bias = model.head.bias.detach().double().numpy()
            filled = np.where(known, bias, attribute_mean(bias, known, attrs))
            with torch.no_grad():
                model.head.bias.copy_(torch.from_numpy(filled).float())
        report(name, model, seconds)

    print(
        "\n| model | cold, among new items NDCG@10 / HR@10 | cold, full catalogue NDCG@10 "
        "| warm, full catalogue NDCG@10 | train s |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        a, f, w = r["cold_among_new"], r["cold_full_catalogue"], r["warm_full_catalogue"]
        print(
            f"| {r['model']} | {a['ndcg@10']:.4f} / {a['hr@10']:.4f} | {f['ndcg@10']:.4f} | "
            f"{w['ndcg@10']:.4f} | {r['train_seconds']:.0f} |"
        )
    print(
        f"\n{header['cold_items']} new items, {header['cold_test_shoppers']} cold and "
        f"{header['warm_test_shoppers']} warm test shoppers; "
        f"{time.perf_counter() - started:.0f} s, "
        f"load {[round(x, 2) for x in os.getloadavg()]}"
    )


if __name__ == "__main__":
    main()
