"""The exceptions `shared` raises; the CLI turns each into one message and a non-zero exit."""


class FedrecError(Exception):
    """Base class of every error fedrec reports to a user."""


class DataError(FedrecError):
    """Input data is missing, malformed, empty or of the wrong format."""


class VocabError(FedrecError):
    """An item vocabulary is inconsistent with a model or with the data."""


class ModelError(FedrecError):
    """A model directory is missing, incomplete, corrupt or of an unknown kind."""


class ConfigError(FedrecError):
    """A configuration value is out of range or inconsistent."""
