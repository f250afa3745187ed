"""DP-SGD vs non-DP local training, side by side: epoch time, peak memory, privacy cost.

For each model and catalogue size (GRU4Rec and SASRec at 5k and 50k items; ``--quick``: GRU
only, fewer shoppers) it builds one synthetic site (``--shoppers`` shoppers whose history
lengths follow a long tail like the Amazon 5-core sets: median about 6 events, capped at the
model's max_len + 1) and then, in one process, alternates one non-DP epoch and one DP epoch
of `edge_client.local_training.train_local` with the same batch size, ``--repeats`` times.
Both use the project's default `LocalTrainConfig` (DP: Poisson sampling with expected batch
256, clipping C = 1, sigma = 1.2; non-DP: length-grouped batches of 256, as centralized
training). Epoch time is `LocalTrainResult.seconds`, the wall time of the training loop
(for DP including the engine's set-up and its per-round brute-force norm check; the privacy
accounting is not in it). The ratio per configuration is median DP / median non-DP wall
time; the CPU-time ratio and the machine's load average before/after each pair are printed
next to it (the machine is shared: a load spike during one epoch moves a wall-time ratio,
CPU time much less).

Peak memory is measured per (model, size, mode) in a fresh subprocess: VmHWM after one
epoch, and its increase during the epoch (the high-water mark is reset after data and model
are built); without ``--quick`` also DP at expected batch 256 vs 1024 on the largest size.

Finally the privacy cost of the default configuration: PRV epsilon (delta 1e-5, one
shopper) after 1, 10, 20 and 50 rounds for sites of 1k, 2k and 10k shoppers.

The last line is ``dp_overhead=<float>``: the largest DP/non-DP epoch-time ratio measured.

Example: .venv/bin/python benchmarks/dp_training.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

SIZES = (5_000, 50_000)
ROUNDS = (1, 10, 20, 50)
SITE_SIZES = (1_000, 2_000, 10_000)


def synthetic_site(n_shoppers: int, n_items: int, max_len: int, seed: int = 0) -> Any:
    """Shoppers with long-tailed history lengths and a noisy successor pattern over items."""
    from shared.sequences import UserSequences

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(np.exp(rng.normal(np.log(6.0), 0.9, n_shoppers))), 2, max_len + 1)
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    popular = rng.zipf(1.3, total) % n_items + 1  # jumps land on popular items
    steps = rng.geometric(0.3, total)
    jump = rng.random(total) < 0.2
    items = np.empty(total, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    starts = rng.integers(1, n_items + 1, n_shoppers)
    for u in range(n_shoppers):
        a, b = offsets[u], offsets[u + 1]
        seq = (starts[u] + np.cumsum(steps[a:b]) - 1) % n_items + 1
        items[a:b] = np.where(jump[a:b], popular[a:b], seq)
    return UserSequences(
        user_ids=tuple(f"shopper-{u}" for u in range(n_shoppers)),
        offsets=offsets,
        items=items,
        event_types=np.zeros(total, dtype=np.int8),
        ts_ms=np.arange(total, dtype=np.int64),
    )


def build(kind: str, n_items: int, shoppers: int) -> tuple[Any, Any]:
    """The model (default sizes, seeded) and the site's sequences."""
    import torch

    from shared.models import build_model

    torch.manual_seed(0)
    model = build_model(kind, {"n_items": n_items})
    max_len = int(model.config.max_len)  # type: ignore[union-attr,arg-type]
    return model, synthetic_site(shoppers, n_items, max_len)


def configs(dp: bool) -> Any:
    """The project's default round settings (DP or not), without a budget cap."""
    from edge_client.local_training import LocalTrainConfig

    return replace(LocalTrainConfig(), dp=dp, epsilon_budget=1e9, device="cpu")


def load_average() -> str:
    """The 1-minute load average (the machine is shared)."""
    return f"{os.getloadavg()[0]:.2f}"


