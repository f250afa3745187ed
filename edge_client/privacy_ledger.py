"""The site's privacy ledger: every DP-SGD round it ran, composed into the epsilon it has spent.

The ledger lives in the site's ``site.db`` in its own table, under its own sqlite-utils
migration set ``fedrec-privacy`` (next to the event store's ``fedrec-edge``), so the spent
epsilon survives restarts and composes across every round the site ever trained.

Unit and mechanism: one shopper (their whole recent sequence is one training example); each
round is a Poisson-subsampled Gaussian mechanism run ``steps`` times with sample rate q and
noise multiplier sigma. `spent` recomputes epsilon from the *whole history* by composing the
mechanisms (never by adding per-round epsilons): PRV accountant for reporting (Gopi et al.
2021; an upper bound), RDP as a cross-check (looser in practice). Epsilons are stored as plain
floats (`PRVAccountant.get_epsilon` returns ``np.float64``).

For speed, rounds with nearly equal (sigma, q) are merged before composing: q is rounded *up*
and sigma *down* to three significant digits, which can only increase epsilon (the
subsampled Gaussian's privacy loss grows with q and shrinks with sigma), so the reported
figure stays an upper bound while the PRV composition stays small.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sqlite3
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from edge_client.errors import PrivacyLedgerError

migrations = Migrations("fedrec-privacy")

UNIT = "shopper"
MECHANISM = "poisson-subsampled-gaussian (DP-SGD)"
ACCOUNTANT = "prv"
CROSS_CHECK = "rdp"
# Renyi orders of the RDP cross-check: Opacus' default grid adds 90 fractional orders, each
# a slow series (~4 ms, ~0.4 s per query); fewer orders can only loosen the bound. Orders
# below 2 only matter for epsilon well under 1.
RDP_ORDERS = [*range(2, 64), 80, 96, 128, 192, 256]


@migrations()
def m001_privacy_rounds(db: Database) -> None:
    """One row per DP-SGD round the site trained (append-only)."""
    db.execute(
        """
        CREATE TABLE privacy_rounds (
            id INTEGER PRIMARY KEY,
            recorded_ms INTEGER NOT NULL,
            model_version TEXT NOT NULL DEFAULT '',
            noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
            sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
            steps INTEGER NOT NULL CHECK (steps >= 1),
            max_grad_norm REAL NOT NULL CHECK (max_grad_norm > 0),
            num_examples INTEGER NOT NULL CHECK (num_examples >= 0),
            delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
            epsilon_round REAL NOT NULL,
            epsilon_prv REAL NOT NULL,
            epsilon_rdp REAL NOT NULL,
            epsilon_budget REAL NOT NULL
        ) STRICT
        """
    )


class Mechanism(NamedTuple):
    """One round of DP-SGD: ``steps`` Poisson-subsampled Gaussian steps."""

    noise_multiplier: float
    sample_rate: float
    steps: int


class PrivacySpent(NamedTuple):
    """Epsilon under both accountants at one delta (unit: one shopper)."""

    epsilon_prv: float
    epsilon_rdp: float
    delta: float


@dataclass(frozen=True)
class PrivacyRound:
    """A recorded round (a row of ``privacy_rounds``)."""

    id: int
    recorded_ms: int
    model_version: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    num_examples: int
    delta: float
    epsilon_round: float  # this round alone (PRV)
    epsilon_prv: float  # all rounds up to and including this one, composed
    epsilon_rdp: float
    epsilon_budget: float

    @property
    def mechanism(self) -> Mechanism:
        """The (sigma, q, steps) this round ran."""
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps)


def _round_sig(x: float, digits: int, up: bool) -> float:
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    # The 1e-9 keeps exact grid values (1.0, 0.25) from moving a step because of float error.
    value = (math.ceil(x * scale - 1e-9) if up else math.floor(x * scale + 1e-9)) / scale
    return value


def merge_mechanisms(mechanisms: Iterable[Mechanism]) -> list[Mechanism]:
    """Merge rounds into few (sigma, q) classes, rounding q up and sigma down (conservative)."""
    merged: dict[tuple[float, float], int] = {}
    for m in mechanisms:
        key = (
            _round_sig(m.noise_multiplier, 3, up=False),
            min(1.0, _round_sig(m.sample_rate, 3, up=True)),
        )
        merged[key] = merged.get(key, 0) + int(m.steps)
    return [Mechanism(s, q, n) for (s, q), n in merged.items()]


def check_mechanism(m: Mechanism) -> None:
    """Raise `PrivacyLedgerError` unless sigma > 0, 0 < q <= 1 and steps >= 1."""
    if not (m.noise_multiplier > 0 and 0 < m.sample_rate <= 1 and m.steps >= 1):
        raise PrivacyLedgerError(f"not a valid DP-SGD round: {m}")


def compose(mechanisms: Iterable[Mechanism], delta: float) -> PrivacySpent:
    """Epsilon at ``delta`` of running all ``mechanisms`` in sequence (PRV, and RDP)."""
    if not 0 < delta < 1:
        raise PrivacyLedgerError(f"delta must be in (0, 1), got {delta}")
    history = merge_mechanisms(mechanisms)
    for m in history:
        check_mechanism(m)
    return _compose(tuple(sorted(history)), float(delta))


@contextlib.contextmanager
def _coarse_rdp_grid() -> Iterator[None]:
    """Use `RDP_ORDERS` wherever Opacus builds an RDP accountant (PRV's domain bound too).

    PRV sizes its discretisation domain with an RDP bound on Opacus' default grid; a coarser
    grid gives a looser (larger, still safe) domain at a fraction of the time.
    """
    from opacus.accountants import RDPAccountant

    saved = RDPAccountant.DEFAULT_ALPHAS
    RDPAccountant.DEFAULT_ALPHAS = RDP_ORDERS
    try:
        yield
    finally:
        RDPAccountant.DEFAULT_ALPHAS = saved


@functools.lru_cache(maxsize=256)
def _compose(history: tuple[Mechanism, ...], delta: float) -> PrivacySpent:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if not history:
        return PrivacySpent(0.0, 0.0, delta)
    prv, rdp = PRVAccountant(), RDPAccountant()
    prv.history = [tuple(m) for m in history]
    rdp.history = [tuple(m) for m in history]
    with warnings.catch_warnings(), _coarse_rdp_grid():
        # q = 1 divides by zero in a masked-out branch; RDP warns about its order grid.
        warnings.simplefilter("ignore")
        eps_rdp = float(rdp.get_epsilon(delta, alphas=RDP_ORDERS))
        try:
            eps_prv = float(prv.get_epsilon(delta))
        except (ValueError, RuntimeError, OverflowError, MemoryError):
            # PRV's discretisation can fail far outside useful regimes (epsilon in the
            # hundreds); RDP is an upper bound as well, so report that instead.
            eps_prv = eps_rdp
    if not math.isfinite(eps_prv):
        eps_prv = eps_rdp
    return PrivacySpent(eps_prv, eps_rdp, delta)


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier for which ``steps`` steps at rate q cost ``target_epsilon`` (PRV)."""
    from opacus.accountants.utils import get_noise_multiplier

    if not target_epsilon > 0:
        raise PrivacyLedgerError(f"target epsilon must be > 0, got {target_epsilon}")
    with warnings.catch_warnings(), _coarse_rdp_grid():
        warnings.simplefilter("ignore")
        try:
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=ACCOUNTANT,
                epsilon_tolerance=0.01,
            )
        except ValueError as err:
            raise PrivacyLedgerError(
                f"no noise level reaches epsilon {target_epsilon}: {err}"
            ) from err
    return float(sigma)


