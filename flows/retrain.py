"""The `retrain` Prefect flow: validate -> pack -> train -> evaluate -> compress -> register.

Each task calls the same stage function that `dvc repro` runs through `vflow stage`, so
the two drivers produce the same files from the same code, and they share one notion of
"up to date": `dvc.lock`. Before each stage the flow asks DVC whether it is stale; a stage
that is up to date is skipped ("cached"), and a stage that ran is recorded in `dvc.lock`
the way `dvc repro` records it (see `visionflow.pipeline.freshness`). On top of the stages:

- retries with exponential back-off on transient errors only (I/O, a tracking server that
  does not answer), never on the data gate or bad config; a timeout per stage;
- a rerun after a failure resumes at the failed stage (the earlier ones are in dvc.lock);
- with `only_new_data` (what `vflow schedule` serves): refresh the data with DVC and stop
  with "no new data" when the registry already has a model trained on it; `force` retrains
  everything regardless;
- a summary (markdown), a metrics table and MLflow links as Prefect artifacts, every run.

    python flows/retrain.py                        # one run (ephemeral API or PREFECT_API_URL)
    python flows/retrain.py -s train.epochs=3      # overridden stages run, unrecorded
    python flows/retrain.py --only-new-data        # what a scheduled run does
    python flows/retrain.py --force                # rerun every stage, skip the data check
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

from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.context import FlowRunContext
from prefect.schedules import Cron, Interval
from prefect.states import Completed, State

from visionflow.core.config import STAGE_NAMES, Params
from visionflow.core.configfile import load_params
from visionflow.core.env import quiet_env
from visionflow.core.errors import ConfigError, VisionflowError
from visionflow.core.files import read_json
from visionflow.core.layout import Layout
from visionflow.mlops.tracking import ui_command
from visionflow.pipeline import outcome, retry, servers, stdio, trigger
from visionflow.pipeline import report as flow_report
from visionflow.pipeline.freshness import DvcState
from visionflow.pipeline.stages import run_stage

quiet_env()
stdio.outlive_the_reader()  # a worker's run goes on if the worker dies


def _retry_condition(task_, task_run, state) -> bool:
    """Retry only what may pass next time (see `pipeline.retry.is_transient`)."""
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


def _configured(t, name: str, cfg: Params):
    f = cfg.flow
    return t.with_options(
        retries=f.retries,
        retry_delay_seconds=retry.retry_delays(f.retry_delay_s, f.retries) or 0,
        retry_jitter_factor=f.retry_jitter or None,
        timeout_seconds=f.timeout_s.get(name),
    )


def _flow_run():
    """This run's FlowRun record (None outside a flow run)."""
    return getattr(FlowRunContext.get(), "flow_run", None)


def _project_lock(layout: Layout, logger):
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
    st = servers.status(servers.MLFLOW, layout)
    return st.url if st.healthy and st.url else cfg.flow.mlflow_ui_url


def _read_json(path: Path) -> dict[str, Any]:
    found = read_json(path, {})
    return found if isinstance(found, dict) else {}


