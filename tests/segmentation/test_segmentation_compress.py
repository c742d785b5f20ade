"""The compress stage on a segmentation model (#19): a trained width-8 U-Net on the generated
shapes set; int8 (ORT QDQ, any input size) and structured pruning (+ fine-tune, + int8) are
built, scored by mIoU on the test pairs at their own sizes, and the choice respects
`compress.max_miou_drop`, measured: the int8 model's mIoU drop is re-measured here from
its file, independently of the stage's numbers."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from segmentation_builders import SPLITS, segmentation_project, shapes_and_model, tensors

from visionflow.core.configfile import load_params
from visionflow.data.segmentation_layout import scan_segmentation
from visionflow.model.segmentation import load_segmenter
from visionflow.model.segmentation_metrics import SegmentationMeter
from visionflow.stages import compress

BUDGET = 1.5  # mIoU points (top-1 budget stays 1.0: the stage must read this one)
SEARCH = {
    "compress.methods": ["int8", "structured"],
    "compress.max_miou_drop": BUDGET,
    "compress.objective": "size",
    "compress.structured_ratios": [0.25],
    "compress.finetune_epochs": 3,
    "compress.finetune_lr": 0.003,
    "compress.finetune_batch_size": 16,
    "compress.calibration_images": 64,
    "compress.latency_batches": [1, 4],
    "compress.latency_reps": 3,
    "compress.latency_reps_large": 2,
    "compress.latency_warmup": 1,
    "compress.threads": 1,
    "compress.stop_at_first_miss": False,
}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    base = tmp_path_factory.mktemp("segmodel")
    layout = segmentation_project(base, tmp_path_factory.mktemp("segcompress") / "proj")
    params = load_params(layout.params, SEARCH)
    threads, cwd = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(1)
    os.chdir(layout.root)  # as dvc and the flow run it
    try:
        report = compress.run(params, layout)
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)
    return layout, report


def _miou(session: ort.InferenceSession | torch.nn.Module, pairs, k: int) -> float:
    meter = SegmentationMeter(k)
    for image, mask in pairs:
        x = image[None].float().div(255)
        if isinstance(session, ort.InferenceSession):
            logits = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        else:
            with torch.inference_mode():
                logits = session(x)
        assert logits.shape[-2:] == mask.shape  # at the image's own size
        meter.update(logits, mask[None])
    return meter.compute().miou


def test_int8_segmenter_within_the_miou_budget_measured(compressed, tmp_path_factory):
    layout, report = compressed
    assert report["task"] == "segmentation" and report["max_miou_drop"] == BUDGET
    int8 = report["variants"]["int8"]
    assert int8["deployable"] and int8["file"] == "model_int8.onnx"
    assert int8["size_ratio"] < 0.45, int8  # int8 weights: about a quarter, plus the graph
    # measured again here, from the files, on the test pairs at their own sizes
    data, _ = shapes_and_model(tmp_path_factory.getbasetemp())
    scan = scan_segmentation(data, **SPLITS)
    test = [tensors(data, p) for p in scan.pairs if p.split == "test"]
    model, arch = load_segmenter(layout.model)
    fp32 = _miou(model, test, arch.num_classes)
    q = ort.InferenceSession(str(layout.compress_models / "model_int8.onnx"),
                             providers=["CPUExecutionProvider"])
    drop = 100 * (fp32 - _miou(q, test, arch.num_classes))
    assert fp32 > 0.6, fp32  # a model worth compressing
    assert drop <= BUDGET, (drop, int8)
    assert int8["miou_drop_points"] == pytest.approx(drop, abs=1e-3)
    assert report["original"]["miou"] == pytest.approx(fp32, abs=1e-6)


def test_structured_pruning_and_the_choice(compressed):
    layout, report = compressed
    variants = report["variants"]
    pruned = variants["structured25"]
    assert pruned["mac_ratio"] < 0.75 and pruned["reload_ok"] and pruned["onnx_ok"], pruned
    assert pruned["finetune"], pruned  # fine-tuned after the pruning step
    sel = report["selected"]
    assert sel is not None, report["selected_reason"]
    assert sel["miou_drop_points"] <= BUDGET + 1e-9
    fits = [v for v in variants.values()
            if v["candidate"] and v["deployable"] and v["miou_drop_points"] <= BUDGET + 1e-9]
    assert sel["size_bytes"] == min(v["size_bytes"] for v in fits)
    for name, v in variants.items():  # a pruned file reloads and answers at any size
        if name.startswith("structured") and v["deployable"]:
            s = ort.InferenceSession(str(layout.compress_models / v["file"]),
                                     providers=["CPUExecutionProvider"])
            out = s.run(None, {"images": np.random.rand(1, 3, 23, 45).astype(np.float32)})
            assert out[0].shape == (1, 5, 23, 45)


def test_pareto_table_reports_miou(compressed):
    layout, report = compressed
    with layout.pareto_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert {"miou", "miou_drop_points", "pixel_accuracy"} <= set(rows[0])
    assert "top1" not in rows[0]
    by_name = {r["name"]: r for r in rows}
    assert float(by_name["int8"]["miou"]) == pytest.approx(
        report["variants"]["int8"]["miou"], abs=1e-6)
    assert by_name[report["selected"]["name"]]["selected"] == "True"
    # ORT's failed symbolic shape inference leaves files in the working directory
    assert not [p.name for p in layout.root.iterdir() if p.suffix in (".onnx", ".data")]
    saved = json.loads(layout.compress_report.read_text())
    assert saved["pareto"][0]["miou"] == report["original"]["miou"]
    assert layout.pareto_png.stat().st_size > 1000


def test_the_pairs_adapter(compressed):
    from visionflow.core.errors import DataError
    from visionflow.data.segmentation_feed import segmentation_pairs

    layout, report = compressed
    params = load_params(layout.params)
    pairs = list(segmentation_pairs(params, layout, "test"))
    assert len(pairs) == report["original"]["n"] > 0
    image, mask = pairs[0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert mask.dtype == torch.int64 and mask.shape == image.shape[1:]
    with pytest.raises(DataError, match="segmentation split 'holdout': choose one of"):
        next(segmentation_pairs(params, layout, "holdout"))


def test_register_compact_registers_the_segmentation_choice(compressed):
    """register's `register_compact` with a segmentation report: the chosen ONNX variant
    becomes the `compact` version (task tag, mIoU budget and card), serving masks."""
    import base64
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    from visionflow.mlops import registry, tracking
    from visionflow.mlops.compact import register_compact
    from visionflow.mlops.publish_segmentation import log_segmenter_pyfunc, tag_task

    layout, report = compressed
    params = load_params(layout.params, SEARCH)
    name = params.register_.model_name
    tracking.setup(layout)
    with mlflow.start_run():
        parent = str(log_segmenter_pyfunc(layout.model, name, params).registered_model_version)
    client = registry.client_for(layout)
    tag_task(client, name, parent, "segmentation")
    client.set_registered_model_alias(name, params.register_.alias, parent)
    out = register_compact(params, layout, parent)
    assert out is not None and out["alias"] == "compact", out
    assert out["variant"] == report["selected"]["name"]
    mv = client.get_model_version(name, out["version"])
    assert mv.tags["task"] == "segmentation" and mv.tags["compact_max_miou_drop"] == "1.5"
    assert "within 1.5 mIoU point(s)" in mv.description and "| mIoU |" in mv.description
    image = next(iter((layout.root / "data/images").glob("*.png")))
    answer = mlflow.pyfunc.load_model(f"models:/{name}@compact").predict(
        pd.DataFrame({"image": [image.read_bytes()]}))
    mask = Image.open(io.BytesIO(base64.b64decode(answer["mask"][0])))
    assert mask.mode == "P" and mask.size == Image.open(image).size


def test_a_pruned_segmenters_fine_tune_ends_with_batchnorm_set_from_train_images(tmp_path):
    """After a pruning step's short fine-tune, BatchNorm's statistics are those of the
    calibration images with the fine-tuned weights (precise BN), not a slow running average
    (torchvision MobileNetV3's momentum 0.01) that a few steps barely move."""
    from visionflow.compression.segmentation import SegContext
    from visionflow.core.config import CompressConfig
    from visionflow.model.segmentation import SegArch
    from visionflow.model.segmentation_augment import JointPolicy, joint_augment

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1),
                                torch.nn.BatchNorm2d(3, momentum=0.01))
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    cfg = CompressConfig(finetune_epochs=1, finetune_batch_size=8, calibration_images=16)
    ctx = SegContext(model, SegArch("unet", 3), list, images, torch.randint(0, 3, (16, 16, 16)),
                     cfg, 0, torch.device("cpu"), tmp_path)
    ctx.recover(model, seed=0)
    gen, policy = torch.Generator().manual_seed(0), JointPolicy(out_size=(16, 16),
                                                                scale=(0.5, 1.2), hflip=0.5)
    pick = ctx.calibration_index()
    with torch.no_grad():  # what it read: the calibration pairs, augmented as in the fine-tune
        seen = torch.cat([model[0](joint_augment(x, y, policy, gen)[0]) for x, y in zip(
            images[pick].split(8), ctx.train_masks[pick].split(8), strict=True)])
    assert torch.allclose(model[1].running_mean, seen.mean(dim=(0, 2, 3)), atol=1e-5)
