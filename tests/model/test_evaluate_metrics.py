"""Evaluation metrics against hand-computed values on a small crafted confusion.

Three classes a, b, c; ten test images. Rows = actual, columns = predicted:

        a  b  c
    a   3  1  0
    b   0  2  1
    c   2  0  1

per class  TP FP FN  precision recall  F1    IoU
    a       3  2  1    3/5     3/4    2/3   3/6
    b       2  1  1    2/3     2/3    2/3   2/4
    c       1  1  2    1/2     1/3    2/5   1/4

The probabilities are chosen so that the true class is second for three of the four
mistakes (top-2 = 9/10) and the confidences fall in three bins of width 0.1:
four right at 0.95 (gap 0.05), two right + two wrong at 0.65 (accuracy 0.5, gap 0.15),
two wrong at 0.45 (gap 0.45): ECE = (4*0.05 + 4*0.15 + 2*0.45) / 10 = 0.17.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from visionflow.mlops.gate import mcnemar_exact
from visionflow.model.inference import model_logits
from visionflow.model.metrics import (
    capped_topk,
    confident_mistakes,
    metrics_json,
    reliability_bins,
    score_logits,
)

CLASSES = ["a", "b", "c"]
A, B, C = 0, 1, 2
SECOND = {0.95: 0.04, 0.65: 0.25, 0.45: 0.35}
# (actual, predicted, second choice, confidence)
SAMPLES = [
    (A, A, B, 0.95), (A, A, B, 0.95), (A, A, C, 0.65), (A, B, A, 0.65),
    (B, B, A, 0.95), (B, B, C, 0.95), (B, C, B, 0.45),
    (C, C, A, 0.65), (C, A, C, 0.65), (C, A, B, 0.45),
]


def crafted() -> tuple[torch.Tensor, torch.Tensor]:
    probs = []
    for _, pred, second, conf in SAMPLES:
        p = [0.0, 0.0, 0.0]
        third = ({0, 1, 2} - {pred, second}).pop()
        p[pred], p[second] = conf, SECOND[conf]
        p[third] = 1.0 - conf - SECOND[conf]
        probs.append(p)
    logits = torch.tensor(probs, dtype=torch.float64).log().float()  # softmax(log p) == p
    target = torch.tensor([s[0] for s in SAMPLES])
    return logits, target


def test_metrics_match_hand_computed_values():
    logits, target = crafted()
    s = score_logits(logits, target, CLASSES, [1, 2, 5], calibration_bins=10)
    approx = pytest.approx
    assert s["n"] == 10
    assert s["confusion"] == [[3, 1, 0], [0, 2, 1], [2, 0, 1]]
    assert s["top1"] == approx(6 / 10)
    assert s["top2"] == approx(9 / 10)
    assert s["top3"] == approx(1.0)  # k=5 capped at the 3 classes
    assert "top5" not in s
    assert s["precision"] == approx({"a": 3 / 5, "b": 2 / 3, "c": 1 / 2})
    assert s["recall"] == approx({"a": 3 / 4, "b": 2 / 3, "c": 1 / 3})
    assert s["f1"] == approx({"a": 2 / 3, "b": 2 / 3, "c": 2 / 5})
    assert s["iou"] == approx({"a": 1 / 2, "b": 1 / 2, "c": 1 / 4})
    assert s["support"] == {"a": 4, "b": 3, "c": 3}
    assert s["f1_macro"] == approx((2 / 3 + 2 / 3 + 2 / 5) / 3)  # 26/45
    assert s["f1_micro"] == approx(6 / 10)
    assert s["f1_weighted"] == approx((4 * 2 / 3 + 3 * 2 / 3 + 3 * 2 / 5) / 10)  # 44/75
    assert s["precision_macro"] == approx(53 / 90)
    assert s["recall_macro"] == approx(7 / 12)
    assert s["miou"] == approx(5 / 12)
    assert s["ece"] == approx(0.17, abs=1e-6)


def test_a_class_with_no_test_images_is_undefined_not_zero():
    """Classes d (never in the test set, never predicted) and e (never in the test set, once
    predicted for an `a`): d's scores are undefined (None), not 0; e's precision, F1 and IoU
    are 0, its recall undefined; mIoU and the macro averages skip d, as they skip it in
    segmentation, instead of counting a 0 for it."""
    logits, target = crafted()
    e_logits = torch.full((len(target), 2), -30.0)
    logits = torch.cat([logits, e_logits], 1)
    logits[1, 4] = 10.0  # sample 1 (an `a`, was right) now predicted `e`
    classes = [*CLASSES, "d", "e"]
    s = score_logits(logits, target, classes, [1], calibration_bins=10)
    approx = pytest.approx
    assert s["support"] == {"a": 4, "b": 3, "c": 3, "d": 0, "e": 0}
    assert s["iou"] == approx({"a": 2 / 6, "b": 1 / 2, "c": 1 / 4, "d": None, "e": 0.0})
    assert s["precision"]["d"] is None and s["precision"]["e"] == 0.0
    assert s["recall"]["d"] is None and s["recall"]["e"] is None
    assert s["f1"]["d"] is None and s["f1"]["e"] == 0.0
    assert s["miou"] == approx((2 / 6 + 1 / 2 + 1 / 4 + 0.0) / 4)
    assert s["f1_macro"] == approx((1 / 2 + 2 / 3 + 2 / 5 + 0.0) / 4)  # torchmetrics skips d
    m = metrics_json(s, classes)
    assert m["iou_per_class"]["d"] is None and m["miou"] == approx(13 / 48)


def test_reliability_bins_are_the_ece_bins():
    logits, target = crafted()
    bins = reliability_bins(logits.softmax(1), target, n_bins=10)
    filled = {b["bin"]: b for b in bins if b["count"]}
    assert {k: v["count"] for k, v in filled.items()} == {4: 2, 6: 4, 9: 4}
    assert filled[9]["accuracy"] == 1.0 and filled[6]["accuracy"] == 0.5
    assert filled[4]["accuracy"] == 0.0
    assert filled[6]["confidence"] == pytest.approx(0.65)
    ece = sum(b["count"] / 10 * abs(b["accuracy"] - b["confidence"]) for b in bins)
    assert ece == pytest.approx(score_logits(logits, target, CLASSES, [1], 10)["ece"], abs=1e-6)


def test_metrics_json_keys_are_stable():
    logits, target = crafted()
    m = metrics_json(score_logits(logits, target, CLASSES, [1, 3, 5]), CLASSES)
    # one column per class in `dvc metrics show` (its IoU); the rest of a class is per_class.csv
    assert list(m) == ["top1", "top3", "f1_macro", "f1_micro", "f1_weighted", "precision_macro",
                       "recall_macro", "miou", "ece", "n_test", "iou_per_class"]
    assert list(m["iou_per_class"]) == CLASSES and m["iou_per_class"]["c"] == pytest.approx(0.25)


def test_capped_topk():
    assert capped_topk([1, 3, 5], 10) == [1, 3, 5]
    assert capped_topk([3, 5], 3) == [1, 3]
    assert capped_topk([5], 2) == [1, 2]


def test_confident_mistakes_order():
    logits, target = crafted()
    conf, pred = logits.softmax(1).max(1)
    assert confident_mistakes(target, pred, conf, 16) == [3, 8, 6, 9]
    assert confident_mistakes(target, pred, conf, 1) == [3]
    assert confident_mistakes(target, target, conf, 16) == []


class _LeftRight(nn.Module):
    """Two classes: mean brightness of the left half vs of the right half (x 10)."""

    def forward(self, x):
        w = x.shape[-1] // 2
        return torch.stack([x[..., :w].mean((1, 2, 3)), x[..., w:].mean((1, 2, 3))], 1) * 10


def test_flip_tta_averages_the_mirror():
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    x[0, :, :, :2] = 255  # bright left half
    x[1, :, :, 3] = 255
    model = _LeftRight()
    plain = model_logits(model, x)
    tta = model_logits(model, x, tta=True)
    mirrored = model_logits(model, x.flip(-1))
    expected = (plain.softmax(1) + mirrored.softmax(1)) / 2
    assert torch.allclose(tta.softmax(1), expected, atol=1e-6)
    # a left/right detector averaged with its mirror cannot tell the halves apart
    assert torch.allclose(tta.softmax(1), torch.full((2, 2), 0.5), atol=1e-6)
    assert plain.argmax(1).tolist() == [0, 1]


@pytest.mark.parametrize(("b", "c"), [(0, 0), (5, 0), (6, 0), (3, 1), (10, 4), (40, 22)])
def test_mcnemar_exact_matches_binomial_test(b, c):
    n = b + c
    expected = 1.0 if n == 0 else min(
        1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)
    assert mcnemar_exact(b, c) == pytest.approx(expected)
    assert mcnemar_exact(b, c) == mcnemar_exact(c, b)
    if n:
        from scipy.stats import binomtest

        assert mcnemar_exact(b, c) == pytest.approx(binomtest(b, n, 0.5).pvalue)
    assert mcnemar_exact(5, 0) == pytest.approx(1 / 16)
