"""Distributed DP-FedSGD under SecAgg+: run config, and whole runs with the real ClientApp.

`SecAggGrid` delivers each message to `edge_client.client_app.app` in this process, with a
persistent Context per node (SecAgg+ keeps its keys in it) and every message copied on the
way, as serialisation would; transport is the only stand-in (tests/integration covers the
SuperLink path). The runs go through Flower's real `SecAggPlusWorkflow`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import PRVAccountant

from coordinator.distributed_dp import ledger_path, noise_shares, run_distributed, share_scale
from coordinator.errors import RunConfigError
from coordinator.federation import Federation
from coordinator.registry import Registry
from coordinator.run_config import RunConfig
from deploy.demo_sites import write_demo_sites
from edge_client.client_app import app as client_app
from edge_client.privacy_ledger import Mechanism, PrivacyLedger

MODEL = '{"dim": 8, "hidden": 8, "max_len": 10, "dropout": 0.0}'
SIGMA, Q = 1.5, 0.5
POP_SIGMA = 0.5


class _Run:
    run_id = 1


class SecAggGrid(Grid):
    """Delivers messages in-process; one persistent Context per node, messages copied."""

    def __init__(self, sites: dict[int, Path], node_config: dict[int, dict[str, Any]]) -> None:
        self.sites = sites
        self.contexts = {
            node: Context(
                1, node, {"site-dir": str(d), **node_config.get(node, {})}, RecordDict(), {}
            )
            for node, d in sites.items()
        }

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            try:
                reply = client_app(copy.deepcopy(msg), self.contexts[node])
                replies.append(copy.deepcopy(reply))
            except Exception as err:
                replies.append(Message(Error(code=0, reason=str(err)), reply_to=msg))
        return replies

    @property
    def run(self) -> Any:
        return _Run()

    def set_run(self, run: Any) -> None:  # pragma: no cover
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


def config(catalogue: Path, state: Path, **kw: Any) -> RunConfig:
    base: dict[str, Any] = {
        "catalogue": str(catalogue),
        "model-config": MODEL,
        "state-dir": str(state),
        "privacy-mode": "distributed",
        "secagg": True,
        "min-sites": 3,
        "quorum": 2,
        "round-timeout": 30.0,
        "noise-multiplier": SIGMA,
        "dist-sample-rate": Q,
        "secagg-max-weight": 100.0,
    }
    return RunConfig.from_mapping({**base, **kw})


def run(cfg: RunConfig, grid: Grid) -> None:
    fed = Federation(cfg, grid, flwr_run_id=7)
    try:
        run_distributed(fed, grid, Context(1, 0, {}, RecordDict(), cfg.to_mapping()))
    finally:
        fed.close("completed")


# ----------------------------------------------------------------------------- run config
def test_distributed_mode_refuses_to_run_without_secagg(tmp_path: Path) -> None:
    with pytest.raises(RunConfigError, match="needs secagg = true"):
        config(tmp_path / "c.json", tmp_path, secagg=False)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("dist-sample-rate", 0.0, "dist-sample-rate"),
        ("dist-sample-rate", 1.5, "dist-sample-rate"),
        ("dist-noise-shares", 3, "never sum fewer shares"),
        ("noise-multiplier", 0.0, "noise-multiplier > 0"),
        ("dist-delta", 1.0, "dist-delta"),
        ("frozen", "head.bias,head.bias", "twice"),
    ],
)
def test_distributed_settings_are_checked(
    tmp_path: Path, key: str, value: object, match: str
) -> None:
    with pytest.raises(RunConfigError, match=match):
        config(tmp_path / "c.json", tmp_path, **{key: value})


def test_frozen_outside_distributed_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RunConfigError, match="distributed' only"):
        RunConfig.from_mapping({"privacy-mode": "store", "frozen": "head.weight"})


def test_shares_are_sized_for_the_quorum_and_fit_the_secagg_range(tmp_path: Path) -> None:
    cfg = config(tmp_path / "c.json", tmp_path)
    assert noise_shares(cfg) == 2
    # 100 shoppers x C plus a 10-sd tail of one share's noise (sigma C / sqrt(2)) fit exactly
    room = share_scale(cfg) * cfg.secagg_clipping_range
    assert room == pytest.approx(100 * cfg.max_grad_norm + 10 * SIGMA / 2**0.5)


# ----------------------------------------------------------------------------- whole runs
def opacus_prv_of(history: list[tuple[float, float, int]], delta: float = 1e-5) -> float:
    accountant = PRVAccountant()
    accountant.history = history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


def true_counts(sites: Iterable[Path], catalogue: Path, window: int) -> np.ndarray:
    """What the popularity release estimates, from the sites' raw data (test only)."""
    from edge_client.distributed_dp import shopper_item_weights
    from edge_client.store import EventStore
    from shared.sequences import build_sequences, leave_one_out
    from shared.vocab import ItemVocab

    vocab = ItemVocab.load(catalogue)
    counts = np.zeros(vocab.n_items + 1)
    for site in sites:
        store = EventStore(site / "site.db", create=False)
        split = leave_one_out(build_sequences(store.events_frame(), vocab))
        store.close()
        items, weights = shopper_item_weights(split.train, window)
        np.add.at(counts, items, weights)
    return counts


