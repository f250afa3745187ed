"""A/B testing: statistics, the experiment registry, and the Flower sync with real sites.

The sync runs the coordinator's `sync_experiments` against the sites' real ClientApp
(`edge_client.client_app.app`) through an in-process Grid: real Flower Messages, real
``site.db`` files, real ONNX Runtime serving at the sites; only the SuperLink transport is
skipped (tests/integration covers it). Every reply a site sends is captured and inspected:
only numbers and the names of model versions may cross.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from coordinator.ab_stats import (
    compare_arms,
    discrete_laplace_variance,
    two_proportion_z_test,
    wilson_interval,
)
from coordinator.ab_sync import sync_experiments
from coordinator.ab_testing import ABRegistry, ABTestError, report
from coordinator.cli import app as coordinator_cli
from coordinator.registry import ModelVersion, Registry
from edge_client.ab_serving import ExperimentServing
from edge_client.ab_site import ABSite, discrete_laplace
from edge_client.client_app import app as client_app
from edge_client.outcomes import ImpressionLog
from edge_client.recommend import Recommender
from edge_client.store import Event, EventStore
from shared.ab import assign_arm
from shared.artifacts import WEIGHTS_FILE, save_model_dir
from shared.models import build_model
from shared.vocab import ItemVocab

N_ITEMS = 30
MODEL = {"n_items": N_ITEMS, "max_len": 6, "dim": 8, "hidden": 8, "dropout": 0.0}
VOCAB = ItemVocab([f"sku-{i:03d}" for i in range(N_ITEMS)])
T0 = 1_700_000_000_000


# ----------------------------------------------------------------------------- statistics
def test_wilson_interval_and_z_test_by_hand() -> None:
    # Wilson 95%: 50/100 -> 0.5 -+ 0.0962 (centre 0.5); 0/10 -> [0, z^2/(n+z^2)]
    low, high = wilson_interval(50, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)
    low0, high0 = wilson_interval(0, 10)
    assert low0 == 0.0 and high0 == pytest.approx(1.959964**2 / (10 + 1.959964**2))
    # pooled z: 60/100 vs 40/100 -> p=0.5, se=sqrt(0.25*0.02)=0.0707, z=2.828, p=0.00468
    test = two_proportion_z_test(60, 100, 40, 100)
    assert test.z == pytest.approx(0.2 / math.sqrt(0.005))
    assert test.p_value == pytest.approx(0.004678, abs=2e-6)
    assert two_proportion_z_test(5, 100, 5, 100).p_value == pytest.approx(1.0)


def test_winner_needs_every_bonferroni_corrected_test() -> None:
    # Arrange: B clearly best; C between A and B
    strong = compare_arms("ctr", [1000, 1000, 1000], [100, 200, 150])
    close = compare_arms("ctr", [1000, 1000, 1000], [100, 200, 190])
    noisy = compare_arms("ctr", [100, 100], [10, 20], noise_var=50.0)
    # Assert
    assert strong.best == 1 and strong.significant
    assert close.best == 1 and not close.significant  # B vs C is not significant
    assert (
        noisy.arms[1].high - noisy.arms[1].low
        > 2 * (wilson_interval(20, 100)[1] - wilson_interval(20, 100)[0]) / 2
    )  # noise widens the interval
    assert not noisy.significant


def test_discrete_laplace_has_the_stated_variance() -> None:
    # Act
    draws = np.concatenate([discrete_laplace(1.0, 4.0, 20_000) for _ in range(5)])
    # Assert: variance 2a/(1-a)^2 with a = exp(-epsilon/4); integers, symmetric
    expected = discrete_laplace_variance(1.0, 4.0)
    assert draws.dtype.kind == "i"
    assert abs(draws.var() / expected - 1) < 0.05
    assert abs(draws.mean()) < 0.1


def test_assignment_is_deterministic_and_follows_the_split() -> None:
    users = [f"u{i}" for i in range(20_000)]
    arms = [assign_arm("ab1", u, (90.0, 10.0)) for u in users]
    again = [assign_arm("ab1", u, (90.0, 10.0)) for u in users]
    other = [assign_arm("ab2", u, (90.0, 10.0)) for u in users]
    assert arms == again
    assert 0.09 < sum(arms) / len(arms) < 0.11
    assert arms != other  # experiments assign independently


# ----------------------------------------------------------------------------- fixtures
def _register(state: Path, version: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = build_model("gru", MODEL)
    out = state / "coordinator" / "models" / version
    meta = save_model_dir(out, model, VOCAB, version=version)
    registry = Registry(state / "coordinator" / "coordinator.db")
    registry.add_model(
        ModelVersion(
            version=version,
            round=None,
            parent=None,
            sha256=meta.files[WEIGHTS_FILE],
            path=str(out),
            kind="gru",
            n_items=N_ITEMS,
        )
    )
    registry.close()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    root = tmp_path / "state"
    _register(root, "v-control", 0)
    _register(root, "v-candidate", 1)
    return root


def _site(root: Path, name: str, n_shoppers: int) -> Path:
    site = root / name
    (site / "models").mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    store = EventStore(site / "site.db")
    store.add_events(
        [
            Event(f"{name}-h{u}-{n}", f"shopper-{name}-{u}", f"sku-{int(i):03d}", "view", T0 + n)
            for u in range(n_shoppers)
            for n, i in enumerate(rng.integers(0, N_ITEMS, 3))
        ]
    )
    store.close()
    return site


class InProcessGrid(Grid):
    """Delivers each Message to the ClientApp of its node's site; keeps every reply."""

    def __init__(self, sites: dict[int, tuple[Path, dict[str, Any]]]) -> None:
        self.sites = sites
        self.replies: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        out = []
        for msg in messages:
            root, node_config = self.sites[msg.metadata.dst_node_id]
            context = Context(
                1,
                msg.metadata.dst_node_id,
                {"site-dir": str(root), **node_config},
                RecordDict(),
                {},
            )
            try:
                out.append(client_app(msg, context))
            except Exception as err:
                out.append(Message(Error(code=0, reason=str(err)), reply_to=msg))
        self.replies.extend(out)
        return out

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


