"""Scheduled retraining end to end, with real DVC (git repos, a local-path remote, an import
from a second git+DVC repo), real MLflow and a real Prefect server (the test harness):

- run 1 trains; run 2, after the data was lost locally, `dvc pull`s it back and skips with
  "no new data"; `vflow data add` of 10% more images per class, then run 3 retrains and the
  gate compares on the stable test split (no file moved, nothing of the champion's training
  set scored); run 4 `dvc update`s an import of the same data and skips again;
- a flow run killed (SIGKILL) during train, then rerun, resumes at train: the earlier stages
  are cached through dvc.lock and the result is complete.
"""

from __future__ import annotations

import csv
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from builders import flat_digits
from helpers import BIN, kill_when, make_project, prefect_settings, run

from visionflow.core.layout import Layout

pytestmark = pytest.mark.slow

DVC, VFLOW = str(BIN / "dvc"), str(BIN / "vflow")
MODEL = "visionflow-classifier"
STAGES = ("validate", "pack", "train", "evaluate", "compress", "register")
FAST = {"train.epochs": 1, "train.threads": 1, "compress.methods": [],
        "register.beat_majority": False,  # one epoch: a first model about at chance
        "flow.retry_delay_s": 0.5, "flow.retry_jitter": 0}


@pytest.fixture(scope="module")
def prefect_api(prefect_server: str) -> Any:
    """The session's Prefect server, for this module's flows and their subprocesses."""
    with prefect_settings(prefect_server):
        yield prefect_server


def _git_commit(root: Path, message: str) -> None:
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", message], root)


def _splits(layout: Layout) -> dict[str, str]:
    with layout.manifest.open(newline="") as f:
        return {r["path"]: r["split"] for r in csv.DictReader(f) if not r["quarantine_reason"]}


def _versions(root: Path) -> tuple[list[str], dict[str, str]]:
    from visionflow.mlops import registry

    client = registry.client_for(Layout.at(root))
    versions = sorted((str(v.version) for v in registry.all_versions(client, MODEL)), key=int)
    return versions, registry.alias_map(client, MODEL)


def _more(v1: Path, dst: Path, digits_dir: Path, extra: int) -> Path:
    """v1 plus `extra` new digits per class (files v1 does not have)."""
    shutil.copytree(v1, dst)
    for label_dir in sorted(dst.iterdir()):
        have = {p.name for p in label_dir.iterdir()}
        pool = sorted(f for s in ("train", "val", "test")
                      for f in (digits_dir / s / label_dir.name).iterdir() if f.name not in have)
        for f in pool[:extra]:
            shutil.copy(f, label_dir / f.name)
    return dst


def test_data_trigger_pull_add_retrain_and_update(prefect_api, tmp_path: Path,
                                                  digits_dir: Path):
    v1 = flat_digits(tmp_path / "v1", digits_dir, 30)
    v2 = _more(v1, tmp_path / "v2", digits_dir, 3)  # 10% more files in each class
    root = make_project(tmp_path / "proj", v1, FAST, git=True)
    layout = Layout.at(root)
    run([DVC, "remote", "add", "-d", "store", str(tmp_path / "remote")], root)  # local path
    run([DVC, "push", "-q"], root)
    _git_commit(root, "data v1 and its remote")
    retrain = runpy.run_path(str(root / "flows" / "retrain.py"))["retrain"]

    # 1. scheduled run, no champion: trains and promotes v1
    first = retrain(root=str(root), only_new_data=True)
    assert (first["version"], first["alias"], first["skipped"]) == ("1", "champion", False)
    assert first["stages"] == dict.fromkeys(STAGES, "ran")
    splits_v1 = _splits(layout)

    # 2. the data is gone locally (a fresh machine): `dvc pull` brings it back; same data
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    validated = layout.manifest.stat().st_mtime_ns
    second = retrain(root=str(root), only_new_data=True)
    assert second["skipped"] and second["reason"].startswith(
        "no new data: champion v1 was trained on data")
    assert sorted(p.name for p in (root / "data").iterdir()) == sorted(
        p.name for p in v1.iterdir())  # pulled back from the remote
    assert _versions(root) == (["1"], {"champion": "1"})
    assert layout.manifest.stat().st_mtime_ns == validated  # decided by the md5: no hashing

    # 3. `vflow data add` of a folder with 10% more images per class: run 3 retrains
    added = run([VFLOW, "data", "add", str(v2), "--push"], root)
    assert "imported 330 images" in added.stdout
    _git_commit(root, "data v2")
    third = retrain(root=str(root), only_new_data=True)
    assert not third["skipped"] and third["version"] == "2"
    assert third["stages"] == dict.fromkeys(STAGES, "ran")
    splits_v2 = _splits(layout)
    moved = {p: (s, splits_v2[p]) for p, s in splits_v1.items() if splits_v2[p] != s}
    assert not moved, moved  # no existing file changed split
    reg = json.loads(layout.registration.read_text())
    scored = reg["decision"]["scored"]
    test_v2 = [p for p, s in splits_v2.items() if s == "test"]
    assert (scored["total"], scored["excluded"], scored["scored"]) == \
        (len(test_v2), 0, len(test_v2))
    assert scored["champion_hashes"] == "recorded"
    assert f"{len(test_v2)} of {len(test_v2)} test images scored, 0 excluded" in \
        layout.gate_report.read_text()
    _assert_test_images_unseen_by_the_champion(layout, test_v2)

    # 4. the data becomes a `dvc import` of a second git+DVC repo; `dvc update` fetches its
    #    newest commit, which holds the data v2 was trained on: no new data
    _import_from_an_upstream_repo(root, src := tmp_path / "upstream", v1, v2,
                                  tmp_path / "upstream-remote")

    validated = layout.manifest.stat().st_mtime_ns
    fourth = retrain(root=str(root), only_new_data=True)
    assert fourth["skipped"] and "no new data" in fourth["reason"], fourth["reason"]
    assert sum(1 for _ in (root / "data").rglob("*.png")) == 330  # updated to upstream v2
    rev = run(["git", "rev-parse", "HEAD"], src).stdout.strip()
    assert rev in (root / "data.dvc").read_text()  # the import now pins upstream's v2
    assert _versions(root)[0] == ["1", "2"]
    assert layout.manifest.stat().st_mtime_ns == validated  # the md5 again: nothing re-read


