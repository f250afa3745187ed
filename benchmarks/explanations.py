"""Are the edge's reasons faithful to the model, and what do they cost per request?

Trains a GRU4Rec on synthetic shopping logs, saves it as a model directory (with its
``explain.npz``) and serves it as the edge does. For test shoppers with two or more distinct
items in their input, the top-10 comes from the serving graph and each item's reason from
`edge_client.explain` (the history item after which the model alone scores it highest).
Faithfulness is an ablation with the torch model: delete the credited item from the
shopper's input and see whether the recommended item leaves the top-10, against deleting
another history item instead (one drawn at random, and the most recent one: the naive
reason "because you just viewed X").

Cost: `Recommender.recommend` (store reads + ORT + reasons) in-process on a real
``site.db``, with the explainer and with it removed, interleaved request by request.

Example: .venv/bin/python benchmarks/explanations.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / "state" / "bench" / "explanations"
MODEL = {"dim": 64, "hidden": 64, "max_len": 50, "dropout": 0.25}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shoppers", type=int, default=2000)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eval", type=int, default=1000, help="test shoppers ablated")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.shoppers, args.items, args.epochs, args.eval, args.requests = 600, 600, 4, 300, 500
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from edge_client.inference import load_model, set_current_version
    from edge_client.recommend import Recommender
    from edge_client.store import EventStore
    from shared.artifacts import save_model_dir
    from shared.models import build_model
    from shared.sequences import serving_input
    from shared.synth import SynthConfig, generate_synthetic
    from shared.training import TrainConfig, prepare_split, train_model

    root = STATE / "site"
    shutil.rmtree(root, ignore_errors=True)
    cfg = SynthConfig(
        n_sites=2,
        shoppers_per_site=args.shoppers // 2,
        n_items=args.items,
        n_categories=20,
        events_per_shopper=30.0,
        seed=1,
    )
    events = generate_synthetic(cfg).events
    vocab, split = prepare_split(events)
    torch.manual_seed(0)
    model = build_model("gru", {"n_items": vocab.n_items, **MODEL})
    result = train_model(model, split, TrainConfig(epochs=args.epochs, device="cpu", patience=3))
    save_model_dir(root / "models" / "v1", model, vocab, version="v1")
    set_current_version(root / "models", "v1")
    served = load_model(root / "models" / "v1")
    explainer = served.explainer
    assert explainer is not None
    model.eval()
    rng = np.random.default_rng(0)

    def top10(inputs: np.ndarray, exclude: list[np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.from_numpy(inputs))[:, -1, :].numpy()  # (B, V)
        logits[:, 0] = -np.inf
        for row, ex in enumerate(exclude):
            logits[row, ex] = -np.inf
        return np.argsort(-logits, axis=1, kind="stable")[:, :10]

    histories = split.test.histories.item_lists()
    cases = {"credited": [0, 0], "random other": [0, 0], "most recent": [0, 0]}
    # the same, only where the credited item is not the most recent one
    differ = {"credited": [0, 0], "random other": [0, 0], "most recent": [0, 0]}
    differs_from_recent = 0
    pairs = 0
    scored = 0
    for history in histories:
        hist = np.asarray(history[-served.max_len :], dtype=np.int64)
        if len(np.unique(hist)) < 2 or scored >= args.eval:
            continue
        scored += 1
        exclude = np.unique(hist)
        _, ids = served.rank(hist, exclude)
        recommended = ids[:10]
        credited = explainer.attribute(hist, recommended)
        for r, pos in zip(recommended.tolist(), credited.tolist(), strict=True):
            others = [p for p in range(len(hist)) if hist[p] != hist[pos]]
            recent = len(hist) - 1 if hist[-1] != hist[pos] else (others[-1] if others else None)
            drops = {
                "credited": pos,
                "random other": int(rng.choice(others)) if others else None,
                "most recent": recent,
            }
            pairs += 1
            not_recent = bool(hist[pos] != hist[-1])
            differs_from_recent += int(not_recent)
            for name, p in drops.items():
                if p is None:
                    continue
                kept = hist[hist != hist[p]]  # every occurrence of that item goes
                top = top10(serving_input(kept, served.max_len), [exclude])[0]
                left = int(r not in top)
                cases[name][0] += left
                cases[name][1] += 1
                if not_recent:
                    differ[name][0] += left
                    differ[name][1] += 1

    # cost per request: recommend() with and without the explainer, interleaved
    store = EventStore(root / "site.db", synchronous="NORMAL")
    store.import_events(events)
    plain = dataclasses.replace(served, explainer=None)

    class Fixed:
        def __init__(self, m: Any) -> None:
            self.current = m

    with_reasons = Recommender(store, Fixed(served))  # type: ignore[arg-type]
    without = Recommender(store, Fixed(plain))  # type: ignore[arg-type]
    users = events["user_id"].astype(str).unique().tolist()
    laps: dict[str, list[float]] = {"with reasons": [], "without": []}
    for i in range(args.requests):
        user = users[i % len(users)]
        pair = ((with_reasons, "with reasons"), (without, "without"))
        for rec, name in pair if i % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            rec.recommend(user, 10)
            laps[name].append(time.perf_counter() - start)
    store.close()
    p50 = {k: float(np.percentile(v[50:], 50) * 1000) for k, v in laps.items()}
    p99 = {k: float(np.percentile(v[50:], 99) * 1000) for k, v in laps.items()}

    out: dict[str, Any] = {
        "data": f"synthetic, {cfg.n_sites} sites x {cfg.shoppers_per_site} shoppers, "
        f"{vocab.n_items} items in the data",
        "test_ndcg@10": result.test["ndcg@10"],
        "shoppers": scored,
        "recommendations": pairs,
        "left_top10_when_removed": {k: v[0] / max(1, v[1]) for k, v in cases.items()},
        "left_top10_when_removed_credited_not_recent": {
            k: v[0] / max(1, v[1]) for k, v in differ.items()
        },
        "credited_is_not_the_most_recent": differs_from_recent / max(1, pairs),
        "recommend_ms_p50": p50,
        "recommend_ms_p99": p99,
        "load_average": os.getloadavg()[0],
    }
    print(
        f"\n{out['data']}; GRU4Rec test NDCG@10 {out['test_ndcg@10']:.4f}; "
        f"{scored} shoppers, {pairs} recommendations"
    )
    print(
        f"{'history item removed':<22} | share of recommendations that leave the top-10: "
        "all | where the credited item is not the most recent"
    )
    subset = out["left_top10_when_removed_credited_not_recent"]
    for name, share in out["left_top10_when_removed"].items():
        print(f"{name:<22} | {share:.3f} | {subset[name]:.3f}")
    share = out["credited_is_not_the_most_recent"]
    print(f"credited item is not the shopper's most recent item: {share:.3f}")
    print(
        f"recommend() p50 / p99 ms: with reasons {p50['with reasons']:.3f} / "
        f"{p99['with reasons']:.3f}, without {p50['without']:.3f} / {p99['without']:.3f} "
        f"(load {out['load_average']:.1f})"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
