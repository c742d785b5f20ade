"""`vflow tune` (issue #15) with the real parts: an Optuna study in the project's sqlite file,
the `tune` Prefect flow with trials as parallel tasks, MLflow's sqlite store, the digits.

One project is prepared per module (validate + pack on 30 digits per class, MLflow's store
created); each test works on a copy. The study: 6 trials, 2 at a time, a random sampler
(seeded: the same params for the same trial numbers on every run), and a learning-rate range
whose lower decades cannot learn in 3 epochs, so the median pruner has trials to stop.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
from builders import snapshot
from helpers import BIN, prefect_settings, run
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from projects import TUNE_STUDY, tune_project

from visionflow.core.configfile import load_params
from visionflow.core.layout import Layout

STUDY = TUNE_STUDY


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, digits_dir: Path) -> Path:
    return tune_project(tmp_path_factory.mktemp("tune") / "proj", digits_dir)


@pytest.fixture
def project(prepared: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "proj"
    shutil.copytree(prepared, dst)
    return dst


def _study(root: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY,
                             storage=f"sqlite:///{Layout.at(root).tune_db}")


def _state(root: Path) -> dict[int, tuple]:
    return {t.number: (t.state, t.params, t.value, t.datetime_complete)
            for t in _study(root).trials}


class _Recorder(dict):
    """The cache as torch.load returns it, recording which keys were read."""

    read: set[str] = set()

    def __getitem__(self, key):
        _Recorder.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        _Recorder.read.add(key)
        return super().get(key, default)


def test_parallel_study_prunes_and_tracks_every_trial(project: Path, prefect_server: str,
                                                      monkeypatch, capsys):
    import runpy

    layout = Layout.at(project)
    real_load = torch.load

    def spying_load(path, *args, **kwargs):
        out = real_load(path, *args, **kwargs)
        return _Recorder(out) if Path(path) == layout.packed else out

    monkeypatch.setattr(torch, "load", spying_load)
    _Recorder.read = set()
    before = {p: snapshot(project / p) if (project / p).is_dir() else (project / p).read_bytes()
              for p in ("params.yaml", "outputs", "data", "dvc.yaml")}
    with prefect_settings(prefect_server):
        summary = runpy.run_path(str(project / "flows" / "tune.py"))["main"](root=str(project))
    out = capsys.readouterr().out

    # the study: 6 finished trials, some pruned, the baseline first, 2 at a time
    study = _study(project)
    trials = study.trials
    states = [t.state for t in trials]
    assert len(trials) == 6 and set(states) <= {TrialState.COMPLETE, TrialState.PRUNED}, states
    assert states.count(TrialState.PRUNED) >= 1 and states.count(TrialState.COMPLETE) >= 2
    assert trials[0].user_attrs.get("baseline") and trials[0].params["train.lr"] == 0.05
    spans = [(t.datetime_start, t.datetime_complete) for t in trials]
    overlap = max(sum(s <= a < e for s, e in spans) for a, _ in spans)
    assert overlap == 2, spans  # two ran side by side, never three
    for t in trials:  # pruned after epoch 2 (min_epochs), the others ran all 3
        assert sorted(t.intermediate_values) == ([1, 2] if t.state == TrialState.PRUNED
                                                 else [1, 2, 3])
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert summary["best_trial"] == best.number and summary["best_params"] == best.params
    assert summary["pruned"] == states.count(TrialState.PRUNED) and summary["run_now"] == 6
    assert "6/6 done" in out and "pruned after 2 epoch(s)" in out and "ETA" in out

    # the test split was never read: only train, val and the metadata
    assert _Recorder.read, "the cache was not loaded through torch.load"
    assert not {k for k in _Recorder.read if k.startswith("test")}, _Recorder.read
    assert {"train_x", "train_y", "val_x", "val_y"} <= _Recorder.read

    # MLflow: one parent, one nested child per trial with its params, epochs and state
    client = MlflowClient(f"sqlite:///{layout.mlflow_db}")
    exp = client.get_experiment_by_name("visionflow-tune")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("visionflow.kind") == "study")
    children = {int(r.data.tags["optuna.trial"]): r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(runs) == 7 and sorted(children) == [t.number for t in trials]
    for t in trials:
        child = children[t.number]
        state = "pruned" if t.state == TrialState.PRUNED else "complete"
        assert child.data.tags["state"] == state and child.info.status == "FINISHED"
        assert child.data.params["train.lr"] == str(t.params["train.lr"])
        history = client.get_metric_history(child.info.run_id, "val_top1")
        assert [(m.step, m.value) for m in history] == sorted(t.intermediate_values.items())
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_top1"] == pytest.approx(best.value)
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.tags["best.train.lr"] == str(best.params["train.lr"])
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/param_importances.png"} <= plots
    local = Path(client.download_artifacts(parent.info.run_id, "plots/param_importances.png"))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # without --apply, nothing in the project changed
    after = {p: snapshot(project / p) if (project / p).is_dir() else (project / p).read_bytes()
             for p in before}
    assert after == before
    _assert_trials_are_task_runs(prefect_server, project, trials)


def _assert_trials_are_task_runs(api_url: str, root: Path, trials: list) -> None:
    """The study's trials ran as task runs of this project's `tune` flow run, as Prefect's
    server recorded them: one `trial-<n>` per trial, completed, inside the flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with prefect_settings(api_url), get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(flow_filter=FlowFilter(
            name=FlowFilterName(any_=["tune"]))) if r.parameters.get("root") == str(root)]
        assert len(runs) == 1 and runs[0].state.is_completed(), runs
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[runs[0].id])))
    by_name = {t.name: t for t in tasks}
    assert sorted(by_name) == sorted(f"trial-{t.number}" for t in trials), sorted(by_name)
    assert all(t.state.is_completed() and t.flow_run_id == runs[0].id for t in tasks)
    for t in trials:  # the task run spans the trial Optuna recorded
        task = by_name[f"trial-{t.number}"]
        assert task.start_time <= t.datetime_complete.astimezone(task.start_time.tzinfo)


