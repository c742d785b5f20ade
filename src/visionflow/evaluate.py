"""Stage 4, evaluate: score the trained model on the test split with torchmetrics.

`score_logits` is the one scoring function: compress and register call it too, so every
number compared anywhere in the pipeline comes from the same code on the same split.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from visionflow.atomic import atomic_path, write_json
from visionflow.config import Params
from visionflow.layout import Layout


def score_logits(logits: torch.Tensor, target: torch.Tensor, classes: list[str],
                 topk: list[int]) -> dict[str, Any]:
    """top-1/top-k accuracy, macro F1, per-class and mean IoU, confusion matrix."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_jaccard_index,
    )

    n = len(classes)
    out: dict[str, Any] = {"n": int(len(target))}
    for k in sorted({1, *topk}):
        if k <= n:
            out[f"top{k}"] = float(multiclass_accuracy(logits, target, n, average="micro",
                                                       top_k=k))
    out["f1_macro"] = float(multiclass_f1_score(logits, target, n, average="macro"))
    iou = multiclass_jaccard_index(logits, target, n, average="none")
    out["miou"] = float(iou.mean())
    out["iou"] = {c: float(v) for c, v in zip(classes, iou, strict=True)}
    out["confusion"] = multiclass_confusion_matrix(logits, target, n).tolist()
    return out


def headline(scores: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics (what goes to MLflow and DVC metrics)."""
    return {k: v for k, v in scores.items() if isinstance(v, float)}


def run_evaluate(params: Params, layout: Layout) -> dict[str, Any]:
    from visionflow import tracking
    from visionflow.augment import load_cache
    from visionflow.classifier import load_classifier
    from visionflow.train import pick_device, predict_logits

    device = pick_device(params.train.device)
    model, arch = load_classifier(layout.model, device)
    cache = load_cache(layout.cache)
    logits = predict_logits(model, cache["test_x"], params.evaluate.batch_size, device)
    target = cache["test_y"]
    scores = score_logits(logits, target, arch.classes, params.evaluate.topk)

    metrics = {**headline(scores), "n_test": scores["n"], "iou_per_class": scores["iou"]}
    write_json(layout.metrics, metrics)
    pred = logits.argmax(1)
    conf = logits.softmax(1).max(1).values
    _write_predictions(layout.predictions, cache["test_paths"], target, pred, conf, arch.classes)
    _write_confusion_csv(layout.confusion_csv, target, pred, arch.classes)
    plot_confusion(layout.confusion_png, scores["confusion"], arch.classes)

    with tracking.stage_run(layout):
        import mlflow

        mlflow.log_metrics({f"test_{k}": v for k, v in headline(scores).items()})
        for f in (layout.metrics, layout.confusion_png, layout.confusion_csv):
            mlflow.log_artifact(str(f), "evaluate")
    return metrics


def _write_predictions(path: Path, paths, target, pred, conf, classes) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "actual", "predicted", "confidence"])
        for p, t, y, c in zip(paths, target.tolist(), pred.tolist(), conf.tolist(), strict=True):
            w.writerow([p, classes[t], classes[y], f"{c:.4f}"])


def _write_confusion_csv(path: Path, target, pred, classes) -> None:
    """Long form (one row per test image), as DVC's confusion template expects."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        for t, y in zip(target.tolist(), pred.tolist(), strict=True):
            w.writerow([classes[t], classes[y]])


def plot_confusion(path: Path, matrix: list[list[int]], classes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(4, 0.5 * n + 2)))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if n <= 20:
        peak = max(max(r) for r in matrix) or 1
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if v > peak / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("confusion matrix (test)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
