"""Centralized training: example windows, batching, loss, determinism, early stopping, results."""

import copy
import dataclasses
import itertools
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from shared.errors import ConfigError, DataError
from shared.models import build_model
from shared.sequences import EvalSet, UserSequences, leave_one_out, next_item_examples
from shared.synth import SynthConfig, generate_synthetic
from shared.training import (
    TrainConfig,
    default_train_config,
    evaluate_model,
    length_batches,
    lr_factor,
    make_optimizer,
    prepare_split,
    resolve_device,
    resolve_precision,
    resolve_threads,
    sequence_loss,
    train_epoch,
    train_model,
    training_examples,
    trim_left,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth_split():  # type: ignore[no-untyped-def]
    dataset = generate_synthetic(
        SynthConfig(
            n_sites=2, shoppers_per_site=150, n_items=300, n_categories=10, events_per_shopper=30
        )
    )
    return prepare_split(dataset.events)


def _seqs(lists: list[list[int]]) -> UserSequences:
    flat = np.asarray([i for s in lists for i in s], dtype=np.int64)
    return UserSequences(
        user_ids=tuple(f"u{i}" for i in range(len(lists))),
        offsets=np.concatenate([[0], np.cumsum([len(s) for s in lists])]).astype(np.int64),
        items=flat,
        event_types=np.ones(len(flat), dtype=np.int8),
        ts_ms=np.arange(len(flat), dtype=np.int64),
    )


@settings(max_examples=40, deadline=None)
@given(
    lists=st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=30), min_size=1, max_size=8),
    max_len=st.integers(1, 8),
)
def test_windows_extend_next_item_examples_and_cover_every_transition(
    lists: list[list[int]], max_len: int
) -> None:
    # Arrange
    seqs = _seqs(lists)
    # Act
    latest_in, latest_out = next_item_examples(seqs, max_len)
    only_latest = training_examples(seqs, max_len, all_windows=False)
    ins, outs = training_examples(seqs, max_len, all_windows=True)
    # Assert: compatible with next_item_examples, then extra rows
    np.testing.assert_array_equal(only_latest[0], latest_in)
    np.testing.assert_array_equal(only_latest[1], latest_out)
    np.testing.assert_array_equal(ins[: len(latest_in)], latest_in)
    np.testing.assert_array_equal(outs[: len(latest_out)], latest_out)
    # every transition (a -> b) of every sequence is a target exactly once
    expected = sorted(pair for s in lists for pair in itertools.pairwise(s))
    got = sorted((int(ins[r, t]), int(outs[r, t])) for r, t in zip(*np.nonzero(outs), strict=True))
    assert got == expected
    # each row is a contiguous piece of a sequence: inputs shifted by one are the targets
    for r in range(len(ins)):
        real = outs[r] > 0
        assert (ins[r][real] > 0).all()
        np.testing.assert_array_equal(ins[r][real][1:], outs[r][real][:-1])


def test_length_batches_cover_every_row_once_and_group_lengths() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 20, size=1000)
    inputs = np.zeros((1000, 20), dtype=np.int64)
    for r, n in enumerate(lengths):
        inputs[r, 20 - n :] = 1
    batches = list(length_batches(inputs, 32, np.random.default_rng(1), pool=8))
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 5  # vs ~18 for random batches
    again = list(length_batches(inputs, 32, np.random.default_rng(1), pool=8))
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))


def test_trim_left_drops_only_all_padding_columns() -> None:
    inputs = np.array([[0, 0, 0, 4, 5], [0, 0, 1, 2, 3]])
    targets = np.array([[0, 0, 0, 5, 6], [0, 0, 2, 3, 4]])
    x, y = trim_left(inputs, targets)
    np.testing.assert_array_equal(x, inputs[:, 2:])
    np.testing.assert_array_equal(y, targets[:, 2:])


