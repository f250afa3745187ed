"""`fedrec train` and `fedrec evaluate`: centralized training and full-ranking evaluation.

A thin layer over `shared.training` and `shared.artifacts`. torch and pandas are imported
inside the commands so that `fedrec --help` stays fast. With ``--json`` the last line on
stdout is one JSON object of test metrics (keys `JSON_KEYS`); progress goes to stderr.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from shared.errors import ConfigError, FedrecError

if TYPE_CHECKING:
    from shared.training import EpochRecord

FORMATS_HELP = "s3rec | sasrec | ml100k | taobao | events"
MODEL_KINDS_HELP = "gru | sasrec | pop | mf"
# Keys every --json object carries (more may follow).
JSON_KEYS: tuple[str, ...] = (
    "hr@10",
    "ndcg@10",
    "mrr@10",
    "hr@20",
    "ndcg@20",
    "n_users",
    "train_seconds",
)

DataOpt = Annotated[Path, typer.Option("--data", "-d", help="Data file (or directory).")]
FormatOpt = Annotated[str, typer.Option("--format", "-f", help=f"Input format: {FORMATS_HELP}.")]
JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print one JSON object of test metrics as the last line.")
]


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """Turn a `FedrecError` into one red line on stderr and exit status 1."""
    try:
        yield
    except FedrecError as err:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(1) from err


def _metrics_json(metrics: dict[str, float], train_seconds: float, **extra: Any) -> str:
    """The one-line JSON object: `JSON_KEYS` first, then the other metrics and ``extra``."""
    out: dict[str, Any] = {key: metrics[key] for key in JSON_KEYS[:-2]}
    out["n_users"] = int(metrics["n_users"])
    out["train_seconds"] = round(train_seconds, 2)
    for key, value in metrics.items():
        out.setdefault(key, value)
    out.update(extra)
    return json.dumps(out, separators=(",", ":"))


def _metrics_table(metrics: dict[str, float], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for k in ("5", "10", "20"):
        table.add_column(f"HR@{k}", justify="right")
        table.add_column(f"NDCG@{k}", justify="right")
    table.add_column("MRR@10", justify="right")
    table.add_column("shoppers", justify="right")
    row = []
    for k in ("5", "10", "20"):
        row += [f"{metrics[f'hr@{k}']:.4f}", f"{metrics[f'ndcg@{k}']:.4f}"]
    row += [f"{metrics['mrr@10']:.4f}", f"{int(metrics['n_users']):,}"]
    table.add_row(*row)
    return table


def _epoch_line(record: EpochRecord) -> str:
    v = record.valid
    return (
        f"epoch {record.epoch:3d}  loss {record.loss:.4f}  valid ndcg@10 {v['ndcg@10']:.4f}  "
        f"hr@10 {v['hr@10']:.4f}  lr {record.lr:.2e}  {record.seconds:.1f}s"
    )


def train(
    data: DataOpt,
    fmt: FormatOpt,
    model: Annotated[str, typer.Option("--model", "-m", help=f"Model kind: {MODEL_KINDS_HELP}.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")],
    epochs: Annotated[int | None, typer.Option(help="Most epochs (early stopping).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training windows per step.")] = None,
    max_len: Annotated[int | None, typer.Option(help="History length the model reads.")] = None,
    dim: Annotated[int | None, typer.Option(help="Embedding (and hidden) size.")] = None,
    patience: Annotated[int | None, typer.Option(help="Epochs without gain before stop.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    threads: Annotated[
        int | None, typer.Option(help="CPU threads (default: the cores not already busy).")
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(help="A trained model directory to distil from (same catalogue)."),
    ] = None,
    distill_alpha: Annotated[
        float, typer.Option(help="Weight of the teacher's soft targets in the loss (0-1).")
    ] = 0.5,
    distill_temperature: Annotated[
        float, typer.Option(help="Softmax temperature of the distillation term.")
    ] = 2.0,
    behaviours: Annotated[
        bool,
        typer.Option(
            "--behaviours",
            help="GRU only: read event types (view, cart, ...) and learn will-purchase too.",
        ),
    ] = False,
    repeats: Annotated[
        bool,
        typer.Option(
            "--repeats/--no-repeats",
            help="Rank items seen before like the rest in validation and test (Taobao).",
        ),
    ] = False,
    json_out: JsonFlag = False,
) -> None:
    """Train a model (leave-one-out, early stopping on validation NDCG@10), save it with ONNX.

    Defaults are the tuned ones (docs/models.md); every option overrides one of them. With
    --teacher the model also learns from that model's soft targets (docs/compression.md);
    with --behaviours it reads each event's type (docs/multi_behaviour.md).

    Example: fedrec train --data ../shared/data/amazon_s3rec/Beauty.txt --format s3rec
    --model sasrec --out state/models/beauty-sasrec
    """
    with _one_line_errors():
        import dataclasses

        from shared.artifacts import load_model_dir, save_model_dir
        from shared.distillation import DistillConfig
        from shared.models import MODEL_KINDS, build_model
        from shared.readers import read_dataset
        from shared.sequences import N_BEHAVIOURS
        from shared.training import (
            default_model_config,
            default_train_config,
            prepare_split,
            train_model,
            with_overrides,
        )

        if model not in MODEL_KINDS:
            raise ConfigError(f"unknown model {model!r}; expected one of {MODEL_KINDS_HELP}")
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, not {device!r}")
        for name, value in (("epochs", epochs), ("batch-size", batch_size), ("dim", dim)):
            if value is not None and value < (0 if name == "epochs" else 1):
                raise ConfigError(f"--{name} must be positive, got {value}")
        if threads is not None and threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {threads}")
        if max_len is not None and max_len < 1:
            raise ConfigError(f"--max-len must be at least 1, got {max_len}")
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {lr}")
        distill = DistillConfig(distill_alpha, distill_temperature)
        err = Console(stderr=True)
        dataset = read_dataset(data, fmt)
        vocab, split = prepare_split(dataset.events)
        teacher_net, distillation = None, None
        if teacher is not None:
            teacher_net, teacher_vocab, teacher_meta = load_model_dir(teacher)
            if teacher_vocab.item_ids != vocab.item_ids:
                raise ConfigError(
                    f"the teacher {teacher} was trained on another catalogue "
                    f"({teacher_vocab.n_items} items, this data {vocab.n_items})"
                )
            distillation = {
                "teacher": str(teacher),
                "teacher_kind": teacher_meta.kind,
                "teacher_version": teacher_meta.version,
                "alpha": distill.alpha,
                "temperature": distill.temperature,
            }
        field_names = {f.name for f in dataclasses.fields(MODEL_KINDS[model][0])}
        sizes: dict[str, int | None] = {k: dim for k in ("dim", "hidden") if k in field_names}
        if max_len is not None and "max_len" in field_names:
            sizes["max_len"] = max_len
        if behaviours:
            if "n_behaviours" not in field_names:
                raise ConfigError(f"--behaviours needs --model gru, not {model!r}")
            if teacher is not None:
                raise ConfigError("--behaviours and --teacher cannot be combined yet")
            sizes["n_behaviours"] = N_BEHAVIOURS
        net = build_model(model, default_model_config(model, vocab.n_items, **sizes))
        config = with_overrides(
            default_train_config(model),
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            patience=patience,
            seed=seed,
            device=device,
            threads=threads,
            mask_history=not repeats,
        )
        err.print(
            f"{dataset.name}: {len(split.train):,} shoppers, {vocab.n_items:,} items, "
            f"{len(split.test):,} evaluated; model {model}",
            highlight=False,
        )
        result = train_model(
            net,
            split,
            config,
            progress=not json_out,
            on_epoch=(lambda r: err.print(_epoch_line(r), highlight=False)) if json_out else None,
            teacher=teacher_net,
            distill=distill,
        )
        metrics = {
            **{f"test_{k}": v for k, v in result.test.items()},
            **{f"valid_{k}": v for k, v in result.best_valid.items()},
            "train_seconds": result.train_seconds,
            "best_epoch": float(result.best_epoch),
        }
        save_model_dir(
            out,
            net,
            vocab,
            metrics=metrics,
            extra={
                "data": str(data),
                "format": fmt,
                "dataset": dataset.name,
                "split": split.kind,
                "train_config": result.config,
                "history": [dataclasses.asdict(r) for r in result.history],
                "device": result.device,
                "threads": result.threads,
                **({"distillation": distillation} if distillation else {}),
            },
        )
        if json_out:
            typer.echo(
                _metrics_json(
                    result.test,
                    result.train_seconds,
                    best_epoch=result.best_epoch,
                    **({"distilled_from": str(teacher)} if teacher else {}),
                )
            )
            return
        console = Console()
        console.print(_metrics_table(result.test, f"{dataset.name} test, {model} (full ranking)"))
        console.print(
            f"best epoch {result.best_epoch} of {len(result.history)}, "
            f"{result.train_seconds:.0f} s on {result.device} ({result.threads} threads); "
            f"wrote {out}",
            highlight=False,
        )


def evaluate(
    model_dir: Annotated[Path, typer.Option("--model-dir", help="A model directory.")],
    data: DataOpt,
    fmt: FormatOpt,
    mode: Annotated[str, typer.Option(help="full (whole catalogue) | sampled (99 negatives).")] = (
        "full"
    ),
    json_out: JsonFlag = False,
) -> None:
    """Test metrics of a saved model on a dataset (leave-one-out: each shopper's last event).

    ``train_seconds`` in the output is the training time recorded in the model directory
    (0 when it has none); the catalogue is the model's vocabulary, and events of other items
    are dropped.

    Example: fedrec evaluate --model-dir state/models/beauty-sasrec
    --data ../shared/data/amazon_s3rec/Beauty.txt --format s3rec --json
    """
    with _one_line_errors():
        from shared.artifacts import load_model_dir
        from shared.readers import read_dataset
        from shared.training import evaluate_model, prepare_split

        if mode not in ("full", "sampled"):
            raise ConfigError(f"--mode must be full or sampled, not {mode!r}")
        net, vocab, meta = load_model_dir(model_dir)
        dataset = read_dataset(data, fmt)
        known = dataset.events["item_id"].astype(str).isin(set(vocab.item_ids))
        if not known.all():
            Console(stderr=True).print(
                f"{int((~known).sum()):,} events of items outside the model's catalogue dropped",
                highlight=False,
            )
        _, split = prepare_split(dataset.events, vocab)
        t0 = time.perf_counter()
        metrics = evaluate_model(net, split.test, mode=mode)
        seconds = time.perf_counter() - t0
        train_seconds = float(meta.metrics.get("train_seconds", 0.0))
        if json_out:
            typer.echo(
                _metrics_json(metrics, train_seconds, eval_seconds=round(seconds, 2), mode=mode)
            )
            return
        Console().print(
            _metrics_table(metrics, f"{dataset.name} test, {meta.kind} {meta.version} ({mode})")
        )
