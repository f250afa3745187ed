"""Recommendation latency of the edge service, in-process and over HTTP, side by side.

For each catalogue size (10k, 50k and 100k items, or only ``--items``) it builds a site: a
GRU4Rec (dim 64, hidden 64, max_len 50; weights at their seeded random initialisation) saved
as a real model directory, and a store of synthetic shoppers. Then, in one run:

1. in-process: the ONNX Runtime ranking alone and the same serving graph in torch eager
   (1 thread, inference mode), timed in alternating blocks on the same histories;
   the whole `Recommender.recommend` (store reads + ORT); ORT with 2 threads; ratios
   torch / ORT;
2. int8: `onnxruntime.quantization.quantize_dynamic` (QInt8 weights): file size, latency
   and the mean (and worst) top-10 overlap with fp32 over real store histories;
3. over HTTP: `fedrec edge serve` in its own process, loaded by `edge_loadgen.py` in
   another: 1 client and 32 clients in closed loop (throughput), and 32 clients in open loop
   at 800 requests/s offered (latency at that rate, coordinated omission included).

The last line is ``p99_ms=<HTTP p99 at 800 req/s from 32 clients> rps=<closed-loop
requests/s with 32 clients> onnx_vs_torch=<torch eager p50 / ORT p50>`` for the last size.

Example: .venv/bin/python benchmarks/edge_latency.py --items 50000 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.edge_common import (
    STATE,
    Site,
    edge_server,
    load_average,
    percentiles,
    run_loadgen,
    synthetic_events,
)

SIZES = (10_000, 50_000, 100_000)
MAX_LEN = 50
OPEN_LOOP_RATE = 800.0


def build_site(n_items: int, n_users: int, events_per_user: int) -> Site:
    """A fresh site directory with a served random-init GRU4Rec and a filled store."""
    import torch

    from edge_client.inference import set_current_version
    from edge_client.store import EventStore
    from shared.artifacts import save_model_dir
    from shared.models import build_model
    from shared.vocab import ItemVocab

    root = STATE / f"latency-{n_items}"
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    model = build_model(
        "gru", {"n_items": n_items, "max_len": MAX_LEN, "dim": 64, "hidden": 64, "dropout": 0.0}
    )
    vocab = ItemVocab.from_items(str(i) for i in range(1, n_items + 1))
    save_model_dir(root / "models" / "v1", model, vocab, version="v1")
    set_current_version(root / "models", "v1")
    with EventStore(root / "site.db") as store:
        store.import_events(synthetic_events(n_users, events_per_user, n_items))
    users = [f"u{i}" for i in np.random.default_rng(1).permutation(n_users)]
    return Site(root, n_items, users)


def _time(fn: Any, inputs: list[Any], warmup: int = 20) -> tuple[float, float]:
    for x in inputs[:warmup]:
        fn(x)
    laps = []
    clock = time.perf_counter
    for x in inputs:
        start = clock()
        fn(x)
        laps.append(clock() - start)
    return percentiles(laps)


def _time_side_by_side(
    fns: dict[str, Any], inputs: dict[str, list[Any]], block: int = 50, warmup: int = 20
) -> dict[str, tuple[float, float]]:
    """`_time` of several functions on the same requests, alternating block by block.

    Blocks of ``block`` calls take turns, so a burst of load from elsewhere on the shared
    machine slows every function alike, while within a block each runs with its own weights
    in cache, as a server running only that function would.
    """
    names = list(fns)
    n = min(len(inputs[k]) for k in names)
    laps: dict[str, list[float]] = {k: [] for k in names}
    clock = time.perf_counter
    for lo in range(0, n, block):
        for k in names:
            fn, xs = fns[k], inputs[k]
            for x in xs[lo : lo + min(warmup, block)]:
                fn(x)  # refill the cache after the other functions' blocks
            for x in xs[lo : lo + block]:
                start = clock()
                fn(x)
                laps[k].append(clock() - start)
    return {k: percentiles(v) for k, v in laps.items()}


def in_process(site: Site, n_requests: int, n_overlap: int) -> dict[str, Any]:
    """ORT vs torch vs int8 on the same histories, and the full recommend path."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edge_client.inference import ModelServer, session_options
    from edge_client.recommend import Recommender
    from edge_client.store import EventStore
    from shared.artifacts import load_model_dir
    from shared.onnx_export import OUTPUT_NAMES, ServingGraph
    from shared.sequences import serving_input

    torch.set_num_threads(1)
    out: dict[str, Any] = {"load_before": load_average()}
    server = ModelServer(site.models)
    server.check()
    model = server.current
    assert model is not None
    store = EventStore(site.db)
    rec = Recommender(store, server)
    users = (site.users * (n_requests // len(site.users) + 1))[:n_requests]
    feeds = []
    for user in users:
        items = serving_input(rec.history(model, user), model.max_len)
        excl = model.known(store.purchased_items(user))
        feeds.append({"items": items, "exclude": excl.reshape(1, -1) if len(excl) else None})
    for f in feeds:
        if f["exclude"] is None:
            f["exclude"] = np.zeros((1, 1), dtype=np.int64)

    def ort_run(session: Any) -> Any:
        return lambda f: session.run(OUTPUT_NAMES, f)

    out["recommend"] = _time(lambda u: rec.recommend(u, 10), users)
    two = ort.InferenceSession(
        str(model.path / "model.onnx"), session_options(2), providers=["CPUExecutionProvider"]
    )
    out["ort_2_threads"] = _time(ort_run(two), feeds)
    torch_model, _, _ = load_model_dir(model.path)
    graph = ServingGraph(torch_model, model.top_k).eval()  # type: ignore[arg-type]
    torch_feeds = [(torch.from_numpy(f["items"]), torch.from_numpy(f["exclude"])) for f in feeds]

    def torch_run(f: tuple[Any, Any]) -> Any:
        with torch.inference_mode():
            return graph(*f)

    # int8: dynamic quantization of the weights (the GRU op itself stays fp32)
    q_path = site.root / "model.int8.onnx"
    start = time.perf_counter()
    quantize_dynamic(str(model.path / "model.onnx"), str(q_path), weight_type=QuantType.QInt8)
    out["quantize_s"] = time.perf_counter() - start
    q_session = ort.InferenceSession(
        str(q_path), session_options(1), providers=["CPUExecutionProvider"]
    )
    paired = _time_side_by_side(
        {"ort": ort_run(model.session), "torch": torch_run, "int8": ort_run(q_session)},
        {"ort": feeds, "torch": torch_feeds, "int8": feeds},
    )
    out["ort"], out["torch"], out["int8"] = paired["ort"], paired["torch"], paired["int8"]
    out["onnx_vs_torch"] = out["torch"][0] / out["ort"][0]
    out["onnx_vs_torch_p99"] = out["torch"][1] / out["ort"][1]
    out["fp32_mb"] = (model.path / "model.onnx").stat().st_size / 1e6
    out["int8_mb"] = q_path.stat().st_size / 1e6
    overlaps = []
    for f in feeds[:n_overlap]:
        top = set(model.session.run(OUTPUT_NAMES, f)[1][0, :10].tolist())
        q_top = set(q_session.run(OUTPUT_NAMES, f)[1][0, :10].tolist())
        overlaps.append(len(top & q_top) / 10)
    out["overlap_mean"] = float(np.mean(overlaps))
    out["overlap_min"] = float(np.min(overlaps))
    out["overlap_n"] = len(overlaps)
    out["load_after"] = load_average()
    store.close()
    return out


def over_http(site: Site, duration: float, warmup: float, variants: bool) -> dict[str, Any]:
    """Closed loop with 1 and 32 clients, open loop at 800 req/s from 32 clients.

    With ``variants``, also 32 clients in closed loop against servers without request
    batching and with batching but ORT on the event loop's thread, and both 32-client runs
    against a server without the fast path (every request through FastAPI's routing), then
    the open loop once more with it, so drift of the shared machine shows (the ablation).
    """
    paths = site.root / "paths.txt"
    paths.write_text("\n".join(f"/v1/users/{u}/recommendations?k=10" for u in site.users))
    out: dict[str, Any] = {}
    with edge_server(site.root) as port:
        common = {"paths": paths, "duration": duration, "warmup": warmup}
        out["c1"] = run_loadgen(port, concurrency=1, **common)  # type: ignore[arg-type]
        out["c32"] = run_loadgen(port, concurrency=32, **common)  # type: ignore[arg-type]
        out["open800"] = run_loadgen(
            port,
            concurrency=32,
            rate=OPEN_LOOP_RATE,
            **common,  # type: ignore[arg-type]
        )
    if variants:
        for key, env in (
            ("c32_unbatched", {"FEDREC_EDGE_BATCH_INFERENCE": "false"}),
            ("c32_batched_inline", {"FEDREC_EDGE_INFERENCE_THREAD": "false"}),
        ):
            with edge_server(site.root, extra_env=env) as port:
                out[key] = run_loadgen(
                    port, concurrency=32, paths=paths, duration=duration, warmup=warmup
                )
        with edge_server(site.root, extra_env={"FEDREC_EDGE_FAST_PATH": "false"}) as port:
            common = {"paths": paths, "duration": duration, "warmup": warmup}
            out["c32_routed"] = run_loadgen(port, concurrency=32, **common)  # type: ignore[arg-type]
            out["open800_routed"] = run_loadgen(
                port,
                concurrency=32,
                rate=OPEN_LOOP_RATE,
                **common,  # type: ignore[arg-type]
            )
        with edge_server(site.root) as port:
            out["open800_again"] = run_loadgen(
                port,
                concurrency=32,
                rate=OPEN_LOOP_RATE,
                paths=paths,
                duration=duration,
                warmup=warmup,
            )
    return out


def print_tables(results: dict[int, dict[str, Any]]) -> None:
    """The in-process, int8 and HTTP tables."""
    print("\nin-process, one shopper per call (ms; ORT 1 intra-op thread, torch 1 thread)")
    print(
        f"{'items':>7} | {'ORT p50':>8} {'p99':>7} | {'recommend p50':>13} {'p99':>7} | "
        f"{'torch p50':>9} {'p99':>7} | {'torch/ORT':>9} | {'ORT 2thr p50':>12} | load"
    )
    for n, r in results.items():
        p = r["in_process"]
        print(
            f"{n:>7} | {p['ort'][0]:>8.3f} {p['ort'][1]:>7.3f} | {p['recommend'][0]:>13.3f} "
            f"{p['recommend'][1]:>7.3f} | {p['torch'][0]:>9.3f} {p['torch'][1]:>7.3f} | "
            f"{p['onnx_vs_torch']:>8.2f}x | {p['ort_2_threads'][0]:>12.3f} | "
            f"{p['load_before']}..{p['load_after']}"
        )
    print("\nint8 dynamic quantization (QInt8 weights) vs fp32, same histories")
    print(
        f"{'items':>7} | {'fp32 MB':>8} {'int8 MB':>8} | {'int8 p50':>8} {'p99':>7} | "
        f"{'fp32/int8 p50':>13} | {'top-10 overlap mean':>19} {'min':>5} {'n':>5}"
    )
    for n, r in results.items():
        p = r["in_process"]
        print(
            f"{n:>7} | {p['fp32_mb']:>8.2f} {p['int8_mb']:>8.2f} | {p['int8'][0]:>8.3f} "
            f"{p['int8'][1]:>7.3f} | {p['ort'][0] / p['int8'][0]:>12.2f}x | "
            f"{p['overlap_mean']:>19.3f} {p['overlap_min']:>5.2f} {p['overlap_n']:>5}"
        )
    print("\nover HTTP (uvicorn, 1 worker; load generator in its own process)")
    rows = [
        ("c1", "closed, 1 client"),
        ("c32", "closed, 32 clients"),
        ("open800", "open, 800/s, 32 clients"),
        ("c32_unbatched", "closed, 32, no batching"),
        ("c32_batched_inline", "closed, 32, batch, no thread"),
        ("c32_routed", "closed, 32, no fast path"),
        ("open800_routed", "open, 800/s, no fast path"),
        ("open800_again", "open, 800/s, again"),
    ]
    print(
        f"{'items':>7} | {'run':<28} | {'req/s':>7} | {'p50 ms':>7} {'p90 ms':>7} "
        f"{'p99 ms':>7} | {'non-200':>7} | {'unsent':>6} | load"
    )
    for n, r in results.items():
        for key, label in rows:
            if key not in r["http"]:
                continue
            h = r["http"][key]
            bad = sum(v for s, v in h["statuses"].items() if s != "200")
            print(
                f"{n:>7} | {label:<28} | {h['rps']:>7.0f} | {h['p50_ms']:>7.2f} "
                f"{h['p90_ms']:>7.2f} {h['p99_ms']:>7.2f} | {bad:>7} | {h['unsent']:>6} | "
                f"{h['load']}"
            )
        if "c32_unbatched" in r["http"]:
            base = r["http"]["c32_unbatched"]["rps"]
            print(
                f"{n:>7} | 32-client throughput vs no batching: batched "
                f"{r['http']['c32_batched_inline']['rps'] / base:.2f}x, batched + ORT thread "
                f"{r['http']['c32']['rps'] / base:.2f}x"
            )
            routed = r["http"]["c32_routed"]
            print(
                f"{n:>7} | fast path vs FastAPI routing: 32-client throughput "
                f"{r['http']['c32']['rps'] / routed['rps']:.2f}x, open-loop p99 "
                f"{r['http']['open800_routed']['p99_ms']:.1f} ms -> "
                f"{r['http']['open800']['p99_ms']:.1f} / "
                f"{r['http']['open800_again']['p99_ms']:.1f} ms"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, help="one catalogue size (default: 10k, 50k, 100k)")
    parser.add_argument("--quick", action="store_true", help="fewer requests, shorter HTTP runs")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sizes = (args.items,) if args.items else SIZES
    n_users, per_user = (1000, 40) if args.quick else (5000, 40)
    n_requests, n_overlap = (400, 200) if args.quick else (2000, 1000)
    duration, warmup = (4.0, 1.0) if args.quick else (10.0, 2.0)
    results: dict[int, dict[str, Any]] = {}
    for n_items in sizes:
        print(f"[{n_items} items] building site ... load {load_average()}", flush=True)
        site = build_site(n_items, n_users, per_user)
        print(f"[{n_items} items] in-process ...", flush=True)
        results[n_items] = {"in_process": in_process(site, n_requests, n_overlap)}
        print(f"[{n_items} items] over HTTP ...", flush=True)
        variants = n_items == sizes[-1]  # the ablation once, at the headline size
        results[n_items]["http"] = over_http(site, duration, warmup, variants)
    print_tables(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    last = results[sizes[-1]]
    print(
        f"p99_ms={last['http']['open800']['p99_ms']:.3f} rps={last['http']['c32']['rps']:.1f} "
        f"onnx_vs_torch={last['in_process']['onnx_vs_torch']:.2f}"
    )


if __name__ == "__main__":
    main()
