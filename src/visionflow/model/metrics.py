"""Scoring with torchmetrics: the one function every compared number comes from.

`score_logits` gives top-k, F1 (macro, micro, weighted), precision, recall, per-class and
mean IoU, ECE and the confusion matrix; evaluate, compress and register all call it, on
the same split, so their numbers line up.
"""

from __future__ import annotations

from typing import Any

import torch

PER_CLASS = ("precision", "recall", "f1", "iou")


def capped_topk(topk: list[int], num_classes: int) -> list[int]:
    """The k values to report: 1 and each requested k, capped at the class count."""
    return sorted({min(k, num_classes) for k in {1, *topk}})


def score_logits(logits: torch.Tensor, target: torch.Tensor, classes: list[str],
                 topk: list[int], calibration_bins: int = 15) -> dict[str, Any]:
    """Every test metric, from torchmetrics.

    Scalars (floats): `top{k}` for k in `capped_topk`, `f1_macro`, `f1_micro`, `f1_weighted`,
    `precision_macro`, `recall_macro`, `miou`, `ece`. Also `n` (int), per-class dicts
    `precision`, `recall`, `f1`, `iou` (None where undefined: recall of a class with no test
    image, precision of one never predicted, F1 and IoU of one neither) and `support`, and
    `confusion` (rows = actual). `miou` and the macro averages skip the classes neither in
    the test set nor predicted, as segmentation's mIoU does.
    """
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_calibration_error,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_jaccard_index,
        multiclass_precision,
        multiclass_recall,
    )

    n = len(classes)
    logits = logits.float()
    probs = logits.softmax(1)  # explicit: torchmetrics guesses "logits or probs" per batch
    out: dict[str, Any] = {"n": int(len(target))}
    for k in capped_topk(topk, n):
        out[f"top{k}"] = float(multiclass_accuracy(probs, target, n, average="micro", top_k=k))
    for avg in ("macro", "micro", "weighted"):
        out[f"f1_{avg}"] = float(multiclass_f1_score(probs, target, n, average=avg))
    out["precision_macro"] = float(multiclass_precision(probs, target, n, average="macro"))
    out["recall_macro"] = float(multiclass_recall(probs, target, n, average="macro"))
    # macro: over the classes that occur in the test set or are predicted, as the F1 above
    out["miou"] = float(multiclass_jaccard_index(probs, target, n, average="macro"))
    out["ece"] = float(multiclass_calibration_error(probs, target, n, n_bins=calibration_bins,
                                                    norm="l1"))
    confusion = multiclass_confusion_matrix(probs, target, n)
    support, predicted = confusion.sum(1), confusion.sum(0)
    defined = {"precision": predicted > 0, "recall": support > 0,
               "f1": support + predicted > 0, "iou": support + predicted > 0}
    per = {
        "precision": multiclass_precision(probs, target, n, average="none"),
        "recall": multiclass_recall(probs, target, n, average="none"),
        "f1": multiclass_f1_score(probs, target, n, average="none"),
        "iou": multiclass_jaccard_index(probs, target, n, average="none"),
    }
    for name, values in per.items():  # None where the score divides by zero (no such images)
        out[name] = {c: float(v) if ok else None
                     for c, v, ok in zip(classes, values, defined[name], strict=True)}
    out["support"] = {c: int(v) for c, v in zip(classes, support, strict=True)}
    out["confusion"] = confusion.tolist()
    return out


def headline(scores: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics (what goes to MLflow and DVC metrics)."""
    return {k: v for k, v in scores.items() if isinstance(v, float)}


def metrics_json(scores: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """The stable `metrics.json` layout (the DVC metric): headline scalars, `n_test` and
    `iou_per_class` (the per-class IoU the spine asks of it). Each class's precision, recall,
    F1, IoU and support are `per_class.csv`, the DVC plot: here they would be five columns of
    `dvc metrics show` a class (5,000 at 1,000 classes)."""
    return {**headline(scores), "n_test": scores["n"],
            "iou_per_class": {c: scores["iou"][c] for c in classes}}


def reliability_bins(probs: torch.Tensor, target: torch.Tensor,
                     n_bins: int = 15) -> list[dict[str, float]]:
    """Equal-width confidence bins (torchmetrics' binning): the reliability diagram's data.

    ECE = sum(count / N * |accuracy - confidence|) over the bins.
    """
    conf, pred = probs.max(1)
    correct = (pred == target).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = idx == b
        count = int(m.sum())
        rows.append({
            "bin": b, "lower": round(float(edges[b]), 6), "upper": round(float(edges[b + 1]), 6),
            "confidence": float(conf[m].mean()) if count else 0.0,
            "accuracy": float(correct[m].mean()) if count else 0.0,
            "count": count,
        })
    return rows


def confident_mistakes(target: torch.Tensor, pred: torch.Tensor, conf: torch.Tensor,
                       limit: int) -> list[int]:
    """Indices of wrong predictions, most confident first (ties: lower index first)."""
    wrong = (pred != target).nonzero().flatten()
    if limit <= 0 or len(wrong) == 0:
        return []
    order = sorted(wrong.tolist(), key=lambda i: (-float(conf[i]), i))
    return order[:limit]
