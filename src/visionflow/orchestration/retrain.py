"""What one `retrain` flow run does around the stage tasks (flows/retrain.py is the flow).

`RetrainRun` holds the run's state and report: it loads the config (failing fast), takes the
project lock, decides for a scheduled run whether it is late or the data is not new, runs or
skips each stage as dvc.lock says, and ends with the registration as the run's final state
(Promoted, Rejected, Skipped, Up to date) and a summary, a metrics table and MLflow links as
Prefect artifacts. A failure publishes the summary with the failed stage, then re-raises.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.context import FlowRunContext
from prefect.schedules import Cron, Interval
from prefect.states import State

from visionflow.core.configfile import load_params
from visionflow.core.errors import ConfigError
from visionflow.core.files import read_json
from visionflow.core.layout import Layout
from visionflow.mlops.tracking import ui_command
from visionflow.orchestration import outcome, servers, trigger
from visionflow.orchestration import report as flow_report
from visionflow.orchestration.freshness import DvcState
from visionflow.orchestration.tasks import (
    STAGE_TASKS,
    check_data,
    configured,
    refresh_data,
    up_to_date,
)


def _flow_run():
    """This run's FlowRun record (None outside a flow run)."""
    return getattr(FlowRunContext.get(), "flow_run", None)


def _read_json(path: Path) -> dict[str, Any]:
    found = read_json(path, {})
    return found if isinstance(found, dict) else {}


def _params_path(params: str, root: str) -> str:
    return params if os.path.isabs(params) else str(Path(root) / params)


def _with_source(overrides: list[str] | None, data_source: str | None) -> list[str]:
    """The run's overrides, `data_source` as `data.source`."""
    return [*(overrides or []), *([f"data.source={json.dumps(data_source)}"]
                                  if data_source else [])]


