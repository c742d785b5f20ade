"""Segmentation training survives a kill: a checkpoint after every epoch, and the run started
again goes on from the next epoch and ends with the weights of a run never stopped, from the
packed tensors and from the shards."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from helpers import make_project
from seg_projects import SEG, shapes

from visionflow.core.configfile import load_params
from visionflow.core.layout import Layout
from visionflow.model import engine
from visionflow.orchestration.stage_runner import run_stage

EPOCHS = 3


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return shapes(tmp_path_factory.mktemp("seg-resume"), n=60)


def _packed(root: Path, images: Path, storage: str) -> tuple[Layout, object]:
    layout = Layout.at(make_project(root, images, {
        **SEG, "segmentation.epochs": EPOCHS, "data.storage": storage,
        "data.shard_bytes": 2**16}))
    params = load_params(layout.params)
    run_stage("validate", params, layout)
    run_stage("pack", params, layout)
    return layout, params


class KillAfter:
    """`engine.save_checkpoint` that records each epoch it saves, and dies right after
    writing epoch `epoch`'s checkpoint (as a killed process would)."""

    def __init__(self, epoch: int | None) -> None:
        self.epoch, self.saved, self.real = epoch, [], engine.save_checkpoint

    def __call__(self, path, chash, state, history) -> None:
        self.real(path, chash, state, history)
        self.saved.append(state["epoch"])
        if state["epoch"] == self.epoch:
            raise KeyboardInterrupt


def _train(params, layout: Layout, monkeypatch, kill_at: int | None) -> list[int]:
    """The epochs one train process saved (it is killed after `kill_at`)."""
    spy = KillAfter(kill_at)
    monkeypatch.setattr(engine, "save_checkpoint", spy)
    if kill_at is None:
        run_stage("train", params, layout)
    else:
        with pytest.raises(KeyboardInterrupt):
            run_stage("train", params, layout)
    monkeypatch.setattr(engine, "save_checkpoint", spy.real)
    return spy.saved


def _epochs(layout: Layout) -> list[int]:
    with layout.history.open() as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("storage", ["tensor", "shards"])
def test_killed_after_an_epoch_resumes_to_the_weights_of_an_unbroken_run(
        images, tmp_path, monkeypatch, capsys, storage):
    full, params = _packed(tmp_path / "full", images, storage)
    run_stage("train", params, full)

    cut, params = _packed(tmp_path / "cut", images, storage)
    assert _train(params, cut, monkeypatch, kill_at=1) == [1]
    assert cut.checkpoint.is_file() and not cut.model.exists()
    capsys.readouterr()
    assert _train(params, cut, monkeypatch, kill_at=None) == [2, 3]  # not 1 again
    assert "resuming from" in capsys.readouterr().out
    assert _epochs(cut) == [1, 2, 3] and not cut.checkpoint.exists()
    a, b = (torch.load(lay.model, weights_only=True)["state_dict"] for lay in (full, cut))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_a_checkpoint_of_other_settings_is_not_resumed(images, tmp_path, monkeypatch):
    layout, params = _packed(tmp_path / "p", images, "tensor")
    assert _train(params, layout, monkeypatch, kill_at=1) == [1]
    other = load_params(layout.params, ["segmentation.lr=0.02"])
    assert _train(other, layout, monkeypatch, kill_at=None) == [1, 2, 3]  # from the start
    assert _epochs(layout) == [1, 2, 3]
