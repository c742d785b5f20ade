"""The study in MLflow: one parent run per study (experiment `visionflow-tune`) and a nested
child run per trial with its params, per-epoch metrics and its state (complete / pruned /
failed). The parent gets the fixed settings, the best trial's value and params, and the
study's plots (optimisation history, parameter importances, intermediate values, timeline)
as PNG.

Runs are written through one `MlflowClient` by explicit run id (no active-run stack), so
parallel trials in threads log side by side. The parent run's id is a study attribute: a
resumed study (or another host) logs into the same parent.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from visionflow.core.env import quiet_env
from visionflow.core.errors import one_line
from visionflow.core.layout import Layout
from visionflow.mlops.tracking import tracking_uri
from visionflow.tune.study import CREATOR_ATTR, worker_id

EXPERIMENT = "visionflow-tune"
PARENT_ATTR = "mlflow_parent_run_id"
PLOTS = ("optimization_history", "param_importances", "intermediate_values", "timeline")


def _value(v: Any) -> str:
    return str(v)[:500]


class StudyRuns:
    """MLflow runs of one study: `start_trial`, `log_epoch`, `end_trial`, `finish`."""

    def __init__(self, layout: Layout, study: optuna.Study, settings: dict[str, Any]) -> None:
        quiet_env()
        uri = tracking_uri(layout)
        self.client = MlflowClient(uri)
        self.experiment_id = self._experiment(layout, uri)
        self.study = study
        self.parent_id = self._parent(settings)

    def _experiment(self, layout: Layout, uri: str) -> str:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        local = uri.startswith("sqlite:") or "://" not in uri
        try:
            return self.client.create_experiment(
                EXPERIMENT, artifact_location=layout.mlflow_artifacts.as_uri() if local else None)
        except MlflowException:  # another host created it meanwhile
            exp = self.client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                raise
            return exp.experiment_id

    def _parent(self, settings: dict[str, Any]) -> str:
        known = self.study.user_attrs.get(PARENT_ATTR)
        if not known and self.study.user_attrs.get(CREATOR_ATTR) != worker_id():
            known = self._wait_for_parent()  # the study's creator makes the parent run
        if known:
            with contextlib.suppress(Exception):  # deleted meanwhile: start a new one
                self.client.update_run(known, status="RUNNING")
                return known
        run = self.client.create_run(self.experiment_id, run_name=f"study-{self.study.study_name}",
                                     tags={"visionflow.kind": "study",
                                           "optuna.study": self.study.study_name})
        run_id = run.info.run_id
        params = [Param(k, _value(v)) for k, v in settings.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i:i + 100])
        self.study.set_user_attr(PARENT_ATTR, run_id)
        winner = self.study.user_attrs.get(PARENT_ATTR)  # another host may have won the race
        if winner != run_id:
            self.client.delete_run(run_id)
            return self._parent(settings)
        return run_id

    def _wait_for_parent(self, timeout: float = 120.0) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if known := self.study.user_attrs.get(PARENT_ATTR):
                return known
            time.sleep(0.5)
        return None  # its creator stopped first: this host makes it

    # --- trials ---------------------------------------------------------------------------

    def start_trial(self, number: int, values: dict[str, Any], baseline: bool = False) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{number}" + (" (baseline)" if baseline else ""),
            tags={"mlflow.parentRunId": self.parent_id, "visionflow.kind": "trial",
                  "optuna.study": self.study.study_name, "optuna.trial": str(number),
                  "state": "running", "baseline": str(baseline).lower()})
        self.client.log_batch(run.info.run_id,
                              params=[Param(k, _value(v)) for k, v in values.items()])
        return run.info.run_id

    def log_epoch(self, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, epoch)
                                               for k, v in metrics.items() if v is not None])

    def end_trial(self, run_id: str, state: str, value: float | None, seconds: float,
                  error: str | None = None) -> None:
        tags = [RunTag("state", state)] + ([RunTag("error", error[:500])] if error else [])
        metrics = [Metric("trial_seconds", seconds, int(time.time() * 1000), 0)]
        if value is not None:
            metrics.append(Metric("final_val_top1", value, int(time.time() * 1000), 0))
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, "FAILED" if state == "failed" else "FINISHED")

    def reconcile(self) -> list[int]:
        """Child runs left RUNNING by a process that died, brought in line with the study:
        a trial the study holds as failed (its process stopped mid-trial) -> KILLED; one it
        holds as complete or pruned (the process died between telling the study and closing
        the run) -> FINISHED with that state. Trials running elsewhere are left alone.
        Returns the trial numbers of the runs marked KILLED."""
        states = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        runs = self.client.search_runs(
            [self.experiment_id], max_results=5000,
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}' and "
                          "attributes.status = 'RUNNING'")
        killed = []
        for run in runs:
            trial = states.get(int(run.data.tags.get("optuna.trial", -1)))
            if trial is None or trial.state == TrialState.RUNNING:
                continue
            run_id = run.info.run_id
            if trial.state == TrialState.FAIL:
                self.client.set_tag(run_id, "state", "killed")
                self.client.set_terminated(run_id, "KILLED")
                killed.append(trial.number)
                continue
            state = "pruned" if trial.state == TrialState.PRUNED else "complete"
            if trial.value is not None and "final_val_top1" not in run.data.metrics:
                self.client.log_metric(run_id, "final_val_top1", trial.value)
            self.client.set_tag(run_id, "state", state)
            self.client.set_terminated(run_id, "FINISHED")
        return killed

    # --- the study ------------------------------------------------------------------------

    def finish(self, summary: dict[str, Any], status: str = "FINISHED") -> list[str]:
        """Best trial, counts and plots on the parent; returns the plots logged."""
        pid = self.parent_id
        now = int(time.time() * 1000)
        step = summary["finished"]
        metrics = [Metric(k, float(summary[k]), now, step)
                   for k in ("finished", "complete", "pruned", "failed")]
        tags = [RunTag("state", summary["state"])]
        if summary.get("best_value") is not None:
            metrics.append(Metric("best_val_top1", summary["best_value"], now, step))
            tags += [RunTag("best_trial", str(summary["best_trial"]))]
            tags += [RunTag(f"best.{k}", _value(v)) for k, v in summary["best_params"].items()]
        self.client.log_batch(pid, metrics=metrics, tags=tags)
        if summary.get("best_params"):
            self.client.log_dict(pid, {"trial": summary["best_trial"],
                                       "val_top1": summary["best_value"],
                                       "params": summary["best_params"]}, "best_params.json")
        logged = self._plots(pid)
        self.client.set_terminated(pid, status)
        return logged

    def _plots(self, run_id: str) -> list[str]:
        import matplotlib  # the Agg backend before pyplot loads (headless hosts)

        matplotlib.use("Agg")
        import optuna.visualization.matplotlib as oplt
        from matplotlib import pyplot as plt

        logged = []
        with tempfile.TemporaryDirectory() as tmp:
            for name in PLOTS:
                path = Path(tmp) / f"{name}.png"
                try:
                    ax = getattr(oplt, f"plot_{name}")(self.study)
                    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
                    fig.set_size_inches(9, 5)
                    fig.tight_layout()
                    fig.savefig(path, dpi=100)
                    plt.close(fig)
                except Exception as err:  # noqa: BLE001 (e.g. importances need 2+ trials)
                    plt.close("all")
                    self.client.set_tag(run_id, f"plot.{name}", f"skipped: {one_line(err)}")
                    continue
                self.client.log_artifact(run_id, str(path), "plots")
                logged.append(name)
        return logged
