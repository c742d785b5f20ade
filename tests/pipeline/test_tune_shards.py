"""`vflow tune` on a shards-mode project (issue #18): the `tune` flow's trials stream the
train split and score on the val stream, never reading the test shards."""

from __future__ import annotations

import runpy
from pathlib import Path

import optuna
import pytest
from builders import write_photo_folder
from helpers import make_project, prefect_settings
from optuna.trial import TrialState

from visionflow.core.configfile import load_params
from visionflow.core.layout import Layout
from visionflow.data import stream

pytestmark = pytest.mark.slow


def test_tune_streams_the_shards(tmp_path: Path, prefect_server: str, monkeypatch):
    from visionflow.orchestration.stage_runner import run_stage

    photos = write_photo_folder(tmp_path / "photos", {"train": 10, "val": 3, "test": 2})
    root = make_project(tmp_path / "proj", photos, {
        "data.storage": "shards", "data.image_size": 32, "data.max_side": 256,
        "train.epochs": 2, "train.batch_size": 8, "train.progress": False,
        "tune.study": "shards", "tune.trials": 2, "tune.parallel": 2, "tune.sampler": "random",
        "tune.pruner": "none", "tune.baseline": False,
        "tune.space": {"train.lr": {"low": 0.01, "high": 0.5, "log": True}}})
    layout = Layout.at(root)
    params = load_params(layout.params)
    for stage in ("validate", "pack"):
        run_stage(stage, params, layout)

    opened: list[str] = []
    real = stream.ShardStream.__init__

    def spy(self, split_dir, split, *args, **kwargs):
        opened.append(split)
        real(self, split_dir, split, *args, **kwargs)

    monkeypatch.setattr(stream.ShardStream, "__init__", spy)
    with prefect_settings(prefect_server):
        summary = runpy.run_path(str(root / "flows" / "tune.py"))["main"](root=str(root))

    study = optuna.load_study(study_name="shards", storage=f"sqlite:///{layout.tune_db}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert all(sorted(t.intermediate_values) == [1, 2] for t in study.trials)
    assert all(0.0 <= t.value <= 1.0 for t in study.trials)
    assert summary["run_now"] == 2
    assert "train" in opened and "val" in opened and "test" not in opened, opened
