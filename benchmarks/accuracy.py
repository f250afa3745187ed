"""Accuracy benchmark: our models on Amazon Beauty and Sports beside published full-ranking rows.

Every model is trained with its default settings (`fedrec train` without flags), leave-one-out,
full ranking over the whole catalogue with the history masked (the S3-Rec protocol). A
first-order Markov chain of transition counts is measured in the same run as a reference
point (it is not one of the project's models). Published rows are quoted from
../shared/data/DATASETS.md (S3-Rec's all_rank.PNG; MCLRec's README).

Usage:
    .venv/bin/python benchmarks/accuracy.py [--data-dir ../shared/data] [--datasets beauty,sports]
        [--models pop,mf,gru,sasrec] [--out state/bench/accuracy]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.metrics import evaluate_ranking
from shared.models import build_model
from shared.readers import read_dataset
from shared.sequences import DataSplit
from shared.training import (
    default_model_config,
    default_train_config,
    prepare_split,
    train_model,
)

REPO = Path(__file__).resolve().parents[1]
DATASETS = {
    "beauty": "amazon_s3rec/Beauty.txt",
    "sports": "amazon_s3rec/Sports_and_Outdoors.txt",
}
COLUMNS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20")
# Published full-ranking leave-one-out rows, as quoted in ../shared/data/DATASETS.md.
PUBLISHED: dict[str, dict[str, tuple[float, ...]]] = {
    "beauty": {
        "PopRec": (0.0080, 0.0044, 0.0152, 0.0068, 0.0217, 0.0084),
        "GRU4Rec": (0.0164, 0.0099, 0.0283, 0.0137, 0.0479, 0.0187),
        "Caser": (0.0205, 0.0131, 0.0347, 0.0176, 0.0556, 0.0229),
        "SASRec": (0.0387, 0.0249, 0.0605, 0.0318, 0.0902, 0.0394),
        "BERT4Rec": (0.0203, 0.0124, 0.0347, 0.0170, 0.0599, 0.0233),
        "S3-Rec": (0.0387, 0.0244, 0.0647, 0.0327, 0.0994, 0.0414),
        "MCLRec": (0.0581, 0.0352, 0.0871, 0.0446, 0.1243, 0.0539),
    },
    "sports": {
        "PopRec": (0.0056, 0.0041, 0.0094, 0.0053, 0.0192, 0.0078),
        "GRU4Rec": (0.0129, 0.0086, 0.0204, 0.0110, 0.0333, 0.0142),
        "Caser": (0.0116, 0.0072, 0.0194, 0.0097, 0.0314, 0.0126),
        "SASRec": (0.0233, 0.0154, 0.0350, 0.0192, 0.0507, 0.0231),
        "BERT4Rec": (0.0115, 0.0075, 0.0191, 0.0099, 0.0315, 0.0130),
        "S3-Rec": (0.0251, 0.0161, 0.0385, 0.0204, 0.0607, 0.0260),
        "MCLRec": (0.0328, 0.0204, 0.0501, 0.0260, 0.0734, 0.0319),
    },
}


def markov_metrics(split: DataSplit, n_items: int) -> dict[str, float]:
    """Test metrics of a first-order Markov chain: count(last item -> item), popularity ties."""
    starts, ends = [], []
    for seq in split.train.item_lists():
        starts.append(seq[:-1])
        ends.append(seq[1:])
    a, b = np.concatenate(starts), np.concatenate(ends)
    order = np.argsort(a, kind="stable")
    successors = b[order]  # CSR: the successors of item i are successors[offsets[i]:offsets[i+1]]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(a, minlength=n_items + 1))])
    popularity = np.bincount(split.train.items, minlength=n_items + 1).astype(np.float32)
    # Below 1, so it orders items with equal transition counts and never overrides a count;
    # coarse enough to stay distinct in float32 next to counts.
    tie_break = 0.5 * popularity / (float(popularity.max()) + 1.0)

    def score(items: torch.Tensor) -> torch.Tensor:
        rows = np.repeat(tie_break[None, :], len(items), axis=0)  # (B, V)
        for row, last in enumerate(items[:, -1].tolist()):
            np.add.at(rows[row], successors[offsets[last] : offsets[last + 1]], 1.0)
        return torch.from_numpy(rows)

    return evaluate_ranking(score, split.test, max_len=1)


def run_model(kind: str, split: DataSplit, n_items: int) -> dict[str, Any]:
    """Train one model with its defaults; test metrics, time and machine load."""
    torch.manual_seed(0)
    model = build_model(kind, default_model_config(kind, n_items))
    load_before = os.getloadavg()[0]
    result = train_model(model, split, default_train_config(kind))
    return {
        **{k: result.test[k] for k in COLUMNS},
        "train_seconds": result.train_seconds,
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "load": (load_before + os.getloadavg()[0]) / 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--datasets", default="beauty,sports")
    parser.add_argument("--models", default="pop,mf,gru,sasrec")
    parser.add_argument("--out", type=Path, default=REPO / "state" / "bench" / "accuracy")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    header = "| dataset | model | " + " | ".join(c.upper() for c in COLUMNS)
    header += " | train s | epochs (best) | load |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 5)]
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "runs": [],
    }
    for name in args.datasets.split(","):
        path = args.data_dir / DATASETS[name]
        if not path.exists():
            print(f"skipping {name}: {path} not found")
            continue
        vocab, split = prepare_split(read_dataset(path, "s3rec").events)
        print(f"{name}: {len(split.train):,} shoppers, {vocab.n_items:,} items", flush=True)
        rows: list[tuple[str, dict[str, Any]]] = []
        t0 = time.perf_counter()
        markov = markov_metrics(split, vocab.n_items)
        rows.append(
            ("markov counts (reference)", {**markov, "train_seconds": time.perf_counter() - t0})
        )
        for kind in args.models.split(","):
            row = run_model(kind, split, vocab.n_items)
            rows.append((kind, row))
            results["runs"].append({"dataset": name, "model": kind, **row})
            print(
                f"  {kind}: ndcg@10 {row['ndcg@10']:.4f} in {row['train_seconds']:.0f} s "
                f"(load {row['load']:.1f})",
                flush=True,
            )
        for kind, row in rows:
            cells = " | ".join(f"{row[c]:.4f}" for c in COLUMNS)
            epochs = f"{row['epochs']} ({row['best_epoch']})" if "epochs" in row else "-"
            load = f"{row['load']:.1f}" if "load" in row else "-"
            lines.append(
                f"| {name} | **{kind}** | {cells} | {row['train_seconds']:.0f} | {epochs} | "
                f"{load} |"
            )
        for model, values in PUBLISHED[name].items():
            cells = " | ".join(f"{v:.4f}" for v in values)
            lines.append(f"| {name} | {model} (published) | {cells} | | | |")
    table = "\n".join(lines)
    print(table)
    (args.out / "accuracy.md").write_text(table + "\n")
    (args.out / "accuracy.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
