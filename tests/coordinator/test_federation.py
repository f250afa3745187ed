"""The coordinator's round loop with the real ClientApp and real sites, in one process.

`InProcessGrid` delivers each Message to `edge_client.client_app.app` for the node's site
and returns its reply (an exception becomes an error reply, as in Flower). Transport is the
only stand-in: the SuperLink path is covered by tests/integration. This makes the
continuous feedback loop, manual publication and rollback, and app-mode accounting across
runs cheap to check exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from coordinator.federation import Federation
from coordinator.registry import Registry
from coordinator.run_config import RunConfig
from coordinator.server_app import build_strategy
from deploy.demo_sites import write_demo_sites
from edge_client.client_app import app as client_app
from edge_client.inference import read_current_version
from edge_client.store import Event, EventStore

pytestmark = pytest.mark.slow

MODEL = '{"dim": 8, "hidden": 8, "max_len": 10, "dropout": 0.0}'


class InProcessGrid(Grid):
    """Delivers messages to the ClientApp of each connected site, in this process."""

    def __init__(self, sites: dict[int, Path]) -> None:
        self.sites = sites
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node not in self.sites:
                continue  # a node that went away: no reply, as after a timeout
            context = Context(1, node, {"site-dir": str(self.sites[node])}, RecordDict(), {})
            try:
                replies.append(client_app(msg, context))
            except Exception as err:
                replies.append(Message(Error(code=0, reason=str(err)), reply_to=msg))
        return replies

    def set_run(self, run: Any) -> None:  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self) -> Any:  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None  # type: ignore[assignment]


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, dict[int, Path], Path]:
    catalogue, dirs = write_demo_sites(
        tmp_path / "sites", n_sites=3, shoppers_per_site=20, n_items=30
    )
    return catalogue, {101 + i: d for i, d in enumerate(dirs)}, tmp_path / "state"


def run_federation(cfg: RunConfig, grid: Grid) -> Federation:
    fed = Federation(cfg, grid, flwr_run_id=7)
    try:
        fed.run(build_strategy(cfg, fed))
    finally:
        fed.close("completed")
    return fed


def config(catalogue: Path, state: Path, **kw: Any) -> RunConfig:
    base: dict[str, Any] = {
        "catalogue": str(catalogue),
        "model-config": MODEL,
        "state-dir": str(state),
        "min-sites": 3,
        "quorum": 2,
        "batch-size": 8,
        "round-timeout": 1.0,
    }
    return RunConfig.from_mapping({**base, **kw})


def add_events(site: Path, n: int) -> None:
    store = EventStore(site / "site.db")
    now = int(time.time() * 1000)
    store.add_events(
        [
            Event(f"new-{site.name}-{i}", f"late-{i % 3}", str(i % 30), "view", now - 1000 + i)
            for i in range(n)
        ]
    )
    store.close()


def test_continuous_mode_trains_when_sites_report_new_events(
    world: tuple[Path, dict[int, Path], Path],
) -> None:
    catalogue, sites, state = world
    grid = InProcessGrid(sites)
    loop = {
        "mode": "continuous",
        "poll-interval": 0.05,
        "min-new-events": 5,
        "min-ready-sites": 2,
        "privacy-mode": "none",
        "fraction-evaluate": 0.0,
    }
    # Act 1: fresh sites have only new events -> one round, then the cap ends the loop
    run_federation(config(catalogue, state, **loop, **{"num-rounds": 1}), grid)
    # Act 2: nothing new since that round -> no round before max-seconds
    run_federation(config(catalogue, state, **loop, **{"num-rounds": 1, "max-seconds": 0.5}), grid)
    rounds_after_quiet = len(Registry(state / "coordinator" / "coordinator.db").rounds())
    # Act 3: two sites record fresh behaviour -> a round is triggered
    for site in list(sites.values())[:2]:
        add_events(site, 12)
    run_federation(config(catalogue, state, **loop, **{"num-rounds": 1, "max-seconds": 30.0}), grid)
    # Assert
    registry = Registry(state / "coordinator" / "coordinator.db")
    assert rounds_after_quiet == 1
    assert [r["status"] for r in registry.rounds()] == ["completed", "completed"]
    counts = {s["name"]: s["new_events"] for s in registry.sites()}
    assert counts["site-000"] == 12 and counts["site-001"] == 12 and counts["site-002"] == 0
    assert {m.metadata.message_type for m in grid.sent} >= {"query", "train"}


def test_manual_publish_and_rollback_reach_every_site_within_one_round(
    world: tuple[Path, dict[int, Path], Path],
) -> None:
    catalogue, sites, state = world
    grid = InProcessGrid(sites)
    # Arrange: two auto-published rounds
    run_federation(config(catalogue, state, **{"num-rounds": 2, "privacy-mode": "none"}), grid)
    registry = Registry(state / "coordinator" / "coordinator.db")
    first, second = sorted((m for m in registry.models() if m.round), key=lambda m: m.round or 0)
    assert all(read_current_version(d / "models") == second.version for d in sites.values())
    # Act: roll back, forget the old version at one site, run one manual-publish round
    registry.rollback(first.version)
    import shutil

    shutil.rmtree(sites[101] / "models" / first.version)
    run_federation(
        config(catalogue, state, **{"num-rounds": 1, "publish": "manual", "privacy-mode": "none"}),
        grid,
    )
    # Assert: the new version is stored but not served; every site serves the rollback
    newest = registry.head()
    assert newest is not None and not newest.published and newest.round == 3
    for site in sites.values():
        assert (site / "models" / newest.version).is_dir()
        assert read_current_version(site / "models") == first.version
    assert registry.published().version == first.version  # type: ignore[union-attr]


def test_app_mode_epsilon_composes_across_runs(world: tuple[Path, dict[int, Path], Path]) -> None:
    catalogue, sites, state = world
    grid = InProcessGrid(sites)
    app = {
        "privacy-mode": "app",
        "num-rounds": 1,
        "quorum": 3,
        "app-noise-multiplier": 2.0,
        "app-clipping-norm": 0.5,
        "fraction-evaluate": 0.0,
    }
    run_federation(config(catalogue, state, **app), grid)
    registry = Registry(state / "coordinator" / "coordinator.db")
    eps_1, _, releases_1 = registry.app_privacy_spent()
    run_federation(config(catalogue, state, **app), grid)
    eps_2, delta, releases_2 = registry.app_privacy_spent()
    assert (releases_1, releases_2) == (1, 2)
    assert 0 < eps_1 < eps_2 and delta == pytest.approx(1e-5)
    newest = registry.head()
    assert newest is not None and newest.epsilon_max == pytest.approx(eps_2)
    assert newest.privacy_mode == "app" and newest.accountant == "rdp"


def test_too_few_sites_is_a_missed_round_not_a_hang(
    world: tuple[Path, dict[int, Path], Path],
) -> None:
    catalogue, sites, state = world
    two = dict(list(sites.items())[:2])
    run_federation(
        config(catalogue, state, **{"num-rounds": 1, "round-timeout": 0.5}), InProcessGrid(two)
    )
    registry = Registry(state / "coordinator" / "coordinator.db")
    (round_,) = registry.rounds()
    assert round_["status"] == "missed-quorum" and "2 site(s) connected" in round_["detail"]
    assert [m.round for m in registry.models()] == [None]  # only the fresh seed version


class LosingGrid(InProcessGrid):
    """A site disappears right after answering its training message."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if messages and messages[0].metadata.message_type == "train":
            self.sites.pop(max(self.sites), None)
        return replies


