"""The site's ClientApp, called in-process with real Flower Messages and a real site.db.

Everything the site sends back is inspected: only model weights (the model's own names and
shapes) and aggregate numbers may leave; no shopper id, no item id, no event row.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from edge_client.client_app import app
from edge_client.federated_site import public_reason
from edge_client.inference import read_current_version
from edge_client.store import EventStore
from shared import federated
from shared.artifacts import verify_model_dir
from shared.errors import VocabError
from shared.federated import RoundInstructions
from shared.models import build_model
from shared.synth import SynthConfig, generate_synthetic
from shared.vocab import ItemVocab

MODEL_CONFIG = {"dim": 16, "hidden": 16, "max_len": 20, "dropout": 0.0}
EVAL_KEYS = {"num-examples", "hr@10", "ndcg@10"}
SITE_KEYS = {"name", "serving", "reason"}


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None  # type: ignore[assignment]


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ItemVocab, set[str]]:
    """One site with distinctive ids, so a leak is easy to spot in any string or bytes."""
    root = tmp_path_factory.mktemp("site") / "store-x"
    (root / "models").mkdir(parents=True)
    events = generate_synthetic(
        SynthConfig(
            n_sites=1,
            shoppers_per_site=30,
            n_items=40,
            n_categories=4,
            events_per_shopper=8.0,
            min_events=5,
            seed=3,
        )
    ).events
    events["item_id"] = "sku-" + events["item_id"].astype(str).str.zfill(5)
    events["user_id"] = "shopper-" + events["user_id"].astype(str)
    store = EventStore(root / "site.db")
    store.import_events(events)
    store.close()
    vocab = ItemVocab.from_items([f"sku-{i:05d}" for i in range(40)])
    secrets = set(events["user_id"]) | set(events["item_id"])
    return root, vocab, secrets


def context(site: Path, **node: Any) -> Context:
    return Context(
        run_id=1,
        node_id=5,
        node_config={"site-dir": str(site), **node},
        state=RecordDict(),
        run_config={},
    )


def instructions(vocab: ItemVocab, round_: int, version: str, **kw: Any) -> RoundInstructions:
    return RoundInstructions(
        server_round=round_,
        model_version=version,
        model_kind="gru",
        model_config={**MODEL_CONFIG, "n_items": vocab.n_items},
        catalogue=vocab,
        serve_version=kw.pop("serve_version", version),
        batch_size=8,
        learning_rate=0.01,
        noise_multiplier=1.0,
        **kw,
    )


def weights(vocab: ItemVocab, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("gru", {**MODEL_CONFIG, "n_items": vocab.n_items}).state_dict()


def send(
    kind: str,
    site: Path,
    instr: RoundInstructions | None,
    state: dict[str, torch.Tensor] | None,
    *,
    config_extra: dict[str, Any] | None = None,
    **node: Any,
) -> Message:
    content = RecordDict()
    if instr is not None:
        content[federated.CONFIG] = ConfigRecord({**instr.to_config(), **(config_extra or {})})
    else:
        content[federated.CONFIG] = ConfigRecord(
            {"ask": federated.QUERY_EVENT_COUNTS, **(config_extra or {})}
        )
    if state is not None:
        content[federated.ARRAYS] = ArrayRecord(state)
    msg = Message(content, dst_node_id=5, message_type=kind)
    return app(msg, context(site, **node))


def strings_in(reply: Message) -> list[str]:
    """Every string and bytes value a reply carries, and the arrays' raw bytes."""
    out: list[str] = []
    for record in reply.content.config_records.values():
        for key, value in record.items():
            out.append(key)
            values = value if isinstance(value, list) else [value]
            out += [v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in values]
    for record in reply.content.metric_records.values():
        out += list(record.keys())
    for record in reply.content.array_records.values():
        out += list(record.keys())
        out += [arr.data.decode("latin-1") for arr in record.values()]
    return out


def test_nothing_but_weights_and_aggregates_leaves_the_site(
    site_data: tuple[Path, ItemVocab, set[str]],
) -> None:
    # Arrange
    site, vocab, secrets = site_data
    state = weights(vocab)
    expected_shapes = {k: tuple(v.shape) for k, v in state.items()}
    replies = []
    # Act: two training rounds, an evaluation and a count query, as the server sends them
    for rnd in (1, 2):
        reply = send(MessageType.TRAIN, site, instructions(vocab, rnd, f"v{rnd}"), state)
        assert not reply.has_error(), reply.error
        replies.append(reply)
        state = replies[-1].content[federated.ARRAYS].to_torch_state_dict()
    replies.append(send(MessageType.EVALUATE, site, instructions(vocab, 2, "v3"), state))
    replies.append(send(MessageType.QUERY, site, None, None))
    # Assert
    for reply in replies:
        assert not reply.has_error(), reply.error
        content = reply.content
        assert set(content.config_records) == {federated.SITE}
        assert set(content.config_records[federated.SITE]) == SITE_KEYS
        assert set(content.metric_records) == {federated.METRICS}
        metric_keys = set(content.metric_records[federated.METRICS])
        assert metric_keys in (
            set(federated.TRAIN_METRICS),
            EVAL_KEYS,
            set(federated.COUNT_METRICS),
        )
        for record in content.array_records.values():
            assert {k: tuple(a.shape) for k, a in record.items()} == expected_shapes
        leaked = [s for s in strings_in(reply) for secret in secrets if secret in s]
        assert not leaked, f"raw data in a reply: {leaked[:3]}"
    train_metrics = replies[1].content.metric_records[federated.METRICS]
    assert train_metrics["refused"] == 0.0
    assert 0 < train_metrics["epsilon"] < train_metrics["epsilon-budget"]
    assert train_metrics["num-examples"] == 30