def _assert_test_images_unseen_by_the_champion(layout: Layout, test_v2: list[str]) -> None:
    """No test image of data v2 is one champion v1 trained or validated on."""
    import mlflow

    from visionflow.mlops import registry

    uri = registry.client_for(layout).get_model_version(MODEL, "1").tags["lineage.train_hashes"]
    champion = json.loads(Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
                          .read_text())
    with layout.manifest.open(newline="") as f:
        sha = {r["path"]: r["sha256"] for r in csv.DictReader(f)}
    assert not {sha[p] for p in test_v2} & (set(champion["train"]) | set(champion["val"]))


def _import_from_an_upstream_repo(root: Path, src: Path, v1: Path, v2: Path,
                                  remote: Path) -> None:
    """The project's data becomes a `dvc import` of `src` (a git+DVC repo holding v1),
    then `src` moves on to v2 (committed and pushed upstream)."""
    shutil.copytree(v1, src / "data")
    run(["git", "init", "-q", "-b", "main"], src)
    run([DVC, "init", "-q"], src)
    run([DVC, "remote", "add", "-d", "store", str(remote)], src)
    run([DVC, "add", "-q", "data"], src)
    run([DVC, "push", "-q"], src)
    _git_commit(src, "v1")
    run([DVC, "remove", "-q", "data.dvc"], root)
    shutil.rmtree(root / "data")
    run([DVC, "import", "-q", str(src), "data", "-o", "data"], root)
    _git_commit(root, "data: an import")
    shutil.rmtree(src / "data")
    shutil.copytree(v2, src / "data")
    run([DVC, "add", "-q", "data"], src)
    run([DVC, "push", "-q"], src)
    _git_commit(src, "v2")


def test_killed_flow_resumes_at_the_killed_stage(prefect_api, tmp_path: Path,
                                                 digits_dir: Path):
    data = flat_digits(tmp_path / "data", digits_dir, 30)
    root = make_project(tmp_path / "proj", data, {**FAST, "train.epochs": 12}, git=True)
    layout = Layout.at(root)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "flow.log").open("w")
    proc = subprocess.Popen([sys.executable, str(root / "flows" / "retrain.py"), "--root",
                             str(root)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:  # kill it once train has checkpointed an epoch (validate, pack are recorded)
        kill_when(proc, layout.checkpoint.is_file, "train's first checkpoint", poll=0.05,
                  detail=lambda: (tmp_path / "flow.log").read_text()[-3000:])
    finally:
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not layout.model.exists() and not layout.registration.exists()  # killed in train
    recorded = json.loads(run([DVC, "status", "--json"], root).stdout)
    assert "validate" not in recorded and "pack" not in recorded  # finished: recorded
    assert "train" in recorded
    manifest_mtime = layout.manifest.stat().st_mtime_ns
    done, saved = _checkpointed(layout)  # what the killed run had trained
    assert 1 <= done < 12 and len(saved) == done

    retrain = runpy.run_path(str(root / "flows" / "retrain.py"))["retrain"]
    out = retrain(root=str(root))
    assert out["stages"] == {"validate": "cached", "pack": "cached", "train": "ran",
                             "evaluate": "ran", "compress": "ran", "register": "ran"}
    assert layout.manifest.stat().st_mtime_ns == manifest_mtime  # validate did not rerun
    assert (out["version"], out["alias"]) == ("1", "champion")
    assert layout.model.is_file() and not layout.checkpoint.exists()
    assert json.loads(run([DVC, "status", "--json"], root).stdout) == {}  # complete
    from visionflow.model.classifier import load_classifier

    load_classifier(layout.model)
    _assert_resumed_after(layout, done, saved, epochs=12)


def _checkpointed(layout: Layout) -> tuple[int, list[dict[str, Any]]]:
    """The epoch train's checkpoint was written after, and its history rows."""
    import torch

    ckpt = torch.load(layout.checkpoint, map_location="cpu", weights_only=True)
    return int(ckpt["fit"]["epoch"]), json.loads(ckpt["history"])


def _assert_resumed_after(layout: Layout, done: int, saved: list[dict[str, Any]],
                          epochs: int) -> None:
    """The rerun trained epochs done+1..epochs only: its MLflow run's per-epoch metrics start
    after the checkpoint, and history.csv keeps the killed run's rows (their wall times) as
    they were. A train that ignored its checkpoint would log from step 1 and time anew."""
    from mlflow import MlflowClient

    from visionflow.mlops import tracking

    tracking.setup(layout)
    run_id = json.loads(layout.run_info.read_text())["run_id"]
    steps = [m.step for m in MlflowClient().get_metric_history(run_id, "curves/train_loss")]
    assert sorted(steps) == list(range(done + 1, epochs + 1)), (done, steps)
    with layout.history.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert [float(r["seconds"]) for r in rows[:done]] == [r["seconds"] for r in saved]