def _traffic(site: Path, clicks_of: dict[int, float], seed: int) -> dict[str, list[str]]:
    """Every shopper of the site asks once (edge logic); a share of each arm clicks."""
    store = EventStore(site / "site.db")
    serving = ExperimentServing(site / "site.db", site / "models")
    serving.refresh()
    assert serving.live is not None, serving.problem
    clock = [T0 + 10_000]
    log = ImpressionLog(site / "site.db", clock=lambda: clock[0])
    rec = Recommender(store, None, experiments=serving, impressions=log)
    rng = np.random.default_rng(seed)
    shown: dict[str, list[str]] = {}
    users = sorted({e.user_id for e in store.events_frame().itertuples()})  # type: ignore[attr-defined]
    for user in users:
        answer = rec.recommend(user, 5)
        shown[user] = [i.item_id for i in answer.items]
        arm = assign_arm(serving.live.spec.experiment_id, user, serving.live.spec.weights)
        assert answer.arm == serving.live.spec.arms[arm].name
        if rng.random() < clicks_of[arm]:
            kind = "purchase" if rng.random() < 0.5 else "view"
            store.add_events([Event(f"c-{user}", user, shown[user][0], kind, clock[0] + 60_000)])
        clock[0] += 1
    log.close()
    serving.close()
    store.close()
    return shown


def strings_in(reply: Message) -> list[str]:
    """Every key and string a reply carries (config, metrics, arrays)."""
    out: list[str] = []
    for record in reply.content.config_records.values():
        for key, value in record.items():
            out.append(key)
            out += [
                v.decode("latin-1") if isinstance(v, bytes) else str(v)
                for v in (value if isinstance(value, list) else [value])
            ]
    for record in reply.content.metric_records.values():
        out += list(record.keys())
        assert all(isinstance(v, int | float) for v in record.values())
    assert not reply.content.array_records  # a site never sends weights for A/B
    return out


