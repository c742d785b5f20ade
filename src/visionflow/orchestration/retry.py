"""Which failures a stage task retries: transient ones (I/O, a tracking server or database
that does not answer) with exponential back-off; never the data gate, bad config, a timeout
or a plain bug."""

from __future__ import annotations

import errno
import re

from visionflow.core.errors import VisionflowError

_PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                        NotADirectoryError)
_TRANSIENT_TEXT = re.compile(
    r"connection (refused|reset|aborted|error)|max retries exceeded|failed to establish a new "
    r"connection|timed? ?out|temporarily unavailable|service unavailable|bad gateway|"
    r"too many requests|database is locked|remote end closed|broken pipe|"
    r"\b(429|502|503|504)\b",
    re.IGNORECASE,
)
_MLFLOW_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                           "DEADLINE_EXCEEDED", "ABORTED"}


def is_transient(exc: BaseException | None) -> bool:
    """True for a failure worth retrying after a pause; False for one that would fail again.

    Never transient: any `VisionflowError` (`ValidationFailed`, `ConfigError`, `DataError`),
    a Prefect task/flow timeout, or a plain bug (ValueError, RuntimeError, ...). Transient:
    OSError other than missing/forbidden paths (includes ConnectionError, TimeoutError and
    requests' errors), urllib3 connection errors, an `MlflowException` or SQL error whose
    code or message says the server did not answer or the store was busy. The `__cause__`
    / `__context__` chain is searched, so a wrapped connection error counts.
    """
    if exc is None or isinstance(exc, VisionflowError) or _is_prefect_timeout(exc):
        return False
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, VisionflowError):
            return False
        if _transient_one(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _transient_one(e: BaseException) -> bool:
    name, module = type(e).__name__, type(e).__module__
    if module.startswith("requests") and name == "HTTPError":
        status = getattr(getattr(e, "response", None), "status_code", None)
        return status is None or status >= 500 or status == 429
    if isinstance(e, OSError):  # not: a missing or forbidden path, a full/read-only disk
        return not (isinstance(e, _PERMANENT_OS_ERRORS) or e.errno in (errno.ENOSPC,
                                                                          errno.EROFS))
    if module.startswith("urllib3") and name in {
        "MaxRetryError", "NewConnectionError", "ProtocolError", "ReadTimeoutError",
        "ConnectTimeoutError", "ProxyError",
    }:
        return True
    if module.startswith("httpx") and ("Connect" in name or "Timeout" in name):
        return True
    if name == "MlflowException" or any(c.__name__ == "MlflowException"
                                         for c in type(e).__mro__):
        code = str(getattr(e, "error_code", "") or "")
        try:
            status = int(e.get_http_status_code())  # type: ignore[attr-defined]
        except (AttributeError, TypeError, ValueError):
            status = 0
        return (code in _MLFLOW_TRANSIENT_CODES or status in (429, 502, 503, 504)
                or bool(_TRANSIENT_TEXT.search(str(e))))
    if module.startswith("sqlalchemy") and name in {"OperationalError", "TimeoutError",
                                                    "DisconnectionError"}:
        return bool(_TRANSIENT_TEXT.search(str(e))) or name != "OperationalError"
    return False


def _is_prefect_timeout(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("prefect") and "Timeout" in type(exc).__name__


def retry_delays(first_s: float, retries: int) -> list[float]:
    """Exponential back-off: first, 2x, 4x, ..."""
    return [first_s * 2**i for i in range(retries)]
