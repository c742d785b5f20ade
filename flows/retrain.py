"""The `retrain` Prefect flow: validate -> pack -> train -> evaluate -> compress -> register.

Each task calls the same stage function that `dvc repro` runs through `vflow stage`, so
the two drivers produce the same files from the same code, and they share one notion of
"up to date": `dvc.lock`. Before each stage the flow asks DVC whether it is stale; a stage
that is up to date is skipped ("cached"), and a stage that ran is recorded in `dvc.lock`
the way `dvc repro` records it (see `visionflow.orchestration.freshness`). On top of the stages:

- retries with exponential back-off on transient errors only (I/O, a tracking server that
  does not answer), never on the data gate or bad config; a timeout per stage;
- a rerun after a failure resumes at the failed stage (the earlier ones are in dvc.lock);
- with `only_new_data` (what `vflow schedule` serves): refresh the data with DVC and stop
  with "no new data" when the registry already has a model trained on it; `force` retrains
  everything regardless;
- a summary (markdown), a metrics table and MLflow links as Prefect artifacts, every run.

This file is the entry point (deployments name `flows/retrain.py:retrain`); the tasks are in
`visionflow.orchestration.tasks`, the run's decisions and report in
`visionflow.orchestration.retrain`.

    python flows/retrain.py                        # one run (ephemeral API or PREFECT_API_URL)
    python flows/retrain.py -s train.epochs=3      # overridden stages run, unrecorded
    python flows/retrain.py --only-new-data        # what a scheduled run does
    python flows/retrain.py --force                # rerun every stage, skip the data check
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prefect import flow

from visionflow.core.config import STAGE_NAMES
from visionflow.core.env import quiet_env
from visionflow.core.errors import VisionflowError
from visionflow.orchestration import stdio
from visionflow.orchestration.retrain import RetrainRun, run_and_print

quiet_env()
stdio.outlive_the_reader()  # a worker's run goes on if the worker dies


@flow(name="retrain", log_prints=True)
def retrain(params: str = "params.yaml", overrides: list[str] | None = None,
            root: str = ".", force: bool = False, data_source: str | None = None,
            only_new_data: bool = False) -> Any:
    """Run the six stages in order; returns the registration summary (as the data of a
    final state named after the outcome: Promoted, Rejected, Skipped, Up to date).

    params: params file (relative to root); overrides: KEY=VALUE list; data_source: sets
    `data.source`; force: rerun every stage and skip the data check; only_new_data: stop
    with "no new data" when the registry has a model trained on this data (scheduled runs).
    """
    run = RetrainRun(params, overrides, root, force, data_source, only_new_data)
    with run.reporting_failures():  # the summary names the failed stage, then re-raises
        run.load()  # config (fails fast), project lock, the champion's metrics
        if only_new_data and not force and (skipped := run.late_or_old_data()) is not None:
            return skipped  # a scheduled run: a late slot, or data a model was trained on
        for name in STAGE_NAMES:  # each a task, or "Cached" when dvc.lock is up to date
            if (skipped := run.stage(name)) is not None:  # validate: the data is not new
                return skipped
        return run.finish()  # the registration: Promoted, Rejected or Up to date


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".")
    ap.add_argument("-s", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--force", action="store_true", help="rerun every stage, skip the data check")
    ap.add_argument("--only-new-data", action="store_true",
                    help="stop with 'no new data' if the registry has a model on this data")
    ap.add_argument("--data-source", default=None, help="sets data.source")
    a = ap.parse_args()
    try:
        run_and_print(retrain, a.params, a.overrides, a.root, a.force, a.only_new_data,
                      a.data_source)
    except VisionflowError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