def test_evaluate_stores_the_version_and_serves_the_published_one(
    site_data: tuple[Path, ItemVocab, set[str]],
) -> None:
    site, vocab, _ = site_data
    old, new = weights(vocab, 1), weights(vocab, 2)
    # Act: evaluate "v-new" while the published version is "v-old" (a rollback)
    reply = send(
        MessageType.EVALUATE,
        site,
        instructions(vocab, 5, "v-new", serve_version="v-old"),
        new,
        config_extra={},
    )
    assert not reply.has_error()
    assert read_current_version(site / "models") != "v-old"  # v-old was not sent yet
    msg_content = RecordDict(
        {
            federated.CONFIG: ConfigRecord(
                instructions(vocab, 5, "v-new", serve_version="v-old").to_config()
            ),
            federated.ARRAYS: ArrayRecord(new),
            federated.SERVE_ARRAYS: ArrayRecord(old),
        }
    )
    reply = app(
        Message(msg_content, dst_node_id=5, message_type=MessageType.EVALUATE), context(site)
    )
    # Assert
    assert not reply.has_error(), reply.error
    assert read_current_version(site / "models") == "v-old"
    assert verify_model_dir(site / "models" / "v-new").version == "v-new"
    assert reply.content.config_records[federated.SITE]["serving"] == "v-old"
    metrics = reply.content.metric_records[federated.METRICS]
    assert metrics["num-examples"] == 30 and 0.0 <= metrics["hr@10"] <= 1.0


def test_a_site_over_its_budget_refuses_and_says_why(
    site_data: tuple[Path, ItemVocab, set[str]],
) -> None:
    site, vocab, _ = site_data
    reply = send(
        MessageType.TRAIN,
        site,
        instructions(vocab, 9, "v9"),
        weights(vocab),
        **{"epsilon-budget": 0.01},
    )
    assert not reply.has_error()
    assert federated.ARRAYS not in reply.content.array_records
    assert reply.content.metric_records[federated.METRICS]["refused"] == 1.0
    assert "privacy budget" in str(reply.content.config_records[federated.SITE]["reason"])


def test_app_mode_updates_are_clipped_on_the_device(
    site_data: tuple[Path, ItemVocab, set[str]],
) -> None:
    site, vocab, _ = site_data
    start = weights(vocab)
    reply = send(
        MessageType.TRAIN,
        site,
        instructions(vocab, 3, "v-app", privacy_mode="app"),
        start,
        config_extra={"clipping_norm": 0.05},
    )
    assert not reply.has_error(), reply.error
    new = reply.content[federated.ARRAYS].to_torch_state_dict()
    norm = float(torch.sqrt(sum(((new[k] - start[k]).double() ** 2).sum() for k in start)))
    assert norm <= 0.05 * (1 + 1e-5)
    assert reply.content.metric_records[federated.METRICS]["num-examples"] == 1.0


def test_failures_reach_the_server_without_details(
    site_data: tuple[Path, ItemVocab, set[str]],
) -> None:
    site, vocab, _ = site_data
    bad = {k: torch.zeros(3) for k in weights(vocab)}  # wrong shapes
    with pytest.raises(Exception, match=r"ModelError \(details in the site's log\)"):
        send(MessageType.TRAIN, site, instructions(vocab, 4, "v4"), bad)
    assert "sku-00001" not in public_reason(VocabError("unknown item id 'sku-00001'"))


def test_a_supernode_without_a_site_is_refused(tmp_path: Path) -> None:
    msg = Message(
        RecordDict({federated.CONFIG: ConfigRecord({"ask": federated.QUERY_EVENT_COUNTS})}),
        dst_node_id=5,
        message_type=MessageType.QUERY,
    )
    with pytest.raises(Exception, match="site directory"):
        app(msg, Context(1, 5, {"site-dir": str(tmp_path / "nope")}, RecordDict(), {}))


def test_legacy_secagg_training_round_trip(site_data: tuple[Path, ItemVocab, set[str]]) -> None:
    from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    site, vocab, _ = site_data
    state = weights(vocab)
    fitins = FitIns(
        ndarrays_to_parameters([v.numpy() for v in state.values()]),
        instructions(vocab, 6, "v6", privacy_mode="none").to_config(),
    )
    msg = Message(
        compat.fitins_to_recorddict(fitins, keep_input=True),
        dst_node_id=5,
        message_type=MessageType.TRAIN,
    )
    reply = app(msg, context(site))
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    arrays = parameters_to_ndarrays(fitres.parameters)
    assert [a.shape for a in arrays] == [tuple(v.shape) for v in state.values()]
    assert fitres.num_examples == 30 and fitres.metrics["site-name"] == "store-x"
    assert not all(np.allclose(a, v.numpy()) for a, v in zip(arrays, state.values(), strict=True))