def time_pairs(kind: str, n_items: int, shoppers: int, repeats: int) -> dict[str, Any]:
    """Alternate non-DP and DP epochs in this process; medians and the ratio."""
    from edge_client.local_training import train_local

    model, seqs = build(kind, n_items, shoppers)
    train_local(model, seqs, replace(configs(False), epochs=0.05))  # warm-up (imports)
    plain, private, plain_cpu, private_cpu, loads = [], [], [], [], []
    for _ in range(repeats):
        load = load_average()
        baseline = train_local(model, seqs, configs(False))
        result = train_local(model, seqs, configs(True), secret_seed=1)
        plain.append(baseline.seconds)
        private.append(result.seconds)
        plain_cpu.append(baseline.cpu_seconds)
        private_cpu.append(result.cpu_seconds)
        loads.append(f"{load}/{load_average()}")
    return {
        "model": kind,
        "items": n_items,
        "shoppers": shoppers,
        "non_dp_s": statistics.median(plain),
        "dp_s": statistics.median(private),
        "ratio": statistics.median(private) / statistics.median(plain),
        "pair_ratios": [d / p for d, p in zip(private, plain, strict=True)],
        "cpu_ratio": statistics.median(private_cpu) / statistics.median(plain_cpu),
        "steps_dp": result.steps,
        "steps_non_dp": baseline.steps,
        "epsilon_round": result.epsilon_round,
        "load": loads,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: per address space, reset by exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: approximate


def child(spec: dict[str, Any]) -> None:
    """In a fresh process: build, reset the peak, run one epoch, print peak RSS as JSON."""
    import torch

    from edge_client.local_training import train_local

    torch.set_num_threads(spec["threads"])
    model, seqs = build(spec["model"], spec["items"], spec["shoppers"])
    built = peak_rss_mb()
    with contextlib.suppress(OSError):  # reset VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    base = peak_rss_mb()
    config = replace(configs(spec["dp"]), batch_size=spec.get("batch", 256))
    train_local(model, seqs, config, secret_seed=1)
    peak = max(peak_rss_mb(), built)
    print(json.dumps({"peak_mb": peak, "training_mb": peak_rss_mb() - base}))


def peak_memory(
    kind: str, n_items: int, shoppers: int, dp: bool, threads: int, batch: int = 256
) -> dict[str, float]:
    """Peak RSS of one epoch in a fresh subprocess."""
    spec = {
        "model": kind,
        "items": n_items,
        "shoppers": shoppers,
        "dp": dp,
        "threads": threads,
        "batch": batch,
    }
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def federated_defaults() -> Any:
    """The `LocalTrainConfig` a site trains with in a default federated round.

    `fedrec coordinator run` and `fedrec sim run` send the run config's values (pyproject's
    ``[tool.flwr.app.config]``, `coordinator.run_config.RunConfig`), not `LocalTrainConfig`'s.
    """
    from coordinator.run_config import RunConfig
    from edge_client.local_training import LocalTrainConfig

    run = RunConfig()
    return replace(
        LocalTrainConfig(),
        epochs=float(run.local_epochs),
        batch_size=run.batch_size,
        noise_multiplier=run.noise_multiplier,
        max_grad_norm=run.max_grad_norm,
    )


def privacy_table(config: Any) -> list[dict[Any, Any]]:
    """PRV epsilon of ``config`` after several rounds, per site size."""
    from edge_client.local_training import plan_round
    from edge_client.privacy_ledger import compose

    rows: list[dict[Any, Any]] = []
    for n in SITE_SIZES:
        mechanism = plan_round(n, config)
        eps = {r: compose([mechanism] * r, config.delta).epsilon_prv for r in ROUNDS}
        rows.append({"shoppers": n, "q": mechanism.sample_rate, "steps": mechanism.steps, **eps})
    return rows


def main() -> None:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GRU only, fewer shoppers/repeats")
    parser.add_argument("--models", default=None, help="comma-separated: gru,sasrec")
    parser.add_argument("--items", type=int, nargs="*", default=None, help="catalogue sizes")
    parser.add_argument("--shoppers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocesses")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    import torch

    # One thread: the 2 cores are shared, and OpenMP's spinning threads make timings
    # several times noisier than the work itself (both modes run under the same setting).
    torch.set_num_threads(args.threads)
    models = (args.models or ("gru" if args.quick else "gru,sasrec")).split(",")
    sizes = tuple(args.items) if args.items else SIZES
    shoppers = args.shoppers or (1024 if args.quick else 4096)
    repeats = args.repeats or 3
    defaults = configs(True)
    print(
        f"# DP-SGD vs non-DP, one epoch of train_local; {shoppers} shoppers; torch "
        f"{torch.__version__}, {args.threads} thread(s); batch {defaults.batch_size}, "
        f"C={defaults.max_grad_norm}, sigma={defaults.noise_multiplier}, "
        f"delta={defaults.delta}; {os.cpu_count()} CPUs"
    )
    timings: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    print(
        "\nmodel   items  non-DP s   DP s  DP/non-DP  pairs            CPU ratio  eps/round"
        "  load 1m (before/after each pair)"
    )
    for kind in models:
        for n_items in sizes:
            row = time_pairs(kind, n_items, shoppers, repeats)
            timings.append(row)
            pairs = ",".join(f"{r:.2f}" for r in row["pair_ratios"])
            print(
                f"{kind:6} {n_items:6} {row['non_dp_s']:9.2f} {row['dp_s']:6.2f} "
                f"{row['ratio']:9.2f}  {pairs:16} {row['cpu_ratio']:9.2f}  "
                f"{row['epsilon_round']:9.3f}  "
                f"{' '.join(row['load'])}",
                flush=True,
            )
    if not args.no_memory:
        print("\nmodel   items  mode    peak RSS MB  training MB")
        for kind in models:
            for n_items in sizes:
                for dp in (False, True):
                    mem = peak_memory(kind, n_items, shoppers, dp, args.threads)
                    memory.append({"model": kind, "items": n_items, "dp": dp, **mem})
                    print(
                        f"{kind:6} {n_items:6}  {'DP' if dp else 'non-DP':6} "
                        f"{mem['peak_mb']:11.0f} {mem['training_mb']:12.0f}",
                        flush=True,
                    )
    if not args.no_memory and not args.quick:
        # DP memory must not grow with batch x catalogue: same site, 4x the expected batch.
        kind, n_items = models[0], max(sizes)
        print(f"\nDP peak memory vs expected batch ({kind}, {n_items} items)")
        print("batch  peak RSS MB  training MB")
        for batch in (256, 1024):
            mem = peak_memory(kind, n_items, shoppers, True, args.threads, batch)
            memory.append({"model": kind, "items": n_items, "dp": True, "batch": batch, **mem})
            print(f"{batch:5} {mem['peak_mb']:11.0f} {mem['training_mb']:12.0f}", flush=True)
    from edge_client.local_training import LocalTrainConfig

    tables = {
        "local": (LocalTrainConfig(), "`fedrec train`-style local default (LocalTrainConfig)"),
        "federated": (federated_defaults(), "a default federated round (run config)"),
    }
    privacy = {}
    for key, (config, label) in tables.items():
        privacy[key] = privacy_table(config)
        print(
            f"\nPRV epsilon (delta={config.delta}, unit: one shopper) after N rounds, {label}: "
            f"expected batch {config.batch_size}, sigma {config.noise_multiplier}, "
            f"C {config.max_grad_norm}, {config.epochs:g} epoch(s) per round"
        )
        print("shoppers      q  steps/round  " + "  ".join(f"N={r:<4}" for r in ROUNDS))
        for p in privacy[key]:
            eps = "  ".join(f"{p[r]:6.2f}" for r in ROUNDS)
            print(f"{p['shoppers']:8} {p['q']:6.4f} {p['steps']:12}  {eps}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "timings": timings,
                    "memory": memory,
                    "privacy": privacy,
                    "config": asdict(defaults),
                },
                indent=2,
            )
        )
    print(f"\ndp_overhead={max(r['ratio'] for r in timings):.3f}")


if __name__ == "__main__":
    main()
