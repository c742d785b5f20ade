"""Segmentation metrics: the pixel confusion matrix (torchmetrics) and what follows from it.

Rows are true classes, columns predicted ones; pixels labelled IGNORE_INDEX (255) count
nowhere. Per class c: IoU = TP / (TP + FP + FN), Dice (= pixel F1) = 2 TP / (2 TP + FP + FN),
NaN for a class absent from both the labels and the predictions. mIoU and mean Dice average
the classes that are not NaN; pixel accuracy = trace / total. `per_image_iou` gives each
image's mIoU (the classes in its labels or predictions), the unit of the gate's paired test.
The matrix is K x K whatever the data size, so evaluation streams batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from visionflow.model.segmentation import IGNORE_INDEX


def _labels(preds: Tensor) -> Tensor:
    """N x K x H x W logits -> N x H x W indices; indices pass through."""
    return preds.argmax(1) if preds.ndim == 4 else preds


@dataclass(frozen=True)
class SegmentationScores:
    confusion: Tensor  # K x K, int64, rows = truth
    iou: Tensor  # K, NaN where the class never occurs
    dice: Tensor  # K
    miou: float
    mean_dice: float
    pixel_accuracy: float

    def as_dict(self, classes: list[str] | None = None) -> dict:
        names = classes or [str(i) for i in range(len(self.iou))]
        return {"miou": self.miou, "mean_dice": self.mean_dice,
                "pixel_accuracy": self.pixel_accuracy,
                "iou": {n: _num(v) for n, v in zip(names, self.iou.tolist(), strict=True)},
                "dice": {n: _num(v) for n, v in zip(names, self.dice.tolist(), strict=True)}}


def _num(v: float) -> float | None:
    return None if v != v else v  # NaN -> None (JSON)


def scores_from_confusion(confusion: Tensor) -> SegmentationScores:
    cm = confusion.to(torch.float64)
    tp = cm.diagonal()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    union = tp + fp + fn
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    dice = torch.where(union > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), nan)
    total = cm.sum()
    return SegmentationScores(
        confusion=confusion.to(torch.int64).cpu(), iou=iou.cpu(), dice=dice.cpu(),
        miou=float(iou.nanmean()) if (union > 0).any() else float("nan"),
        mean_dice=float(dice.nanmean()) if (union > 0).any() else float("nan"),
        pixel_accuracy=float(tp.sum() / total) if total > 0 else float("nan"))


def commonest_class_miou(confusion: Tensor) -> float:
    """The mIoU of predicting the commonest true class at every pixel (what a model that
    learnt nothing scores): that class's share of the pixels, over the classes present."""
    truth = confusion.to(torch.float64).sum(1)
    present = int((truth > 0).sum())
    return float(truth.max() / truth.sum()) / present if present else float("nan")


class SegmentationMeter:
    """Accumulates the pixel confusion matrix over batches (on the batches' device), in this
    process only: under DDP rank 0 alone evaluates, so it must not wait for the others."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        # imported here: torchmetrics takes a second or more to import, and every classifier's
        # train stage imports this module through the task table
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.num_classes = num_classes
        self.matrix = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index,
                                                validate_args=False, sync_on_compute=False)

    def update(self, preds: Tensor, target: Tensor) -> None:
        """`preds`: N x K x H x W logits or N x H x W indices; `target`: N x H x W."""
        self.matrix = self.matrix.to(target.device)
        self.matrix.update(_labels(preds), target)

    def compute(self) -> SegmentationScores:
        return scores_from_confusion(self.matrix.compute())


def per_image_iou(preds: Tensor, target: Tensor, num_classes: int,
                  ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Each image's mIoU over the classes in its labels or its predictions (float64, N;
    NaN for an image whose pixels are all ignored)."""
    labels = _labels(preds).reshape(len(target), -1).long()
    truth = target.reshape(len(target), -1).long()
    valid = truth != ignore_index
    n, k = len(truth), num_classes
    image = torch.arange(n, device=truth.device).unsqueeze(1).expand_as(truth)
    code = (image * k + truth.clamp(0, k - 1)) * k + labels.clamp(0, k - 1)
    cm = torch.bincount(code[valid], minlength=n * k * k).reshape(n, k, k).to(torch.float64)
    tp = cm.diagonal(dim1=1, dim2=2)
    union = cm.sum(1) + cm.sum(2) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.nan)
    return iou.nanmean(dim=1)


class PixelCalibration:
    """Reliability bins over pixels, streamed (K bins of counts, whatever the data size):
    the same rows as `model.metrics.reliability_bins`, and the pixel ECE."""

    def __init__(self, n_bins: int = 15, ignore_index: int = IGNORE_INDEX) -> None:
        self.n_bins, self.ignore_index = n_bins, ignore_index
        self.count = torch.zeros(n_bins, dtype=torch.float64)
        self.conf = torch.zeros(n_bins, dtype=torch.float64)
        self.correct = torch.zeros(n_bins, dtype=torch.float64)

    def update(self, logits: Tensor, target: Tensor) -> None:
        conf, pred = logits.softmax(1).max(1)
        keep = target != self.ignore_index
        conf, hit = conf[keep].double().cpu(), (pred[keep] == target[keep]).double().cpu()
        idx = (conf * self.n_bins).long().clamp(0, self.n_bins - 1)
        self.count += torch.bincount(idx, minlength=self.n_bins).double()
        self.conf += torch.bincount(idx, conf, minlength=self.n_bins)
        self.correct += torch.bincount(idx, hit, minlength=self.n_bins)

    def rows(self) -> list[dict[str, float]]:
        out = []
        for b in range(self.n_bins):
            n = float(self.count[b])
            out.append({"bin": b, "lower": round(b / self.n_bins, 6),
                        "upper": round((b + 1) / self.n_bins, 6),
                        "confidence": float(self.conf[b]) / n if n else 0.0,
                        "accuracy": float(self.correct[b]) / n if n else 0.0, "count": int(n)})
        return out

    def ece(self) -> float:
        total = float(self.count.sum()) or 1.0
        return sum(r["count"] / total * abs(r["accuracy"] - r["confidence"])
                   for r in self.rows())
