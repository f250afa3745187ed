"""The exceptions the edge store, model server and service raise."""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import FedrecError


class EdgeError(FedrecError):
    """Base class of every error of the edge client."""


class StoreError(EdgeError):
    """The event store cannot be opened, migrated, read or written."""


@dataclass(frozen=True)
class RowProblem:
    """Why one event of a batch was refused: its position, the field and the reason."""

    row: int
    field: str
    reason: str

    def describe(self) -> str:
        """One line such as ``row 3, timestamp: is in the future``."""
        return f"row {self.row}, {self.field}: {self.reason}"


class EventValidationError(StoreError):
    """A batch of events was refused as a whole; ``problems`` names each bad row."""

    def __init__(self, problems: list[RowProblem], total: int | None = None) -> None:
        self.problems = problems
        self.total = len(problems) if total is None else total
        shown = "; ".join(p.describe() for p in problems[:5])
        more = f" (and {self.total - 5} more)" if self.total > 5 else ""
        super().__init__(f"{self.total} invalid event(s), nothing stored: {shown}{more}")


class ModelRejectedError(EdgeError):
    """A model directory failed verification or its smoke inference; it is not served."""


class SettingsError(EdgeError):
    """The service settings are unsafe or inconsistent (e.g. a default admin token)."""


class PrivacyError(EdgeError):
    """Local DP training or the site's privacy ledger cannot proceed."""


class DPModelError(PrivacyError):
    """A model cannot be trained with exact per-shopper DP-SGD (tied weights, packing, ...)."""


class PrivacyLedgerError(PrivacyError):
    """The privacy ledger is unreadable, or a round contradicts its history (e.g. delta)."""


class PrivacyBudgetExceeded(PrivacyError):  # noqa: N818 - the name the ClientApp reports
    """The next DP round would take the site past its (epsilon, delta) budget; nothing ran."""

    def __init__(self, spent: float, next_round: float, budget: float, delta: float) -> None:
        self.spent = spent
        self.next_round = next_round  # epsilon after the refused round, all rounds composed
        self.budget = budget
        self.delta = delta
        super().__init__(
            f"privacy budget exhausted: epsilon spent {spent:.3f}, after the next round "
            f"{next_round:.3f} > budget {budget:.3f} (delta={delta:g}, unit: one shopper); "
            "the site refuses to train"
        )