@pytest.mark.timeout(120)
def test_a_site_lost_after_training_does_not_block_evaluation(
    world: tuple[Path, dict[int, Path], Path],
) -> None:
    catalogue, sites, state = world
    grid = LosingGrid(dict(sites))
    run_federation(config(catalogue, state, **{"num-rounds": 1, "privacy-mode": "none"}), grid)
    registry = Registry(state / "coordinator" / "coordinator.db")
    (round_,) = registry.rounds()
    assert round_["status"] == "completed" and round_["sites_accepted"] == 3
    evaluated = [s for s in registry.site_results(round_["number"]) if s["phase"] == "evaluate"]
    assert len(evaluated) == 2 and round_["eval_metrics"]


class DeadNodeGrid(InProcessGrid):
    """Like a SuperLink whose node ``dead`` is gone: the SuperLink itself answers for it."""

    def __init__(self, sites: dict[int, Path], dead: int) -> None:
        super().__init__(sites)
        self.dead = dead

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's push does
        alive = [m for m in messages if m.metadata.dst_node_id != self.dead]
        replies = list(super().send_and_receive(alive, timeout=timeout))
        return replies + [
            create_message_error_unavailable_res_message(m.metadata, "node_unavail")
            for m in messages
            if m.metadata.dst_node_id == self.dead
        ]


def test_a_dead_node_is_recorded_once_under_its_own_name(
    world: tuple[Path, dict[int, Path], Path],
) -> None:
    # Arrange: round 1 with every site, so the registry learns their names; then 103 dies
    catalogue, sites, state = world
    cfg = config(catalogue, state, **{"num-rounds": 1, "privacy-mode": "none"})
    run_federation(cfg, InProcessGrid(dict(sites)))
    registry = Registry(state / "coordinator" / "coordinator.db")
    name_103 = registry.site_name_for_node(103)
    # Act
    run_federation(cfg, DeadNodeGrid(dict(sites), dead=103))
    # Assert: one train row per site; the dead one is "failed" under its name, not "node-1"
    last = max(registry.rounds(), key=lambda r: r["number"])
    train = [s for s in registry.site_results(last["number"]) if s["phase"] == "train"]
    assert sorted(int(s["node_id"]) for s in train) == [101, 102, 103]
    (dead,) = [s for s in train if int(s["node_id"]) == 103]
    assert dead["site"] == name_103 != "node-103" and dead["outcome"] == "failed"
    assert last["status"] == "completed"


def test_a_cosine_schedule_counts_the_rounds_of_each_run(
    world: tuple[Path, dict[int, Path], Path],
) -> None:
    # Arrange: two runs on one registry, so the second run's rounds are numbered 3 and 4
    catalogue, sites, state = world
    cfg = config(
        catalogue,
        state,
        **{"num-rounds": 2, "privacy-mode": "none", "fraction-evaluate": 0.0},
        **{"learning-rate": 0.01, "lr-schedule": "cosine", "lr-min-ratio": 0.1},
    )
    sent: list[float] = []
    # Act
    for _ in range(2):
        grid = InProcessGrid(sites)
        run_federation(cfg, grid)
        rates = {
            float(m.content["config"]["learning-rate"])  # type: ignore[arg-type]
            for m in grid.sent
            if m.metadata.message_type == "train"
        }
        assert len(rates) == 2  # one rate per round, the same for every site
        sent += sorted(rates, reverse=True)
    # Assert: each run starts at lr and ends at the floor
    assert sent == pytest.approx([0.01, 0.001, 0.01, 0.001])
