"""The `retrain` Prefect flow: validate -> augment -> train -> evaluate -> compress -> register.

Each task calls the same stage function that `dvc repro` runs through `vflow stage`, so
the two drivers produce the same files from the same code.

    python flows/retrain.py                 # one run, ephemeral Prefect API
    python flows/retrain.py -s train.epochs=3
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from visionflow.config import load_params
from visionflow.layout import Layout
from visionflow.stages import STAGES, run_stage
from visionflow.tracking import quiet_env

quiet_env()


def _stage_task(name: str):
    @task(name=name, task_run_name=name, retries=0)
    def stage(params_path: str, overrides: list[str], root: str) -> Any:
        layout = Layout.at(root)
        params = load_params(params_path, overrides, root=layout.root)
        return run_stage(name, params, layout)

    return stage


STAGE_TASKS = {name: _stage_task(name) for name in STAGES}


@flow(name="retrain", log_prints=True)
def retrain(params: str = "params.yaml", overrides: list[str] | None = None,
            root: str = ".", force: bool = False) -> dict[str, Any]:
    """Run the six stages in order; returns the registration summary."""
    logger = get_run_logger()
    root = str(Path(root).resolve())
    params_path = params if os.path.isabs(params) else str(Path(root) / params)
    load_params(params_path, overrides or [], root=Path(root))  # fail fast on bad config
    results: dict[str, Any] = {}
    for name, stage in STAGE_TASKS.items():
        logger.info("stage %s", name)
        results[name] = stage(params_path, overrides or [], root)
    reg = results["register"]
    logger.info("registered %s version %s alias %s: %s", reg.model_name, reg.version,
                reg.alias, reg.decision.reason)
    return {"model_name": reg.model_name, "version": reg.version, "alias": reg.alias,
            "reason": reg.decision.reason, "ui_command": reg.ui_command}


def main(params: str = "params.yaml", overrides: list[str] | None = None, root: str = ".",
         force: bool = False) -> dict[str, Any]:
    out = retrain(params=params, overrides=overrides or [], root=root, force=force)
    alias = f"@{out['alias']}" if out["alias"] else "(no alias: champion kept)"
    print(f"\nregistered model: {out['model_name']} version {out['version']} {alias}")
    print(f"decision: {out['reason']}")
    print(f"browse it: {out['ui_command']}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".")
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    from visionflow.errors import VisionflowError

    try:
        main(a.params, a.overrides, a.root, a.force)
    except VisionflowError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
