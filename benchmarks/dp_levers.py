"""EXPLORATORY: which levers make user-level DP useful on Beauty (no Flower, one process).

This is a research script, not the product. It calls the functions the production code
uses (`edge_client.dp_sgd.DPSGDEngine`, `poisson_batches`, `edge_client.privacy_ledger`
accounting, `shared.training.evaluate_model`) on the whole Beauty population at once.

Why one process stands for the federation: distributed DP-FedSGD (every site clips each of
its sampled shoppers' gradients, adds N(0, sigma^2 C^2 / m), the SecAgg+ sum carries
N(0, sigma^2 C^2); the server divides by q N and takes an Adam step) computes *exactly* the
same update distribution as central DP-SGD over the union of the sites' shoppers with
Poisson rate q and noise sigma C, whatever the split into sites. So the levers can be
compared here in minutes; the final figures come from `fedrec sim run` (docs/results.md).

Every run prints one JSON line: the settings, the epsilon (PRV) actually composed, test and
validation NDCG@10/HR@10 of the final model, seconds.

Example:
    .venv/bin/python benchmarks/dp_levers.py --epsilon 8 --q 0.1 --rounds 50 --dim 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

BEAUTY = Path("/work/shared/data/amazon_s3rec/Beauty.txt")
CACHE = Path("state/cache/beauty_split.pkl")


@dataclass
class Data:
    """The Beauty split, the catalogue's attribute matrix and the DP training examples."""

    split: Any
    n_items: int
    attr_rows: list[list[int]]  # per item index (1..V): attribute ids (0..A-1)
    n_attrs: int


def load(path: Path = BEAUTY) -> Data:
    """Read Beauty once (cached under state/)."""
    if CACHE.is_file():
        with CACHE.open("rb") as fh:
            cached: Data = pickle.load(fh)
        return cached
    from shared.readers import read_dataset
    from shared.training import prepare_split

    dataset = read_dataset(path, "s3rec")
    vocab, split = prepare_split(dataset.events)
    attrs = sorted({a for v in dataset.item_attributes.values() for a in v})
    index = {a: i for i, a in enumerate(attrs)}
    rows: list[list[int]] = [[]]
    for item in vocab.item_ids:
        rows.append([index[a] for a in dataset.item_attributes.get(item, [])])
    data = Data(split=split, n_items=vocab.n_items, attr_rows=rows, n_attrs=len(attrs))
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with CACHE.open("wb") as fh:
        pickle.dump(data, fh)
    return data


def attribute_vectors(data: Data, dim: int) -> torch.Tensor:
    """(V + 1, dim) item vectors from public attributes: rank-``dim`` SVD of the item x
    attribute matrix (rows L2-normalised), so dot products approximate attribute overlap.
    Row 0 (padding) is zero. Uses the catalogue only: no behaviour, no privacy cost."""
    n_items = data.n_items
    m = np.zeros((n_items + 1, data.n_attrs), dtype=np.float64)
    for i, row in enumerate(data.attr_rows):
        if row:
            m[i, row] = 1.0 / math.sqrt(len(row))
    u, s, _ = np.linalg.svd(m[1:], full_matrices=False)
    k = min(dim, len(s))
    vec = np.zeros((n_items + 1, dim))
    vec[1:, :k] = u[:, :k] * s[:k]
    return torch.from_numpy(vec).float()


def dp_popularity(
    data: Data, max_len: int, cap: int, sigma: float, gen: torch.Generator
) -> torch.Tensor:
    """log(1 + noisy weighted count) per item: each shopper adds 1/sqrt(k) to each of the k
    (at most ``cap``) distinct items of their last ``max_len`` + 1 training events, so their
    contribution has L2 norm 1; Gaussian noise of std sigma. One Gaussian mechanism (q = 1,
    one step), rescaled so that the noise-free total equals the events counted."""
    counts = torch.zeros(data.n_items + 1, dtype=torch.float64)
    for seq in data.split.train.item_lists():
        tail = seq[-(max_len + 1) :]
        items = list(dict.fromkeys(tail.tolist()))[-cap:]
        counts[items] += 1.0 / math.sqrt(len(items))
    noisy = counts + torch.randn(len(counts), generator=gen, dtype=torch.float64) * sigma
    noisy[0] = 0.0
    return torch.log1p(noisy.clamp(min=0.0)).float()


def build(args: argparse.Namespace, data: Data, bias: torch.Tensor | None) -> torch.nn.Module:
    """GRU4Rec with the lever's item vectors, frozen parts and output bias."""
    from shared.models import build_model
    from shared.models.gru4rec import GRU4Rec

    torch.manual_seed(args.seed)
    model = build_model(
        "gru",
        {
            "n_items": data.n_items,
            "max_len": args.max_len,
            "dim": args.dim,
            "hidden": args.dim,
            "dropout": args.dropout,
        },
    )
    assert isinstance(model, GRU4Rec)
    if args.items in ("attr", "attr-frozen"):
        vec = attribute_vectors(data, args.dim)
        vec = vec / vec[1:].norm(dim=1).mean() * args.attr_scale
        with torch.no_grad():
            model.item_emb.weight.copy_(vec)
            if args.head_attr:
                model.head.weight.copy_(vec)
        if args.items == "attr-frozen":
            model.item_emb.weight.requires_grad_(False)
            if args.head_attr and not args.train_head:
                model.head.weight.requires_grad_(False)
    if bias is not None:
        with torch.no_grad():
            model.head.bias.copy_(bias)
        if args.freeze_bias:
            model.head.bias.requires_grad_(False)
    if args.freeze_gru:
        for p in model.gru.parameters():
            p.requires_grad_(False)
    return model


