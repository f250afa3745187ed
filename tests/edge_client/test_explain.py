"""Explanations: every recommended item names the history item the served model credits."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from edge_kit import (
    MAX_LEN,
    client,
    item_vocab,
    live_server,
    make_model,
    rehash,
    settings_for,
    write_model,
)

from edge_client.errors import ModelRejectedError
from edge_client.explain import ItemExplainer, history_free_reason
from edge_client.inference import ModelServer, load_model, set_current_version
from edge_client.recommend import Recommender
from edge_client.store import Event, EventStore
from shared.artifacts import METADATA_FILE, save_model_dir
from shared.explanations import EXPLAIN_FILE, explanation_tables
from shared.models import build_model

T0 = 1_700_000_000_000
REASON = re.compile(r"^because you (viewed|added|saved|bought|rated) (i\d+)( to your cart)?$")
VERB_OF = {"view": "viewed", "cart": "added", "fav": "saved", "purchase": "bought"}


def _events(user: str, items: list[tuple[str, str]], start: int = 0) -> list[Event]:
    return [
        Event(f"{user}-{start + n}", user, item, kind, T0 + 1000 * (start + n))
        for n, (item, kind) in enumerate(items)
    ]


def test_attribution_picks_the_history_item_the_tables_credit() -> None:
    # Arrange: 2-d tables; item 4 points along item 2's state, item 5 along item 3's
    context = np.zeros((7, 2), dtype=np.float16)
    target = np.zeros((7, 2), dtype=np.float16)
    context[1], context[2], context[3] = [0.1, 0.1], [1.0, 0.0], [0.0, 1.0]
    target[4], target[5], target[6] = [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]
    context[6] = [1.0, 0.0]
    explainer = ItemExplainer(context, target)
    # Act
    positions = explainer.attribute(np.array([1, 2, 3]), [4, 5, 6])
    tie = explainer.attribute(np.array([2, 3]), [6])  # equal logits: the newer item wins
    itself = explainer.attribute(np.array([6, 1]), [6])  # never itself when others exist
    only_itself = explainer.attribute(np.array([6]), [6])
    # Assert
    assert positions.tolist() == [1, 2, 2]
    assert tie.tolist() == [1]
    assert itself.tolist() == [1]
    assert only_itself.tolist() == [0]
    assert not explainer.history_free
    assert ItemExplainer(np.zeros((3, 1), np.float16), target[:3, :1]).history_free


@pytest.mark.parametrize("kind", ["gru", "sasrec", "mf"])
def test_tables_give_the_models_own_single_item_logits(kind: str) -> None:
    # Arrange
    torch.manual_seed(1)
    model = build_model(kind, {"n_items": 30, "max_len": 6}).eval()
    # Act
    context, target = explanation_tables(model)
    # Assert: context[x] @ target[r] + bias[r] is the model's logit of r after [x] alone
    items = torch.arange(1, 31).unsqueeze(1)  # (30, 1)
    with torch.no_grad():
        logits = model(items)[:, -1, :].numpy()  # (30, V)
    bias = model.head.bias.detach().numpy()
    rebuilt = context[1:].astype(np.float32) @ target.astype(np.float32).T + bias
    np.testing.assert_allclose(rebuilt, logits, atol=0.02, rtol=0.02)
    assert context.dtype == np.float16 and not context[0].any()


def test_every_model_item_names_an_item_of_that_shoppers_history(site: Path) -> None:
    # Arrange: three shoppers with different histories and event types
    write_model(site / "models", "v1")
    store = EventStore(site / "site.db")
    histories = {
        "u1": [("i3", "view"), ("i17", "cart")],
        "u2": [("i9", "fav"), ("i22", "view"), ("i5", "purchase"), ("i30", "view")],
        "u3": [("i12", "view")],
    }
    for user, items in histories.items():
        store.add_events(_events(user, items))
    server = ModelServer(site / "models")
    server.check()
    recommender = Recommender(store, server)
    # Act
    answers = {user: recommender.recommend(user, 10) for user in histories}
    store.close()
    # Assert
    for user, answer in answers.items():
        kinds = dict(histories[user])  # item -> its (only) event type
        assert answer.source == "model" and len(answer.items) == 10
        for item in answer.items:
            match = REASON.fullmatch(item.reason)
            assert match, item.reason
            named = match.group(2)
            assert named in kinds, (user, item.reason)
            assert match.group(1) == VERB_OF[kinds[named]]


def test_the_reason_changes_when_the_history_changes(site: Path) -> None:
    # Arrange: a shopper who viewed one item, then MAX_LEN others (the model reads MAX_LEN)
    write_model(site / "models", "v1")
    store = EventStore(site / "site.db")
    store.add_events(_events("u1", [("i7", "view")]))
    server = ModelServer(site / "models")
    server.check()
    recommender = Recommender(store, server)
    # Act
    before = recommender.recommend("u1", 5)
    later = [(f"i{n}", "view") for n in range(20, 20 + MAX_LEN)]
    store.add_events(_events("u1", later, start=1))
    after = recommender.recommend("u1", 5)
    store.close()
    # Assert
    assert {i.reason for i in before.items} == {"because you viewed i7"}
    named_after = {REASON.fullmatch(i.reason).group(2) for i in after.items}  # type: ignore[union-attr]
    assert named_after <= {item for item, _ in later}
    assert "i7" not in named_after


def test_popularity_model_keeps_an_honest_reason(site: Path) -> None:
    # Arrange: the history-free popularity model
    model = build_model("pop", {"n_items": 40, "max_len": MAX_LEN})
    model.fit_counts(np.arange(1, 41).repeat(np.arange(1, 41)))  # type: ignore[operator]
    save_model_dir(site / "models" / "vp", model, item_vocab(), version="vp")
    set_current_version(site / "models", "vp")
    store = EventStore(site / "site.db")
    store.add_events(_events("u1", [("i3", "view")]))
    server = ModelServer(site / "models")
    server.check()
    # Act
    answer = Recommender(store, server).recommend("u1", 3)
    store.close()
    # Assert
    assert [i.reason for i in answer.items] == [history_free_reason("vp")] * 3


def test_a_model_directory_without_explanations_still_serves_with_a_reason(site: Path) -> None:
    # Arrange: a directory as written before explain.npz existed
    write_model(site / "models", "v1")
    (site / "models" / "v1" / EXPLAIN_FILE).unlink()
    meta_path = site / "models" / "v1" / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    del meta["files"][EXPLAIN_FILE]
    meta_path.write_text(json.dumps(meta))
    store = EventStore(site / "site.db")
    store.add_events(_events("u1", [("i3", "view"), ("i4", "view")]))
    server = ModelServer(site / "models")
    # Act
    outcome = server.check()
    answer = Recommender(store, server).recommend("u1", 3)
    store.close()
    # Assert
    assert outcome.status == "swapped"
    assert server.current is not None and server.current.explainer is None
    assert all(i.reason == "next-item model v1, from your last 2 events" for i in answer.items)


def test_a_tampered_explanation_file_rejects_the_version(site: Path) -> None:
    # Arrange: tables replaced by ones of the wrong shape, metadata re-hashed to match
    write_model(site / "models", "v1", current=False)
    bad = make_model(n_items=12)
    save_model_dir(site / "other", bad, item_vocab(12), version="v1")
    (site / "models" / "v1" / EXPLAIN_FILE).write_bytes(
        (site / "other" / EXPLAIN_FILE).read_bytes()
    )
    rehash(site / "models" / "v1")
    # Act / Assert
    with pytest.raises(ModelRejectedError, match=r"explain\.npz"):
        load_model(site / "models" / "v1")


def test_every_answer_over_http_carries_a_reason(site: Path) -> None:
    # Arrange
    now = int(time.time())
    with live_server(settings_for(site)) as base, client(base) as c:
        c.post(
            "/v1/events",
            json={
                "events": [
                    {
                        "event_id": f"p{i}",
                        "user_id": f"s{i}",
                        "item_id": "i9",
                        "event_type": "view",
                        "timestamp": now,
                    }
                    for i in range(3)
                ]
            },
        )
        cold = c.get("/v1/users/nobody/recommendations", params={"k": 5}).json()
        write_model(site / "models", "v1")
        deadline = time.monotonic() + 10
        while c.get("/v1/model").json()["mode"] != "model" and time.monotonic() < deadline:
            time.sleep(0.05)
        # Act
        warm = c.get("/v1/users/s1/recommendations", params={"k": 50}).json()
    # Assert
    assert cold["items"] and all(
        i["reason"].startswith("trending at this store") for i in cold["items"]
    )
    assert warm["source"] == "model" and len(warm["items"]) == 40  # the whole catalogue
    assert all(i["reason"] == "because you viewed i9" for i in warm["items"])
