"""int8 vs fp32 at the edge on a *trained* model: file size, latency, NDCG@10 loss.

Trains a GRU4Rec (dim 64, hidden 64, max_len 50) on synthetic shopping logs (default) or
a real dataset (``--data ../shared/data/amazon_s3rec/Beauty.txt --format s3rec``), saves it
as a model directory, and loads it twice the way the edge does (`edge_client.inference.
load_model`): fp32, and with ``quantize="int8"`` (ORT ``quantize_dynamic``, QInt8 weights,
built, cached and verified by `edge_client.quantize`). Then, on the same test shoppers
(leave-one-out: each shopper's last item held out, the rest is the input):

- size of ``model.onnx`` and ``model.int8.onnx``;
- latency of one shopper's ranking (ORT, 1 intra-op thread), p50 and p99, fp32 and int8
  interleaved request by request so that load on the machine hits both alike;
- HR@10 and NDCG@10 of the *serving graphs* (the whole history excluded, as the S3-Rec
  protocol masks it), the int8 loss, and the torch model's own full-ranking NDCG@10 as a
  check that the fp32 graph is the model;
- mean and worst top-10 overlap of int8 with fp32.

The last line is ``int8_ndcg_loss=<fp32 - int8 NDCG@10> size_ratio=<fp32 / int8 bytes>
speedup_p50=<fp32 p50 / int8 p50>``.

Example: .venv/bin/python benchmarks/int8.py --quick
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

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / "state" / "bench" / "int8"
MODEL = {"dim": 64, "hidden": 64, "max_len": 50, "dropout": 0.25}


def load_data(args: argparse.Namespace) -> tuple[Any, str]:
    """The event log and a description of it."""
    if args.data == "synth":
        from shared.synth import SynthConfig, generate_synthetic

        cfg = SynthConfig(
            n_sites=5,
            shoppers_per_site=args.shoppers // 5,
            n_items=args.items,
            n_categories=50,
            events_per_shopper=40.0,
            seed=0,
        )
        return generate_synthetic(cfg).events, (
            f"synthetic ({cfg.n_sites} sites x {cfg.shoppers_per_site} shoppers, "
            f"{cfg.n_items:,} items, ~40 events each, seed 0)"
        )
    from shared.readers import read_dataset

    dataset = read_dataset(Path(args.data), args.format)
    return dataset.events, f"{dataset.name} ({args.format})"


def train(events: Any, args: argparse.Namespace, out: Path) -> tuple[Any, dict[str, Any]]:
    """Train the GRU on the leave-one-out split; save it as a model directory at ``out``."""
    import torch

    from shared.artifacts import save_model_dir
    from shared.models import build_model
    from shared.training import TrainConfig, prepare_split, train_model

    torch.manual_seed(0)
    vocab, split = prepare_split(events)
    model = build_model("gru", {"n_items": vocab.n_items, **MODEL})
    config = TrainConfig(
        epochs=args.epochs, device="cpu", time_budget_s=args.time_budget, patience=3
    )
    start = time.perf_counter()
    result = train_model(model, split, config, progress=False)
    info = {
        "train_seconds": time.perf_counter() - start,
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "torch_test": result.test,
        "n_items": vocab.n_items,
        "n_test_shoppers": len(split.test),
    }
    save_model_dir(out, model, vocab, version=out.name, metrics={"ndcg@10": result.test["ndcg@10"]})
    return split, info


def serving_metrics(
    model: Any, split: Any, limit: int | None
) -> tuple[dict[str, float], list[np.ndarray]]:
    """HR@10, NDCG@10 of a loaded serving graph on the test shoppers, and its top-10 lists."""
    from shared.sequences import serving_input

    histories = split.test.histories.item_lists()
    targets = split.test.targets
    n = len(targets) if limit is None else min(limit, len(targets))
    hits, gains, tops = 0, 0.0, []
    for row in range(n):
        history = histories[row]
        items = serving_input(history, model.max_len)
        exclude = np.unique(history).reshape(1, -1).astype(np.int64)
        _, ids = model.session.run(("scores", "item_ids"), {"items": items, "exclude": exclude})
        top = ids[0, :10]
        tops.append(top)
        where = np.flatnonzero(top == targets[row])
        if len(where):
            hits += 1
            gains += 1.0 / np.log2(where[0] + 2.0)
    return {"hr@10": hits / n, "ndcg@10": gains / n, "n": float(n)}, tops


def latency(fp32: Any, int8: Any, split: Any, n: int) -> dict[str, tuple[float, float]]:
    """p50/p99 ms of one-shopper rankings, fp32 and int8 interleaved on the same inputs."""
    from shared.sequences import serving_input

    histories = split.test.histories.item_lists()
    feeds = []
    for row in range(min(n, len(histories))):
        history = histories[row]
        feeds.append(
            {
                "items": serving_input(history, fp32.max_len),
                "exclude": np.unique(history).reshape(1, -1).astype(np.int64),
            }
        )
    laps: dict[str, list[float]] = {"fp32": [], "int8": []}
    clock = time.perf_counter
    for feed in feeds[:50]:  # warm-up
        fp32.session.run(("scores", "item_ids"), feed)
        int8.session.run(("scores", "item_ids"), feed)
    for i, feed in enumerate(feeds):
        order = (("fp32", fp32), ("int8", int8)) if i % 2 == 0 else (("int8", int8), ("fp32", fp32))
        for name, model in order:
            start = clock()
            model.session.run(("scores", "item_ids"), feed)
            laps[name].append(clock() - start)
    return {
        name: (float(np.percentile(v, 50) * 1000), float(np.percentile(v, 99) * 1000))
        for name, v in laps.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", default="synth", help="'synth' or a data file")
    parser.add_argument("--format", default="events", help="format of --data")
    parser.add_argument("--shoppers", type=int, default=5000, help="synthetic shoppers")
    parser.add_argument("--items", type=int, default=20_000, help="synthetic catalogue size")
    parser.add_argument("--epochs", type=int, default=30, help="at most this many epochs")
    parser.add_argument("--time-budget", type=float, default=900.0, help="training seconds")
    parser.add_argument("--requests", type=int, default=2000, help="latency samples per model")
    parser.add_argument("--eval-limit", type=int, help="test shoppers scored (default all)")
    parser.add_argument("--quick", action="store_true", help="small data, short training")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.shoppers, args.items, args.epochs, args.time_budget = 1000, 5000, 5, 120.0
        args.requests = 500
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

    from edge_client.inference import load_model
    from edge_client.quantize import INT8_FILE

    events, described = load_data(args)
    out = STATE / ("model-" + ("synth" if args.data == "synth" else Path(args.data).stem))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"training GRU4Rec on {described} ... load {os.getloadavg()[0]:.1f}", flush=True)
    split, info = train(events, args, out)
    print(
        f"trained {info['epochs']} epoch(s) in {info['train_seconds']:.0f} s (best epoch "
        f"{info['best_epoch']}); torch test NDCG@10 {info['torch_test']['ndcg@10']:.4f}",
        flush=True,
    )
    start = time.perf_counter()
    fp32 = load_model(out)
    int8 = load_model(out, quantize="int8")
    quantize_s = time.perf_counter() - start
    if int8.precision != "int8":
        raise SystemExit("the int8 copy was refused (see the log above); nothing to compare")
    metrics = {}
    tops = {}
    for name, model in (("fp32", fp32), ("int8", int8)):
        metrics[name], tops[name] = serving_metrics(model, split, args.eval_limit)
    overlaps: list[float] = [
        len(set(a.tolist()) & set(b.tolist())) / 10
        for a, b in zip(tops["fp32"], tops["int8"], strict=True)
    ]
    load_before = os.getloadavg()[0]
    lat = latency(fp32, int8, split, args.requests)
    load_after = os.getloadavg()[0]
    sizes = {"fp32": (out / "model.onnx").stat().st_size, "int8": (out / INT8_FILE).stat().st_size}
    overlap = {"mean": float(np.mean(overlaps)), "min": float(np.min(overlaps))}
    results: dict[str, Any] = {
        "data": described,
        "model": {"kind": "gru", **MODEL, "n_items": info["n_items"]},
        "training": info,
        "load_and_quantize_seconds": quantize_s,
        "sizes_bytes": sizes,
        "serving": metrics,
        "latency_ms": lat,
        "top10_overlap": overlap,
        "load_average": [load_before, load_after],
        "cores": os.cpu_count(),
    }
    print(f"\n{described}; GRU4Rec dim 64, hidden 64, max_len 50, {info['n_items']:,} items")
    print(
        f"{'model':>6} | {'MB':>6} | {'p50 ms':>7} {'p99 ms':>7} | {'HR@10':>7} {'NDCG@10':>8} | "
        f"test shoppers"
    )
    for name in ("fp32", "int8"):
        m = metrics[name]
        print(
            f"{name:>6} | {sizes[name] / 1e6:>6.2f} | {lat[name][0]:>7.3f} {lat[name][1]:>7.3f} | "
            f"{m['hr@10']:>7.4f} {m['ndcg@10']:>8.4f} | {int(m['n']):,}"
        )
    loss = metrics["fp32"]["ndcg@10"] - metrics["int8"]["ndcg@10"]
    print(
        f"torch full-ranking NDCG@10 {info['torch_test']['ndcg@10']:.4f} (fp32 graph "
        f"{metrics['fp32']['ndcg@10']:.4f}); top-10 overlap int8 vs fp32 mean "
        f"{overlap['mean']:.3f}, worst {overlap['min']:.1f}; "
        f"load {load_before:.1f}..{load_after:.1f} on {os.cpu_count()} cores"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print(
        f"int8_ndcg_loss={loss:.4f} size_ratio={sizes['fp32'] / sizes['int8']:.2f} "
        f"speedup_p50={lat['fp32'][0] / lat['int8'][0]:.2f}"
    )


if __name__ == "__main__":
    main()
