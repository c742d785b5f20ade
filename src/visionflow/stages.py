"""The six stages by name: the one table both drivers (DVC via `vflow stage`, Prefect via
`flows/retrain.py`) call, so they can never drift apart."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from visionflow.config import Params
from visionflow.layout import Layout

STAGES: dict[str, str] = {
    "validate": "visionflow.validate:run_validate",
    "augment": "visionflow.augment:run_augment",
    "train": "visionflow.train:run_train",
    "evaluate": "visionflow.evaluate:run_evaluate",
    "compress": "visionflow.compress:run_compress",
    "register": "visionflow.register:run_register",
}


def stage_function(name: str) -> Callable[[Params, Layout], Any]:
    module, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module), func)


def run_stage(name: str, params: Params, layout: Layout) -> Any:
    from visionflow.tracking import quiet_env

    quiet_env()
    return stage_function(name)(params, layout)