class RetrainRun:
    """One run of the flow: `load`, then `late_or_old_data` (scheduled runs), `stage` for
    each stage, `finish`; all inside `reporting_failures`."""

    def __init__(self, params: str, overrides: list[str] | None, root: str, force: bool,
                 data_source: str | None, only_new_data: bool) -> None:
        self.logger = get_run_logger()
        self.root = str(Path(root).resolve())
        self.params_path = _params_path(params, self.root)
        self.overrides = _with_source(overrides, data_source)
        self.force = force
        self.report: dict[str, Any] = {"root": self.root, "force": force,
                                       "only_new_data": only_new_data, "stages": [],
                                       "status": "running", "data": {}}
        self.layout = Layout.at(self.root)
        self.lock: FileLock | None = None
        self.current = "config"  # the step a failure is reported at
        self.check: dict[str, Any] | None = None  # the scheduled run's data check

    @contextlib.contextmanager
    def reporting_failures(self) -> Iterator[None]:
        """A failure: logged, the summary artifact with the failed step, the run tagged;
        then re-raised. The project lock is released either way."""
        try:
            yield
        except Exception as err:
            msg = f"{type(err).__name__}: {err}"
            if self.current == "validate":
                failed = [f"{e.get('expectation')}({e.get('column')})" for e in
                          _read_json(self.layout.validation).get("expectations", [])
                          if not e.get("success")]
                msg += f" | failed expectations: {', '.join(failed)}" if failed else ""
            self.logger.error("stage %s failed: %s", self.current, msg)
            self.report.update(status="failed", headline=f"failed at {self.current}: {err}"[:300],
                               error={"stage": self.current, "message": msg})
            self._publish()
            outcome.tag_run(_flow_run(), "failed", self.logger)
            raise
        finally:
            if self.lock is not None:
                self.lock.release()

    def load(self) -> None:
        """The config (bad config fails here, before any work), the project lock (one run
        per project at a time), the champion's metrics before this run."""
        root = Path(self.root)
        self.cfg = load_params(self.params_path, self.overrides, root=root)
        self.base = load_params(self.params_path, root=root) if self.overrides else self.cfg
        self.report.update(model_name=self.cfg.register_.model_name,
                           data={"source": self.cfg.data.source,
                                 "refresh": "not run (not a scheduled run)",
                                 **trigger.data_version(self.cfg, self.layout)})
        self.current = "setup"
        self.lock = self._project_lock()
        self.report["champion_metrics"] = trigger.champion_metrics(self.cfg, self.layout)
        self.state = DvcState(self.layout)
        self.rerun_all = self.force or not self.cfg.flow.cache

    def _project_lock(self) -> FileLock:
        path = self.layout.retrain_lock
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            self.logger.warning("another retrain run holds %s; waiting for it", path)
            lock.acquire()
        return lock

    def late_or_old_data(self) -> State | None:
        """A scheduled run (`only_new_data`): the skip state when it is late or when its
        data is not new, else None."""
        late = self.late()
        return late if late is not None else self.data_is_old()

    def late(self) -> State | None:
        """A scheduled slot that started past `flow.schedule.max_lateness_s`: skipped."""
        fr = _flow_run()
        if fr is None:
            return None
        late = trigger.late_reason(fr.expected_start_time, datetime.now(UTC),
                                   self.cfg.flow.schedule.max_lateness_s,
                                   bool(fr.auto_scheduled and fr.deployment_id))
        return self._skip(late, {}) if late else None

    def data_is_old(self) -> State | None:
        """Refresh the data with DVC, then skip when the registry has a model trained on it
        (undecided until validate has hashed it: see `stage`)."""
        cfg, args = self.cfg, (self.params_path, self.overrides, self.root)
        self.current = "refresh-data"
        self.report["data"]["refresh"] = configured(refresh_data, "validate", cfg)(*args)
        self.logger.info("data refresh: %s", self.report["data"]["refresh"])
        self.current = "check-data"  # after the refresh: it may have changed the data
        fresh = not self.state.verdict("validate", cfg, self.base, force=False).run
        check = self.check = configured(check_data, "validate", cfg)(*args, fresh)
        self.report["data"].update(data_hash=check["data_hash"], dvc_md5=check["dvc_md5"],
                                   decision=f"{check['reason']} (by {check['method']})")
        self.logger.info("data check (%s): %s", check["method"], check["reason"])
        return self._skip(check["reason"], check) if check["new_data"] is False else None

    def stage(self, name: str) -> State | None:
        """Run the stage's task, or mark it up to date (dvc.lock); after validate, a
        scheduled run whose data turned out not to be new ends here (the skip state)."""
        self.current = name
        verdict = self.state.verdict(name, self.cfg, self.base, force=self.rerun_all)
        self.logger.info("stage %s: %s", name, "run, " + verdict.reason if verdict.run
                         else "skipped, " + verdict.reason)
        seconds = None
        if verdict.run:
            seconds = configured(STAGE_TASKS[name], name, self.cfg)(
                self.params_path, self.overrides, self.root, verdict.record)["seconds"]
        else:
            up_to_date.with_options(task_run_name=name)(name, verdict.reason)
        self.report["stages"].append({"name": name, "state": "ran" if verdict.run else "cached",
                                      "seconds": seconds})
        return self._after_validate() if name == "validate" else None

    def _after_validate(self) -> State | None:
        report, check = self.report, self.check
        report["validation"] = _read_json(self.layout.validation)
        data_hash = report["validation"].get("data_hash", "")
        report["data"]["data_hash"] = data_hash
        if check is None:  # a manual run trains anyway: say what it would decide
            report["data"]["decision"] = (f"{trigger.data_news(self.cfg, self.layout, data_hash)}"
                                          " (a manual run trains regardless)")
        elif check["new_data"] is None:
            decided = trigger.compare_data(data_hash, check["champion"], check["latest"],
                                           "validate", check["dvc_md5"])
            report["data"]["decision"] = f"{decided.reason} (by validate)"
            self.logger.info("data check (validate): %s", decided.reason)
            if decided.new_data is False:
                return self._skip(decided.reason, decided.as_dict())
        return None

    def _ui_url(self) -> str:
        st = servers.status(servers.MLFLOW, self.layout)
        return st.url if st.healthy and st.url else self.cfg.flow.mlflow_ui_url

    def _publish(self) -> None:
        """Markdown summary, metrics table and MLflow links; never fails the run."""
        report = self.report
        try:
            create_markdown_artifact(flow_report.summary_markdown(report),
                                     key="retrain-summary",
                                     description=f"retrain: {report.get('headline', '')}"[:500])
            if report.get("metrics"):
                create_table_artifact(
                    flow_report.metric_rows(report["metrics"], report.get("champion_metrics")),
                    key="retrain-metrics", description="test-split headline metrics, beside "
                    "the champion's before this run")
            for key, link in (report.get("links") or {}).items():
                create_link_artifact(link["url"], link_text=link["text"], key=key,
                                     description=link["text"])
        except Exception as err:  # noqa: BLE001 (artifacts are a report, not the job)
            self.logger.warning("could not publish the run summary artifacts: %s", err)

    def _skip(self, reason: str, check: dict[str, Any]) -> State:
        """A run that trains nothing: "no new data" or a late scheduled slot."""
        cfg, report = self.cfg, self.report
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
            compact = trigger.champion_metrics(cfg, self.layout, "compact").get("version")
            report["links"] = flow_report.mlflow_links(
                self._ui_url(), None, cfg.register_.model_name, version, compact)
        self.logger.info("nothing to train: %s", reason)
        self._publish()
        result = {"model_name": cfg.register_.model_name, "version": version,
                  "alias": cfg.register_.alias if version else None, "reason": reason,
                  "ui_command": ui_command(self.layout), "skipped": True,
                  "data_hash": report["data"].get("data_hash", ""), "stages": {}}
        return outcome.final_state(report, result, _flow_run(), self.logger)

    def finish(self) -> State:
        """The registration (`outputs/register/registration.json`, this run's or, when
        register was up to date, the earlier one) as the run's result and summary."""
        layout, report = self.layout, self.report
        reg = _read_json(layout.registration)
        if not reg:
            raise RuntimeError(f"{layout.registration}: missing after register")
        decision = reg["decision"]
        label = "promoted" if decision["promote"] else "rejected"
        self.logger.info("registered %s version %s alias %s: %s", reg["model_name"],
                         reg["version"], reg["alias"], decision["reason"])
        champion_before = (f"v{decision['champion_version']}"
                           if decision.get("champion_version") else None)
        headline = flow_report.headline(reg["version"], label, reg["alias"], champion_before)
        ending = {"label": label,
                  "message": flow_report.outcome_message(reg["version"], decision)}
        if all(s["state"] == "cached" for s in report["stages"]):
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
            links=flow_report.mlflow_links(self._ui_url(), _read_json(layout.run_info),
                                           reg["model_name"], reg["version"],
                                           (reg.get("compact") or {}).get("version")),
            outcome=ending,
        )
        if report["compress"]:
            report["compression_choice"] = flow_report.compression_choice(report["compress"])[0]
        report["compact"] = reg.get("compact")
        self._publish()
        result = {"model_name": reg["model_name"], "version": reg["version"],
                  "alias": reg["alias"], "reason": decision["reason"],
                  "ui_command": reg["ui_command"], "skipped": False,
                  "compact": reg.get("compact"),
                  "data_hash": report["data"].get("data_hash", ""),
                  "stages": {s["name"]: s["state"] for s in report["stages"]},
                  "stage_seconds": {s["name"]: s["seconds"] for s in report["stages"]
                                    if s["seconds"] is not None}}
        return outcome.final_state(report, result, _flow_run(), self.logger)


