"""Cold start for new shoppers: all-time vs recent ("trending") popularity, replayed in time.

A new shopper's first answer at the edge is the site's popularity, since the model has no
history to read. This replays a log with real timestamps in time order. At each shopper's
first event, the store holds every earlier event. The item of that first event is ranked by:

- **all-time**: event counts over the whole store (`EventStore.popularity`);
- **recent W days**: event counts of the last W UTC days (up to the day of the newest
  stored event), topped up from all-time when fewer than K items have events in the window
  (`edge_client.popularity`; `FEDREC_EDGE_POPULARITY_WINDOW_DAYS`, default 14).

Both rankings are computed side by side in one pass. The table gives HR@10 and NDCG@10 (a
single relevant item, so NDCG@10 = 1 / log2(rank + 1) inside the top 10) and the ratio to
all-time.

Example: .venv/bin/python benchmarks/new_shoppers.py --data ../shared/data/ml-100k --format ml100k
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from edge_client.store import DAY_MS
from shared.readers import read_dataset

K = 10


def top_k(counts: np.ndarray, fill: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``counts`` (ties: smaller index), topped up from ``fill``.

    The same order as the edge: most events first, ties by item, items without events in
    the window after those with events, in all-time order.
    """
    order = top_k_all(counts, k)
    if len(order) < k:
        taken = set(order)
        order += [i for i in top_k_all(fill, 2 * k) if i not in taken][: k - len(order)]
    return np.asarray(order, dtype=np.int64)


def top_k_all(counts: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` largest counts, ties by smaller index (all-time popularity)."""
    nonzero = np.flatnonzero(counts)
    return nonzero[np.lexsort((nonzero, -counts[nonzero]))][:k].tolist()


def replay(
    items: np.ndarray, users: np.ndarray, ts: np.ndarray, windows: list[int]
) -> dict[str, Any]:
    """Per ranking: HR@10 and NDCG@10 over every shopper's first event (events in time order).

    A window of W days holds the events of the W UTC days up to the day of the newest
    stored event, as `EventStore.recent_popularity` counts them.
    """
    n_items = int(items.max()) + 1
    days = ts // DAY_MS
    all_time = np.zeros(n_items, dtype=np.int64)
    recent = {w: np.zeros(n_items, dtype=np.int64) for w in windows}
    expiry = dict.fromkeys(windows, 0)  # index of the oldest event still in each window
    seen: set[Any] = set()
    scores: dict[str, list[float]] = {"all-time": [], **{f"recent {w} d": [] for w in windows}}
    for i in range(len(items)):
        if i > 0:
            newest_day = days[i - 1]
            for w in windows:
                j = expiry[w]
                while j < i and days[j] <= newest_day - w:
                    recent[w][items[j]] -= 1
                    j += 1
                expiry[w] = j
        if users[i] not in seen and i > 0:
            target = items[i]
            ranked = {"all-time": np.asarray(top_k_all(all_time, K))}
            for w in windows:
                ranked[f"recent {w} d"] = top_k(recent[w], all_time, K)
            for name, order in ranked.items():
                hit = np.flatnonzero(order == target)
                scores[name].append(1.0 / math.log2(hit[0] + 2) if len(hit) else 0.0)
        seen.add(users[i])
        all_time[items[i]] += 1
        for w in windows:
            recent[w][items[i]] += 1
    out = {}
    for name, s in scores.items():
        arr = np.asarray(s)
        out[name] = {"n": len(arr), "hr@10": float(np.mean(arr > 0)), "ndcg@10": float(arr.mean())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--format", default="ml100k")
    parser.add_argument("--windows", default="1,7,14,30", help="window lengths in whole days")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    dataset = read_dataset(args.data, args.format)
    if dataset.timestamps != "real":
        raise SystemExit(f"{dataset.name} has no real timestamps: nothing to replay in time")
    events = dataset.events.reset_index(drop=True)
    order = np.lexsort((np.arange(len(events)), events["ts_ms"].to_numpy()))  # stable by time
    events = events.iloc[order]
    item_index = {item: k for k, item in enumerate(sorted(events["item_id"].unique()))}
    items = events["item_id"].map(item_index).to_numpy(np.int64)
    users = events["user_id"].to_numpy()
    ts = events["ts_ms"].to_numpy(np.int64)
    windows = [int(w) for w in args.windows.split(",")]
    span_days = (ts[-1] - ts[0]) / DAY_MS
    print(
        f"{dataset.name}: {len(events):,} events, {len(item_index):,} items, "
        f"{len(set(users.tolist())):,} shoppers over {span_days:.0f} days"
    )
    results = replay(items, users, ts, windows)
    base = results["all-time"]
    print(f"\n{'ranking':<16} {'shoppers':>8} {'HR@10':>7} {'NDCG@10':>8} {'vs all-time':>12}")
    for name, r in results.items():
        ratio = r["ndcg@10"] / base["ndcg@10"] if base["ndcg@10"] else float("nan")
        print(f"{name:<16} {r['n']:>8} {r['hr@10']:>7.4f} {r['ndcg@10']:>8.4f} {ratio:>11.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"dataset": dataset.name, "results": results}, indent=2))


if __name__ == "__main__":
    main()