def test_sequence_loss_is_cross_entropy_over_real_positions() -> None:
    torch.manual_seed(0)
    model = build_model("mf", {"n_items": 20, "dim": 4}).eval()
    x = torch.tensor([[0, 3, 4], [5, 6, 7]])
    y = torch.tensor([[0, 4, 9], [6, 7, 8]])
    logits = model(x)
    expected = F.cross_entropy(logits[y > 0], y[y > 0])
    torch.testing.assert_close(sequence_loss(model, x, y), expected)


def test_chunked_steps_make_the_same_update() -> None:
    # Arrange: one model, two copies; the head run on 7 targets at a time vs all at once
    rng = np.random.default_rng(0)
    seqs = _seqs([rng.integers(1, 30, size=n).tolist() for n in rng.integers(2, 12, size=40)])
    inputs, targets = training_examples(seqs, 10)
    torch.manual_seed(0)
    model = build_model(
        "gru", {"n_items": 30, "max_len": 10, "dim": 8, "hidden": 8, "dropout": 0.0}
    )
    twin = copy.deepcopy(model)
    results = []
    for net, cap in ((model, 10_000), (twin, 7)):
        config = TrainConfig(batch_size=16, precision="fp32", head_chunk=cap)
        optimizer = make_optimizer(net, config)
        # Act
        loss = train_epoch(
            net, optimizer, inputs, targets, config, np.random.default_rng(1), torch.device("cpu")
        )
        results.append(loss)
    # Assert
    assert results[0] == pytest.approx(results[1], rel=1e-5)
    twin_state = twin.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, twin_state[name], atol=1e-5, rtol=1e-4, msg=name)


