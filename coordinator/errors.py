"""The exceptions the coordinator raises; the CLI turns each into one message and exit 1."""

from shared.errors import FedrecError


class CoordinatorError(FedrecError):
    """Base class of the coordinator's errors."""


class RunConfigError(CoordinatorError):
    """A run-config value is missing, of the wrong type, out of range or inconsistent."""


class RegistryError(CoordinatorError):
    """The registry database is unreadable, or a model version or site is unknown."""


class UpdateRejectedError(CoordinatorError):
    """A site's update failed validation (non-finite, wrong shape, norm above the bound)."""