# ----------------------------------------------------------------------------- the sync
def test_sync_delivers_experiment_and_models_and_only_counts_come_back(
    state: Path, tmp_path: Path
) -> None:
    # Arrange: two sites; an experiment 50/50 between two registered versions
    sites = {11: _site(tmp_path, "north", 60), 12: _site(tmp_path, "south", 40)}
    grid = InProcessGrid({n: (s, {}) for n, s in sites.items()})
    db = state / "coordinator" / "coordinator.db"
    with ABRegistry(db) as reg:
        exp = reg.start(["v-control", "v-candidate"], window_s=3600)
    # Act 1: the first sync tells the sites and delivers the arm models they lack
    first = sync_experiments(grid, db, timeout=30)
    # Act 2: shoppers at each site are served by their arm; the candidate's arm clicks more
    shown = {n: _traffic(s, {0: 0.2, 1: 0.6}, seed=n) for n, s in sites.items()}
    second = sync_experiments(grid, db, timeout=30)
    # Assert: the sites hold both versions, and their reports add up to the exact counts
    assert first.models_sent == 4 and first.reports == 2
    for site in sites.values():
        assert (site / "models" / "v-control" / "model.onnx").is_file()
        with ABSite(site / "site.db") as ab:
            assert ab.running() is not None and ab.running().experiment_id == exp.experiment_id  # type: ignore[union-attr]
    assert second.reports == 2 and not second.failures
    with ABRegistry(db) as reg:
        payload = report(reg.get())
    exposed = [a["counts"]["exposed"] for a in payload["arms"]]
    assert sum(exposed) == 100  # every shopper once, in exactly one arm
    clicked = [a["counts"]["clicked"] for a in payload["arms"]]
    assert clicked[1] / exposed[1] > clicked[0] / exposed[0]
    assert all(s["active"] for s in payload["sites"]) and len(payload["sites"]) == 2
    # Assert: nothing but numbers and version names crossed the network
    secrets = (
        {u for per_site in shown.values() for u in per_site}
        | {i for per_site in shown.values() for items in per_site.values() for i in items}
        | {"sku-"}
    )
    allowed_key = re.compile(r"^(ab\.\d+\.\d+\.[a-z]+|ab\.\d+\.[a-z-]+|ab\.epsilon-\w+|stored)$")
    for reply in grid.replies:
        assert not reply.has_error()
        for text in strings_in(reply):
            assert not any(s in text for s in secrets), text
        for record in reply.content.metric_records.values():
            assert all(allowed_key.match(k) for k in record), list(record)
        missing = reply.content.config_records.get("ab")
        if missing is not None:
            assert set(json.loads(str(missing["missing"]))) <= {"v-control", "v-candidate"}


def test_noisy_reports_spend_the_sites_budget_then_repeat(state: Path, tmp_path: Path) -> None:
    # Arrange: epsilon 1 per report, a site budget of 2.5
    site = _site(tmp_path, "east", 30)
    grid = InProcessGrid({21: (site, {"ab-epsilon-budget": 2.5})})
    db = state / "coordinator" / "coordinator.db"
    with ABRegistry(db) as reg:
        reg.start(["v-control", "v-candidate"], epsilon=1.0)
    # Act: four syncs = four report numbers
    for _ in range(4):
        sync_experiments(grid, db, timeout=30)
    # Assert: two fresh releases (epsilon 2 of 2.5), then the last one again, at no cost
    with ABSite(site / "site.db") as ab:
        spent = ab.epsilon_spent()
        releases = ab.releases(ab.running().experiment_id)  # type: ignore[union-attr]
    assert spent == pytest.approx(2.0) and len(releases) == 2
    metrics = [
        r.content.metric_records["metrics"]
        for r in grid.replies
        if "metrics" in r.content.metric_records
        and "ab.0.fresh" in r.content.metric_records["metrics"]
    ]
    assert [m["ab.0.fresh"] for m in metrics] == [1.0, 1.0, 0.0, 0.0]
    assert all("ab.0.0.impressions" not in m for m in metrics)  # unbounded: never released noisy
    assert metrics[-1]["ab.epsilon-spent"] == pytest.approx(2.0)


def test_a_site_that_allows_no_exact_counts_refuses_them(state: Path, tmp_path: Path) -> None:
    site = _site(tmp_path, "west", 10)
    grid = InProcessGrid({31: (site, {"ab-exact-counts": False})})
    db = state / "coordinator" / "coordinator.db"
    with ABRegistry(db) as reg:
        reg.start(["v-control", "v-candidate"], epsilon=0.0)
    # Act
    sync_experiments(grid, db, timeout=30)
    # Assert
    metrics = grid.replies[0].content.metric_records["metrics"]
    assert metrics["ab.0.refused"] == 1.0
    with ABRegistry(db) as reg:
        assert reg.get().reports == []


