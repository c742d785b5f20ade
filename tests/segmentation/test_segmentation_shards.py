"""`data.storage: shards` for `task: segmentation`: pack stores the pairs as LitData shards
(no pixels in `packed.pt`), `data.segmentation_feed` streams them back with the pixels the
tensor path holds, and train, evaluate and register run from them; `auto` picks shards when
the decoded pairs would not fit `data.storage_budget_bytes`; pairs over `data.max_side` are
stored scaled down."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_project
from PIL import Image
from seg_projects import SEG, shapes

from visionflow.core.configfile import load_params
from visionflow.core.errors import DataError
from visionflow.core.layout import Layout
from visionflow.data.segmentation_feed import (
    pair_stream,
    segmentation_pack,
    segmentation_pairs,
    train_batches,
)
from visionflow.data.segmentation_shards import encode_pair
from visionflow.orchestration.stage_runner import run_stage


def _digest(x: torch.Tensor, y: torch.Tensor) -> str:
    return hashlib.sha256(x.contiguous().numpy().tobytes()
                          + y.to(torch.uint8).contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("seg-shards")
    return make_project(base / "proj", shapes(base / "shapes", n=60),
                        {**SEG, "segmentation.epochs": 2, "data.shard_bytes": 2**16})


def test_shards_hold_the_pixels_the_tensors_hold(project: Path):
    layout = Layout.at(project)
    tensor = load_params(layout.params, ["data.storage=tensor"])
    run_stage("validate", tensor, layout)
    run_stage("pack", tensor, layout)
    held = segmentation_pack(layout)
    assert held["storage"] == "tensor" and not (layout.split_shards("test") / "index.json").exists()
    want = {s: {h: _digest(x, y) for h, (x, y) in
                zip(held[f"{s}_sha256"], segmentation_pairs(tensor, layout, s), strict=True)}
            for s in ("train", "val", "test")}

    params = load_params(layout.params, ["data.storage=shards"])
    run_stage("pack", params, layout)
    pack = segmentation_pack(layout)
    assert pack["storage"] == "shards" and "train_x" not in pack and "test_x" not in pack
    for split in ("val", "test"):  # at their own size, in the recorded order
        got = {h: _digest(x, y) for h, (x, y) in
               zip(pack[f"{split}_sha256"], segmentation_pairs(params, layout, split),
                   strict=True)}
        assert got == want[split], split
    # train: shuffled, resized to image_size, batched: the same pixels as the tensors
    stream = pair_stream(params, layout, pack, "train", train=True)
    batches = list(stream.epoch())
    assert len(batches) == len(stream) == -(-len(pack["train_paths"]) // 16)
    assert all(x.shape[1:] == (3, 32, 32) and y.shape[1:] == (32, 32) for x, y in batches)
    got = sorted(_digest(x, y) for xs, ys in batches for x, y in zip(xs, ys, strict=True))
    assert got == sorted(want["train"].values())
    # a last batch of one pair is left out (DeepLabV3 cannot normalise one), as in tensor mode
    n = len(pack["train_paths"])
    lone = load_params(layout.params, ["data.storage=shards", f"segmentation.batch_size={n - 1}"])
    feed = train_batches(lone, layout, pack, torch.device("cpu"))
    assert feed.steps == 1 and [len(x) for x, _ in feed(1)] == [n - 1]
    feed.stream.close()
    policy = json.loads(layout.policy.read_text())
    assert policy["storage"] == "shards" and sum(policy["shards"][s]["samples"] for s in
                                                 ("train", "val", "test")) == 60


def test_train_evaluate_and_register_read_the_shards(project: Path):
    """`auto` with a budget the pairs exceed: shards, then the stages run from them."""
    layout = Layout.at(project)
    with pytest.raises(DataError, match=r"data.storage_budget_bytes=4096: .*data.storage=shards"):
        run_stage("pack", load_params(layout.params, ["data.storage=tensor",
                                                       "data.storage_budget_bytes=4096"]), layout)
    params = load_params(layout.params, ["data.storage_budget_bytes=4096", "data.workers=1"])
    run_stage("pack", params, layout)
    pack = segmentation_pack(layout)
    assert pack["storage"] == "shards"
    for stage in ("train", "evaluate", "register"):
        run_stage(stage, params, layout)
    with layout.history.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["val_miou"] for r in rows)
    metrics = json.loads(layout.metrics.read_text())
    assert metrics["test_images"] == len(pack["test_paths"]) and 0 < metrics["miou"] <= 1
    with layout.predictions.open() as f:
        assert [r["path"] for r in csv.DictReader(f)] == pack["test_paths"]
    assert layout.mistakes_png.stat().st_size > 1000
    reg = json.loads(layout.registration.read_text())
    assert reg["version"] == "1" and reg["decision"]["metric"] == "mIoU", reg


def test_a_pair_over_max_side_is_stored_scaled_down(tmp_path: Path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    mask = np.zeros((60, 80), dtype=np.uint8)
    mask[:, 40:] = 2
    image, mask_png, again = encode_pair(tmp_path / "a.png", mask, max_side=32)
    assert again
    with Image.open(io.BytesIO(image)) as img:
        assert img.format == "JPEG" and img.size == (32, 24)
    with Image.open(io.BytesIO(mask_png)) as m:
        small = np.asarray(m)
    assert small.shape == (24, 32) and set(np.unique(small)) == {0, 2}
    kept, _, again = encode_pair(tmp_path / "a.png", mask, max_side=80)
    assert not again and kept == (tmp_path / "a.png").read_bytes()


def test_new_pairs_are_appended_as_new_shards(project: Path):
    """Pack again after adding pairs: only those are encoded, the old shard files untouched
    (the photos' incremental packing, `data.shards.pack_rows`, with the pair codec)."""
    layout = Layout.at(project)
    params = load_params(layout.params, ["data.storage=shards"])
    for stage in ("validate", "pack"):
        run_stage(stage, params, layout)
    before = {p: p.read_bytes() for p in layout.shards.rglob("chunk-*.bin")}
    extra = shapes(project.parent / "more", n=70)
    for kind in ("images", "masks"):
        for f in sorted((extra / kind).iterdir())[60:]:  # 10 pairs the project lacks
            (project / "data" / kind / f"new_{f.name}").write_bytes(f.read_bytes())
    run_stage("validate", params, layout)
    run_stage("pack", params, layout)
    stats = json.loads(layout.policy.read_text())["shards"]
    assert sum(s["encoded"] for s in stats.values()) == 10, stats
    assert sum(s["reused"] for s in stats.values()) == 60, stats
    assert all(p.read_bytes() == data for p, data in before.items())
    pack = segmentation_pack(layout)
    assert sum(len(pack[f"{s}_paths"]) for s in ("train", "val", "test")) == 70
    test = list(segmentation_pairs(params, layout, "test"))
    assert len(test) == len(pack["test_paths"])


def test_the_pair_codec_runs_in_packing_workers(tmp_path: Path):
    """Pairs are encoded in a process pool from 256 on: the codec must pickle."""
    from visionflow.data.segmentation_layout import read_mask
    from visionflow.data.segmentation_shards import pair_codec

    codec = pair_codec(tmp_path, ["background", "a"], read_mask, max_side=64)
    assert pickle.loads(pickle.dumps(codec.encode)).keywords == codec.encode.keywords


def test_a_mid_epoch_resume_without_the_loaders_position_is_refused():
    """Resuming after batch `done` needs the loader's saved position (a mid-epoch checkpoint
    holds every rank's); without it the epoch would start over and train twice on its first
    batches."""
    from visionflow.data.segmentation_feed import ShardBatches

    batches = ShardBatches(stream=None, steps=4, device=torch.device("cpu"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch 2 resumes after batch 1 without"):
        next(batches(2, done=1))
