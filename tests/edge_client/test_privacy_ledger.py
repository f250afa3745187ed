"""The site's privacy ledger: composition across rounds and restarts, in the site's SQLite."""

from __future__ import annotations

import json
import math
import sqlite3
import warnings
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from edge_client.errors import PrivacyLedgerError
from edge_client.privacy_ledger import (
    Mechanism,
    PrivacyLedger,
    compose,
    merge_mechanisms,
    noise_for_epsilon,
)
from edge_client.store import EventStore

DELTA = 1e-5
ROUND = Mechanism(1.2, 0.128, 8)


def opacus_prv(history: list[Mechanism], delta: float = DELTA) -> float:
    accountant = PRVAccountant()
    accountant.history = [tuple(m) for m in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


def record(ledger: PrivacyLedger, m: Mechanism = ROUND, delta: float = DELTA) -> None:
    ledger.record(m, delta=delta, max_grad_norm=1.0, num_examples=2000, epsilon_budget=10.0)


def test_a_fresh_ledger_has_spent_nothing(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "site.db") as ledger:
        assert ledger.spent(DELTA) == (0.0, 0.0, DELTA)
        assert ledger.delta is None
        with pytest.raises(PrivacyLedgerError, match="give the delta"):
            ledger.spent()


def test_rounds_compose_by_mechanism_not_by_adding_epsilons(tmp_path: Path) -> None:
    # Arrange
    rounds = [ROUND, Mechanism(1.0, 0.1, 10), ROUND]
    with PrivacyLedger(tmp_path / "site.db") as ledger:
        # Act
        for m in rounds:
            record(ledger, m)
        spent = ledger.spent()
        history = ledger.history()

    # Assert: equals one PRV composition of the whole history, far below the sum
    assert spent.epsilon_prv == pytest.approx(opacus_prv(rounds), rel=1e-9)
    assert spent.epsilon_prv < sum(r.epsilon_round for r in history)
    assert spent.epsilon_prv <= spent.epsilon_rdp
    assert history[-1].epsilon_prv == pytest.approx(spent.epsilon_prv)
    assert [r.mechanism for r in history] == rounds
    assert history[0].epsilon_prv < history[1].epsilon_prv < history[2].epsilon_prv


def test_the_ledger_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    with PrivacyLedger(path) as ledger:
        record(ledger)
        before = ledger.spent()
    with PrivacyLedger(path) as ledger:  # a new process would do exactly this
        record(ledger)
        after = ledger.spent()
        assert len(ledger.history()) == 2
    assert after.epsilon_prv > before.epsilon_prv
    assert after.epsilon_prv == pytest.approx(opacus_prv([ROUND, ROUND]), rel=1e-9)


def test_epsilon_if_looks_ahead_without_recording(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "site.db") as ledger:
        record(ledger)
        ahead = ledger.epsilon_if(*ROUND, delta=DELTA)
        assert len(ledger.history()) == 1
        record(ledger)
        assert ledger.spent().epsilon_prv == pytest.approx(ahead.epsilon_prv)


def test_coexists_with_the_event_store_schema(tmp_path: Path) -> None:
    # Arrange: the event store creates site.db first, as the edge service does
    path = tmp_path / "site.db"
    EventStore(path).close()

    # Act
    with PrivacyLedger(path) as ledger:
        record(ledger)

    # Assert: both sets applied, each to its own tables
    conn = sqlite3.connect(path)
    sets = {row[0] for row in conn.execute("SELECT migration_set FROM _sqlite_migrations")}
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert {"fedrec-edge", "fedrec-privacy"} <= sets
    assert {"events", "privacy_rounds"} <= tables


def test_delta_is_pinned_by_the_first_round(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "site.db") as ledger:
        record(ledger, delta=1e-5)
        with pytest.raises(PrivacyLedgerError, match="re-price"):
            record(ledger, delta=1e-3)
        with pytest.raises(PrivacyLedgerError, match="re-price"):
            ledger.epsilon_if(*ROUND, delta=1e-3)
        assert len(ledger.history()) == 1


@pytest.mark.parametrize(
    "bad",
    [
        Mechanism(0.0, 0.1, 1),
        Mechanism(1.0, 0.0, 1),
        Mechanism(1.0, 1.5, 1),
        Mechanism(1.0, 0.1, 0),
    ],
)
def test_invalid_rounds_are_refused(tmp_path: Path, bad: Mechanism) -> None:
    with PrivacyLedger(tmp_path / "site.db") as ledger:
        with pytest.raises(PrivacyLedgerError, match="not a valid"):
            record(ledger, bad)
        assert ledger.history() == []


def test_values_are_plain_json_floats(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / "site.db") as ledger:
        record(ledger)
        spent = ledger.spent()
        row = ledger.history()[0]
    assert all(type(x) is float for x in spent)
    json.dumps({"spent": list(spent), "round": row.__dict__})


def test_merging_rounds_only_rounds_towards_more_privacy_loss() -> None:
    # Arrange: near-identical rounds, as a site whose shopper count drifts would run
    rounds = [Mechanism(1.2, 256 / (2000 + i), 8) for i in range(0, 8, 2)]

    # Act
    merged = merge_mechanisms(rounds)

    # Assert: fewer classes, q rounded up, sigma down, steps kept; epsilon an upper bound
    assert len(merged) < len(rounds)
    assert sum(m.steps for m in merged) == sum(m.steps for m in rounds)
    assert min(m.sample_rate for m in merged) >= max(m.sample_rate for m in rounds) * 0.99
    assert all(m.noise_multiplier <= 1.2 for m in merged)
    exact = opacus_prv(rounds)
    assert exact <= compose(rounds, DELTA).epsilon_prv <= exact * 1.05


def test_rdp_cross_check_matches_opacus_rdp_order_for_order() -> None:
    accountant = RDPAccountant()
    accountant.history = [tuple(ROUND)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default_grid = accountant.get_epsilon(DELTA)
    ours = compose([ROUND], DELTA).epsilon_rdp
    assert ours >= default_grid - 1e-9  # a coarser grid can only be looser
    assert ours == pytest.approx(default_grid, rel=0.05)


def test_noise_for_a_target_epsilon_reaches_it() -> None:
    sigma = noise_for_epsilon(2.0, DELTA, 0.128, 8)
    assert compose([Mechanism(sigma, 0.128, 8)], DELTA).epsilon_prv == pytest.approx(2.0, abs=0.02)
    with pytest.raises(PrivacyLedgerError):
        noise_for_epsilon(-1.0, DELTA, 0.1, 1)


def test_an_unreadable_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    path.write_bytes(b"this is not an sqlite file" * 100)
    with pytest.raises(PrivacyLedgerError, match="cannot open"):
        PrivacyLedger(path)


def test_epsilon_grows_with_rounds_and_stays_finite() -> None:
    eps = [compose([ROUND] * r, DELTA).epsilon_prv for r in (1, 2, 4)]
    assert eps[0] < eps[1] < eps[2]
    assert all(math.isfinite(e) for e in eps)


class RacingLedger(PrivacyLedger):
    """Another process records a round while this one is composing its own."""

    raced = False

    def mechanisms(self) -> list[Mechanism]:
        history = super().mechanisms()
        if not self.raced:
            self.raced = True
            with PrivacyLedger(self.path) as other:
                record(other, Mechanism(1.0, 0.1, 10))
        return history


def test_a_round_recorded_concurrently_is_composed_not_lost(tmp_path: Path) -> None:
    with RacingLedger(tmp_path / "site.db") as ledger:
        record(ledger)
        rounds = [r.mechanism for r in ledger.history()]
        last = ledger.history()[-1]
    assert rounds == [Mechanism(1.0, 0.1, 10), ROUND]
    assert last.epsilon_prv == pytest.approx(compose(rounds, DELTA).epsilon_prv)