def _publish(report: dict[str, Any], logger) -> None:
    """Markdown summary, metrics table and MLflow links; never fails the run."""
    try:
        create_markdown_artifact(flow_report.summary_markdown(report), key="retrain-summary",
                                 description=f"retrain: {report.get('headline', '')}"[:500])
        if report.get("metrics"):
            create_table_artifact(
                flow_report.metric_rows(report["metrics"], report.get("champion_metrics")),
                key="retrain-metrics", description="test-split headline metrics, beside the "
                "champion's before this run")
        for key, link in (report.get("links") or {}).items():
            create_link_artifact(link["url"], link_text=link["text"], key=key,
                                 description=link["text"])
    except Exception as err:  # noqa: BLE001 (artifacts are a report, not the job)
        logger.warning("could not publish the run summary artifacts: %s", err)


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
        base = load_params(params_path, root=Path(root)) if overrides else cfg
        report.update(model_name=cfg.register_.model_name,
                      data={"source": cfg.data.source,
                            "refresh": "not run (not a scheduled run)",
                            **trigger.data_version(cfg, layout)})
        current = "setup"
        lock = _project_lock(layout, logger)
        report["champion_metrics"] = trigger.champion_metrics(cfg, layout)
        state = DvcState(layout)
        rerun_all = force or not cfg.flow.cache
        check: dict[str, Any] | None = None
        if only_new_data and not force:
            fr = _flow_run()
            late = None
            if fr is not None:
                late = trigger.late_reason(fr.expected_start_time, datetime.now(UTC),
                                           cfg.flow.schedule.max_lateness_s,
                                           bool(fr.auto_scheduled and fr.deployment_id))
            if late:
                return _skip(report, late, {}, cfg, layout, logger)
            current = "refresh-data"
            report["data"]["refresh"] = _configured(refresh_data, "validate", cfg)(
                params_path, overrides, root)
            logger.info("data refresh: %s", report["data"]["refresh"])
            current = "check-data"  # after the refresh: it may have changed the data
            fresh = not state.verdict("validate", cfg, base, force=False).run
            check = _configured(check_data, "validate", cfg)(params_path, overrides, root, fresh)
            report["data"].update(data_hash=check["data_hash"], dvc_md5=check["dvc_md5"],
                                  decision=f"{check['reason']} (by {check['method']})")
            logger.info("data check (%s): %s", check["method"], check["reason"])
            if check["new_data"] is False:
                return _skip(report, check["reason"], check, cfg, layout, logger)
        for name, stage in STAGE_TASKS.items():
            current = name
            verdict = state.verdict(name, cfg, base, force=rerun_all)
            logger.info("stage %s: %s", name, "run, " + verdict.reason if verdict.run
                        else "skipped, " + verdict.reason)
            if verdict.run:
                out = _configured(stage, name, cfg)(params_path, overrides, root,
                                                    verdict.record)
            else:
                up_to_date.with_options(task_run_name=name)(name, verdict.reason)
            report["stages"].append({"name": name, "state": "ran" if verdict.run else "cached",
                                     "seconds": out["seconds"] if verdict.run else None})
            if name == "validate":
                report["validation"] = _read_json(layout.validation)
                data_hash = report["validation"].get("data_hash", "")
                report["data"]["data_hash"] = data_hash
                if check is None:  # a manual run trains anyway: say what it would decide
                    report["data"]["decision"] = (f"{trigger.data_news(cfg, layout, data_hash)}"
                                                  " (a manual run trains regardless)")
                elif check["new_data"] is None:
                    decided = trigger.compare_data(data_hash, check["champion"],
                                                   check["latest"], "validate", check["dvc_md5"])
                    report["data"]["decision"] = f"{decided.reason} (by validate)"
                    logger.info("data check (validate): %s", decided.reason)
                    if decided.new_data is False:
                        return _skip(report, decided.reason, decided.as_dict(), cfg, layout,
                                     logger)
        return _finish(report, _read_json(layout.registration), cfg, layout, logger)
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
        outcome.tag_run(_flow_run(), "failed", logger)
        raise
    finally:
        if lock is not None:
            lock.release()


def _skip(report: dict[str, Any], reason: str, check: dict[str, Any], cfg: Params,
          layout: Layout, logger) -> State:
    """A run that trains nothing: "no new data" or a late scheduled slot."""
    champion = check.get("champion") or {}
    version = champion.get("version")
    report.update(status="skipped", headline=f"skipped: {reason}",
                  outcome={"label": "skipped", "message": f"skipped: {reason}"})
    report["data"].setdefault("decision", reason)
    report["data"].setdefault("dvc_md5", check.get("dvc_md5", ""))
    if version:
        report["champion"] = {"version": version, "alias": cfg.register_.alias,
                              "data_hash": champion.get("data_hash", ""),
                              "gate": champion.get("gate_reason", "")}
        report["links"] = flow_report.mlflow_links(
            _ui_url(cfg, layout), None, cfg.register_.model_name, version,
            _compact_version(cfg, layout))
    logger.info("nothing to train: %s", reason)
    _publish(report, logger)
    result = {"model_name": cfg.register_.model_name, "version": version,
              "alias": cfg.register_.alias if version else None, "reason": reason,
              "ui_command": ui_command(layout), "skipped": True,
              "data_hash": report["data"].get("data_hash", ""), "stages": {}}
    return outcome.final_state(report, result, _flow_run(), logger)


