"""User-facing errors: the CLI prints `str(err)` as one line and exits non-zero."""


class VisionflowError(Exception):
    """Base class; the message is a single line naming the file, key or value."""

    exit_code = 1


class ConfigError(VisionflowError):
    exit_code = 2


class DataError(VisionflowError):
    exit_code = 3


class ValidationFailed(VisionflowError):
    """The data gate rejected the dataset (a hard expectation failed)."""

    exit_code = 4
