"""The six stages by name: the one table both drivers (DVC via `vflow stage`, Prefect via
`flows/retrain.py`) call, so they can never drift apart. Each is `stages/<name>.py:run`.

When params ask for more than one training process (`train.nodes`, `train.procs_per_node`),
train runs through torchrun in a subprocess (`orchestration/launch.py`): from the flow and from
`vflow stage train`. (`dvc repro` runs the stage module itself, one process; `vflow launch`
is the multi-process command.)"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from visionflow.core.config import STAGE_NAMES, Params
from visionflow.core.env import imports_without_gc, quiet_env
from visionflow.core.layout import Layout
from visionflow.orchestration import launch

STAGES: dict[str, str] = {name: f"visionflow.stages.{name}" for name in STAGE_NAMES}


def stage_function(name: str) -> Callable[[Params, Layout], Any]:
    module = sys.modules.get(STAGES[name])
    if module is None:  # the first call imports the stage, and with it torch, MLflow...
        with imports_without_gc():
            module = importlib.import_module(STAGES[name])
    return module.run


def run_stage(name: str, params: Params, layout: Layout) -> Any:
    quiet_env()
    if name == "train" and launch.wanted(params):
        return launch.train(params, layout)
    return stage_function(name)(params, layout)
