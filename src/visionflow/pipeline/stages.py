"""The six stages by name: the one table both drivers (DVC via `vflow stage`, Prefect via
`flows/retrain.py`) call, so they can never drift apart. Each is `stages/<name>.py:run`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from visionflow.config import STAGE_NAMES, Params
from visionflow.env import quiet_env
from visionflow.layout import Layout

STAGES: dict[str, str] = {name: f"visionflow.stages.{name}" for name in STAGE_NAMES}


def stage_function(name: str) -> Callable[[Params, Layout], Any]:
    return importlib.import_module(STAGES[name]).run


def run_stage(name: str, params: Params, layout: Layout) -> Any:
    quiet_env()
    return stage_function(name)(params, layout)
