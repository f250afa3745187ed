"""Event ingestion of the edge: bulk import and HTTP ingest, side by side in one run.

1. Bulk import of a synthetic canonical event frame into a fresh ``site.db`` with
   `EventStore.import_events` (generated ids, then client-supplied ids), a repeated import
   (every row a duplicate), and the same rows through sqlite-utils' ``insert_all`` into the
   same schema as the baseline.
2. HTTP ingest into `fedrec edge serve` (its own process) from `edge_loadgen.py` (another
   process): batches of 500 and of 1 event per request with SQLite ``synchronous=FULL``
   (the default: an acknowledged event survives power loss), and batches of 1 with
   ``NORMAL`` (survives a crash of the process) for the price of FULL.

Example: .venv/bin/python benchmarks/edge_ingest.py --quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.edge_common import (
    STATE,
    edge_server,
    load_average,
    run_loadgen,
    synthetic_events,
)

T0_S = 1_700_000_000


def bulk(n_events: int) -> dict[str, Any]:
    """events/s of import_events (two id modes), a re-import, and sqlite-utils insert_all."""
    from sqlite_utils import Database

    from edge_client.store import EventStore

    root = STATE / "ingest"
    shutil.rmtree(root, ignore_errors=True)
    frame = synthetic_events(n_events // 40, 40, 50_000, seed=3)
    out: dict[str, Any] = {"events": n_events, "load_before": load_average()}

    def timed(name: str, db: Path, fn: Any) -> None:
        with EventStore(db) as store:
            start = time.perf_counter()
            result = fn(store)
            seconds = time.perf_counter() - start
        out[name] = {"seconds": seconds, "events_per_s": n_events / seconds, "result": result}

    timed("import_generated_ids", root / "a.db", lambda s: s.import_events(frame).accepted)
    timed("reimport_duplicates", root / "a.db", lambda s: s.import_events(frame).duplicates)
    with_ids = frame.assign(
        event_id=[f"{x:032x}" for x in np.random.default_rng(4).integers(0, 2**63, n_events)]
    )
    timed("import_client_ids", root / "b.db", lambda s: s.import_events(with_ids).accepted)
    # Baseline: the same rows, same schema and indexes, through sqlite-utils' insert_all.
    EventStore(root / "c.db").close()
    db = Database(root / "c.db")
    rows: list[dict[str, Any]] = [
        {**{str(k): v for k, v in r.items()}, "value": None}
        for r in with_ids.assign(received_ms=0).to_dict("records")
    ]
    start = time.perf_counter()
    with db.atomic():
        db.table("events").insert_all(rows, batch_size=1000)
    seconds = time.perf_counter() - start
    db.close()
    out["sqlite_utils_insert_all"] = {"seconds": seconds, "events_per_s": n_events / seconds}
    out["load_after"] = load_average()
    return out


def write_bodies(path: Path, n_requests: int, batch: int, prefix: str) -> None:
    """One JSON request body a line, each with ``batch`` events of unique ids."""
    rng = np.random.default_rng(5)
    with path.open("w") as fh:
        for r in range(n_requests):
            items = rng.integers(1, 50_001, batch)
            users = rng.integers(0, 20_000, batch)
            events = [
                {
                    "event_id": f"{prefix}-{r}-{j}",
                    "user_id": f"u{users[j]}",
                    "item_id": str(items[j]),
                    "event_type": "view",
                    "timestamp": T0_S + r,
                }
                for j in range(batch)
            ]
            body = events[0] if batch == 1 else {"events": events}
            fh.write(json.dumps(body, separators=(",", ":")) + "\n")


def http(duration: float, warmup: float) -> dict[str, Any]:
    """HTTP ingest: batch 500 and batch 1 with FULL, batch 1 with NORMAL."""
    root = STATE / "ingest-http"
    shutil.rmtree(root, ignore_errors=True)
    (root / "models").mkdir(parents=True)
    seconds = duration + warmup + 1
    runs = {
        "b500_full": (500, 4, "FULL", int(seconds * 100)),  # up to 50k events/s
        "b1_full": (1, 16, "FULL", int(seconds * 20_000)),
        "b1_normal": (1, 16, "NORMAL", int(seconds * 20_000)),
    }
    out: dict[str, Any] = {}
    for name, (batch, concurrency, sync, n_requests) in runs.items():
        bodies = root / f"{name}.jsonl"
        write_bodies(bodies, n_requests, batch, name)
        with edge_server(root, extra_env={"FEDREC_EDGE_SYNCHRONOUS": sync}) as port:
            result = run_loadgen(
                port,
                concurrency=concurrency,
                duration=duration,
                warmup=warmup,
                bodies=bodies,
            )
        bodies.unlink()
        result["batch"] = batch
        result["synchronous"] = sync
        result["events_per_s"] = float(result["rps"]) * batch  # type: ignore[arg-type]
        out[name] = result
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer events, shorter HTTP runs")
    parser.add_argument("--events", type=int, help="rows of the bulk import")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    n_events = args.events or (200_000 if args.quick else 1_000_000)
    duration, warmup = (4.0, 1.0) if args.quick else (10.0, 2.0)
    print(f"bulk import of {n_events:,} events ... load {load_average()}", flush=True)
    results = {"bulk": bulk(n_events)}
    print("HTTP ingest ...", flush=True)
    results["http"] = http(duration, warmup)
    b = results["bulk"]
    base = b["sqlite_utils_insert_all"]["events_per_s"]
    print(f"\nbulk import, {n_events:,} events into a fresh site.db (one transaction each)")
    print(f"{'how':<46} | {'events/s':>10} | {'vs insert_all':>13}")
    for key, label in (
        ("import_generated_ids", "import_events, content-derived ids"),
        ("import_client_ids", "import_events, client event ids"),
        ("reimport_duplicates", "import_events again (all duplicates)"),
        ("sqlite_utils_insert_all", "sqlite-utils insert_all (baseline, no counts)"),
    ):
        rate = b[key]["events_per_s"]
        print(f"{label:<46} | {rate:>10,.0f} | {rate / base:>12.2f}x")
    print(f"load average {b['load_before']} .. {b['load_after']}")
    h = results["http"]
    print("\nHTTP ingest (POST /v1/events, closed loop, load generator in its own process)")
    print(
        f"{'run':<28} | {'clients':>7} | {'req/s':>8} | {'events/s':>9} | {'p50 ms':>7} "
        f"{'p99 ms':>7} | {'non-200':>7} | load"
    )
    for key, label in (
        ("b500_full", "batch 500, FULL"),
        ("b1_full", "batch 1, FULL"),
        ("b1_normal", "batch 1, NORMAL"),
    ):
        r = h[key]
        bad = sum(v for s, v in r["statuses"].items() if s != "200")
        print(
            f"{label:<28} | {r['concurrency']:>7} | {r['rps']:>8,.0f} | "
            f"{r['events_per_s']:>9,.0f} | {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} | "
            f"{bad:>7} | {r['load']}"
        )
    ratio = h["b500_full"]["events_per_s"] / h["b1_full"]["events_per_s"]
    sync_cost = h["b1_normal"]["events_per_s"] / h["b1_full"]["events_per_s"]
    print(f"batch 500 vs batch 1 (FULL): {ratio:.1f}x events/s; NORMAL vs FULL: {sync_cost:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print(
        f"bulk_events_per_s={b['import_generated_ids']['events_per_s']:.0f} "
        f"http_events_per_s_b500={h['b500_full']['events_per_s']:.0f}"
    )


if __name__ == "__main__":
    main()
