"""Multi-behaviour GRU: tokens, the padding contract, examples, the purchase loss, ONNX."""

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from shared.events import EVENT_TYPE_CODES
from shared.metrics import evaluate_ranking
from shared.models import build_model
from shared.onnx_export import export_onnx
from shared.sequences import (
    N_BEHAVIOURS,
    PURCHASE_CODE,
    EvalSet,
    UserSequences,
    behaviour_tokens,
    pad_left,
)
from shared.training import (
    TrainConfig,
    behaviour_examples,
    chunked_loss_backward,
    evaluate_model,
    n_behaviours,
    train_epoch,
    training_examples,
)

N_ITEMS = 30
MAX_LEN = 8


def _model(seed: int = 0, dropout: float = 0.0) -> Any:
    torch.manual_seed(seed)
    return build_model(
        "gru",
        {
            "n_items": N_ITEMS,
            "max_len": MAX_LEN,
            "dim": 8,
            "hidden": 12,
            "dropout": dropout,
            "n_behaviours": N_BEHAVIOURS,
        },
    )


def _seqs(rows: list[list[tuple[int, str]]]) -> UserSequences:
    lengths = [len(r) for r in rows]
    flat = [e for r in rows for e in r]
    return UserSequences(
        user_ids=tuple(f"u{i}" for i in range(len(rows))),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=np.array([i for i, _ in flat], dtype=np.int64),
        event_types=np.array([EVENT_TYPE_CODES[t] for _, t in flat], dtype=np.int8),
        ts_ms=np.arange(len(flat), dtype=np.int64),
    )


