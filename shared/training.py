"""Centralized training of any sequential model: full-catalogue cross-entropy, early stopping.

This is the reference every federated and private result is compared with, and a library the
federated code reuses: `training_examples` builds the per-shopper (inputs, targets) arrays
(the format of `shared.sequences.next_item_examples`), `train_epoch` runs one pass over
them, and `train_model` adds validation, early stopping on NDCG@10 and the test metrics.

Batches are grouped by sequence length and trimmed to their longest sequence (most shoppers
have a handful of events, so padding every batch to ``max_len`` wastes most of the work).
That is exact, not an approximation: every model in `shared.models` gives a history the same
scores however much left padding precedes it (tested), so a model trained on trimmed
batches serves identically on inputs padded to ``max_len`` by `shared.sequences.pad_left`.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from shared.distillation import DistillConfig, check_teacher, distill_loss_backward
from shared.errors import ConfigError, DataError
from shared.metrics import ScoreFn, evaluate_ranking
from shared.sequences import (
    PURCHASE_CODE,
    DataSplit,
    EvalSet,
    UserSequences,
    build_sequences,
    leave_one_out,
    pad_left,
)
from shared.vocab import ItemVocab

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]
EARLY_STOP_METRIC = "ndcg@10"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of `train_model` (the model's own sizes live in its config)."""

    epochs: int = (
        12  # upper bound (and the cosine schedule's length); early stopping may end sooner
    )
    batch_size: int = 128
    lr: float = 2e-3  # peak learning rate, reached after the warm-up
    weight_decay: float = 0.0  # AdamW's decoupled decay on matrices (not biases or norms)
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.05
    label_smoothing: float = 0.0
    grad_clip: float | None = 5.0  # max global gradient norm (None: no clipping)
    patience: int = 3  # epochs without a better validation NDCG@10 before stopping
    all_windows: bool = True  # also train on earlier max_len windows of long sequences
    seed: int = 0
    device: Device = "auto"
    # Matmuls of the training steps in bfloat16 (autocast; weights, loss and evaluation stay
    # float32). "auto": bf16 where the hardware has it natively (CPU AMX, CUDA), else fp32.
    precision: Precision = "auto"
    time_budget_s: float | None = None  # wall-time limit: stop (mid-epoch), validate, keep best
    # torch intra-op threads; None = the cores not already busy (1-minute load average), so a
    # shared machine is not oversubscribed: two spinning OpenMP threads on a loaded 2-core box
    # ran an epoch 4-8x slower than one thread (docs/models.md).
    threads: int | None = None
    eval_batch_size: int = 512
    # Target positions per head/softmax chunk (`chunked_loss_backward`): bounds the memory
    # of a step's logits without changing its gradient.
    head_chunk: int = 512
    # Weight of the will-purchase loss of a multi-behaviour model (ignored by others).
    purchase_weight: float = 1.0
    # Validation and test rank items already in the history last (S3-Rec protocol); False
    # ranks them like the rest, for logs where repeats are the point (Taobao: buy what was
    # carted).
    mask_history: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.patience < 1:
            raise ConfigError("epochs must be >= 0, batch_size and patience >= 1")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            raise ConfigError("lr must be > 0, weight_decay >= 0, label_smoothing in [0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.head_chunk < 1 or self.eval_batch_size < 1:
            raise ConfigError("head_chunk and eval_batch_size must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, not {self.precision!r}")
        if not self.purchase_weight >= 0:
            raise ConfigError(f"purchase_weight must be >= 0, got {self.purchase_weight}")


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did."""

    epoch: int  # 1-based
    loss: float  # mean training cross-entropy per predicted position
    valid: dict[str, float]  # validation metrics (full ranking)
    lr: float  # learning rate at the end of the epoch
    seconds: float  # training plus validation wall time


@dataclass(frozen=True)
class TrainResult:
    """The outcome of `train_model`; the model passed in holds the best weights."""

    history: list[EpochRecord]
    best_epoch: int  # 0 when no epoch ran (e.g. the popularity model)
    best_valid: dict[str, float]
    test: dict[str, float]
    train_seconds: float
    n_examples: int  # training windows (rows of the example arrays)
    n_targets: int  # predicted positions per epoch
    device: str
    stopped_early: bool = False
    threads: int = 1
    config: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: Device) -> torch.device:
    """``auto`` picks CUDA when torch sees a GPU, else the CPU; ``cuda`` without one raises."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(device)


def resolve_threads(threads: int | None) -> int:
    """``threads``, or when None the CPU cores not already busy (at least one)."""
    if threads is not None:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = int(os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else 0
    return max(1, (cores or 1) - busy)


def _cpu_has_amx_bf16() -> bool:
    """Whether this (Linux) CPU multiplies bfloat16 matrices natively (Intel AMX)."""
    try:
        with Path("/proc/cpuinfo").open(encoding="utf-8") as fh:
            return any(line.startswith("flags") and " amx_bf16" in line for line in fh)
    except OSError:
        return False


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training steps, or None for plain float32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if _cpu_has_amx_bf16() else None


def training_examples(
    train: UserSequences, max_len: int, all_windows: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Next-item training windows: inputs and targets, each (N, max_len), left-padded.

    The first rows are exactly `shared.sequences.next_item_examples` (each shopper's latest
    window). With ``all_windows`` a sequence longer than ``max_len + 1`` also gives its
    earlier windows, cut so that every transition of every sequence is a target once.
    """
    items = train.item_lists()
    inputs, targets = _windows([items, items], max_len, all_windows)
    return inputs, targets


def behaviour_examples(
    train: UserSequences, max_len: int, n_items: int, all_windows: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`training_examples` of a multi-behaviour model: token inputs, item targets, purchases.

    The inputs are `shared.sequences.behaviour_tokens`; the third array is 1 where the
    target event is a purchase and 0 elsewhere (padding included), each (N, max_len).
    """
    purchases = [(t == PURCHASE_CODE).astype(np.int64) for t in train.event_type_lists()]
    inputs, targets, next_purchase = _windows(
        [train.token_lists(n_items), train.item_lists(), purchases], max_len, all_windows
    )
    return inputs, targets, next_purchase


def _windows(
    aligned: list[list[np.ndarray]], max_len: int, all_windows: bool
) -> tuple[np.ndarray, ...]:
    """Left-padded windows of aligned per-shopper arrays, as (N, max_len) arrays.

    The first list is the input side (events 0..n-2), every other one a target side (events
    1..n-1).
    """
    if max_len < 1:
        raise ConfigError("max_len must be >= 1")
    keep = [i for i, s in enumerate(aligned[0]) if len(s) >= 2]
    # (shopper, input slice, target slice) of each window: every latest window first
    spans = [(i, slice(0, len(aligned[0][i]) - 1), slice(1, None)) for i in keep]
    if all_windows:
        for i in keep:
            end = len(aligned[0][i]) - max_len  # the latest window predicts s[end:]
            while end >= 2:
                given = slice(max(0, end - 1 - max_len), end - 1)
                spans.append((i, given, slice(max(1, end - max_len), end)))
                end -= max_len
    inputs = pad_left([aligned[0][i][cut] for i, cut, _ in spans], max_len)
    sides = [pad_left([a[i][cut] for i, _, cut in spans], max_len) for a in aligned[1:]]
    return (inputs, *sides)


def length_batches(
    inputs: np.ndarray, batch_size: int, rng: np.random.Generator, pool: int = 64
) -> Iterator[np.ndarray]:
    """Row indices of batches of similar length, in random order (a shuffled "sortish" order).

    Rows are shuffled, cut into pools of ``pool`` batches, sorted by length inside each pool
    and split into batches; the batch order is then shuffled again.
    """
    lengths = (inputs != 0).sum(axis=1)
    order = rng.permutation(len(inputs))
    batches: list[np.ndarray] = []
    step = batch_size * pool
    for start in range(0, len(order), step):
        chunk = order[start : start + step]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    for b in rng.permutation(len(batches)):
        yield batches[b]


def trim_left(inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the leading columns that are padding in every row of a batch."""
    width = int((targets != 0).sum(axis=1).max(initial=1))
    width = max(width, int((inputs != 0).sum(axis=1).max(initial=1)))
    return inputs[:, -width:], targets[:, -width:]


def sequence_loss(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean full-catalogue cross-entropy over the non-padded positions of (B, T) batches.

    The head runs only on positions with a target, which saves most of its cost.
    """
    h = model.encode(inputs)  # type: ignore[operator]  # (B, T, H)
    mask = targets > 0  # (B, T)
    logits = model.head(h[mask])  # type: ignore[operator]  # (N, V)
    return F.cross_entropy(logits, targets[mask], label_smoothing=label_smoothing)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (embeddings, linear weights)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: np.ndarray,
    targets: np.ndarray,
    config: TrainConfig,
    rng: np.random.Generator,
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_batch: Callable[[], None] | None = None,
    deadline: float | None = None,
    teacher: nn.Module | None = None,
    distill: DistillConfig | None = None,
    purchases: np.ndarray | None = None,
) -> float:
    """One pass over the examples in length-grouped batches; the mean loss per target.

    With a ``deadline`` (a `time.perf_counter` value) the pass ends early once it is passed.
    With a ``teacher`` the loss is `shared.distillation`'s (``distill``, default settings).
    With ``purchases`` (`behaviour_examples`) a multi-behaviour model also learns whether
    each next event is a purchase.
    """
    if teacher is not None and purchases is not None:
        raise ConfigError("distillation into a multi-behaviour model is not supported")
    model.train()
    autocast_dtype = resolve_precision(config.precision, device)
    total, count = 0.0, 0
    for rows in length_batches(inputs, config.batch_size, rng):
        x_np, y_np = trim_left(inputs[rows], targets[rows])
        x = torch.from_numpy(x_np).to(device)
        y = torch.from_numpy(y_np).to(device)
        p = None
        if purchases is not None:
            p = torch.from_numpy(purchases[rows][:, -y_np.shape[1] :]).to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
        ):
            if teacher is None:
                loss = chunked_loss_backward(
                    model,
                    x,
                    y,
                    config.head_chunk,
                    config.label_smoothing,
                    purchases=p,
                    purchase_weight=config.purchase_weight,
                )
            else:
                loss = distill_loss_backward(
                    model, teacher, x, y, config.head_chunk, distill or DistillConfig()
                )
        if config.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = int((y_np > 0).sum())
        total += loss * n
        count += n
        if on_batch is not None:
            on_batch()
        if deadline is not None and time.perf_counter() > deadline:
            break
    return total / max(1, count)


ChunkLoss = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]


def chunked_loss_backward(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    label_smoothing: float = 0.0,
    chunk_loss: ChunkLoss | None = None,
    purchases: torch.Tensor | None = None,
    purchase_weight: float = 1.0,
) -> float:
    """Back-propagate `sequence_loss` with the head run on ``chunk`` targets at a time.

    The same gradients as ``sequence_loss(...).backward()``, but the (targets x catalogue)
    logits, the largest tensors of a step, exist one chunk at a time: the encoder runs once,
    its states are detached, each chunk's loss is back-propagated into the head and the
    detached states, then the states' gradient into the encoder. Chunks small enough for
    the allocator to reuse (512 x 12k floats = 25 MB) also avoid fresh page faults every step.
    ``chunk_loss(logits, targets, rows)`` replaces the summed cross-entropy of a chunk
    (``rows``: its slice of the N target positions; distillation uses it). With
    ``purchases`` ((B, T) 0/1 beside ``targets``) the model's ``purchase_head`` adds
    ``purchase_weight`` times the mean binary cross-entropy of "the next event is a
    purchase". Returns the mean loss.
    """
    h = model.encode(inputs)  # type: ignore[operator]  # (B, T, H)
    mask = targets > 0
    states = h[mask]  # (N, H)
    wanted = targets[mask]  # (N,)
    n = len(wanted)
    leaf = states.detach().requires_grad_(True)
    total = 0.0
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        logits = model.head(leaf[rows])  # type: ignore[operator]  # (C, V)
        if chunk_loss is None:
            summed = F.cross_entropy(
                logits, wanted[rows], label_smoothing=label_smoothing, reduction="sum"
            )
        else:
            summed = chunk_loss(logits, wanted[rows], rows)
        loss = summed / max(1, n)
        loss.backward()  # type: ignore[no-untyped-call]
        total += float(loss.detach())
    if purchases is not None and n:
        logit = model.purchase_head(leaf).squeeze(-1)  # type: ignore[operator]  # (N,)
        bce = F.binary_cross_entropy_with_logits(logit, purchases[mask].to(logit.dtype))
        (purchase_weight * bce).backward()  # type: ignore[no-untyped-call]
        total += purchase_weight * float(bce.detach())
    if leaf.grad is not None:
        states.backward(leaf.grad)
    return total


def last_position_scores(model: nn.Module, device: torch.device | None = None) -> ScoreFn:
    """A `shared.metrics.ScoreFn`: (B, T) inputs -> last-position logits (B, V) on the CPU."""
    dev = device or torch.device("cpu")

    def score(items: torch.Tensor) -> torch.Tensor:
        h = model.encode(items.to(dev))[:, -1, :]  # type: ignore[operator]  # (B, H)
        return model.head(h).float().cpu()  # type: ignore[operator]  # (B, V)

    return score


def evaluate_model(
    model: nn.Module,
    data: Any,
    mode: str = "full",
    device: torch.device | None = None,
    batch_size: int = 512,
    seed: int = 0,
    mask_history: bool = True,
) -> dict[str, float]:
    """Ranking metrics of ``model`` on an `EvalSet` (eval mode, no gradients).

    A multi-behaviour model gets its histories as `shared.sequences.behaviour_tokens`.
    ``mask_history`` as in `shared.metrics.evaluate_ranking`.
    """
    model.eval()
    max_len = int(model.config.max_len)  # type: ignore[union-attr,arg-type]
    inputs = None
    if n_behaviours(model):
        inputs = data.histories.token_lists(int(model.config.n_items))  # type: ignore[union-attr,arg-type]
    with torch.no_grad():
        return evaluate_ranking(
            last_position_scores(model, device),
            data,
            max_len,
            mode=mode,
            batch_size=batch_size,
            seed=seed,
            trim=True,  # exact: every model here is invariant to left padding (tested)
            inputs=inputs,
            mask_history=mask_history,
        )


def n_behaviours(model: nn.Module) -> int:
    """Event-type codes ``model`` reads in its input tokens (0: item ids only)."""
    return int(getattr(getattr(model, "config", None), "n_behaviours", 0) or 0)


class _Bars:
    """Rich progress bars for epochs and batches (or nothing)."""

    def __init__(self, enabled: bool, epochs: int, batches: int) -> None:
        self.progress: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self.progress.start()
        self.epoch_task = self.progress.add_task("epochs", total=epochs, info="")
        self.batch_task = self.progress.add_task("batches", total=batches, info="")

    def batch(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.batch_task)

    def epoch(self, info: str) -> None:
        if self.progress is not None:
            self.progress.advance(self.epoch_task)
            self.progress.update(self.epoch_task, info=info)
            self.progress.reset(self.batch_task)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def train_model(
    model: nn.Module,
    split: DataSplit,
    config: TrainConfig | None = None,
    progress: bool = False,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    teacher: nn.Module | None = None,
    distill: DistillConfig | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``split.train``; early stopping on validation NDCG@10.

    The best epoch's weights are restored before the test metrics are computed. A
    `shared.models.popularity.Popularity` model is fitted by counting instead. torch's
    intra-op thread count is set to `resolve_threads(config.threads)` for the call. With a
    ``teacher`` (a trained model of the same catalogue, left unchanged) the student learns
    from its soft targets too (`shared.distillation`).
    """
    config = config or TrainConfig()
    if teacher is not None:
        check_teacher(model, teacher)
    threads = resolve_threads(config.threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = _train(model, split, config, progress, on_epoch, teacher, distill)
    finally:
        torch.set_num_threads(before)
    return replace(result, threads=threads)


def _train(
    model: nn.Module,
    split: DataSplit,
    config: TrainConfig,
    progress: bool,
    on_epoch: Callable[[EpochRecord], None] | None,
    teacher: nn.Module | None = None,
    distill: DistillConfig | None = None,
) -> TrainResult:
    from shared.models.popularity import Popularity

    device = resolve_device(config.device)
    if len(split.valid) == 0 or len(split.test) == 0:
        raise DataError("no shopper has enough events to validate and test (need >= 3 each)")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    max_len = int(model.config.max_len)  # type: ignore[union-attr,arg-type]
    start = time.perf_counter()

    def evaluate(data: EvalSet) -> dict[str, float]:
        # A popularity model is counted on the CPU and evaluated there (device None).
        return evaluate_model(
            model,
            data,
            device=None if isinstance(model, Popularity) else device,
            batch_size=config.eval_batch_size,
            mask_history=config.mask_history,
        )

    if isinstance(model, Popularity) and teacher is not None:
        raise ConfigError("a popularity model is counted, not trained: it cannot be distilled")
    if isinstance(model, Popularity):
        # Validated on training counts; the final model (and its test metrics) also counts
        # the validation events, which precede every test event and are in its history.
        model.fit_counts(split.train.items)
        valid = evaluate(split.valid)
        model.fit_counts(np.concatenate([split.train.items, split.valid.targets]))
        return TrainResult(
            history=[],
            best_epoch=0,
            best_valid=valid,
            test=evaluate(split.test),
            train_seconds=time.perf_counter() - start,
            n_examples=len(split.train),
            n_targets=int(split.train.n_events),
            device="cpu",
            config=_config_dict(config),
        )

    purchases = None
    if n_behaviours(model):
        n_items = int(model.config.n_items)  # type: ignore[union-attr,arg-type]
        inputs, targets, purchases = behaviour_examples(
            split.train, max_len, n_items, config.all_windows
        )
    else:
        inputs, targets = training_examples(split.train, max_len, config.all_windows)
    if len(inputs) == 0:
        raise DataError("no training sequence has two or more events")
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = make_optimizer(model, config)
    steps_per_epoch = math.ceil(len(inputs) / config.batch_size)
    total_steps = max(1, steps_per_epoch * config.epochs)
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
    budget = config.time_budget_s

    def schedule(step: int) -> float:
        # With a time budget the decay also follows the clock, so a run the budget cuts short
        # (a slow or loaded machine) still ends at the low learning rate, where the best
        # epochs are; such a run is not bit-reproducible. Unhurried runs follow the steps.
        if budget is not None and step >= warmup:
            elapsed = (time.perf_counter() - start) / max(budget, 1e-9)
            step = max(step, round(elapsed * total_steps))
        return lr_factor(step, total_steps, warmup, config.min_lr_ratio)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    history: list[EpochRecord] = []
    best_score, best_epoch = -1.0, 0
    best_state = copy.deepcopy(model.state_dict())
    best_valid: dict[str, float] = {}
    stopped_early = False
    deadline = None if config.time_budget_s is None else start + config.time_budget_s
    bars = _Bars(progress, config.epochs, steps_per_epoch)
    try:
        for epoch in range(1, config.epochs + 1):
            t0 = time.perf_counter()
            loss = train_epoch(
                model,
                optimizer,
                inputs,
                targets,
                config,
                rng,
                device,
                scheduler,
                bars.batch,
                deadline,
                teacher,
                distill,
                purchases,
            )
            valid = evaluate(split.valid)
            record = EpochRecord(
                epoch=epoch,
                loss=loss,
                valid=valid,
                lr=float(optimizer.param_groups[0]["lr"]),
                seconds=time.perf_counter() - t0,
            )
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            score = valid[EARLY_STOP_METRIC]
            if score > best_score:
                best_score, best_epoch, best_valid = score, epoch, valid
                best_state = copy.deepcopy(model.state_dict())
            bars.epoch(f"loss {loss:.3f} valid ndcg@10 {score:.4f} (best {best_score:.4f})")
            if epoch - best_epoch >= config.patience:
                stopped_early = True
                break
            if deadline is not None and time.perf_counter() > deadline:
                stopped_early = True
                break
    finally:
        bars.close()
    model.load_state_dict(best_state)
    train_seconds = time.perf_counter() - start
    test = evaluate(split.test)
    model.to("cpu")
    return TrainResult(
        history=history,
        best_epoch=best_epoch,
        best_valid=best_valid,
        test=test,
        train_seconds=train_seconds,
        n_examples=len(inputs),
        n_targets=int((targets > 0).sum()),
        device=str(device),
        stopped_early=stopped_early,
        config=_config_dict(config),
    )


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    return asdict(config)


# What `fedrec train` uses when no flag is given: model sizes and optimisation settings tuned
# on Amazon Beauty (docs/models.md has the measurements). The config dataclasses' own defaults
# stay compact on purpose: they are what federated runs get unless told otherwise, where every
# parameter costs DP noise, per-sample-gradient memory and bytes on the wire.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "gru": {"dim": 256, "hidden": 256, "dropout": 0.3},
    "sasrec": {"dim": 256, "n_heads": 4, "n_layers": 2, "dropout": 0.3},
    "mf": {"dim": 256, "dropout": 0.3},
    "pop": {},
}
# 16 minutes of training at most, so that `fedrec train` ends within 20 minutes even on a
# loaded machine: after the budget come one validation, the test evaluation, the ONNX and
# explanation export (about 2 minutes together at load average 10 on 2 cores). The best
# epoch so far is kept.
TIME_BUDGET_S = 16 * 60.0
TRAIN_DEFAULTS: dict[str, TrainConfig] = {
    "gru": TrainConfig(time_budget_s=TIME_BUDGET_S),
    "sasrec": TrainConfig(time_budget_s=TIME_BUDGET_S),
    "mf": TrainConfig(time_budget_s=TIME_BUDGET_S),
    "pop": TrainConfig(epochs=0),
}


def default_train_config(kind: str) -> TrainConfig:
    """The tuned `TrainConfig` of a model kind (what `fedrec train` uses without flags)."""
    try:
        return TRAIN_DEFAULTS[kind]
    except KeyError as err:
        raise ConfigError(f"unknown model kind {kind!r}; known: {sorted(TRAIN_DEFAULTS)}") from err


def default_model_config(kind: str, n_items: int, **overrides: Any) -> dict[str, Any]:
    """The tuned model config of a kind for a catalogue, with ``overrides`` (None = keep)."""
    default_train_config(kind)  # validates the kind
    config = {**MODEL_DEFAULTS[kind], "n_items": n_items}
    config.update({k: v for k, v in overrides.items() if v is not None})
    return config


def prepare_split(
    events: pd.DataFrame, vocab: ItemVocab | None = None
) -> tuple[ItemVocab, DataSplit]:
    """The item vocabulary (every item in ``events`` unless given) and the leave-one-out split.

    With a given vocabulary (evaluating a saved model), events of unknown items are dropped.
    """
    vocab = vocab or ItemVocab.from_items(events["item_id"].astype(str))
    if vocab.n_items == 0:
        raise DataError("the data holds no items")
    split = leave_one_out(build_sequences(events, vocab))
    if len(split.test) == 0:
        raise DataError("no shopper has the 3 events leave-one-out needs (train, valid, test)")
    return vocab, split


def with_overrides(config: TrainConfig, **overrides: Any) -> TrainConfig:
    """``config`` with every override that is not None applied."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
