"""User-facing errors.

Anything raised as a `FedShopError` is a mistake the user can fix (a missing file, a bad config value);
the CLI prints its message on one line and exits non-zero instead of showing a traceback.
"""


class FedShopError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(FedShopError):
    """The run configuration is invalid."""


class DataError(FedShopError):
    """A data file is missing, unreadable or not in the expected format."""