class PrivacyLedger:
    """The DP rounds of one site, persisted in its SQLite file (table ``privacy_rounds``).

    Examples
    --------
    >>> ledger = PrivacyLedger("site.db")                       # doctest: +SKIP
    >>> ledger.epsilon_if(1.2, 0.128, 8, delta=1e-5)             # doctest: +SKIP
    PrivacySpent(epsilon_prv=2.29..., epsilon_rdp=..., delta=1e-05)
    """

    def __init__(self, db_path: str | Path, *, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(db_path)
        try:
            self._conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s)
            self.db = Database(self._conn, execute_plugins=False)
            # One migrating process at a time (the ClientApp, the edge service and the CLI
            # may open a new site.db together); migrations run as savepoints in this lock.
            with self._immediate():
                migrations.apply(self.db)
        except (sqlite3.Error, ValueError) as err:
            raise PrivacyLedgerError(
                f"cannot open the privacy ledger in {self.path}: {err}"
            ) from err

    @contextlib.contextmanager
    def _immediate(self) -> Iterator[None]:
        """A ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back otherwise."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the database connection."""
        self._conn.close()

    def history(self) -> list[PrivacyRound]:
        """Every recorded round, oldest first."""
        rows = self.db.execute("SELECT * FROM privacy_rounds ORDER BY id").fetchall()
        names = [c.name for c in self.db.table("privacy_rounds").columns]
        return [PrivacyRound(**dict(zip(names, row, strict=True))) for row in rows]

    def mechanisms(self) -> list[Mechanism]:
        """The (sigma, q, steps) of every recorded round, oldest first."""
        rows = self.db.execute(
            "SELECT noise_multiplier, sample_rate, steps FROM privacy_rounds ORDER BY id"
        ).fetchall()
        return [Mechanism(float(s), float(q), int(n)) for s, q, n in rows]

    @property
    def delta(self) -> float | None:
        """The delta this site accounts at (fixed by its first round), or None before any."""
        row = self.db.execute("SELECT delta FROM privacy_rounds ORDER BY id LIMIT 1").fetchone()
        return None if row is None else float(row[0])

    def _delta(self, delta: float | None) -> float:
        pinned = self.delta
        if delta is None:
            if pinned is None:
                raise PrivacyLedgerError("no round recorded yet: give the delta to account at")
            return pinned
        if pinned is not None and not math.isclose(delta, pinned, rel_tol=1e-12):
            raise PrivacyLedgerError(
                f"this site accounts at delta={pinned:g} since its first round; "
                f"delta={delta:g} would re-price every past round"
            )
        return delta

    def spent(self, delta: float | None = None) -> PrivacySpent:
        """(epsilon_prv, epsilon_rdp, delta) of all recorded rounds, composed."""
        return compose(self.mechanisms(), self._delta(delta))

    def epsilon_if(
        self, noise_multiplier: float, sample_rate: float, steps: int, delta: float | None = None
    ) -> PrivacySpent:
        """What `spent` would be after one more round of (sigma, q, steps)."""
        nxt = Mechanism(float(noise_multiplier), float(sample_rate), int(steps))
        check_mechanism(nxt)
        return compose([*self.mechanisms(), nxt], self._delta(delta))

    def record(
        self,
        mechanism: Mechanism,
        *,
        delta: float,
        max_grad_norm: float,
        num_examples: int,
        epsilon_budget: float,
        model_version: str = "",
    ) -> PrivacyRound:
        """Append one round (atomically) and return it with the new composed totals."""
        check_mechanism(mechanism)
        delta = self._delta(delta)
        alone = compose([mechanism], delta)
        for _ in range(5):
            # Compose outside the write lock (it takes ~0.5 s and site.db is shared with
            # the event store), then insert only if no round was added meanwhile.
            history = self.mechanisms()
            total = compose([*history, mechanism], delta)
            row = {
                "recorded_ms": int(time.time() * 1000),
                "model_version": model_version,
                "noise_multiplier": float(mechanism.noise_multiplier),
                "sample_rate": float(mechanism.sample_rate),
                "steps": int(mechanism.steps),
                "max_grad_norm": float(max_grad_norm),
                "num_examples": int(num_examples),
                "delta": float(delta),
                "epsilon_round": alone.epsilon_prv,
                "epsilon_prv": total.epsilon_prv,
                "epsilon_rdp": total.epsilon_rdp,
                "epsilon_budget": float(epsilon_budget),
            }
            try:
                with self._immediate():
                    (count,) = self._conn.execute("SELECT count(*) FROM privacy_rounds").fetchone()
                    if count != len(history):
                        continue
                    row_id = self.db.table("privacy_rounds").insert(row).last_pk
                break
            except sqlite3.Error as err:  # a failed write must stop the weights leaving the site
                raise PrivacyLedgerError(
                    f"cannot record the DP round in {self.path}: {err}"
                ) from err
        else:
            raise PrivacyLedgerError(f"{self.path}: rounds keep being added concurrently")
        return PrivacyRound(id=int(row_id), **row)  # type: ignore[arg-type]
