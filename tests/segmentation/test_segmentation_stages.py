"""The task switch (#19): `task:` in params (classification the default), the shapes preset,
and a small Pascal VOC folder through validate (bad pair quarantined with its reason, never
deleted), pack (the dataset's own train/val lists) and train (a segmenter file)."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch
from helpers import REPO, make_project
from seg_projects import SEG, write_voc

from visionflow.core.configfile import load_params
from visionflow.core.errors import ConfigError, ValidationFailed
from visionflow.core.layout import Layout
from visionflow.orchestration.stage_runner import run_stage


def test_classification_stays_the_default_and_the_preset_switches_task():
    default = load_params(REPO / "params.yaml")
    assert default.task == "classification"
    seg = load_params(REPO / "params.yaml", ["preset=shapes-unet"])
    assert seg.task == "segmentation" and seg.segmentation.model == "unet"
    assert seg.register_.model_name == "visionflow-segmenter"
    with pytest.raises(ConfigError, match="segmentation.model"):
        load_params(REPO / "params.yaml", ["task=segmentation", "segmentation.model=resnet18"])
    with pytest.raises(ConfigError, match="task"):
        load_params(REPO / "params.yaml", ["task=detection"])


def test_a_voc_folder_imports_and_trains(tmp_path, capsys):
    voc = write_voc(tmp_path / "VOC", n=40, bad=1)
    before = sorted(p.relative_to(voc) for p in voc.rglob("*"))
    root = make_project(tmp_path / "proj", voc, {
        **SEG, "segmentation.epochs": 2, "validate.max_quarantine_fraction": 0.05})
    layout = Layout.at(root)
    params = load_params(layout.params)
    for stage in ("validate", "pack", "train"):
        run_stage(stage, params, layout)
    assert re.search(r"pack \(segmentation\): train \d+, val 10, test \d+ pairs, tensor",
                     capsys.readouterr().out)
    validation = json.loads(layout.validation.read_text())
    assert validation["layout"] == "voc" and validation["usable"] == 39
    assert validation["quarantined"] == {"rgb_colour_not_in_palette": 1}
    # the lists give train and val; test is carved by content, recorded as classifiers' are
    assert validation["split_scheme"]["carved"] == ["test"], validation["split_scheme"]
    assert validation["split"]["scheme"].startswith("by content hash, split_seed=0: test [")
    with layout.quarantine.open() as f:
        (bad,) = list(csv.DictReader(f))
    assert bad["path"] == "SegmentationClass/2007_000000.png"
    assert bad["reason"] == "rgb_colour_not_in_palette"
    assert sorted(p.relative_to(root / "data") for p in (root / "data").rglob("*")) == before
    cache = torch.load(layout.packed, weights_only=True)
    # VOC's lists: val as listed; test carved from train.txt (no test.txt) by content
    n = {s: len(cache[f"{s}_paths"]) for s in ("train", "val", "test")}
    assert n["val"] == 10 and n["train"] + n["test"] == 29 and n["test"] > 0, n
    blob = torch.load(layout.model, weights_only=True)
    assert blob["task"] == "segmentation" and blob["arch"]["num_classes"] == 5
    with layout.history.open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]

    # over the quarantine budget: the gate fails in one line, naming reason and file
    strict = load_params(layout.params, ["validate.max_quarantine_fraction=0.0"])
    with pytest.raises(ValidationFailed, match="rgb_colour_not_in_palette: "
                                               "SegmentationClass/2007_000000.png"):
        run_stage("validate", strict, layout)
    err = capsys.readouterr().err  # the gate's table, as classification's
    assert "segmentation data gate: voc (40 pairs, 39 usable" in err, err
    assert "┃ expectation" in err and "OVER BUDGET" in err and "2007_000000.png" in err, err


def test_a_segmentation_loss_that_is_not_a_number_stops_train(tmp_path, capsys):
    """lr 1e30: the pixel loss is NaN from the first epoch; train stops at the end of that
    epoch (not after all three) in one line naming segmentation.lr, and writes no model (the
    checkpoint of the broken weights dropped)."""
    from seg_projects import shapes

    from visionflow.core.errors import VisionflowError

    layout = Layout.at(make_project(tmp_path / "proj", shapes(tmp_path / "shapes", n=40), {
        **SEG, "segmentation.epochs": 3, "segmentation.lr": 1e30}))
    params = load_params(layout.params)
    for stage in ("validate", "pack"):
        run_stage(stage, params, layout)
    with pytest.raises(VisionflowError, match=r"^train: the loss is not a number in epoch 1: "
                                              r"training diverged; lower segmentation.lr"):
        run_stage("train", params, layout)
    assert not layout.model.exists() and not layout.checkpoint.exists()
    assert "epoch 2/3" not in capsys.readouterr().out  # no epoch trained after the first


def test_a_mobilenet_segmenter_trained_briefly_answers_more_than_background(tmp_path):
    """LR-ASPP on MobileNetV3 keeps BatchNorm statistics as a running average at momentum
    0.01: after three short epochs they are still mostly their starting values, and the model
    in eval mode answered background everywhere (val mIoU the all-background score, whatever
    the loss). Train sets them from `segmentation.bn_images` train images before each
    evaluation, so the saved model answers what it learnt."""
    from seg_projects import shapes

    layout = Layout.at(make_project(tmp_path / "proj", shapes(tmp_path / "shapes", n=100), {
        **SEG, "segmentation.model": "lraspp_mobilenet_v3_large", "segmentation.model_kwargs": {},
        "segmentation.image_size": 48, "segmentation.batch_size": 8, "segmentation.epochs": 3,
        "segmentation.lr": 0.003}))
    params = load_params(layout.params)
    for stage in ("validate", "pack", "train"):
        run_stage(stage, params, layout)
    with layout.history.open() as f:
        val = [float(r["val_miou"]) for r in csv.DictReader(f)]
    assert val[-1] > 0.3, val  # 0.42 measured; all background: 0.16 on this set
