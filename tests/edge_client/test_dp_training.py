"""`train_local`: one DP round at a site, its budget, its weights and its randomness."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_client.dp_sgd import DPSGDEngine, microbatches, seeded_generator
from edge_client.errors import PrivacyBudgetExceeded
from edge_client.local_training import (
    LocalTrainConfig,
    LocalTrainResult,
    _uniform_batches,
    plan_round,
    train_local,
)
from edge_client.privacy_ledger import PrivacyLedger, compose
from shared.errors import ConfigError, DataError
from shared.models import build_model
from shared.onnx_export import export_onnx
from shared.sequences import UserSequences, next_item_examples, serving_input
from shared.training import sequence_loss

N_ITEMS = 40
GRU = {"n_items": N_ITEMS, "max_len": 8, "dim": 8, "hidden": 8, "dropout": 0.1}
# Small site, small batches: a few steps per round, fast accounting.
CONFIG = LocalTrainConfig(batch_size=16, epochs=1.0, lr=5e-3, epsilon_budget=50.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sequences(n_shoppers: int = 64, seed: int = 0) -> UserSequences:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 14, n_shoppers)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # A successor pattern, so training has something to learn.
    starts = rng.integers(1, N_ITEMS + 1, n_shoppers)
    items = np.concatenate(
        [(s + np.arange(n) - 1) % N_ITEMS + 1 for s, n in zip(starts, lengths, strict=True)]
    )
    n = int(offsets[-1])
    return UserSequences(
        user_ids=tuple(f"shopper-{i}" for i in range(n_shoppers)),
        offsets=offsets,
        items=items.astype(np.int64),
        event_types=np.zeros(n, dtype=np.int8),
        ts_ms=np.arange(n, dtype=np.int64),
    )


class Untouchable(UserSequences):
    """Sequences whose behaviour must not be read (only the counts may be)."""

    def item_lists(self) -> list[np.ndarray]:
        raise AssertionError("the shoppers' events were read")


def untouchable(seqs: UserSequences) -> Untouchable:
    return Untouchable(seqs.user_ids, seqs.offsets, seqs.items, seqs.event_types, seqs.ts_ms)


def test_a_dp_round_returns_plain_weights_and_its_privacy_cost(tmp_path: Path) -> None:
    # Arrange
    torch.manual_seed(0)
    model = build_model("gru", GRU)
    seqs = sequences()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # Act
    with PrivacyLedger(tmp_path / "site.db") as ledger:
        result = train_local(model, seqs, CONFIG, ledger, model_version="v1", secret_seed=1)
        history = ledger.history()

    # Assert: plain names and shapes, the model passed in untouched, the update non-trivial
    assert {k: v.shape for k, v in result.state_dict.items()} == {
        k: v.shape for k, v in before.items()
    }
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, before[k]) for k, v in result.state_dict.items())
    assert float(result.state_dict["item_emb.weight"][0].abs().max()) == 0.0  # padding row
    # Accounting: q, steps, epsilon of this mechanism, recorded with the model version
    n = int((seqs.lengths >= 2).sum())
    assert result.num_examples == n
    assert result.sample_rate == pytest.approx(CONFIG.batch_size / n)
    assert result.steps == math.ceil(n / CONFIG.batch_size)
    mechanism = plan_round(n, CONFIG)
    assert result.epsilon == pytest.approx(compose([mechanism], CONFIG.delta).epsilon_prv)
    assert result.epsilon_round == pytest.approx(result.epsilon)
    assert result.epsilon <= result.epsilon_rdp
    assert [(r.model_version, r.mechanism) for r in history] == [("v1", mechanism)]
    scalars = {k: v for k, v in vars(result).items() if k != "state_dict"}
    json.dumps(scalars)


def test_the_weights_export_to_onnx_and_serve_like_torch(tmp_path: Path) -> None:
    # Arrange
    torch.manual_seed(1)
    model = build_model("gru", GRU)
    result = train_local(model, sequences(), CONFIG, secret_seed=2)
    served = build_model("gru", GRU)
    served.load_state_dict(result.state_dict, strict=True)
    served.eval()

    # Act
    export_onnx(served, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    items = np.concatenate([serving_input(np.array([3, 4, 5]), 8), serving_input(np.array([9]), 8)])
    scores, ids = session.run(None, {"items": items, "exclude": np.zeros((2, 1), np.int64)})

    # Assert: same top items and scores as the torch model with the same weights
    with torch.no_grad():
        logits = served(torch.from_numpy(items))[:, -1, 1:]
    top = torch.topk(logits, scores.shape[1], dim=1)
    np.testing.assert_array_equal(ids, top.indices.numpy() + 1)
    np.testing.assert_allclose(scores, top.values.numpy(), rtol=1e-4, atol=1e-5)


def test_the_budget_composes_across_restarts_and_refuses_before_reading(tmp_path: Path) -> None:
    # Arrange: a budget that two rounds fit and three do not
    torch.manual_seed(2)
    model = build_model("gru", GRU)
    seqs = sequences()
    n = int((seqs.lengths >= 2).sum())
    two = compose([plan_round(n, CONFIG)] * 2, CONFIG.delta).epsilon_prv
    three = compose([plan_round(n, CONFIG)] * 3, CONFIG.delta).epsilon_prv
    config = LocalTrainConfig(
        batch_size=16, epsilon_budget=(two + three) / 2, verify_shoppers=0, lr=5e-3
    )
    path = tmp_path / "site.db"

    # Act: two rounds, each in a fresh ledger connection (a restart in between)
    for _ in range(2):
        with PrivacyLedger(path) as ledger:
            train_local(model, seqs, config, ledger, secret_seed=3)
    with PrivacyLedger(path) as ledger, pytest.raises(PrivacyBudgetExceeded) as refused:
        train_local(model, untouchable(seqs), config, ledger)

    # Assert: refused with the numbers, nothing recorded, no event read
    assert refused.value.spent == pytest.approx(two)
    assert refused.value.next_round == pytest.approx(three)
    assert "shopper" in str(refused.value)
    with PrivacyLedger(path) as ledger:
        assert len(ledger.history()) == 2
        assert ledger.spent().epsilon_prv == pytest.approx(two)


def test_noise_and_sampling_come_from_the_secret_seed_not_the_config_seed() -> None:
    model = build_model("gru", GRU)
    seqs = sequences(32)
    config = LocalTrainConfig(batch_size=8, verify_shoppers=0, epsilon_budget=100.0)

    def weights(secret: int | None) -> torch.Tensor:
        result = train_local(model, seqs, config, secret_seed=secret)
        return result.state_dict["head.weight"]

    assert torch.equal(weights(5), weights(5))  # reproducible when a test asks for it
    assert not torch.equal(weights(None), weights(None))  # fresh OS entropy otherwise


def test_noise_has_the_calibrated_scale() -> None:
    # An empty Poisson batch: the averaged gradient is pure noise, std = sigma * C / (q N).
    engine = DPSGDEngine(
        build_model("gru", {**GRU, "n_items": 400}),
        lr=1e-3,
        max_grad_norm=0.5,
        noise_multiplier=2.0,
        expected_batch_size=10.0,
        noise_generator=seeded_generator(0),
        device=torch.device("cpu"),
    )
    empty = np.zeros((0, 8), dtype=np.int64)
    before = engine.state_dict()
    engine.step(empty, empty)
    noise = engine.dp_model.head.weight.grad
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 10.0, rel=0.05)
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.01)
    after = engine.state_dict()
    assert not torch.equal(after["head.weight"], before["head.weight"])
    assert float(after["item_emb.weight"][0].abs().max()) == 0.0


def test_empty_poisson_batches_are_noise_only_steps() -> None:
    # Three shoppers, expected batch 1: about a third of the steps draw nobody.
    result = train_local(
        build_model("gru", GRU),
        sequences(3),
        LocalTrainConfig(batch_size=1, epochs=4.0, verify_shoppers=0, epsilon_budget=1e3),
        secret_seed=11,
    )
    assert result.steps == 12
    assert math.isfinite(result.loss)


def test_micro_batches_sum_to_the_whole_batch_exactly() -> None:
    # Arrange: one batch split by length and by a tiny logits budget, vs in one piece
    torch.manual_seed(4)
    model = build_model("gru", {**GRU, "dropout": 0.0})
    seqs = sequences(24)
    from shared.sequences import next_item_examples

    inputs, targets = next_item_examples(seqs, 8)

    def summed(max_logits: int) -> dict[str, torch.Tensor]:
        engine = DPSGDEngine(
            model,
            lr=1e-3,
            max_grad_norm=0.3,
            noise_multiplier=1.0,
            expected_batch_size=10.0,
            noise_generator=seeded_generator(0),
            device=torch.device("cpu"),
            max_logits=max_logits,
        )
        engine.accumulate_batch(inputs, targets)
        return {n: p.grad.clone() for n, p in engine.dp_model.named_parameters()}

    # Act
    whole, split = summed(1 << 30), summed(3 * (N_ITEMS + 1))

    # Assert
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-5, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 50), min_size=1, max_size=80),
    max_logits=st.integers(1, 5000),
    n_outputs=st.integers(1, 100),
)
def test_micro_batches_partition_the_batch(
    lengths: list[int], max_logits: int, n_outputs: int
) -> None:
    arr = np.array(lengths)
    parts = microbatches(arr, max_logits, n_outputs)
    rows = np.concatenate(parts)
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    cap = max(1, max_logits // n_outputs)
    for part in parts:
        widths = arr[part]
        assert widths.max() <= 2 * widths.min() or len(part) == 1
        assert widths.sum() <= cap or len(part) == 1


def test_without_dp_there_is_no_guarantee_and_loss_goes_down() -> None:
    torch.manual_seed(5)
    model = build_model("gru", {**GRU, "dropout": 0.0})
    seqs = sequences(128)
    config = LocalTrainConfig(dp=False, batch_size=32, epochs=3.0, lr=2e-2)
    first = train_local(model, seqs, config)
    model.load_state_dict(first.state_dict)
    second = train_local(model, seqs, config)
    assert first.epsilon == math.inf and first.noise_multiplier == 0.0
    assert first.steps == math.ceil(3.0 * first.num_examples / 32)
    assert second.loss < first.loss


def test_one_sgd_step_at_lr_1_subtracts_the_mean_gradient_of_every_target() -> None:
    """FedSGD's local step: micro-batches add up to the whole site's gradient exactly."""
    # Arrange
    torch.manual_seed(6)
    model = build_model("gru", {**GRU, "dropout": 0.0})
    seqs = sequences(40)
    inputs, targets = next_item_examples(seqs, GRU["max_len"])
    x, y = torch.from_numpy(inputs), torch.from_numpy(targets)
    expected = copy.deepcopy(model)
    sequence_loss(expected, x, y).backward()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        for p in expected.parameters():
            p -= p.grad  # type: ignore[operator]
    # 3 targets x 41 logits per micro-batch: dozens of micro-batches for the one step
    config = LocalTrainConfig(
        dp=False, optimizer="sgd", lr=1.0, max_steps=1, batch_size=1000, max_logits=3 * 41
    )
    # Act
    result = train_local(model, seqs, config)
    # Assert
    assert result.steps == 1 and result.num_examples == len(inputs)
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(result.state_dict[name], value, rtol=1e-5, atol=1e-6)
    before = model.state_dict()
    assert sum(float((result.state_dict[k] - v).abs().sum()) for k, v in before.items()) > 0


def test_local_steps_draw_uniform_batches_of_the_asked_size() -> None:
    # Arrange: 4 steps of 8 from 64 shoppers, Adam
    config = LocalTrainConfig(dp=False, max_steps=4, batch_size=8, lr=1e-2)
    # Act
    result = train_local(build_model("gru", GRU), sequences(64), config)
    # Assert
    assert result.steps == 4
    draws = [set(b.tolist()) for b in _uniform_batches(64, 8, 50, np.random.default_rng(0))]
    assert all(len(d) == 8 for d in draws)  # without replacement within a step
    seen = set().union(*draws)
    assert len(seen) > 56  # uniform over the site, not one length bucket


def test_a_target_epsilon_sets_the_noise() -> None:
    config = LocalTrainConfig(batch_size=16, noise_multiplier=None, target_epsilon=3.0)
    result: LocalTrainResult = train_local(
        build_model("gru", GRU), sequences(), config, secret_seed=4
    )
    assert result.epsilon_round == pytest.approx(3.0, abs=0.05)
    assert result.noise_multiplier > 0


def test_a_site_without_sequences_to_learn_from_is_an_error() -> None:
    with pytest.raises(DataError, match="two or more events"):
        train_local(build_model("gru", GRU), sequences(5).truncate(20), CONFIG)


@pytest.mark.parametrize(
    "overrides",
    [
        {"batch_size": 0},
        {"epochs": 0.0},
        {"max_grad_norm": 0.0},
        {"delta": 1.0},
        {"epsilon_budget": -1.0},
        {"noise_multiplier": None},
        {"noise_multiplier": 0.0},
        {"target_epsilon": -2.0},
        {"device": "tpu"},
        {"dp": False, "optimizer": "rmsprop"},
        {"dp": False, "max_steps": -1},
        {"optimizer": "sgd"},  # DP-SGD plans its own steps
        {"max_steps": 1},
    ],
)
def test_bad_settings_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        LocalTrainConfig(**overrides)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_asking_for_cuda_without_a_gpu_is_an_error() -> None:
    with pytest.raises(ConfigError, match="CUDA"):
        train_local(build_model("gru", GRU), sequences(), LocalTrainConfig(device="cuda"))


def test_a_multi_behaviour_model_trains_under_dp_on_its_event_types() -> None:
    # Arrange: the same shoppers, with event types; a model that reads them
    torch.manual_seed(0)
    model = build_model("gru", {**GRU, "n_behaviours": 5})
    seqs = sequences()
    rng = np.random.default_rng(1)
    typed = UserSequences(
        seqs.user_ids,
        seqs.offsets,
        seqs.items,
        rng.integers(1, 5, len(seqs.items)).astype(np.int8),
        seqs.ts_ms,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Act
    result = train_local(model, typed, CONFIG, secret_seed=2)
    # Assert: exact per-shopper clipping held (verified every round), the behaviour table
    # moved, the will-purchase head (not in the DP loss) is returned unchanged
    changed = {k for k, v in result.state_dict.items() if not torch.equal(v, before[k])}
    assert "behaviour_emb.weight" in changed and "item_emb.weight" in changed
    assert not changed & {"purchase_head.weight", "purchase_head.bias"}
    assert float(result.state_dict["behaviour_emb.weight"][0].abs().max()) == 0.0
    assert math.isfinite(result.epsilon) and result.epsilon <= CONFIG.epsilon_budget
