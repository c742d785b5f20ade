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
from helpers import BIN, REPO, make_project, prefect_settings, run
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from visionflow.core.configfile import load_params
from visionflow.core.layout import Layout

STUDY = "tune-test"
TUNE = f"""\
tune:                     # `vflow tune` (the tests' study)
  study: {STUDY}
  trials: 6
  parallel: 2
  timeout_s: null
  sampler: random         # seeded: trial n gets the same params on every run
  startup_trials: 2
  pruner: median
  min_epochs: 2           # epoch 1 says little on 300 images
  baseline: true
  storage: null
  space:
    train.lr: {{low: 1.0e-5, high: 0.2, log: true}}   # below ~3e-3 nothing is learnt
    train.weight_decay: {{low: 1.0e-5, high: 1.0e-3, log: true}}
"""
PRESET = """\
data:
  limit_per_class: 30
train:
  epochs: 3
  batch_size: 32
  warmup_epochs: 0.0
  schedule: constant
  label_smoothing: 0.0
  threads: 1
  deterministic: true
  progress: false
"""


def _params_text() -> str:
    """The repository's params.yaml, comments and all, with the tests' preset and study."""
    text = (REPO / "params.yaml").read_text()
    head = text[:text.index("\ntune:")]
    assert "\n  lr: 0.5\n" in head and "\npreset: null " in head
    head = head.replace("\n  lr: 0.5\n", "\n  lr: 0.05\n")  # the baseline: a good one
    head = head.replace("\npreset: null ", "\npreset: tune-test ")
    return head + "\n" + TUNE


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, digits_dir: Path) -> Path:
    from visionflow.mlops.tracking import setup
    from visionflow.orchestration.stage_runner import run_stage

    root = make_project(tmp_path_factory.mktemp("tune") / "proj", digits_dir)
    (root / "presets" / "tune-test.yaml").write_text(PRESET)
    (root / "params.yaml").write_text(_params_text())
    layout = Layout.at(root)
    params = load_params(layout.params)
    for stage in ("validate", "pack"):
        run_stage(stage, params, layout)
    setup(layout)  # MLflow's store, created once (its migrations take seconds)
    return root


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
        if killed[n][1]:  # (unless the kill came before it drew any)
            retried = [m for m in done if m > n and after[m][1] == killed[n][1]]
            assert retried, (n, after)
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
    assert "\n  lr: 0.05\n" in text_before and "\n  weight_decay: 0.0005\n" in text_before
    text_before = text_before.replace("\n  lr: 0.05\n", "\n  lr: 0.07\n").replace(
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


@pytest.mark.stack
def test_two_hosts_share_one_study_in_the_stack_postgres(project: Path, team_stack,
                                                         tmp_path: Path):
    """Two checkouts (hosts) run `vflow tune` at once against the team stack: one study in
    its PostgreSQL (`VFLOW_TUNE_STORAGE` from `vflow stack up`), one MLflow parent run on its
    tracking server, each trial run once by one of them."""
    from stack_fixtures import CLIENT_ENV

    other = tmp_path / "host2"
    shutil.copytree(project, other)
    env = {**team_stack.env, **CLIENT_ENV}
    storage = env["VFLOW_TUNE_STORAGE"]
    assert storage.startswith("postgresql+psycopg://optuna:")
    # trials long enough (5 epochs) that a host still importing cannot find the study done
    args = ["-s", "tune.study=shared", "-s", "tune.trials=6", "-s", "tune.parallel=1",
            "-s", "train.epochs=5"]
    procs = [subprocess.Popen([str(BIN / "vflow"), "tune", "--root", str(root), *args],
                              cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for root in (project, other)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]

    study = optuna.load_study(study_name="shared", storage=storage)
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 6 <= len(done) <= 7 and len(done) == len(study.trials), study.trials
    workers = {t.user_attrs["vflow_worker"].rsplit(":", 1)[0] for t in done}
    assert len(workers) == 2, workers  # both hosts ran trials of the one study
    assert len({tuple(sorted(t.params.items())) for t in done}) == len(done)
    assert not Layout.at(project).tune_db.exists()  # nothing in the local sqlite file

    client = team_stack.client()
    exp = client.get_experiment_by_name("visionflow-tune")
    runs = client.search_runs([exp.experiment_id],
                              filter_string="tags.`optuna.study` = 'shared'")
    parents = [r for r in runs if r.data.tags.get("visionflow.kind") == "study"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")
                == parents[0].info.run_id]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == sorted(
        t.number for t in done)


_OPEN_AT_GO = """\
import sys
from visionflow.tune.study import open_storage
print("ready", flush=True)
sys.stdin.readline()
open_storage(sys.argv[1])
print("opened", flush=True)
"""


@pytest.mark.stack
def test_hosts_opening_a_new_tune_storage_at_once_all_join(team_stack):
    """Hosts starting `vflow tune` on a new PostgreSQL database create Optuna's tables at
    the same instant: every one must open the storage (none exits on a duplicate-table
    UniqueViolation). Six processes, imports done, released together; two new databases."""
    base = team_stack.env["VFLOW_TUNE_STORAGE"].rsplit("/", 1)[0]
    for attempt in range(2):
        db = f"race_{os.getpid()}_{attempt}"
        team_stack.admin_sql("postgres", f'CREATE DATABASE "{db}" OWNER optuna')
        procs = [subprocess.Popen([str(BIN / "python"), "-c", _OPEN_AT_GO, f"{base}/{db}"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(6)]
        try:
            for p in procs:
                assert p.stdout.readline().strip() == "ready"
            for p in procs:  # released together
                p.stdin.write("go\n")
                p.stdin.flush()
            outs = [p.communicate(timeout=120)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        failed = [o[-600:] for p, o in zip(procs, outs, strict=True) if p.returncode != 0]
        assert not failed, f"attempt {attempt}: {len(failed)} of 6 failed: {failed[0]}"
        assert all(o.strip().endswith("opened") for o in outs)