def test_stop_reaches_the_sites_and_promotion_publishes_the_winner(
    state: Path, tmp_path: Path
) -> None:
    # Arrange: an experiment with enough traffic for a significant winner
    sites = {41: _site(tmp_path, "a", 150), 42: _site(tmp_path, "b", 150)}
    grid = InProcessGrid({n: (s, {}) for n, s in sites.items()})
    db = state / "coordinator" / "coordinator.db"
    with ABRegistry(db) as reg:
        reg.start(["v-control", "v-candidate"], names=["control", "candidate"], metric="ctr")
    sync_experiments(grid, db, timeout=30)
    for n, s in sites.items():
        _traffic(s, {0: 0.1, 1: 0.5}, seed=n)
    # Act: before the sites report the traffic, nothing is significant yet
    with ABRegistry(db) as reg, pytest.raises(ABTestError, match="no significant winner"):
        reg.promote()
    sync_experiments(grid, db, timeout=30)
    with ABRegistry(db) as reg:
        exp, model = reg.promote()
    sync_experiments(grid, db, timeout=30)  # announces the end
    # Assert
    assert exp.status == "promoted" and model.version == "v-candidate" and model.published
    for s in sites.values():
        with ABSite(s / "site.db") as ab:
            assert ab.running() is None
    with ABRegistry(db) as reg:
        # still announced as stopped (for sites offline at the end), with the same report
        # number: sites answer with their last release, at no cost
        (announced,) = reg.specs_to_send()
        assert announced.status == "stopped"
        assert announced.report_seq == reg.specs_to_send()[0].report_seq


def test_registry_refuses_bad_experiments(state: Path) -> None:
    db = state / "coordinator" / "coordinator.db"
    with ABRegistry(db) as reg:
        with pytest.raises(Exception, match="unknown model version"):
            reg.start(["v-control", "v-nope"])
        with pytest.raises(ABTestError, match="2 to 8 arms"):
            reg.start(["v-control"])
        with pytest.raises(ABTestError, match="different model version"):
            reg.start(["v-control", "v-control"])
        reg.start(["v-control", "v-candidate"])
        with pytest.raises(ABTestError, match="is running"):
            reg.start(["v-control", "v-candidate"])
        with pytest.raises(ABTestError, match="no site has reported"):
            reg.promote()
        with pytest.raises(ABTestError, match="has no arm"):
            reg.promote(arm="Z")


def test_cli_start_status_stop_promote(state: Path) -> None:
    runner = CliRunner()
    base = ["ab", "--help"]
    assert runner.invoke(coordinator_cli, base).exit_code == 0
    sd = ["--state-dir", str(state)]
    # Act
    started = runner.invoke(
        coordinator_cli,
        [
            "ab",
            "start",
            "v-control",
            "v-candidate",
            "--split",
            "90,10",
            "--epsilon",
            "0.5",
            "--json",
            *sd,
        ],
    )
    status = runner.invoke(coordinator_cli, ["ab", "status", "--json", *sd])
    human = runner.invoke(coordinator_cli, ["ab", "status", *sd])
    promote = runner.invoke(coordinator_cli, ["ab", "promote", *sd])
    forced = runner.invoke(coordinator_cli, ["ab", "promote", "--arm", "B", "--json", *sd])
    listed = runner.invoke(coordinator_cli, ["ab", "list", "--json", *sd])
    # Assert
    assert started.exit_code == 0, started.output
    spec = json.loads(started.output)
    assert [a["weight"] for a in spec["arms"]] == [90.0, 10.0] and spec["epsilon"] == 0.5
    body = json.loads(status.output)
    assert body["status"] == "running" and body["arms"][0]["ctr"]["rate"] == 0.0
    assert "two-proportion z-test" in body["test"]
    assert human.exit_code == 0 and "ctr" in human.output
    assert promote.exit_code != 0 and isinstance(promote.exception, ABTestError)
    assert forced.exit_code == 0 and json.loads(forced.output)["published"] == "v-candidate"
    assert json.loads(listed.output)[0]["status"] == "promoted"
