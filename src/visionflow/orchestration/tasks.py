"""The Prefect tasks of the `retrain` flow: one per stage, the data refresh and check, and the
"up to date" marker; `configured` gives a task the `flow:` section's retries and timeout;
`bring_up_to_date` runs the stale ones of some stages (the `tune` flow's validate and pack).

A stage task calls the same `run` that `dvc repro` runs
(`orchestration.stage_runner.run_stage`) and, when its params are params.yaml's, records it
in dvc.lock as `dvc repro` would.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from visionflow.core.config import STAGE_NAMES, Params
from visionflow.core.configfile import load_params
from visionflow.core.layout import Layout
from visionflow.orchestration import retry, trigger
from visionflow.orchestration.freshness import DvcState
from visionflow.orchestration.stage_runner import run_stage


def _retry_condition(task_, task_run, state) -> bool:
    """Retry only what may pass next time (see `orchestration.retry.is_transient`)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except BaseException as err:  # noqa: BLE001 (the exception is what we classify)
            exc = err
    ok = isinstance(exc, BaseException) and retry.is_transient(exc)
    if ok:
        get_run_logger().warning("%s: transient %s: %s; retrying", task_run.name,
                                 type(exc).__name__, exc)
    return ok


def _stage_task(name: str):
    @task(name=name, task_run_name=name, retries=0, cache_policy=NO_CACHE,
          persist_result=False, retry_condition_fn=_retry_condition)
    def stage(params_path: str, overrides: list[str], root: str, record: bool) -> dict[str, Any]:
        """Run the stage; when its params are params.yaml's, record it in dvc.lock."""
        layout = Layout.at(root)
        params = load_params(params_path, overrides, root=layout.root)
        t0 = time.perf_counter()
        run_stage(name, params, layout)
        seconds = time.perf_counter() - t0
        if record:
            DvcState(layout).record(name)
        return {"seconds": round(seconds, 3)}

    return stage


STAGE_TASKS = {name: _stage_task(name) for name in STAGE_NAMES}


@task(name="up-to-date", cache_policy=NO_CACHE, persist_result=False)
def up_to_date(stage: str, reason: str) -> State:
    """A stage dvc.lock says is up to date: shown as a Cached task run, nothing runs."""
    return Completed(name="Cached", message=f"{stage}: {reason}")


@task(name="refresh-data", retries=0, retry_condition_fn=_retry_condition, cache_policy=NO_CACHE)
def refresh_data(params_path: str, overrides: list[str], root: str) -> str:
    layout = Layout.at(root)
    return trigger.refresh_data(load_params(params_path, overrides, root=layout.root), layout)


@task(name="check-data", retries=0, retry_condition_fn=_retry_condition, cache_policy=NO_CACHE)
def check_data(params_path: str, overrides: list[str], root: str,
               validate_fresh: bool) -> dict[str, Any]:
    layout = Layout.at(root)
    params = load_params(params_path, overrides, root=layout.root)
    return trigger.check_data(params, layout, validate_fresh).as_dict()


def configured(t, name: str, cfg: Params):
    """Task `t` with `flow:`'s retries (exponential back-off, jitter) and `name`'s timeout."""
    f = cfg.flow
    return t.with_options(
        retries=f.retries,
        retry_delay_seconds=retry.retry_delays(f.retry_delay_s, f.retries) or 0,
        retry_jitter_factor=f.retry_jitter or None,
        timeout_seconds=f.timeout_s.get(name),
    )


def bring_up_to_date(stages: tuple[str, ...], params_path: str, overrides: list[str],
                     root: str) -> list[str]:
    """Run the stages of `stages` that are stale, in order, as `dvc repro <last>` would: each
    as its task, recorded in dvc.lock when its params are params.yaml's. Without DVC (no
    .dvc/), those whose outputs are missing, and every one after a stage that ran. Returns
    the stages that ran (for a flow that reads their outputs: `vflow tune` reads pack's)."""
    layout = Layout.at(root)
    cfg = load_params(params_path, overrides, root=layout.root)
    base = load_params(params_path, root=layout.root) if overrides else cfg
    state = DvcState(layout)
    outputs = {"validate": layout.validation, "pack": layout.packed}
    ran: list[str] = []
    for name in stages:
        if state.enabled:
            verdict = state.verdict(name, cfg, base, force=False)
            run, record, why = verdict.run, verdict.record, verdict.reason
        else:
            run = bool(ran) or not outputs.get(name, layout.root).exists()
            record, why = False, "outputs missing (not a DVC project)"
        if run:
            get_run_logger().info("stage %s: run, %s", name, why)
            configured(STAGE_TASKS[name], name, cfg)(params_path, overrides, str(layout.root),
                                                     record)
            ran.append(name)
    return ran
