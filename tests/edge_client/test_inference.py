"""The ONNX Runtime model server: parity with torch, verification and hot swap."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import pytest
import torch
from edge_kit import MAX_LEN, N_ITEMS, item_vocab, make_model, rehash, write_model

from edge_client import inference
from edge_client.errors import ModelRejectedError
from edge_client.inference import ModelServer, RankBatcher, load_model, set_current_version
from edge_client.recommend import Recommender
from edge_client.store import Event, EventStore
from shared import onnx_export
from shared.artifacts import save_model_dir
from shared.onnx_export import ServingGraph
from shared.sequences import serving_input
from shared.vocab import ItemVocab

if TYPE_CHECKING:
    from shared.models import SequentialModel

T0 = 1_700_000_000_000


def torch_top(model: torch.nn.Module, history: list[int], exclude: list[int], k: int) -> list[int]:
    graph = ServingGraph(cast("SequentialModel", model), k).eval()
    items = torch.from_numpy(serving_input(np.asarray(history), MAX_LEN))
    excl = torch.tensor([exclude or [0]], dtype=torch.int64)
    with torch.inference_mode():
        _, ids = graph(items, excl)
    return ids[0].tolist()


def test_serving_names_agree_with_the_export_contract() -> None:
    assert inference.INPUT_NAMES == onnx_export.INPUT_NAMES
    assert inference.OUTPUT_NAMES == onnx_export.OUTPUT_NAMES


def test_serving_does_not_import_torch() -> None:
    # The service process needs ORT only; torch costs seconds of start-up and ~0.3 GB.
    code = "import sys, edge_client.service.app; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_onnx_ranking_matches_torch_for_the_same_history(site: Path) -> None:
    # Arrange: longer than max_len, so the cut to the last MAX_LEN items matters too
    model = write_model(site / "models", "v1")
    loaded = load_model(site / "models" / "v1")
    history = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    # Act
    scores, ids = loaded.rank(np.asarray(history), np.asarray([7, 8]))
    # Assert
    assert ids[:10].tolist() == torch_top(model, history, [7, 8], 10)
    assert 7 not in ids[: N_ITEMS - 2] and 8 not in ids[: N_ITEMS - 2]
    assert np.all(np.diff(scores[np.isfinite(scores)]) <= 0)


def test_server_swaps_only_when_current_changes(site: Path) -> None:
    # Arrange
    models = site / "models"
    server = ModelServer(models)
    assert server.check().status == "no-model"
    write_model(models, "v1", seed=1)
    # Act
    first = server.check()
    unchanged = server.check()
    held = server.current
    write_model(models, "v2", seed=2)
    second = server.check()
    # Assert: the old model a request still holds keeps working after the swap
    assert (first.status, first.version) == ("swapped", "v1")
    assert unchanged.status == "unchanged"
    assert (second.status, second.version) == ("swapped", "v2")
    assert held is not None and held.version == "v1"
    _, ids = held.rank(np.array([1, 2]), np.zeros(0, dtype=np.int64))
    assert len(ids) == N_ITEMS


def _corrupt(model_dir: Path) -> None:
    data = bytearray((model_dir / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model_dir / "model.onnx").write_bytes(bytes(data))


def _truncate(model_dir: Path) -> None:
    data = (model_dir / "model.onnx").read_bytes()
    (model_dir / "model.onnx").write_bytes(data[: len(data) // 3])


def _garbage_rehashed(model_dir: Path) -> None:
    # Hashes match, but the graph is not a graph: only ONNX Runtime can tell.
    (model_dir / "model.onnx").write_bytes(b"\x08\x07garbage" * 50)
    rehash(model_dir)


def _bigger_vocab_rehashed(model_dir: Path) -> None:
    # A consistent directory whose vocabulary has 5 more items than the graph scores.
    ItemVocab([f"i{i}" for i in range(1, N_ITEMS + 6)]).save(model_dir / "vocab.json")
    rehash(model_dir)


def _smaller_vocab_rehashed(model_dir: Path) -> None:
    # ... and one whose graph scores more items than its vocabulary names.
    ItemVocab([f"i{i}" for i in range(1, N_ITEMS - 4)]).save(model_dir / "vocab.json")
    rehash(model_dir)


def _missing_file(model_dir: Path) -> None:
    (model_dir / "vocab.json").unlink()


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_corrupt, "corrupt"),
        (_truncate, "corrupt"),
        (_garbage_rehashed, "cannot load"),
        (_bigger_vocab_rehashed, "smoke inference failed"),
        (_smaller_vocab_rehashed, "top_k out of range"),
        (_missing_file, "missing"),
    ],
)
def test_damaged_version_is_rejected_and_the_old_keeps_serving(
    site: Path, damage: object, why: str
) -> None:
    # Arrange
    models = site / "models"
    write_model(models, "v1", seed=1)
    server = ModelServer(models)
    server.check()
    write_model(models, "v2", seed=2, current=False)
    assert callable(damage)
    damage(models / "v2")
    # Act
    set_current_version(models, "v2")
    outcome = server.check()
    retried = server.check()
    # Assert
    assert outcome.status == "rejected" and why in outcome.reason
    assert server.current is not None and server.current.version == "v1"
    assert server.last_rejection is not None and server.last_rejection.version == "v2"
    assert retried.status == "unchanged"  # not retried until CURRENT changes


def test_graph_scoring_more_items_than_its_vocabulary_is_rejected(site: Path) -> None:
    # Arrange: 120 items, so K = 100 stays valid for a 110-item vocabulary
    models = site / "models"
    write_model(models, "v1", n_items=120, current=False)
    ItemVocab([f"i{i}" for i in range(1, 111)]).save(models / "v1" / "vocab.json")
    rehash(models / "v1")
    set_current_version(models, "v1")
    server = ModelServer(models)
    # Act
    outcome = server.check()
    # Assert
    assert outcome.status == "rejected" and "vocab mismatch" in outcome.reason
    assert server.current is None


def test_repaired_version_is_picked_up_by_reload(site: Path) -> None:
    # Arrange: v2 is broken when first named, then replaced by a good copy
    models = site / "models"
    write_model(models, "v1", seed=1)
    server = ModelServer(models)
    server.check()
    write_model(models, "v2", seed=2, current=False)
    _truncate(models / "v2")
    set_current_version(models, "v2")
    assert server.check().status == "rejected"
    shutil.rmtree(models / "v2")
    save_model_dir(models / "v2", make_model(2), item_vocab(), version="v2")
    # Act
    outcome = server.reload()
    # Assert
    assert (outcome.status, outcome.version) == ("swapped", "v2")


@pytest.mark.parametrize("text", ["../outside", "v1/../../x", "", "a b"])
def test_current_naming_an_unsafe_or_missing_version_is_rejected(site: Path, text: str) -> None:
    # Arrange
    models = site / "models"
    write_model(models, "v1")
    server = ModelServer(models)
    server.check()
    # Act
    (models / "CURRENT").write_text(text)
    outcome = server.check()
    # Assert
    assert outcome.status == "rejected"
    assert server.current is not None and server.current.version == "v1"


def test_metadata_version_must_match_the_directory(site: Path) -> None:
    # Arrange: a copy of v1 under another name
    models = site / "models"
    write_model(models, "v1", current=False)
    shutil.copytree(models / "v1", models / "v1-copy")
    set_current_version(models, "v1-copy")
    # Act
    outcome = ModelServer(models).check()
    # Assert
    assert outcome.status == "rejected" and "metadata says version" in outcome.reason


def test_load_model_names_the_problem(site: Path) -> None:
    with pytest.raises(ModelRejectedError, match="not a model directory"):
        load_model(site / "models" / "nothing-here")


def test_recommender_uses_the_model_and_falls_back_to_popularity(site: Path) -> None:
    # Arrange
    model = write_model(site / "models", "v1")
    server = ModelServer(site / "models")
    server.check()
    store = EventStore(site / "site.db")
    store.add_events(
        [
            Event("e1", "u1", "i3", "view", T0),
            Event("e2", "u1", "i5", "purchase", T0 + 1),
            Event("e3", "u1", "not-in-vocab", "view", T0 + 2),
            Event("e4", "u2", "i7", "view", T0),
            Event("e5", "u3", "i7", "view", T0),
        ]
    )
    rec = Recommender(store, server)
    # Act
    known = rec.recommend("u1", k=5)
    unknown = rec.recommend("stranger", k=3)
    kept = rec.recommend("u1", k=N_ITEMS, exclude_purchased=False)
    # Assert: the unknown item is dropped from the input as in training; i5 is excluded
    assert known.source == "model" and known.model_version == "v1"
    assert [i.item_id for i in known.items] == [f"i{j}" for j in torch_top(model, [3, 5], [5], 5)]
    # each reason names an item of the model's input (explanations: test_explain.py)
    assert all(i.reason in {"because you viewed i3", "because you bought i5"} for i in known.items)
    assert unknown.source == "popularity" and unknown.model_version is None
    assert [i.item_id for i in unknown.items] == ["i7", "i3", "i5"]
    assert all(i.reason.startswith("popular at this store") for i in unknown.items)
    assert "i5" in {i.item_id for i in kept.items}
    store.close()


def test_short_model_list_is_filled_from_popularity(site: Path) -> None:
    # Arrange: a 6-item catalogue; the shopper bought 2, so the model can offer only 4
    models = site / "models"
    write_model(models, "v1", n_items=6)
    server = ModelServer(models)
    server.check()
    store = EventStore(site / "site.db")
    store.add_events(
        [Event("p1", "u1", "i1", "purchase", T0), Event("p2", "u1", "i2", "purchase", T0)]
        + [Event(f"x{j}", f"s{j}", "outside", "view", T0) for j in range(3)]
    )
    # Act
    rec = Recommender(store, server).recommend("u1", k=6)
    # Assert
    assert rec.source == "model+popularity"
    assert [i.item_id for i in rec.items][-1] == "outside"
    assert {i.item_id for i in rec.items[:4]} == {"i3", "i4", "i5", "i6"}
    store.close()


def test_batched_ranking_equals_one_by_one(site: Path) -> None:
    # Arrange: histories of different lengths (one empty) and exclusion lists
    write_model(site / "models", "v1")
    model = load_model(site / "models" / "v1")
    histories = [np.array([3, 1, 4]), np.array([], dtype=np.int64), np.arange(1, 20)]
    excludes = [np.array([5, 9]), np.array([], dtype=np.int64), np.array([2])]
    # Act
    scores, ids = model.rank_many(histories, excludes)
    # Assert
    for row, (h, e) in enumerate(zip(histories, excludes, strict=True)):
        one_scores, one_ids = model.rank(h, e)
        assert ids[row].tolist() == one_ids.tolist()
        np.testing.assert_allclose(scores[row], one_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threaded", [True, False])
def test_batcher_shares_runs_and_keeps_each_request_on_its_model(
    site: Path, threaded: bool
) -> None:
    # Arrange: two versions loaded side by side, as during a swap
    models = site / "models"
    write_model(models, "v1", seed=1, current=False)
    write_model(models, "v2", seed=2, current=False)
    old, new = load_model(models / "v1"), load_model(models / "v2")
    batcher = RankBatcher(max_batch=4, threaded=threaded)
    calls = [(old if i % 3 else new, np.array([1 + i % 7, 2]), np.array([3])) for i in range(10)]

    async def all_at_once() -> list[tuple[np.ndarray, np.ndarray]]:
        return await asyncio.gather(*(batcher.rank(m, h, e) for m, h, e in calls))

    # Act
    results = asyncio.run(all_at_once())
    batcher.close()
    # Assert: every answer is that request's model's answer; fewer runs than requests
    for (m, h, e), (_, ids) in zip(calls, results, strict=True):
        assert ids.tolist() == m.rank(h, e)[1].tolist()
    assert batcher.ranked == 10 and batcher.batches <= 4


def test_a_multi_behaviour_model_reads_each_event_type_at_the_edge(site: Path) -> None:
    # Arrange: a model that reads event types; the same items viewed by u1, carted by u2
    from shared.events import EVENT_TYPE_CODES
    from shared.models import build_model
    from shared.sequences import behaviour_tokens

    torch.manual_seed(0)
    config = {"n_items": N_ITEMS, "max_len": MAX_LEN, "dim": 8, "hidden": 8, "dropout": 0.0}
    model = build_model("gru", {**config, "n_behaviours": 5}).eval()
    with torch.no_grad():
        model.behaviour_emb.weight.mul_(5.0)  # type: ignore[union-attr,operator]  # types matter
    save_model_dir(site / "models" / "mb", model, item_vocab(), version="mb")
    set_current_version(site / "models", "mb")
    server = ModelServer(site / "models")
    server.check()
    store = EventStore(site / "site.db")
    for user, kind in (("u1", "view"), ("u2", "cart")):
        store.add_events([Event(f"{user}-{n}", user, f"i{n}", kind, T0 + n) for n in (3, 8, 5)])
    rec = Recommender(store, server)
    # Act
    viewed = rec.recommend("u1", k=5)
    carted = rec.recommend("u2", k=5)
    # Assert: each answer is torch's on that shopper's tokens, and they differ
    assert server.current is not None and server.current.metadata.n_behaviours == 5
    for answer, kind in ((viewed, "view"), (carted, "cart")):
        codes = np.full(3, EVENT_TYPE_CODES[kind])
        tokens = behaviour_tokens(np.array([3, 5, 8]), codes, N_ITEMS)  # time order
        want = torch_top(model, tokens.tolist(), [], 5)
        assert [i.item_id for i in answer.items] == [f"i{j}" for j in want]
        assert all(i.reason for i in answer.items)
    assert [i.item_id for i in viewed.items] != [i.item_id for i in carted.items]
    store.close()
