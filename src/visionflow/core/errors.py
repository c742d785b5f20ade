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


def one_line(e: BaseException | str) -> str:
    """An error's text on one line (at most 300 characters) for a one-line message."""
    text = str(e) if str(e) else type(e).__name__
    return " ".join(text.split())[:300]