def _vflow_tune(root: Path, api_url: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "vflow"), "tune", "--root", str(root), *args],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            env={**os.environ, "PREFECT_API_URL": api_url})


def test_killed_study_resumes_without_repeating_trials_then_applies(project: Path,
                                                                   prefect_server: str):
    layout = Layout.at(project)
    blob = torch.load(layout.packed, weights_only=True)  # a cache with no test split at all:
    torch.save({k: v for k, v in blob.items() if not k.startswith("test")}, layout.packed)
    text_before = layout.params.read_text()
    proc = _vflow_tune(project, prefect_server, "-s", "tune.parallel=1")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if layout.tune_db.is_file() and _finished(project) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # vflow and its trial threads, mid-trial
        proc.wait()
    killed = _state(project)
    finished = {n: s for n, s in killed.items() if s[0] in (TrialState.COMPLETE,
                                                            TrialState.PRUNED)}
    running = [n for n, s in killed.items() if s[0] == TrialState.RUNNING]
    assert 2 <= len(finished) < 6 and len(running) <= 1, killed

    rerun = _vflow_tune(project, prefect_server)
    out = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, out[-3000:]
    after = _state(project)
    assert f"resuming study '{STUDY}': {len(finished)} of 6 trials finished" in out
    for n, s in finished.items():  # the finished trials stand as they were: not rerun
        assert after[n] == s
    done = [n for n, s in after.items() if s[0] in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 6, after
    for n in running:  # the trial the kill interrupted: failed, and its params run again
        assert after[n][0] == TrialState.FAIL
        drawn = killed[n][1]  # what it had drawn: none, some or all (the kill can land
        if drawn:             # between two suggestions); the retry draws the rest anew
            retried = [m for m in done if m > n and drawn.items() <= after[m][1].items()]
            assert retried, (n, drawn, after)
    seen = [tuple(sorted(after[n][1].items())) for n in done]
    assert len(set(seen)) == 6  # no finished trial repeats another's params
    client = MlflowClient(f"sqlite:///{layout.mlflow_db}")
    runs = client.search_runs([client.get_experiment_by_name("visionflow-tune").experiment_id])
    assert sum(r.data.tags.get("visionflow.kind") == "study" for r in runs) == 1  # resumed
    # the interrupted trial's child run (when it got that far) is KILLED, none left RUNNING
    killed_runs = [int(r.data.tags["optuna.trial"]) for r in runs if r.info.status == "KILLED"]
    assert set(killed_runs) <= set(running) and not [r for r in runs
                                                     if r.info.status == "RUNNING"], killed_runs
    assert layout.params.read_text() == text_before

    # the study is complete: --apply runs nothing and writes the best trial's params (the
    # tuned keys first set to values no trial had, so that both lines must change)
    assert "\n  lr: 0.05 " in text_before and "\n  weight_decay: 0.0005\n" in text_before
    text_before = text_before.replace("\n  lr: 0.05 ", "\n  lr: 0.07 ").replace(
        "\n  weight_decay: 0.0005\n", "\n  weight_decay: 0.0002\n")
    layout.params.write_text(text_before)
    applied = run([str(BIN / "vflow"), "tune", "--apply"], project)
    assert "complete (6/6 trials finished" in applied.stdout
    best = max((t for t in _study(project).trials if t.state == TrialState.COMPLETE),
               key=lambda t: t.value)
    new = layout.params.read_text()
    changed = [(a, b) for a, b in zip(text_before.splitlines(), new.splitlines(), strict=True)
               if a != b]
    keys = {b.split(":")[0].strip() for _, b in changed}
    assert keys == {"lr", "weight_decay"} and len(changed) == 2, changed  # the tuned lines
    assert "-  lr: 0.07" in applied.stdout and "+  lr: " in applied.stdout  # the diff shown
    loaded = load_params(layout.params)
    assert loaded.train.lr == best.params["train.lr"]
    assert loaded.train.weight_decay == best.params["train.weight_decay"]
    assert "# visionflow: the single source of configuration" in new  # comments kept
    assert "  epochs: 4               # digits:" in new


def _finished(root: Path) -> int:
    """Finished trials so far (0 while the study is not there yet, or the file is locked)."""
    try:
        return sum(s in (TrialState.COMPLETE, TrialState.PRUNED)
                   for s, *_ in _state(root).values())
    except Exception:  # noqa: BLE001 (created or written right now: ask again next poll)
        return 0