def test_lr_schedule_warms_up_then_decays() -> None:
    factors = [lr_factor(s, total=100, warmup=10, min_ratio=0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_config_validation_and_devices() -> None:
    with pytest.raises(ConfigError):
        TrainConfig(lr=0.0)
    with pytest.raises(ConfigError):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError):
        TrainConfig(device="tpu")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        default_train_config("lstm")
    assert resolve_threads(3) == 3
    assert 1 <= resolve_threads(None) <= (os.cpu_count() or 1)
    with pytest.raises(ConfigError):
        TrainConfig(threads=0)
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(ConfigError):
        TrainConfig(precision="fp8")  # type: ignore[arg-type]
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) in (None, torch.bfloat16)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_epoch_in_each_precision_lowers_the_loss(synth_split, precision: str) -> None:  # type: ignore[no-untyped-def]
    vocab, split = synth_split
    torch.manual_seed(0)
    model = build_model("gru", {"n_items": vocab.n_items, "max_len": 20, "dim": 16, "hidden": 16})
    config = TrainConfig(
        epochs=2, lr=5e-3, batch_size=64, precision=precision, device="cpu", threads=1
    )  # type: ignore[arg-type]
    result = train_model(model, split, config)
    losses = [r.loss for r in result.history]
    assert all(np.isfinite(losses)) and losses[1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32


def test_training_is_deterministic_and_restores_the_best_epoch(synth_split) -> None:  # type: ignore[no-untyped-def]
    # Arrange
    vocab, split = synth_split
    config = TrainConfig(epochs=3, lr=5e-3, batch_size=64, patience=3, device="cpu", threads=1)

    def run() -> tuple[torch.nn.Module, object]:
        torch.manual_seed(123)  # model init; training seeds itself from config.seed
        model = build_model("sasrec", {"n_items": vocab.n_items, "max_len": 20, "dim": 16})
        return model, train_model(model, split, config)

    # Act
    model_a, result_a = run()
    model_b, result_b = run()
    # Assert: same seed, same weights and history
    state_b = model_b.state_dict()
    for name, a in model_a.state_dict().items():
        torch.testing.assert_close(a, state_b[name], msg=name)
    assert [r.valid for r in result_a.history] == [r.valid for r in result_b.history]  # type: ignore[attr-defined]
    # the model holds the best epoch's weights: re-evaluating gives the recorded metrics
    assert evaluate_model(model_a, split.valid) == result_a.best_valid  # type: ignore[attr-defined]
    best = max(result_a.history, key=lambda r: r.valid["ndcg@10"])  # type: ignore[attr-defined]
    assert result_a.best_epoch == best.epoch  # type: ignore[attr-defined]
    assert result_a.test["n_users"] == len(split.test)  # type: ignore[attr-defined]


def test_time_budget_stops_after_one_epoch(synth_split) -> None:  # type: ignore[no-untyped-def]
    vocab, split = synth_split
    model = build_model("mf", {"n_items": vocab.n_items, "max_len": 20, "dim": 8})
    result = train_model(
        model, split, TrainConfig(epochs=5, time_budget_s=0.0, device="cpu", threads=1)
    )
    assert len(result.history) == 1 and result.stopped_early


def test_a_run_cut_short_by_its_budget_still_decays_the_learning_rate(synth_split) -> None:  # type: ignore[no-untyped-def]
    # Arrange: 200 epochs could never finish in 2 s; the step-based cosine would stay near peak
    vocab, split = synth_split
    model = build_model("mf", {"n_items": vocab.n_items, "max_len": 20, "dim": 8})
    config = TrainConfig(
        epochs=200,
        lr=1e-2,
        warmup_epochs=0.1,
        patience=500,  # only the budget may stop it
        time_budget_s=2.0,
        device="cpu",
        threads=1,
    )
    # Act
    result = train_model(model, split, config)
    # Assert: stopped by the budget, with the schedule following the clock to its low end
    assert result.stopped_early and len(result.history) < 200
    assert result.history[-1].lr < 0.3 * config.lr


def test_popularity_is_fitted_by_counting(synth_split) -> None:  # type: ignore[no-untyped-def]
    vocab, split = synth_split
    model = build_model("pop", {"n_items": vocab.n_items})
    result = train_model(model, split, default_train_config("pop"))
    assert result.history == [] and result.best_epoch == 0
    counts = np.bincount(
        np.concatenate([split.train.items, split.valid.targets]), minlength=vocab.n_items + 1
    ).astype(np.float32)
    counts[0] = 0.0
    # the final model counts training and validation events (both precede every test event)
    torch.testing.assert_close(model.head.bias.detach(), torch.from_numpy(np.log1p(counts)))
    assert result.test["n_users"] == len(split.test) and result.best_valid["ndcg@10"] > 0


def test_a_sequential_model_clearly_beats_popularity_on_synthetic_data(synth_split) -> None:  # type: ignore[no-untyped-def]
    # Arrange: the synthetic log has successor patterns that popularity cannot see
    vocab, split = synth_split
    torch.manual_seed(0)
    pop = build_model("pop", {"n_items": vocab.n_items})
    gru = build_model("gru", {"n_items": vocab.n_items, "max_len": 30, "dim": 32, "hidden": 32})
    # Act
    pop_ndcg = train_model(pop, split, default_train_config("pop")).test["ndcg@10"]
    config = TrainConfig(epochs=6, lr=5e-3, batch_size=64, device="cpu", threads=1)
    gru_ndcg = train_model(gru, split, config).test["ndcg@10"]
    # Assert
    assert gru_ndcg > 2 * pop_ndcg, (gru_ndcg, pop_ndcg)


def test_data_without_evaluable_shoppers_is_a_clear_error() -> None:
    import pandas as pd

    events = pd.DataFrame(
        {
            "user_id": ["a", "a", "b"],
            "item_id": ["1", "2", "1"],
            "event_type": "view",
            "ts_ms": np.array([0, 1, 0], dtype=np.int64),
            "value": np.nan,
            "site": "",
        }
    )
    with pytest.raises(DataError, match="3 events"):
        prepare_split(events)
    split = leave_one_out(_seqs([[1, 2, 3]]))
    nobody = EvalSet(split.test.histories.select(np.array([], dtype=np.int64)), np.array([]))
    with pytest.raises(DataError, match="no shopper"):
        train_model(
            build_model("mf", {"n_items": 3, "dim": 2}),
            dataclasses.replace(split, test=nobody),
            TrainConfig(epochs=1),
        )
