"""The `retrain` Prefect flow: validate -> augment -> train -> evaluate -> compress -> register.

Each task calls the same stage function that `dvc repro` runs through `vflow stage`, so
the two drivers produce the same files from the same code. On top of the stages:

- retries with exponential back-off on transient errors only (I/O, a tracking server that
  does not answer), never on the data gate or bad config; a timeout per stage;
- a task cache keyed like `dvc repro` (data, stage params, code): a rerun after a failure
  resumes at the failed stage, provided the earlier stages' output files are untouched;
- with `only_new_data` (what `vflow schedule` serves): refresh the data with DVC and stop
  with "no new data" when the registry already has a model trained on it; `force` retrains
  everything regardless;
- a summary (markdown), a metrics table and MLflow links as Prefect artifacts, every run.

    python flows/retrain.py                        # one run (ephemeral API or PREFECT_API_URL)
    python flows/retrain.py -s train.epochs=3
    python flows/retrain.py --only-new-data        # what a scheduled run does
    python flows/retrain.py --force                # ignore the cache and the data check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from visionflow.config import Params, load_params
from visionflow.env import quiet_env
from visionflow.layout import Layout
from visionflow.pipeline import orchestration as orch
from visionflow.pipeline import report as flow_report
from visionflow.pipeline.stages import STAGES, run_stage

quiet_env()


def _retry_condition(task_, task_run, state) -> bool:
    """Retry only what may pass next time (see `orchestration.is_transient`)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except BaseException as err:  # noqa: BLE001 (the exception is what we classify)
            exc = err
    ok = isinstance(exc, BaseException) and orch.is_transient(exc)
    if ok:
        get_run_logger().warning("%s: transient %s: %s; retrying", task_run.name,
                                 type(exc).__name__, exc)
    return ok


def _cache_key(context, parameters: dict[str, Any]) -> str | None:
    return parameters.get("cache_key")


def _stage_task(name: str):
    @task(name=name, task_run_name=name, retries=0, persist_result=True,
          cache_key_fn=_cache_key, retry_condition_fn=_retry_condition)
    def stage(params_path: str, overrides: list[str], root: str,
              cache_key: str | None = None) -> dict[str, Any]:
        layout = Layout.at(root)
        params = load_params(params_path, overrides, root=layout.root)
        orch.clear_marker(layout, name)
        t0 = time.perf_counter()
        result = run_stage(name, params, layout)
        seconds = time.perf_counter() - t0
        if cache_key:
            specs = orch.read_specs(layout, STAGES)
            if specs:
                orch.write_marker(layout, specs[name], cache_key)
        return {"result": result, "seconds": round(seconds, 3)}

    return stage


STAGE_TASKS = {name: _stage_task(name) for name in STAGES}


@task(name="refresh-data", retries=0, retry_condition_fn=_retry_condition, cache_policy=NO_CACHE)
def refresh_data(params_path: str, overrides: list[str], root: str) -> str:
    layout = Layout.at(root)
    return orch.refresh_data(load_params(params_path, overrides, root=layout.root), layout)


@task(name="check-data", retries=0, retry_condition_fn=_retry_condition, cache_policy=NO_CACHE)
def check_data(params_path: str, overrides: list[str], root: str,
               validate_key: str | None) -> dict[str, Any]:
    layout = Layout.at(root)
    params = load_params(params_path, overrides, root=layout.root)
    specs = orch.read_specs(layout, STAGES)
    return orch.check_data(params, layout, validate_key,
                           specs["validate"] if specs else None).as_dict()


def _configured(t, name: str, cfg: Params, refresh: bool = False):
    f = cfg.flow
    return t.with_options(
        retries=f.retries,
        retry_delay_seconds=orch.retry_delays(f.retry_delay_s, f.retries) or 0,
        retry_jitter_factor=f.retry_jitter or None,
        timeout_seconds=f.timeout_s.get(name),
        cache_expiration=timedelta(days=f.cache_days),
        refresh_cache=refresh,
    )


def _flow_run():
    """This run's FlowRun record (None outside a flow run)."""
    from prefect.context import FlowRunContext

    return getattr(FlowRunContext.get(), "flow_run", None)


def _project_lock(layout: Layout, logger):
    from filelock import FileLock, Timeout

    path = layout.retrain_lock
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning("another retrain run holds %s; waiting for it", path)
        lock.acquire()
    return lock


