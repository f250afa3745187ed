"""The update guard around Flower's strategies, with real Flower Messages.

A real SuperLink is exercised in tests/integration; here the Grid is a minimal in-memory
stand-in (it only lists node ids), so every guard decision is checked exactly.
"""

from collections.abc import Iterable, Iterator

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from coordinator.run_config import RunConfig
from coordinator.strategy import GuardedStrategy, build_aggregator, build_app_dp
from shared import federated

NODES = [101, 102, 103]


class ListGrid(Grid):
    """Lists fixed node ids; messages are answered by the test itself."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def create_message(self, *args: object, **kwargs: object) -> Message:  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def set_run(self, run: object) -> None:  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self) -> object:  # pragma: no cover
        raise NotImplementedError


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    # Messages created outside a Flower process need a task identity.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None  # type: ignore[assignment]


GLOBAL = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def reply(to: Message, w: float, n: int, *, name: str, refused: bool = False) -> Message:
    metrics = {
        "num-examples": n,
        "train-loss": 1.0,
        "epsilon": 0.5,
        "epsilon-rdp": 0.6,
        "delta": 1e-5,
        "epsilon-budget": 8.0,
        "new-events": 3,
        "refused": float(refused),
        "train-seconds": 0.1,
    }
    content = RecordDict(
        {
            federated.METRICS: MetricRecord(metrics),
            federated.SITE: ConfigRecord(
                {"name": name, "serving": "", "reason": "budget" if refused else ""}
            ),
        }
    )
    if not refused:
        content[federated.ARRAYS] = record(
            {"w": np.full((2, 2), w, np.float32), "b": np.full(2, w, np.float32)}
        )
    return Message(content, reply_to=to)


def configure(guard: GuardedStrategy, nodes: list[int] = NODES) -> list[Message]:
    return list(guard.configure_train(1, record(GLOBAL), ConfigRecord({"x": 1}), ListGrid(nodes)))


def guard_for(**overrides: object) -> GuardedStrategy:
    cfg = RunConfig(min_sites=3, quorum=2, **overrides)  # type: ignore[arg-type]
    return GuardedStrategy(
        build_aggregator(cfg), max_update_norm=cfg.max_update_norm, quorum=cfg.quorum
    )


def test_a_nan_update_is_rejected_and_the_rest_averaged(caplog: pytest.LogCaptureFixture) -> None:
    # Arrange
    guard = guard_for()
    m1, m2, m3 = configure(guard)
    replies = [
        reply(m1, 1.0, 10, name="a"),
        reply(m2, 4.0, 30, name="b"),
        reply(m3, np.nan, 5, name="evil"),
    ]
    # Act
    arrays, _ = guard.aggregate_train(1, replies)
    # Assert: weighted by num-examples over the two valid sites only
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), (10 * 1 + 30 * 4) / 40))
    outcomes = {o.site: o.outcome for o in guard.train_report.outcomes}
    assert outcomes == {"a": "accepted", "b": "accepted", "evil": "rejected"}
    assert "evil" in caplog.text and "non-finite" in caplog.text


def test_missing_the_quorum_aggregates_nothing() -> None:
    guard = guard_for()
    m1, m2, m3 = configure(guard)
    replies = [
        reply(m1, 1.0, 10, name="a"),
        reply(m2, 0.0, 10, name="b", refused=True),
        Message(Error(code=1, reason="boom"), reply_to=m3),
    ]
    arrays, metrics = guard.aggregate_train(1, replies)
    assert arrays is None and metrics is None
    report = guard.train_report
    assert report.quorum_missed
    assert (report.count("accepted"), report.count("refused"), report.count("failed")) == (1, 1, 1)


def test_an_error_reply_made_by_the_superlink_is_booked_to_the_node_that_was_asked() -> None:
    # Arrange: ids set as Flower's grid sets them on push; the SuperLink answers for the node
    # of m3, which is gone, with its own id (1) as the source.
    guard = guard_for()
    m1, m2, m3 = configure(guard)
    for msg in (m1, m2, m3):
        msg.metadata.__dict__["_message_id"] = msg.object_id
    gone = create_message_error_unavailable_res_message(m3.metadata, "node_unavail")
    assert gone.metadata.src_node_id == 1
    # Act
    arrays, _ = guard.aggregate_train(
        1, [reply(m1, 1.0, 1, name="a"), reply(m2, 2.0, 1, name="b"), gone]
    )
    # Assert
    assert arrays is not None
    failed = [o for o in guard.train_report.outcomes if o.outcome == "failed"]
    node = m3.metadata.dst_node_id
    assert [(o.site, o.node_id) for o in failed] == [(f"node-{node}", node)]


def test_an_update_beyond_the_norm_bound_is_rejected() -> None:
    guard = guard_for(max_update_norm=1.0)
    m1, m2, m3 = configure(guard)
    arrays, _ = guard.aggregate_train(
        1,
        [reply(m1, 0.1, 1, name="a"), reply(m2, 0.2, 1, name="b"), reply(m3, 50.0, 1, name="big")],
    )
    assert arrays is not None
    assert [o.outcome for o in guard.train_report.outcomes] == ["accepted", "accepted", "rejected"]
    np.testing.assert_allclose(arrays["b"].numpy(), [0.15, 0.15], rtol=1e-6)


def test_median_ignores_one_outlier_that_passes_validation() -> None:
    guard = guard_for(strategy="fedmedian", max_update_norm=0.0)
    m1, m2, m3 = configure(guard)
    arrays, _ = guard.aggregate_train(
        1,
        [reply(m1, 1.0, 1, name="a"), reply(m2, 2.0, 1, name="b"), reply(m3, 1000.0, 1, name="c")],
    )
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)


def test_trimmed_mean_cuts_each_tail_before_averaging() -> None:
    # Arrange: five sites, beta 0.2 cuts one update off each end
    guard = guard_for(strategy="fedtrimmedavg", trim_beta=0.2, max_update_norm=0.0)
    nodes = [101, 102, 103, 104, 105]
    messages = configure(guard, nodes)
    values = [1.0, 2.0, 3.0, 4.0, 1000.0]
    # Act
    arrays, _ = guard.aggregate_train(
        1,
        [
            reply(m, v, 1, name=f"s{i}")
            for i, (m, v) in enumerate(zip(messages, values, strict=True))
        ],
    )
    # Assert: the mean of 2, 3, 4; the outlier and the smallest update are cut
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), 3.0, rtol=1e-6)


def test_fedadam_takes_an_adam_step_from_the_run_configs_eta_and_tau() -> None:
    # Arrange
    guard = guard_for(strategy="fedadam", fedadam_eta=0.05, fedadam_tau=1e-3, max_update_norm=0.0)
    adam = guard.inner
    m1, m2, m3 = configure(guard)
    # Act: the sites' weighted average moves every weight from 0 to 0.2
    arrays, _ = guard.aggregate_train(
        1, [reply(m1, 0.1, 1, name="a"), reply(m2, 0.2, 1, name="b"), reply(m3, 0.3, 1, name="c")]
    )
    # Assert: one bias-corrected Adam step (Reddi et al. 2021) of size eta, not the average
    delta = 0.2
    m = (1 - adam.beta_1) * delta
    v = (1 - adam.beta_2) * delta**2
    eta = 0.05 * np.sqrt(1 - adam.beta_2**2) / (1 - adam.beta_1**2)
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), eta * m / (np.sqrt(v) + 1e-3), rtol=1e-5)
    assert not np.allclose(arrays["w"].numpy(), delta)


def test_app_mode_clips_on_devices_adds_noise_and_accounts() -> None:
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

    # Arrange: 5 connected devices, 3 asked per round
    cfg = RunConfig(privacy_mode="app", min_sites=3, quorum=3, app_noise_multiplier=1.0)
    accountant = RdpAccountant(
        PrivacyConfig(
            1e-5, 100, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION
        )
    )
    guard = GuardedStrategy(
        build_app_dp(cfg, build_aggregator(cfg), accountant), max_update_norm=0, quorum=3
    )
    # Act
    msgs = configure(guard, nodes=[1, 2, 3, 4, 5])
    arrays, _ = guard.aggregate_train(
        1, [reply(m, 0.1, 1, name=f"d{i}") for i, m in enumerate(msgs)]
    )
    # Assert
    assert len(msgs) == 3
    assert (
        msgs[0].content.config_records[federated.CONFIG]["clipping_norm"] == cfg.app_clipping_norm
    )
    assert arrays is not None
    assert not np.allclose(arrays["w"].numpy(), 0.1)  # Gaussian noise was added
    spent = accountant.get_privacy_spent()
    assert spent.num_releases == 1 and spent.epsilon > 0


def test_evaluate_messages_carry_the_published_weights_when_different() -> None:
    guard = guard_for()
    guard.serve_arrays = record({"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)})
    msgs = list(
        guard.configure_evaluate(1, record(GLOBAL), ConfigRecord({"x": 1}), ListGrid(NODES))
    )
    assert len(msgs) == 3
    assert all(federated.SERVE_ARRAYS in m.content.array_records for m in msgs)