@settings(max_examples=30, deadline=None)
@given(
    items=st.lists(st.integers(0, N_ITEMS), min_size=1, max_size=20),
    codes=st.lists(st.integers(0, N_BEHAVIOURS), min_size=20, max_size=20),
)
def test_tokens_keep_item_and_type_apart(items: list[int], codes: list[int]) -> None:
    # Arrange
    i = np.asarray(items)
    c = np.asarray(codes[: len(items)])
    # Act
    tokens = behaviour_tokens(i, c, N_ITEMS)
    # Assert: both parts come back; code 0 leaves the item id itself
    np.testing.assert_array_equal(tokens % (N_ITEMS + 1), i)
    np.testing.assert_array_equal(tokens // (N_ITEMS + 1), c)
    np.testing.assert_array_equal(behaviour_tokens(i, np.zeros_like(i), N_ITEMS), i)


@settings(max_examples=15, deadline=None)
@given(
    history=st.lists(
        st.tuples(st.integers(1, N_ITEMS), st.integers(1, N_BEHAVIOURS)), min_size=1, max_size=8
    ),
    extra_pad=st.integers(0, 6),
)
def test_scores_do_not_depend_on_left_padding(
    history: list[tuple[int, int]], extra_pad: int
) -> None:
    # Arrange: the contract that lets training trim batches while serving pads
    model = _model().eval()
    tokens = behaviour_tokens(
        np.array([i for i, _ in history]), np.array([c for _, c in history]), N_ITEMS
    )
    # Act
    with torch.no_grad():
        tight = model(torch.from_numpy(pad_left([tokens], len(tokens))))[:, -1]
        padded = model(torch.from_numpy(pad_left([tokens], len(tokens) + extra_pad)))[:, -1]
    # Assert
    torch.testing.assert_close(tight, padded, atol=1e-5, rtol=1e-5)


def test_the_event_type_changes_the_answer() -> None:
    # Arrange: the same items, viewed or purchased
    model = _model(seed=3).eval()
    items = np.array([4, 9, 2])
    viewed = behaviour_tokens(items, np.full(3, EVENT_TYPE_CODES["view"]), N_ITEMS)
    bought = behaviour_tokens(items, np.full(3, PURCHASE_CODE), N_ITEMS)
    # Act
    with torch.no_grad():
        a = model(torch.from_numpy(viewed[None]))[:, -1]
        b = model(torch.from_numpy(bought[None]))[:, -1]
    # Assert
    assert (a - b).abs().max() > 1e-3
    assert n_behaviours(model) == N_BEHAVIOURS
    assert n_behaviours(build_model("gru", {"n_items": N_ITEMS})) == 0


def test_behaviour_examples_align_with_item_examples() -> None:
    # Arrange: one shopper longer than two windows, one short, one too short to train on
    rows = [
        [(1 + k % 7, ("view", "cart", "purchase")[k % 3]) for k in range(2 * MAX_LEN + 3)],
        [(3, "view"), (4, "purchase")],
        [(5, "fav")],
    ]
    seqs = _seqs(rows)
    # Act
    inputs, targets, purchases = behaviour_examples(seqs, MAX_LEN, N_ITEMS)
    plain_inputs, plain_targets = training_examples(seqs, MAX_LEN)
    # Assert: same windows; inputs are the tokens of the items; 1 exactly at purchase targets
    np.testing.assert_array_equal(targets, plain_targets)
    np.testing.assert_array_equal(inputs % (N_ITEMS + 1), plain_inputs)
    assert ((inputs // (N_ITEMS + 1) > 0) == (plain_inputs > 0)).all()
    flat_types = np.concatenate(seqs.event_type_lists()[:2])
    assert int(purchases.sum()) == int((flat_types == PURCHASE_CODE).sum())
    assert (purchases[targets == 0] == 0).all()
    assert purchases[1, -1] == 1 and targets[1, -1] == 4


def test_chunked_loss_adds_the_purchase_term_with_exact_gradients() -> None:
    # Arrange
    model = _model(seed=1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(1, 5 * (N_ITEMS + 1), (4, MAX_LEN), generator=gen)
    x[:, :2] = 0
    y = torch.randint(1, N_ITEMS + 1, (4, MAX_LEN), generator=gen)
    y[:, :2] = 0
    p = (torch.rand((4, MAX_LEN), generator=gen) < 0.3).long() * (y > 0)
    # Act: chunked (3 targets a chunk) against the whole loss at once
    model.zero_grad()
    got = chunked_loss_backward(model, x, y, 3, purchases=p, purchase_weight=0.5)
    chunked = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    model.zero_grad()
    h = model.encode(x)
    mask = y > 0
    whole = F.cross_entropy(model.head(h[mask]), y[mask]) + 0.5 * (
        F.binary_cross_entropy_with_logits(
            model.purchase_head(h[mask]).squeeze(-1),
            p[mask].float(),
        )
    )
    whole.backward()  # type: ignore[no-untyped-call]
    # Assert
    assert got == pytest.approx(whole.item(), rel=1e-5)
    assert "purchase_head.weight" in chunked and "behaviour_emb.weight" in chunked
    for name, q in model.named_parameters():
        torch.testing.assert_close(chunked[name], q.grad, atol=1e-6, rtol=1e-4)


def test_the_purchase_head_learns_that_a_cart_is_followed_by_a_purchase() -> None:
    # Arrange: after a cart comes a purchase of the same item; after a view, another view
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(200):
        row: list[tuple[int, str]] = []
        for _ in range(3):
            item = int(rng.integers(1, N_ITEMS + 1))
            if rng.random() < 0.5:
                row += [(item, "cart"), (item, "purchase")]
            else:
                row += [(item, "view"), (int(rng.integers(1, N_ITEMS + 1)), "view")]
        rows.append(row)
    inputs, targets, purchases = behaviour_examples(_seqs(rows), MAX_LEN, N_ITEMS)
    model = _model(seed=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    config = TrainConfig(batch_size=32, grad_clip=None, precision="fp32")
    rng_batches = np.random.default_rng(1)
    # Act
    for _ in range(15):
        train_epoch(
            model,
            optimizer,
            inputs,
            targets,
            config,
            rng_batches,
            torch.device("cpu"),
            purchases=purchases,
        )
    model.eval()
    after = {}
    for kind in ("cart", "view"):
        tokens = behaviour_tokens(np.array([5]), np.array([EVENT_TYPE_CODES[kind]]), N_ITEMS)
        with torch.no_grad():
            h = model.encode(torch.from_numpy(tokens[None]))[:, -1]
            after[kind] = float(torch.sigmoid(model.purchase_head(h)))
    # Assert
    assert after["cart"] > 0.8 and after["view"] < 0.2


def test_repeat_aware_ranking_does_not_mask_the_history() -> None:
    # Arrange: the target was seen before; a scorer that likes seen items
    seqs = _seqs([[(3, "view"), (7, "cart")]])
    data = EvalSet(histories=seqs, targets=np.array([7]))

    def likes_history(inputs: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros((inputs.shape[0], N_ITEMS + 1))
        scores.scatter_(1, inputs, 1.0)
        scores[:, 7] = 2.0
        return scores

    # Act
    masked = evaluate_ranking(likes_history, data, MAX_LEN)
    repeat = evaluate_ranking(likes_history, data, MAX_LEN, mask_history=False)
    # Assert
    assert masked["hr@10"] == 0.0  # S3-Rec: a seen target is ranked last
    assert repeat["ndcg@10"] == 1.0


def test_evaluation_feeds_the_model_its_tokens() -> None:
    # Arrange: the same history evaluated directly and by the model's evaluation
    model = _model(seed=4).eval()
    seqs = _seqs([[(3, "view"), (7, "cart"), (9, "purchase")], [(1, "fav"), (2, "view")]])
    data = EvalSet(histories=seqs, targets=np.array([5, 6]))
    tokens = seqs.token_lists(N_ITEMS)
    with torch.no_grad():
        scores = torch.cat([model(torch.from_numpy(pad_left([t], MAX_LEN)))[:, -1] for t in tokens])
    # Act
    got = evaluate_model(model, data, mask_history=False)
    # Assert: the ranks evaluate_model reports are those of the token inputs
    ranks = [
        (scores[r] > scores[r, t]).sum() + (scores[r] == scores[r, t]).sum() - 1
        for r, t in enumerate(data.targets)
    ]
    hits = np.mean([int(rk) < 10 for rk in ranks])
    assert got["hr@10"] == pytest.approx(hits)


def test_onnx_serving_graph_reads_tokens(tmp_path: Path) -> None:
    # Arrange
    model = _model(seed=5).eval()
    with torch.no_grad():
        model.head.weight.normal_(0.0, 1.0)
    path = tmp_path / "model.onnx"
    k = export_onnx(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    history = behaviour_tokens(np.array([3, 7, 9]), np.array([1, 2, PURCHASE_CODE]), N_ITEMS)
    tokens = pad_left([history], MAX_LEN)
    exclude = np.array([[9]], dtype=np.int64)
    # Act
    scores, ids = session.run(None, {"items": tokens, "exclude": exclude})
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens))[:, -1].clone()
    logits[:, 0] = float("-inf")
    logits[:, 9] = float("-inf")
    ref_scores, ref_ids = torch.topk(logits, k, dim=1)
    # Assert
    assert np.abs(scores[:, :10] - ref_scores.numpy()[:, :10]).max() < 1e-4
    np.testing.assert_array_equal(ids[:, :10], ref_ids.numpy()[:, :10])


def _benchmark() -> Any:
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "multi_behaviour.py"
    spec = importlib.util.spec_from_file_location("multi_behaviour_bench", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and typing look modules up by name
    spec.loader.exec_module(module)
    return module


def test_benchmark_next_purchase_targets_and_type_weighted_recency() -> None:
    # Arrange: u0 buys at t=3 (before the window) and t=5; u1 never buys; u2 buys first event
    bench = _benchmark()
    seqs = _seqs(
        [
            [(1, "view"), (2, "cart"), (3, "view"), (2, "purchase"), (4, "view"), (3, "purchase")],
            [(5, "view"), (6, "cart")],
            [(7, "purchase"), (8, "view")],
        ]
    )
    # Act
    purchases = bench.next_purchase_set(seqs, t_from_ms=4)
    weights = np.zeros(N_BEHAVIOURS + 1)
    weights[EVENT_TYPE_CODES["view"]] = 1.0
    weights[EVENT_TYPE_CODES["cart"]] = 4.0
    score = bench.weighted_recency_scores(N_ITEMS, weights, half_life=100.0)
    tokens = torch.from_numpy(pad_left(seqs.token_lists(N_ITEMS)[1:2], 4))
    scores = score(tokens)[0]
    # Assert: only u0's purchase at index 5 counts; its history is the five events before it
    assert purchases.histories.user_ids == ("u0",)
    assert purchases.targets.tolist() == [3]
    assert purchases.histories.items.tolist() == [1, 2, 3, 2, 4]
    assert scores[6] > scores[5] > 0 and scores[1] == 0  # the carted item first
    assert bench.auc(np.array([0.9, 0.1, 0.5]), np.array([True, False, False])) == 1.0