def main() -> None:
    """Parse the lever settings, train with DP-SGD over the union, print one JSON line."""
    from edge_client.dp_sgd import DPSGDEngine, poisson_batches, seeded_generator
    from edge_client.privacy_ledger import Mechanism, compose, noise_for_epsilon
    from shared.sequences import next_item_examples
    from shared.training import evaluate_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilon", type=float, default=8.0, help="0 = no DP")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--q", type=float, default=0.1, help="Poisson rate per round")
    ap.add_argument("--rounds", type=int, default=50, help="DP-SGD steps (one per round)")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=20)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--items", choices=["id", "attr", "attr-frozen"], default="id")
    ap.add_argument("--head-attr", action="store_true", help="head rows = attribute vectors")
    ap.add_argument("--attr-scale", type=float, default=1.0)
    ap.add_argument("--train-head", action="store_true", help="attr head rows stay trainable")
    ap.add_argument("--freeze-bias", action="store_true")
    ap.add_argument("--freeze-gru", action="store_true")
    ap.add_argument("--pop-sigma", type=float, default=0.0, help="0 = no popularity prior")
    ap.add_argument("--pop-cap", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    data = load()
    inputs, targets = next_item_examples(data.split.train, args.max_len)
    n = len(inputs)
    gen = seeded_generator(args.seed + 1)
    bias = None
    mechanisms: list[Mechanism] = []
    if args.pop_sigma > 0:
        bias = dp_popularity(data, args.max_len, args.pop_cap, args.pop_sigma, gen)
        mechanisms.append(Mechanism(args.pop_sigma, 1.0, 1))
    model = build(args, data, bias)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sigma = 0.0
    if args.epsilon > 0:
        # the DP-SGD part gets what the popularity release leaves (PRV, bisection)
        lo, hi = 0.3, 50.0
        base = noise_for_epsilon(args.epsilon, args.delta, args.q, args.rounds)
        if not mechanisms:
            sigma = base
        else:
            lo = base
            while compose([*mechanisms, Mechanism(hi, args.q, args.rounds)], args.delta)[0] > (
                args.epsilon
            ):
                hi *= 2
            for _ in range(20):
                mid = math.sqrt(lo * hi)
                eps = compose([*mechanisms, Mechanism(mid, args.q, args.rounds)], args.delta)[0]
                lo, hi = (mid, hi) if eps > args.epsilon else (lo, mid)
            sigma = hi
        mechanisms.append(Mechanism(sigma, args.q, args.rounds))
    spent = compose(mechanisms, args.delta) if mechanisms else None
    history = []
    t_train = time.perf_counter()
    if args.epsilon > 0:
        engine = DPSGDEngine(
            model,
            lr=args.lr,
            max_grad_norm=args.clip,
            noise_multiplier=sigma,
            expected_batch_size=args.q * n,
            noise_generator=seeded_generator(args.seed + 2),
            device=torch.device("cpu"),
        )
        sampler = seeded_generator(args.seed + 3)
        for r, rows in enumerate(poisson_batches(n, args.q, args.rounds, sampler), start=1):
            engine.step(inputs[rows], targets[rows])
            if args.eval_every and r % args.eval_every == 0 and r < args.rounds:
                model.load_state_dict(engine.state_dict())
                v = evaluate_model(model, data.split.valid)
                history.append((r, round(v["ndcg@10"], 5)))
                print(json.dumps({"round": r, "valid_ndcg@10": v["ndcg@10"]}), flush=True)
        model.load_state_dict(engine.state_dict())
    else:
        from shared.training import sequence_loss, trim_left

        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        rng = np.random.default_rng(args.seed)
        for r in range(1, args.rounds + 1):
            rows = np.flatnonzero(rng.random(n) < args.q)
            x, y = trim_left(inputs[rows], targets[rows])
            model.train()
            loss = sequence_loss(model, torch.from_numpy(x), torch.from_numpy(y))
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            if args.eval_every and r % args.eval_every == 0 and r < args.rounds:
                v = evaluate_model(model, data.split.valid)
                history.append((r, round(v["ndcg@10"], 5)))
                print(json.dumps({"round": r, "valid_ndcg@10": v["ndcg@10"]}), flush=True)
    train_seconds = time.perf_counter() - t_train
    test = evaluate_model(model, data.split.test)
    valid = evaluate_model(model, data.split.valid)
    out = {
        "tag": args.tag,
        **{k: v for k, v in vars(args).items() if k not in ("tag",)},
        "shoppers": n,
        "trainable": trainable,
        "sigma": round(sigma, 4),
        "epsilon_prv": round(spent[0], 3) if spent else None,
        "epsilon_rdp": round(spent[1], 3) if spent else None,
        "test_ndcg@10": round(test["ndcg@10"], 5),
        "test_hr@10": round(test["hr@10"], 5),
        "valid_ndcg@10": round(valid["ndcg@10"], 5),
        "history": history,
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "load": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