@pytest.mark.slow
def test_distributed_runs_release_popularity_compose_and_enforce_budgets(
    tmp_path: Path,
) -> None:
    # Arrange: three sites; the third's budget covers the popularity release and one step
    catalogue, dirs = write_demo_sites(
        tmp_path / "sites", n_sites=3, shoppers_per_site=20, n_items=30
    )
    sites = {101 + i: d for i, d in enumerate(dirs)}
    pop, step = (POP_SIGMA, 1.0, 1), (SIGMA, Q, 1)
    small = (opacus_prv_of([pop, step]) + opacus_prv_of([pop, (SIGMA, Q, 2)])) / 2
    roomy = {"epsilon-budget": 1e3}  # sigma_p = 0.5 alone costs about 10
    grid = SecAggGrid(sites, {101: roomy, 102: roomy, 103: {"epsilon-budget": small}})
    state = tmp_path / "state"
    first = {"num-rounds": 3, "fraction-evaluate": 0.0, "dist-popularity-noise": POP_SIGMA}

    # Act 1: the popularity release, then two steps; the third site refuses the last one
    run(config(catalogue, state, **first), grid)

    # Assert 1: every round made a version, the refusal was a dropout
    registry = Registry(state / "coordinator" / "coordinator.db")
    rounds = sorted(registry.rounds(), key=lambda r: r["number"])
    assert [r["status"] for r in rounds] == ["completed"] * 3
    assert [r["sites_accepted"] for r in rounds] == [3, 3, 2]
    # the released bias follows the true (never sent) item counts
    released = registry.model(rounds[0]["model_version"])
    bias = torch.load(Path(released.path) / "weights.pt", weights_only=True)["head.bias"]
    truth = np.log1p(true_counts(sites.values(), catalogue, window=11))
    assert np.corrcoef(bias.numpy()[1:], truth[1:])[0, 1] > 0.8
    # epsilon: Opacus' PRV of the whole history, at the coordinator and at every site
    expected = opacus_prv_of([pop, (SIGMA, Q, 2)])
    head = registry.head()
    assert head is not None and head.privacy_mode == "distributed"
    assert head.epsilon_max == pytest.approx(expected, rel=1e-6)
    with PrivacyLedger(ledger_path(state)) as ledger:
        assert ledger.mechanisms() == [Mechanism(*pop), Mechanism(*step), Mechanism(*step)]
    for node, site in sites.items():
        with PrivacyLedger(site / "site.db") as ledger:
            steps = 1 if node == 103 else 2
            assert ledger.mechanisms() == [Mechanism(*pop)] + [Mechanism(*step)] * steps
            eps = opacus_prv_of([pop, (SIGMA, Q, steps)])
            assert ledger.spent().epsilon_prv == pytest.approx(eps, rel=1e-6)

    # Act 2: a population budget below what one more step would cost
    budget = (expected + opacus_prv_of([pop, (SIGMA, Q, 3)])) / 2
    second = {"num-rounds": 1, "fraction-evaluate": 0.0, "dist-epsilon-budget": budget}
    run(config(catalogue, state, **second), grid)

    # Assert 2: the round was not started; nothing was released or recorded
    last = max(registry.rounds(), key=lambda r: r["number"])
    assert last["status"] == "failed" and "population budget" in last["detail"]
    assert registry.head() == head
    with PrivacyLedger(ledger_path(state)) as ledger:
        assert len(ledger.mechanisms()) == 3
    registry.close()
