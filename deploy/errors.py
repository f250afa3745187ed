"""The exceptions `deploy` raises; the `fedrec` CLI prints each as one red line."""

from shared.errors import FedrecError


class DeployError(FedrecError):
    """A deployment step failed: a process, a port, a state directory, a Flower command."""


class CertificateError(DeployError):
    """A certificate or key is missing, unreadable, expired or does not match its CA."""


class StackError(DeployError):
    """The local stack cannot be started, inspected or stopped as asked."""
