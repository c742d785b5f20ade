"""A search: open (or resume) the study, then keep `tune.parallel` trials running until the
study holds `tune.trials` finished ones, the time budget is spent, or trials keep failing.

    search = Search.open(params, layout)            # config, data, study, MLflow parent
    summary = search.drive(submit)                  # submit(number) -> a future
    search.run_trial(number)                        # what each submitted task runs

The Prefect flow (`flows/tune.py`) submits each trial as a task on a thread pool; `drive`
asks the study for the next trial's params in this thread, and the task trains and scores
it, reports each epoch to the pruner and tells the study the outcome. Several processes
(hosts) can drive one study: the budget is counted in the shared storage.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from visionflow.core.config import Params
from visionflow.core.errors import VisionflowError, one_line
from visionflow.core.layout import Layout
from visionflow.model.inference import pick_device
from visionflow.tune import study as studies
from visionflow.tune.mlflow_runs import StudyRuns
from visionflow.tune.objective import TrialData, load_trial_data, run_trial
from visionflow.tune.progress import Display, Status
from visionflow.tune.space import fixed_settings, suggest, trial_params

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
MAX_FAILURES_IN_A_ROW = 3
POLL_S = 0.5


class TuneFailed(VisionflowError):
    """Trials failed: the study stopped (one line with the first error)."""


def _fmt(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in values.items())


@dataclass
class Search:
    params: Params
    layout: Layout
    storage: Any
    study: optuna.Study
    runs: StudyRuns
    data: TrialData
    device: torch.device
    threads: int
    status: Status
    display: Display | None = None
    _trials: dict[int, tuple[optuna.Trial, dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def open(cls, params: Params, layout: Layout) -> Search:
        """Check the data, open or resume the study and its MLflow parent run, and fail the
        trials a killed run left running (their params are queued again)."""
        cfg = params.tune
        data = load_trial_data(params, layout)
        settings = fixed_settings(params, data.data_hash)
        storage = studies.open_storage(studies.storage_url(params, layout))
        study = studies.open_study(params, storage, settings)
        runs = StudyRuns(layout, study, settings)
        device = pick_device(params.train.device)
        threads = max(1, (params.train.threads or os.cpu_count() or 1) // cfg.parallel)
        if params.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        search = cls(params, layout, storage, study, runs, data, device, threads,
                     Status(cfg.trials, cfg.parallel))
        search._refresh_status()
        return search

    # --- one trial (a task) ---------------------------------------------------------------

    def run_trial(self, number: int) -> dict[str, Any]:
        """Train and score trial `number` (asked by `drive`), report every epoch to the
        pruner, tell the study the outcome; returns it."""
        trial, values = self._trials[number]
        run_id = self.runs.start_trial(number, values,
                                       bool(trial.user_attrs.get("baseline")))
        trial.set_user_attr(studies.RUN_ATTR, run_id)
        t0 = time.perf_counter()

        def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
            self.runs.log_epoch(run_id, epoch, metrics)
            trial.report(metrics["val_top1"], epoch)
            return trial.should_prune()

        try:
            with studies.heartbeat(self.storage, trial._trial_id):
                out = run_trial(trial_params(self.params, values), self.data, self.device,
                                self.threads, on_epoch)
        except BaseException as err:
            self.study.tell(trial, state=TrialState.FAIL)
            self.runs.end_trial(run_id, "failed", None, time.perf_counter() - t0,
                                one_line(err))
            raise
        state = "pruned" if out.pruned else "complete"
        if out.pruned:
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, out.value)
        self.runs.end_trial(run_id, state, out.value, out.seconds)
        return {"number": number, "state": state, "value": out.value, "epochs": out.epochs,
                "seconds": round(out.seconds, 3), "params": values}

    # --- the loop -------------------------------------------------------------------------

    def _reclaim(self) -> None:
        failed = studies.reclaim_stale(self.study)
        self.runs.reconcile()
        for t in failed:
            self._say(f"trial {t.number}: its process stopped; failed, params queued again")

    def _ask(self) -> int:
        trial = self.study.ask()
        trial.set_user_attr(studies.WORKER_ATTR, studies.worker_id())
        values = suggest(trial, self.params.tune.space)
        self._trials[trial.number] = (trial, values)
        return trial.number

    def _refresh_status(self) -> None:
        c = studies.counts(self.study)
        self.status.complete, self.status.pruned, self.status.failed = (
            c.complete, c.pruned, c.failed)
        best = self.best()
        if best is not None:
            self.status.best_value, self.status.best_trial = best.value, best.number

    def best(self) -> optuna.trial.FrozenTrial | None:
        return best_of(self.study)

    def _say(self, text: str) -> None:
        if self.display is not None:
            self.display.event(text)
        else:
            print(text, flush=True)

    def drive(self, submit: Callable[[int], Any]) -> dict[str, Any]:
        """Run trials through `submit` (number -> future with `add_done_callback` and
        `result(raise_on_failure=False)`) until the budget is reached; the summary."""
        cfg = self.params.tune
        t_start = time.monotonic()
        deadline = t_start + cfg.timeout_s if cfg.timeout_s else None
        done: queue.Queue[int] = queue.Queue()
        inflight: dict[int, tuple[Any, float]] = {}
        errors: list[str] = []
        in_a_row, stop, last_reclaim = 0, "", time.monotonic()
        self._reclaim()
        before = studies.counts(self.study)
        with Display(self.status) as self.display:
            if before.finished:
                self._say(f"resuming study {self.study.study_name!r}: {before.finished} of "
                          f"{cfg.trials} trials finished")
            while True:
                if not stop and deadline is not None and time.monotonic() > deadline:
                    stop = f"time budget ({cfg.timeout_s:g} s) spent"
                if not stop and in_a_row >= MAX_FAILURES_IN_A_ROW:
                    stop = f"{in_a_row} trials failed in a row"
                if time.monotonic() - last_reclaim > studies.GRACE_S / 2:
                    self._reclaim()  # trials of hosts that died meanwhile
                    last_reclaim = time.monotonic()
                while not stop and len(inflight) < cfg.parallel:
                    c = studies.counts(self.study)
                    if c.finished + c.running >= cfg.trials:
                        break
                    number = self._ask()
                    fut = submit(number)
                    fut.add_done_callback(lambda _f, n=number: done.put(n))
                    inflight[number] = (fut, time.perf_counter())
                    self.status.running = sorted(inflight)
                    self._say(f"trial {number} started: {_fmt(self._trials[number][1])}")
                if not inflight:
                    break
                try:
                    number = done.get(timeout=POLL_S)
                except queue.Empty:
                    self.display.refresh()
                    continue
                fut, t0 = inflight.pop(number)
                self.status.running = sorted(inflight)
                self.status.durations.append(time.perf_counter() - t0)
                out = fut.result(raise_on_failure=False)
                self._refresh_status()
                if isinstance(out, dict):
                    in_a_row = 0
                    value = f"{out['value']:.4f}" if out["value"] is not None else "-"
                    self._say(f"trial {number} {out['state']} after {out['epochs']} epoch(s): "
                              f"val top-1 {value}")
                else:
                    in_a_row += 1
                    errors.append(f"trial {number}: {one_line(out)}")
                    self._say(f"trial {number} failed: {one_line(out)}")
        self.display = None
        return self._finish(stop, errors, time.monotonic() - t_start, before.finished)

    def _finish(self, stop: str, errors: list[str], seconds: float,
                finished_before: int) -> dict[str, Any]:
        self._refresh_status()
        c = studies.counts(self.study)
        best = self.best()
        reached = c.finished >= self.params.tune.trials
        state = "complete" if reached else (stop or "stopped")
        base = next((t for t in self.study.get_trials(deepcopy=False, states=FINISHED_STATES)
                     if t.user_attrs.get("baseline")), None)
        summary = {
            "study": self.study.study_name, "storage": studies.redact(self.storage.url),
            "state": state, "trials": self.params.tune.trials, "finished": c.finished,
            "complete": c.complete, "pruned": c.pruned, "failed": c.failed,
            "run_now": c.finished - finished_before, "seconds": round(seconds, 2),
            "best_trial": best.number if best else None,
            "best_value": best.value if best else None,
            "best_params": dict(best.params) if best else {},
            "baseline_trial": base.number if base else None,
            "baseline_value": base.value if base else None,
            "mlflow_parent_run_id": self.runs.parent_id, "errors": errors,
            "trial_wall_s": [round(s, 3) for s in self.status.durations],  # submit to done
        }
        ok = reached or stop.startswith("time budget")
        summary["plots"] = self.runs.finish(summary, "FINISHED" if ok else "FAILED")
        if errors and not reached:
            raise TuneFailed(f"tune: {state}; {errors[0]}")
        return summary


def best_of(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The complete trial with the highest val top-1 (pruned trials never win)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(done, key=lambda t: t.value, default=None)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The study's outcome in a few plain lines (the CLI prints them)."""
    lines = [f"study {summary['study']} ({summary['storage']}): {summary['state']}, "
             f"{summary['finished']}/{summary['trials']} trials finished ({summary['complete']} "
             f"complete, {summary['pruned']} pruned, {summary['failed']} failed), "
             f"{summary.get('run_now', 0)} run now in {summary.get('seconds', 0):.0f} s"]
    if summary.get("baseline_value") is not None:
        lines.append(f"baseline: trial {summary['baseline_trial']} (params.yaml's values), val "
                     f"top-1 {summary['baseline_value']:.4f}")
    if summary.get("best_value") is not None:
        lines.append(f"best: trial {summary['best_trial']}, val top-1 "
                     f"{summary['best_value']:.4f}: {_fmt(summary['best_params'])}")
    if summary.get("mlflow_parent_run_id"):
        lines.append(f"MLflow: experiment visionflow-tune, run {summary['mlflow_parent_run_id']}")
    return lines


def summary_markdown(summary: dict[str, Any]) -> str:
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in summary.get("best_params", {}).items())
    return "\n\n".join(["# tune: " + summary["study"], *summary_lines(summary),
                        "| best params | value |\n|---|---|\n" + rows if rows else ""])