def serve_deployment(retrain: Any, params: str, overrides: list[str], root: str, *, cron: str,
                     interval: float | None, timezone: str, name: str) -> None:
    """Serve the `retrain` flow as a deployment against the running Prefect server (blocks).

    One run at a time (deployment concurrency limit 1; a run due while another is running
    waits, ENQUEUE); a scheduled run that waited past `flow.schedule.max_lateness_s` is
    skipped by the flow itself. Must run with the project root as working directory (the
    entrypoint is flows/retrain.py:retrain). `cron`, `timezone`, `name`: `flow.schedule`'s."""
    try:
        schedule = (Interval(timedelta(seconds=interval), timezone=timezone) if interval
                    else Cron(cron, timezone=timezone))
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


def run_and_print(retrain: Callable[..., Any], params: str, overrides: list[str], root: str,
                  force: bool = False, only_new_data: bool = False,
                  data_source: str | None = None) -> dict[str, Any]:
    """One run of the flow against the project's Prefect server (or an ephemeral one), and
    what it registered, on stdout (`vflow run`, `python flows/retrain.py`). Bad config is
    its one line before the temporary API starts (seconds), as it is in the flow."""
    resolved = str(Path(root).resolve())
    load_params(_params_path(params, resolved), _with_source(overrides, data_source),
                root=Path(resolved))
    with servers.prefect_api(Layout.at(root)):
        out = retrain(params=params, overrides=overrides, root=root, force=force,
                      data_source=data_source, only_new_data=only_new_data)
    alias = f"@{out['alias']}" if out["alias"] else "(not promoted)"
    print(f"\nregistered model: {out['model_name']} version {out['version']} {alias}")
    print(f"decision: {out['reason']}")
    if out.get("compact"):
        c = out["compact"]
        where = f"@{c['alias']}" if c.get("alias") else f"({c['reason']})"
        print(f"compressed copy: version {c['version']} {where}, {c['variant']}")
    print(f"browse it: {out['ui_command']}")
    return out