def _compact_version(cfg: Params, layout: Layout) -> str | None:
    return trigger.champion_metrics(cfg, layout, "compact").get("version")


def _finish(report: dict[str, Any], reg: dict[str, Any], cfg: Params, layout: Layout,
            logger) -> State:
    """The registration (`outputs/register/registration.json`, this run's or, when register
    was up to date, the earlier one) as the run's result and summary."""
    if not reg:
        raise RuntimeError(f"{layout.registration}: missing after register")
    decision = reg["decision"]
    label = "promoted" if decision["promote"] else "rejected"
    logger.info("registered %s version %s alias %s: %s", reg["model_name"], reg["version"],
                reg["alias"], decision["reason"])
    champion_before = (f"v{decision['champion_version']}" if decision.get("champion_version")
                       else None)
    cached = all(s["state"] == "cached" for s in report["stages"])
    headline = (f"v{reg['version']} {label}"
                + (f" to @{reg['alias']}" if reg["alias"] else ", champion kept"))
    ending = {"label": label, "message": flow_report.outcome_message(reg["version"], decision)}
    if cached:
        headline = f"up to date: every stage cached (v{reg['version']}, registered earlier)"
        ending = {"label": "up to date", "message": headline}
    report.update(
        status=label,
        headline=headline,
        metrics=_read_json(layout.metrics),
        compress=_read_json(layout.compress_report),
        gate={"decision": label, "reason": decision["reason"], "version": reg["version"],
              "test_images": (decision.get("scored") or {}).get("text", ""),
              "champion_before": champion_before,
              "champion_after": f"v{reg['version']}" if reg["alias"] else champion_before},
        links=flow_report.mlflow_links(_ui_url(cfg, layout), _read_json(layout.run_info),
                                       reg["model_name"], reg["version"],
                                       (reg.get("compact") or {}).get("version")),
        outcome=ending,
    )
    if report["compress"]:
        report["compression_choice"] = flow_report.compression_choice(report["compress"])[0]
    report["compact"] = reg.get("compact")
    _publish(report, logger)
    result = {"model_name": reg["model_name"], "version": reg["version"], "alias": reg["alias"],
              "reason": decision["reason"], "ui_command": reg["ui_command"], "skipped": False,
              "compact": reg.get("compact"),
              "data_hash": report["data"].get("data_hash", ""),
              "stages": {s["name"]: s["state"] for s in report["stages"]},
              "stage_seconds": {s["name"]: s["seconds"] for s in report["stages"]
                                if s["seconds"] is not None}}
    return outcome.final_state(report, result, _flow_run(), logger)


def serve_deployment(params: str = "params.yaml", overrides: list[str] | None = None,
                     root: str = ".", cron: str | None = None, interval: float | None = None,
                     timezone: str = "UTC", name: str = "nightly") -> None:
    """Serve `retrain` as a deployment against the running Prefect server (blocks).

    One run at a time (deployment concurrency limit 1; a run due while another is running
    waits, ENQUEUE); a scheduled run that waited past `flow.schedule.max_lateness_s` is
    skipped by the flow itself. Must run with the project root as working directory."""
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
    with servers.prefect_api(Layout.at(root)):
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
    try:
        main(a.params, a.overrides, a.root, a.force, a.only_new_data, a.data_source)
    except VisionflowError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
