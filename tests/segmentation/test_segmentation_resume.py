"""Segmentation training survives a kill: a checkpoint after every epoch (and in shards mode
every `train.checkpoint_steps` steps, with the loader's position), and the run started again
goes on from the next batch and ends with the weights of a run never stopped, from the packed
tensors and from the shards."""

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


def _packed(root: Path, images: Path, storage: str, **more) -> tuple[Layout, object]:
    layout = Layout.at(make_project(root, images, {
        **SEG, "segmentation.epochs": EPOCHS, "data.storage": storage,
        "data.shard_bytes": 2**16, **more}))
    params = load_params(layout.params)
    run_stage("validate", params, layout)
    run_stage("pack", params, layout)
    return layout, params


class KillAfter:
    """`engine.save_checkpoint` that records each (epochs done, steps into the next) it saves,
    and dies right after writing the checkpoint `at` (as a killed process would)."""

    def __init__(self, at: tuple[int, int] | None) -> None:
        self.at, self.saved, self.real = at, [], engine.save_checkpoint

    def __call__(self, path, chash, state, history) -> None:
        self.real(path, chash, state, history)
        self.saved.append((state["epoch"], state.get("step", 0)))
        if self.saved[-1] == self.at:
            raise KeyboardInterrupt


def _train(params, layout: Layout, monkeypatch,
           kill_at: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The checkpoints one train process saved (it is killed after `kill_at`)."""
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
    assert _train(params, cut, monkeypatch, kill_at=(1, 0)) == [(1, 0)]
    assert cut.checkpoint.is_file() and not cut.model.exists()
    capsys.readouterr()
    assert _train(params, cut, monkeypatch, kill_at=None) == [(2, 0), (3, 0)]  # not 1 again
    assert "resuming from" in capsys.readouterr().out
    assert _epochs(cut) == [1, 2, 3] and not cut.checkpoint.exists()
    a, b = (torch.load(lay.model, weights_only=True)["state_dict"] for lay in (full, cut))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_a_checkpoint_of_other_settings_is_not_resumed(images, tmp_path, monkeypatch):
    layout, params = _packed(tmp_path / "p", images, "tensor")
    assert _train(params, layout, monkeypatch, kill_at=(1, 0)) == [(1, 0)]
    other = load_params(layout.params, ["segmentation.lr=0.02"])
    assert _train(other, layout, monkeypatch, kill_at=None) == [(1, 0), (2, 0), (3, 0)]
    assert _epochs(layout) == [1, 2, 3]


def test_shards_killed_mid_epoch_resume_at_the_next_batch(images, tmp_path, monkeypatch,
                                                          capsys):
    """A checkpoint every step: killed after epoch 2's second batch, the run goes on from its
    third (the loader's saved position, two DataLoader workers), not from epoch 2's start."""
    full, params = _packed(tmp_path / "full", images, "shards", **{
        "train.checkpoint_steps": 1})
    run_stage("train", params, full)

    cut, params = _packed(tmp_path / "cut", images, "shards", **{"train.checkpoint_steps": 1})
    saved = _train(params, cut, monkeypatch, kill_at=(1, 2))
    assert saved[-3:] == [(1, 0), (1, 1), (1, 2)] and (0, 2) in saved
    capsys.readouterr()
    resumed = _train(params, cut, monkeypatch, kill_at=None)
    assert "after epoch 1, step 2" in capsys.readouterr().out
    steps = len([s for s in saved if s[0] == 0]) + 1  # epoch 1's batches (steps 1, 2, ...)
    # epoch 2's last batch, then all of epoch 3's (not the restored position again)
    assert resumed == [(2, 0)] + [(2, i) for i in range(1, steps)] + [(3, 0)], resumed
    with full.history.open() as f, cut.history.open() as g:
        rows = [{r["epoch"]: r for r in csv.DictReader(h)} for h in (f, g)]
    images = [float(r["2"]["img_per_s"]) * float(r["2"]["seconds"]) for r in rows]
    assert 0 < round(images[1]) < round(images[0])  # the batches after the kill only
    # the epoch's loss still covers all its batches, those before the kill too
    assert float(rows[1]["2"]["train_loss"]) == pytest.approx(float(rows[0]["2"]["train_loss"]),
                                                              rel=1e-5)
    a, b = (torch.load(lay.model, weights_only=True)["state_dict"] for lay in (full, cut))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
