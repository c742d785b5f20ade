"""Evaluate for `task: segmentation`: the trained segmenter on the test pairs, each at its
own size (torchmetrics' pixel confusion matrix, ignore 255), read one at a time through
`data.segmentation_feed` (tensors or shards).

The same files as classification's evaluate, with pixel meanings:

- `metrics.json`: `miou`, `pixel_accuracy`, `mean_dice` (= pixel F1, macro), `ece` (pixel
  calibration), per-class `iou` and `dice`, `test_images`;
- `predictions.csv`: one row per test image: image, mask, its IoU (mIoU over the classes
  in its labels or prediction: the unit of the gate's paired test);
- `confusion.csv` (actual, predicted, pixels), `confusion.png`, `confusion_normalized.png`;
- `per_class.csv` / `per_class.png`: per-class IoU and Dice bars;
- `reliability.csv` / `reliability.png`: the pixel reliability diagram;
- `mistakes.png`: overlays of the worst test images (true and predicted masks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import torch

from visionflow.core.config import Params
from visionflow.core.files import write_csv, write_json
from visionflow.core.layout import Layout
from visionflow.data.segmentation_feed import segmentation_pack, segmentation_pairs
from visionflow.mlops import tracking
from visionflow.mlops.datasets import log_test_dataset
from visionflow.model.inference import pick_device
from visionflow.model.plots import plot_confusion, plot_reliability
from visionflow.model.segmentation import load_segmenter
from visionflow.model.segmentation_metrics import (
    PixelCalibration,
    SegmentationMeter,
    per_image_iou,
)
from visionflow.model.segmentation_plots import plot_iou_bars, plot_worst

HEADLINE = ("miou", "pixel_accuracy", "mean_dice", "ece")


@torch.no_grad()
def run(params: Params, layout: Layout) -> dict[str, Any]:
    device = pick_device(params.train.device)
    model, arch = load_segmenter(layout.model, device)
    cache = segmentation_pack(layout)
    classes, k = arch.classes, arch.num_classes
    meter, calib = SegmentationMeter(k), PixelCalibration(params.evaluate.calibration_bins)
    per_image: list[float] = []
    for x, y in segmentation_pairs(params, layout, "test", pack=cache):
        logits = model(x[None].to(device).float().div_(255))
        target = y[None].to(device)
        meter.update(logits, target)
        calib.update(logits, target)
        per_image.append(float(per_image_iou(logits, target, k)[0]))
    scores = meter.compute()
    metrics = {**scores.as_dict(classes), "ece": calib.ece(), "test_images": len(per_image)}
    write_json(layout.metrics, metrics)

    paths, masks = cache["test_paths"], cache["test_mask_paths"]
    write_csv(layout.predictions, ([p, m, f"{v:.6f}"] for p, m, v in
                                   zip(paths, masks, per_image, strict=True)),
              header=["path", "mask", "iou"])
    cm = scores.confusion.tolist()
    write_csv(layout.confusion_csv, ([classes[t], classes[p], cm[t][p]] for t in range(k)
                                     for p in range(k) if cm[t][p]),
              header=["actual", "predicted", "pixels"])
    plot_confusion(layout.confusion_png, cm, classes)
    plot_confusion(layout.confusion_norm_png, cm, classes, normalize=True)
    bins = calib.rows()
    write_csv(layout.reliability_csv, bins)
    plot_reliability(layout.reliability_png, bins, metrics["ece"])
    support = scores.confusion.sum(1).tolist()
    rows = [{"class": c, "iou": metrics["iou"][c], "dice": metrics["dice"][c],
             "f1": metrics["dice"][c], "pixels": support[i]} for i, c in enumerate(classes)]
    write_csv(layout.per_class_csv, rows)
    plot_iou_bars(layout.per_class_png, rows, scores.miou)
    worst = sorted(range(len(per_image)), key=lambda i: (per_image[i] != per_image[i],
                                                          per_image[i]))
    shown = {i: rank for rank, i in enumerate(worst[:params.segmentation.worst_images])}
    items: list[Any] = [None] * len(shown)
    last = max(shown, default=-1) + 1  # a second pass, up to the last pair shown: only
    for i, (x, y) in enumerate(segmentation_pairs(params, layout, "test", last, cache)):
        if i in shown:  # the shown pairs are held
            pred = model(x[None].to(device).float().div_(255)).argmax(1)[0]
            items[shown[i]] = (x, y, pred.cpu(), per_image[i], str(paths[i]))
    plot_worst(layout.mistakes_png, items)

    with tracking.stage_run(layout):
        mlflow.log_metrics({f"test/{m}": float(metrics[m]) for m in HEADLINE},
                           dataset=log_test_dataset(params, layout))
        for f in artifact_files(layout):
            mlflow.log_artifact(str(f), "evaluate")
    print(f"test mIoU {scores.miou:.4f}, pixel accuracy {scores.pixel_accuracy:.4f}, "
          f"mean Dice {scores.mean_dice:.4f} on {len(per_image)} images", flush=True)
    return metrics


def artifact_files(layout: Layout) -> list[Path]:
    return [layout.metrics, layout.predictions, layout.confusion_csv, layout.confusion_png,
            layout.confusion_norm_png, layout.reliability_csv, layout.reliability_png,
            layout.per_class_csv, layout.per_class_png, layout.mistakes_png]
