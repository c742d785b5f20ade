"""Stage 4, evaluate: score the trained model on the test split with torchmetrics.

Scoring is `model.metrics.score_logits` and prediction `model.inference.model_logits`:
compress and register call the same two, so every number compared anywhere in the pipeline
comes from the same code on the same split.

Files written to `outputs/evaluate/` (the names are stable, so `dvc metrics diff` and
`dvc plots diff` between commits line up):

- `metrics.json`: top-1/top-k, F1 (macro, micro, weighted), mean IoU, ECE, and per class
  precision, recall, F1, IoU and support;
- `predictions.csv`: one row per test image;
- `confusion.csv` (long form, DVC confusion templates), `confusion.png`,
  `confusion_normalized.png` (rows sum to 1);
- `reliability.csv`, `reliability.png`: the reliability diagram behind the ECE;
- `per_class.csv`, `per_class.png`: per-class bars;
- `mistakes.png`: the most confident mistakes, with true and predicted labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import torch

from visionflow.core.config import Params
from visionflow.core.files import write_csv, write_json
from visionflow.core.layout import Layout
from visionflow.data.feed import with_images
from visionflow.data.packed import load_packed
from visionflow.mlops import tracking
from visionflow.mlops.datasets import log_test_dataset
from visionflow.model.classifier import load_classifier
from visionflow.model.inference import model_logits, pick_device
from visionflow.model.metrics import (
    PER_CLASS,
    confident_mistakes,
    headline,
    metrics_json,
    reliability_bins,
    score_logits,
)
from visionflow.model.plots import plot_confusion, plot_mistakes, plot_per_class, plot_reliability
from visionflow.stages import main
from visionflow.tasks.segmentation import evaluate as segmentation

# task -> its own run (params.task; classification is this module's `run`)
TASKS = {"segmentation": segmentation.run}


def run(params: Params, layout: Layout) -> dict[str, Any]:
    if params.task in TASKS:
        return TASKS[params.task](params, layout)
    cfg = params.evaluate
    device = pick_device(params.train.device)
    model, arch = load_classifier(layout.model, device)
    cache = with_images(layout, load_packed(layout.packed), ("test",),
                        params.data.shard_cache_bytes, cfg.batch_size)
    # (shards: decoded through resize + centre crop)
    logits = model_logits(model, cache["test_x"], cfg.batch_size, device, cfg.tta,
                          arch.temperature)
    target = cache["test_y"]
    classes = arch.classes
    scores = score_logits(logits, target, classes, cfg.topk, cfg.calibration_bins)

    metrics = metrics_json(scores, classes)
    if cfg.tta:
        plain = model_logits(model, cache["test_x"], cfg.batch_size, device, tta=False)
        metrics["top1_no_tta"] = float((plain.argmax(1) == target).float().mean())
    write_json(layout.metrics, metrics)

    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    write_csv(layout.predictions,
              ([p, classes[t], classes[y], f"{c:.4f}"] for p, t, y, c in
               zip(cache["test_paths"], target.tolist(), pred.tolist(), conf.tolist(),
                   strict=True)),
              header=["path", "actual", "predicted", "confidence"])
    # long form (one row per test image), as DVC's confusion template expects
    write_csv(layout.confusion_csv,
              ([classes[t], classes[y]] for t, y in zip(target.tolist(), pred.tolist(),
                                                         strict=True)),
              header=["actual", "predicted"])
    plot_confusion(layout.confusion_png, scores["confusion"], classes)
    plot_confusion(layout.confusion_norm_png, scores["confusion"], classes, normalize=True)
    bins = reliability_bins(probs, target, cfg.calibration_bins)
    write_csv(layout.reliability_csv, bins)
    plot_reliability(layout.reliability_png, bins, scores["ece"])
    per_rows = [{"class": c, **{m: _rounded(scores[m][c]) for m in PER_CLASS},
                 "support": scores["support"][c]} for c in classes]
    write_csv(layout.per_class_csv, per_rows)
    plot_per_class(layout.per_class_png, per_rows)
    images = cache["test_x"]
    if not isinstance(images, torch.Tensor):  # shards: read only the mistakes it shows
        shown = confident_mistakes(target, pred, conf, cfg.mistakes)
        images = dict(zip(shown, images.gather(shown), strict=True))
    plot_mistakes(layout.mistakes_png, images, target, pred, conf, classes,
                  cache.get("test_paths"), cfg.mistakes)

    with tracking.stage_run(layout):  # `test/*` sort after the learning curves (`curves/*`)
        mlflow.log_metrics({f"test/{k}": v for k, v in headline(scores).items()},
                           dataset=log_test_dataset(params, layout))
        for f in artifact_files(layout):
            mlflow.log_artifact(str(f), "evaluate")
    return metrics


def artifact_files(layout: Layout) -> list[Path]:
    return [layout.metrics, layout.predictions, layout.confusion_csv, layout.confusion_png,
            layout.confusion_norm_png, layout.reliability_csv, layout.reliability_png,
            layout.per_class_csv, layout.per_class_png, layout.mistakes_png]


def _rounded(score: float | None) -> float | None:
    return None if score is None else round(score, 6)  # None: an empty cell


if __name__ == "__main__":
    main("evaluate", run)
