"""Issue #18: a folder of mixed-size photos trains from shards at 224 px with
RandomResizedCrop through both drivers; a SIGKILL mid-epoch resumes at the batch where it
stopped; a corrupt shard stops training with one line and no model."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from builders import write_photo_folder
from helpers import BIN, kill_when, make_project, prefect_settings, run

from visionflow.core.configfile import load_params
from visionflow.core.layout import Layout
from visionflow.orchestration.stage_runner import run_stage

pytestmark = pytest.mark.slow
STAGES = ("validate", "pack", "train", "evaluate", "compress", "register")
PHOTOS = {  # storage shards, tiny net settings; 224 px crops of full-size JPEGs
    "data.storage": "shards", "data.image_size": 224, "data.max_side": 640,
    "data.workers": 1, "train.batch_size": 8, "train.epochs": 1, "train.progress": False,
    "augment.hflip": 0.5, "augment.translate": 0, "augment.cutout": 0,
    "compress.methods": [], "compress.calibration_images": 16,  # latency: batch 1, 2 rounds
    "compress.latency_batches": [1], "compress.latency_reps": 2, "compress.latency_warmup": 0,
    "register.min_test_images": 1, "evaluate.batch_size": 16,
    "register.beat_majority": False,  # one epoch on a few photos: about chance
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photo_folder(tmp_path_factory.mktemp("photos"), {"train": 12, "val": 4})


@pytest.fixture(scope="module")
def few_photos(tmp_path_factory) -> Path:
    """Fewer for the 224-px runs (1200×900 ones still among the training photos)."""
    return write_photo_folder(tmp_path_factory.mktemp("few"), {"train": 8, "val": 2})


# 64-px shards, two images a step, a checkpoint after every step, no loader processes
SMALL = {**PHOTOS, "data.image_size": 64, "data.max_side": 400, "train.batch_size": 2,
         "train.checkpoint_steps": 1, "train.epochs": 1, "data.workers": 0}


@pytest.fixture(scope="module")
def packed(tmp_path_factory, photos: Path) -> Path:
    """The photos validated and packed (SMALL) once, in this process; each test trains on
    its own copy."""
    root = make_project(tmp_path_factory.mktemp("packed") / "proj", photos, SMALL)
    layout = Layout.at(root)
    params = load_params(layout.params)
    for stage in ("validate", "pack"):
        run_stage(stage, params, layout)
    return root


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root / "src")}


def test_photos_train_at_224_through_the_flow_and_dvc(tmp_path: Path, few_photos: Path,
                                                      prefect_server: str):
    photos = few_photos
    root = make_project(tmp_path / "proj", photos, PHOTOS, git=True)
    layout = Layout.at(root)
    flow = runpy.run_path(str(root / "flows" / "retrain.py"))
    with prefect_settings(prefect_server):
        first = flow["retrain"](root=str(root))
    assert first["stages"] == dict.fromkeys(STAGES, "ran")
    policy = json.loads(layout.policy.read_text())
    assert policy["storage"] == "shards" and policy["image_size"] == 224
    assert policy["resize_size"] == 256 and policy["crop_scale"] == [0.08, 1.0]
    assert policy["shards"]["train"]["reencoded"] > 0  # the 1200×900 photos
    assert sorted(p.name for p in layout.shards.iterdir()) == ["test", "train", "val"]
    blob = torch.load(layout.packed, weights_only=True)
    assert "train_x" not in blob  # no pixels in the cache: they stream from the shards
    arch = torch.load(layout.model, weights_only=True)["arch"]
    assert (arch["image_size"], arch["resize_size"]) == (224, 256)
    metrics = json.loads(layout.metrics.read_text())
    assert metrics["n_test"] == len(blob["test_y"]) > 0
    # compress.methods: [] writes no variant; the DVC out says so instead of being empty
    assert [p.name for p in layout.compress_models.iterdir()] == ["no_variants.json"]

    dvc = str(BIN / "dvc")
    assert "up to date" in run([dvc, "repro"], root).stdout.lower()  # the flow recorded it
    run([dvc, "repro", "-f", "-s", "pack"], root)  # the DVC driver packs: nothing new
    again = json.loads(layout.policy.read_text())["shards"]["train"]
    assert again["encoded"] == 0 and again["reused"] == policy["shards"]["train"]["samples"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # DVC's driver trains again (train alone: the stages after it are the flow's, above)
    out = run([dvc, "repro", "train"], root).stdout
    assert [s for s in STAGES if f"Running stage '{s}'" in out] == ["train"], out
    history = (layout.history).read_text().splitlines()
    assert len(history) == 3  # header + 2 epochs
    arch = torch.load(layout.model, weights_only=True)["arch"]
    assert (arch["image_size"], arch["resize_size"]) == (224, 256)

    # the served model: a full-size JPEG, resized + centre-cropped as in evaluation
    pred = run([str(BIN / "vflow"), "predict", str(next((photos / "val" / "bees").iterdir())),
                "--root", str(root), "--out", "-", "--format", "json", "--no-progress"],
               root, check=False)
    assert pred.returncode == 0, pred.stdout + pred.stderr
    assert json.loads(pred.stdout)[0]["label"] in ("ants", "bees")


def _checkpoint_step(layout: Layout) -> tuple[int, bool]:
    try:
        ckpt = torch.load(layout.checkpoint, weights_only=True)
    except Exception:  # not there yet, or being replaced
        return 0, False
    return int(ckpt["fit"]["step"]), ckpt["fit"]["ranks"][0]["stream"] is not None


def test_sigkill_mid_epoch_resumes_at_the_batch_where_it_stopped(tmp_path: Path,
                                                                 packed: Path):
    """Killed in epoch 1 of 2: the rest of epoch 1, then a whole epoch 2 (the loader does not
    start epoch 2 at the restored position again)."""
    root = Path(shutil.copytree(packed, tmp_path / "proj"))
    layout = Layout.at(root)
    params = yaml.safe_load(layout.params.read_text())
    params["train"]["epochs"] = 2
    layout.params.write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(root)
    steps = len(torch.load(layout.packed, weights_only=True)["train_y"]) // 2  # one epoch
    full = Layout.at(shutil.copytree(root, tmp_path / "full"))  # the same run, not killed,
    run_stage("train", load_params(full.params), full)  # here (no second process start-up)
    proc = subprocess.Popen([sys.executable, "-m", "visionflow.stages.train"], cwd=root,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def mid_epoch() -> bool:
        step, mid = _checkpoint_step(layout)
        return mid and step >= 3

    kill_when(proc, mid_epoch, "mid-epoch checkpoint")
    step, mid = _checkpoint_step(layout)  # the last one written before the kill
    assert mid and 3 <= step < steps and not layout.model.exists()
    resumed = run([sys.executable, "-m", "visionflow.stages.train"], root, env=env)
    assert f"after epoch 0, step {step}" in resumed.stdout
    head, *rows = [r.split(",") for r in layout.history.read_text().splitlines()]
    images = [float(v["img_per_s"]) * float(v["seconds"])
              for v in (dict(zip(head, row, strict=True)) for row in rows)]
    assert [round(i) for i in images] == [(steps - step) * 2, steps * 2]  # after the kill
    weights = [torch.load(x.model, weights_only=True)["state_dict"] for x in (layout, full)]
    for k, v in weights[0].items():  # the same samples and crops as without the kill
        assert torch.allclose(v.float(), weights[1][k].float(), atol=1e-5), k


def test_corrupt_shard_stops_training_with_one_line(tmp_path: Path, packed: Path):
    root = Path(shutil.copytree(packed, tmp_path / "proj"))
    layout = Layout.at(root)
    env = _env(root)
    shard = sorted(layout.split_shards("train").glob("chunk-*.bin"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 4:] = bytes(len(data) - len(data) // 4)
    shard.write_bytes(bytes(data))
    proc = run([sys.executable, "-m", "visionflow.stages.train"], root, check=False, env=env)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "corrupt shard" in ln]
    assert len(lines) == 1 and str(shard) in lines[0] and "'train'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not layout.model.exists()
