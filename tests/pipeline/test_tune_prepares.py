"""`vflow tune` on a fresh DVC project (nothing validated or packed yet) brings validate and
pack up to date itself, as `dvc repro pack` would, then searches: no traceback, no error."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from helpers import BIN, make_project, run
from projects import assert_stage_recorded

SMALL = {"data.limit_per_class": 10, "train.epochs": 1, "train.threads": 1,
         "train.progress": False, "tune.trials": 1, "tune.parallel": 1,
         "tune.study": "prepares", "tune.space": {"train.lr": {"low": 0.05, "high": 0.5}}}


def test_tune_on_an_unpacked_project_runs_validate_and_pack_first(
        tmp_path: Path, digits_dir: Path, prefect_server: str):
    root = make_project(tmp_path / "proj", digits_dir, SMALL, git=True)
    assert not (root / "outputs").exists()
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    proc = subprocess.run([str(BIN / "vflow"), "tune"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stdout.count("best: trial 0") == 1, proc.stdout  # the summary's line alone
    assert "`vflow tune --apply` writes trial 0's params into params.yaml" in proc.stdout
    for stage in ("validate", "pack"):  # recorded as dvc repro records them
        assert_stage_recorded(root, stage)
    status = json.loads(run([str(BIN / "dvc"), "status", "--json", "pack"], root).stdout)
    assert status == {}, status