def _ui_url(cfg: Params, layout: Layout) -> str:
    from visionflow.pipeline.servers import MLFLOW, status

    st = status(MLFLOW, layout)
    return st.url if st.healthy and st.url else cfg.flow.mlflow_ui_url


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _publish(report: dict[str, Any], logger) -> None:
    """Markdown summary, metrics table and MLflow links; never fails the run."""
    from prefect.artifacts import (
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    try:
        create_markdown_artifact(flow_report.summary_markdown(report), key="retrain-summary",
                                 description=f"retrain: {report.get('headline', '')}"[:500])
        if report.get("metrics"):
            create_table_artifact(flow_report.metric_rows(report["metrics"]),
                                  key="retrain-metrics", description="test-split metrics")
        for key, link in (report.get("links") or {}).items():
            create_link_artifact(link, link_text=key, key=key,
                                 description=f"{key} in the MLflow UI")
    except Exception as err:  # noqa: BLE001 (artifacts are a report, not the job)
        logger.warning("could not publish the run summary artifacts: %s", err)


@flow(name="retrain", log_prints=True)
def retrain(params: str = "params.yaml", overrides: list[str] | None = None,
            root: str = ".", force: bool = False, data_source: str | None = None,
            only_new_data: bool = False) -> dict[str, Any]:
    """Run the six stages in order; returns the registration summary.

    params: params file (relative to root); overrides: KEY=VALUE list; data_source: sets
    `data.source`; force: rerun every stage and skip the data check; only_new_data: stop
    with "no new data" when the registry has a model trained on this data (scheduled runs).
    """
    logger = get_run_logger()
    root = str(Path(root).resolve())
    params_path = params if os.path.isabs(params) else str(Path(root) / params)
    overrides = list(overrides or [])
    if data_source:
        overrides.append(f"data.source={json.dumps(data_source)}")
    report: dict[str, Any] = {"root": root, "force": force, "only_new_data": only_new_data,
                              "stages": [], "status": "running", "data": {}}
    layout = Layout.at(root)
    lock = None
    current = "config"
    try:
        cfg = load_params(params_path, overrides, root=Path(root))  # fail fast on bad config
        report.update(model_name=cfg.register_.model_name,
                      data={"source": cfg.data.source,
                            "refresh": "not run (not a scheduled run)"})
        current = "setup"
        lock = _project_lock(layout, logger)
        specs = orch.read_specs(layout, STAGES) if cfg.flow.cache else None
        keys: dict[str, str | None] | None = None
        check: dict[str, Any] | None = None
        if only_new_data and not force:
            fr = _flow_run()
            late = None
            if fr is not None:
                late = orch.late_reason(fr.expected_start_time, datetime.now(UTC),
                                        cfg.flow.schedule.max_lateness_s,
                                        bool(fr.auto_scheduled and fr.deployment_id))
            if late:
                return _skip(report, late, {}, cfg, layout, logger)
            current = "refresh-data"
            report["data"]["refresh"] = _configured(refresh_data, "validate", cfg)(
                params_path, overrides, root)
            logger.info("data refresh: %s", report["data"]["refresh"])
            current = "check-data"
            keys = orch.stage_keys(specs, cfg, layout)  # after the refresh: it may change files
            check = _configured(check_data, "validate", cfg)(
                params_path, overrides, root, keys.get("validate"))
            report["data"].update(data_hash=check["data_hash"], dvc_md5=check["dvc_md5"],
                                  decision=f"{check['reason']} (by {check['method']})")
            logger.info("data check (%s): %s", check["method"], check["reason"])
            if check["new_data"] is False:
                return _skip(report, check["reason"], check, cfg, layout, logger)
        if keys is None:
            keys = orch.stage_keys(specs, cfg, layout)
        results: dict[str, Any] = {}
        for name, stage in STAGE_TASKS.items():
            current = name
            key = keys.get(name)
            refresh = force or not (key and specs and orch.outputs_match(layout, specs[name],
                                                                         key))
            logger.info("stage %s%s", name, "" if refresh or not key else " (cache allowed)")
            state = _configured(stage, name, cfg, refresh=refresh)(
                params_path, overrides, root, key, return_state=True)
            out = state.result()  # raises the stage's exception
            results[name] = out["result"]
            cached = state.name == "Cached"  # seconds: time inside the stage function
            report["stages"].append({"name": name, "state": "cached" if cached else "ran",
                                     "seconds": None if cached else out["seconds"]})
            if name == "validate":
                report["validation"] = _read_json(layout.validation)
                data_hash = report["validation"].get("data_hash", "")
                report["data"]["data_hash"] = data_hash
                if check is not None and check["new_data"] is None:
                    decided = orch.compare_data(data_hash, check["champion"], check["latest"],
                                                "validate", check["dvc_md5"])
                    report["data"]["decision"] = f"{decided.reason} (by validate)"
                    logger.info("data check (validate): %s", decided.reason)
                    if decided.new_data is False:
                        return _skip(report, decided.reason, decided.as_dict(), cfg, layout,
                                     logger)
        return _finish(report, results, cfg, layout, logger)
    except Exception as err:
        msg = f"{type(err).__name__}: {err}"
        if current == "validate":
            failed = [f"{e.get('expectation')}({e.get('column')})" for e in
                      _read_json(layout.validation).get("expectations", [])
                      if not e.get("success")]
            msg += f" | failed expectations: {', '.join(failed)}" if failed else ""
        logger.error("stage %s failed: %s", current, msg)
        report.update(status="failed", headline=f"failed at {current}: {err}"[:300],
                      error={"stage": current, "message": msg})
        _publish(report, logger)
        raise
    finally:
        if lock is not None:
            lock.release()


def _skip(report: dict[str, Any], reason: str, check: dict[str, Any], cfg: Params,
          layout: Layout, logger) -> dict[str, Any]:
    """A run that trains nothing: "no new data" or a late scheduled slot."""
    champion = check.get("champion") or {}
    version = champion.get("version")
    report.update(status="skipped", headline=reason)
    report["data"].setdefault("decision", reason)
    if version:
        report["links"] = flow_report.mlflow_links(_ui_url(cfg, layout), None,
                                                   cfg.register_.model_name, version)
    logger.info("nothing to train: %s", reason)
    _publish(report, logger)
    from visionflow.mlops.tracking import ui_command

    return {"model_name": cfg.register_.model_name, "version": version,
            "alias": cfg.register_.alias if version else None, "reason": reason,
            "ui_command": ui_command(layout), "skipped": True,
            "data_hash": report["data"].get("data_hash", ""), "stages": {}}


def _finish(report: dict[str, Any], results: dict[str, Any], cfg: Params, layout: Layout,
            logger) -> dict[str, Any]:
    reg = results["register"]
    logger.info("registered %s version %s alias %s: %s", reg.model_name, reg.version,
                reg.alias, reg.decision.reason)
    decision = "promoted" if reg.decision.promote else "rejected"
    champion_before = (f"v{reg.decision.champion_version}" if reg.decision.champion_version
                       else None)
    cached = all(s["state"] == "cached" for s in report["stages"])
    headline = (f"v{reg.version} {decision}"
                + (f" to @{reg.alias}" if reg.alias else ", champion kept"))
    if cached:
        headline = f"up to date: every stage cached (v{reg.version}, registered earlier)"
    report.update(
        status=decision,
        headline=headline,
        metrics=_read_json(layout.metrics),
        compress=_read_json(layout.compress_report),
        gate={"decision": decision, "reason": reg.decision.reason, "version": reg.version,
              "champion_before": champion_before,
              "champion_after": f"v{reg.version}" if reg.alias else champion_before},
        links=flow_report.mlflow_links(_ui_url(cfg, layout), _read_json(layout.run_info),
                                       reg.model_name, reg.version),
    )
    if report["compress"]:
        report["compression_choice"] = flow_report.compression_choice(report["compress"])[0]
    report["compact"] = reg.compact
    _publish(report, logger)
    return {"model_name": reg.model_name, "version": reg.version, "alias": reg.alias,
            "reason": reg.decision.reason, "ui_command": reg.ui_command, "skipped": False,
            "compact": reg.compact,
            "data_hash": report["data"].get("data_hash", ""),
            "stages": {s["name"]: s["state"] for s in report["stages"]},
            "stage_seconds": {s["name"]: s["seconds"] for s in report["stages"]
                              if s["seconds"] is not None}}


def serve_deployment(params: str = "params.yaml", overrides: list[str] | None = None,
                     root: str = ".", cron: str | None = None, interval: float | None = None,
                     timezone: str = "UTC", name: str = "nightly") -> None:
    """Serve `retrain` as a deployment against the running Prefect server (blocks).

    One run at a time (deployment concurrency limit 1; a run due while another is running
    waits, ENQUEUE); a scheduled run that waited past `flow.schedule.max_lateness_s` is
    skipped by the flow itself. Must run with the project root as working directory."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron, Interval

    from visionflow.errors import ConfigError

    try:
        schedule = (Interval(timedelta(seconds=interval), timezone=timezone) if interval
                    else Cron(cron or "0 3 * * *", timezone=timezone))
    except ValueError as err:  # a bad cron string or time zone
        raise ConfigError(f"schedule: {str(err).splitlines()[0]}") from None
    retrain.serve(
        name=name,
        schedules=[schedule],
        parameters={"params": params, "overrides": list(overrides or []),
                    "root": str(Path(root).resolve()), "only_new_data": True},
        global_limit=ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        tags=["visionflow", "retrain"],
        description="Nightly retraining: trains only on new data; one run at a time.",
        pause_on_shutdown=True,
    )


def main(params: str = "params.yaml", overrides: list[str] | None = None, root: str = ".",
         force: bool = False, only_new_data: bool = False,
         data_source: str | None = None) -> dict[str, Any]:
    from visionflow.pipeline.servers import prefect_api

    with prefect_api(Layout.at(root)):
        out = retrain(params=params, overrides=overrides or [], root=root, force=force,
                      data_source=data_source, only_new_data=only_new_data)
    alias = f"@{out['alias']}" if out["alias"] else "(no alias: champion kept)"
    print(f"\nregistered model: {out['model_name']} version {out['version']} {alias}")
    print(f"decision: {out['reason']}")
    if out.get("compact"):
        c = out["compact"]
        where = f"@{c['alias']}" if c.get("alias") else f"({c['reason']})"
        print(f"compressed copy: version {c['version']} {where}, {c['variant']}")
    print(f"browse it: {out['ui_command']}")
    return out


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
    from visionflow.errors import VisionflowError

    try:
        main(a.params, a.overrides, a.root, a.force, a.only_new_data, a.data_source)
    except VisionflowError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
