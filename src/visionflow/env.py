"""The process environment every tool we drive gets: telemetry off, quiet progress bars."""

from __future__ import annotations

import os

QUIET = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GIT_PYTHON_REFRESH": "quiet",
}


def quiet_env() -> None:
    """Telemetry off for every tool we drive (values the user set are kept)."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)
