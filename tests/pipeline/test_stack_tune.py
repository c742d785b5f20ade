"""`vflow tune` on the team stack (issue #15, #21): two hosts share one study in the stack's
PostgreSQL, and hosts opening a new tune storage at the same instant all join it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
from helpers import BIN
from optuna.trial import TrialState
from projects import tune_project

from visionflow.core.layout import Layout

pytestmark = pytest.mark.stack


@pytest.fixture
def project(tmp_path_factory, digits_dir: Path) -> Path:
    return tune_project(tmp_path_factory.mktemp("stacktune") / "proj", digits_dir)


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
