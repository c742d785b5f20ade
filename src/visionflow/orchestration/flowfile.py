"""The one loader of the project's flow files (`flows/retrain.py`, `flows/tune.py`).

They are scripts, not package modules, because Prefect deployments name them by path
(`flows/retrain.py:retrain`); `load` imports one as a real module (Prefect finds the flow's
file), so `vflow run`, `vflow tune` and `vflow schedule` all get their flows the same way.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from prefect.exceptions import ScriptError
from prefect.utilities.importtools import load_script_as_module

from visionflow.core.errors import VisionflowError


def load(path: Path) -> ModuleType:
    """The flow file at `path` (`Layout.flow_file`, `Layout.tune_flow_file`), imported; one
    line when it is missing or does not import."""
    if not path.is_file():
        raise VisionflowError(f"{path}: flow file not found")
    try:
        return load_script_as_module(str(path))
    except ScriptError as err:
        raise VisionflowError(f"{path}: {type(err.user_exc).__name__}: {err.user_exc}") \
            from err.user_exc
