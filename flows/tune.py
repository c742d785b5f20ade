"""The `tune` Prefect flow: a hyperparameter search (`tune:` in params.yaml), each trial a task.

Trials run `tune.parallel` at a time on a thread pool (`ThreadPoolTaskRunner`); each trains
on the train split, is scored on the val split after every epoch and may be pruned. The
search itself (study, storage, MLflow runs, progress) is `visionflow.tune`; this
file holds the Prefect wrappers only. A rerun continues the study; on several hosts, run it
on each against one storage (`VFLOW_TUNE_STORAGE`).

    python flows/tune.py                       # what `vflow tune` runs
    python flows/tune.py -s tune.trials=40     # overrides as for every command
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from visionflow.core.configfile import load_params
from visionflow.core.env import imports_without_gc, quiet_env
from visionflow.core.errors import VisionflowError
from visionflow.core.layout import Layout
from visionflow.orchestration import servers, stdio
from visionflow.orchestration.tasks import bring_up_to_date

with imports_without_gc():  # torch, torchvision, Optuna: the trials' libraries
    from visionflow.tune.search import Search, summary_markdown

quiet_env()
stdio.outlive_the_reader()  # a worker's run goes on if the worker dies
_SEARCHES: dict[str, Search] = {}  # the flow's open search, by id, for its tasks


@task(name="trial", cache_policy=NO_CACHE, persist_result=False, retries=0)
def trial(search_id: str, number: int) -> dict[str, Any]:
    """Train and score one trial of the open search."""
    return _SEARCHES[search_id].run_trial(number)


@flow(name="tune")
def tune(params: str = "params.yaml", overrides: list[str] | None = None,
         root: str = ".") -> dict[str, Any]:
    """Run the study to `tune.trials` finished trials; returns its summary."""
    layout = Layout.at(root)
    params_path = params if Path(params).is_absolute() else str(layout.root / params)
    cfg = load_params(params_path, overrides or [], root=layout.root)
    # the trials read pack's cache: validate and pack first when stale (as `dvc repro pack`)
    bring_up_to_date(("validate", "pack"), params_path, overrides or [], str(layout.root))
    search = Search.open(cfg, layout)
    key = uuid.uuid4().hex
    _SEARCHES[key] = search
    try:
        summary = search.drive(
            lambda n: trial.with_options(task_run_name=f"trial-{n}").submit(key, n))
    finally:
        _SEARCHES.pop(key, None)
    create_markdown_artifact(summary_markdown(summary), key="tune-summary",
                             description=f"tune {summary['study']}: {summary['state']}")
    return summary


def main(params: str = "params.yaml", overrides: list[str] | None = None,
         root: str = ".") -> dict[str, Any]:
    layout = Layout.at(root)
    path = params if Path(params).is_absolute() else str(layout.root / params)
    cfg = load_params(path, overrides or [], root=layout.root)  # fail fast, before Prefect
    runner = ThreadPoolTaskRunner(max_workers=cfg.tune.parallel)
    with servers.prefect_api(layout):
        return tune.with_options(task_runner=runner)(params=path, overrides=overrides or [],
                                                    root=str(layout.root))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".")
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()
    try:
        main(a.params, a.overrides, a.root)
    except VisionflowError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
