"""The exceptions `simulations` raises; the `fedrec` CLI prints each as one red line."""

from shared.errors import FedrecError


class SimulationError(FedrecError):
    """A simulation cannot be prepared, run or reported as asked."""


class PartitionError(SimulationError):
    """A dataset cannot be split into the requested sites."""
