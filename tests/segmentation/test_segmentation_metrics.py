"""Segmentation metrics (#19) against hand-computed cases, and the paired per-image IoU
test of the gate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from visionflow.mlops.paired_iou import paired_iou_test
from visionflow.model.segmentation_metrics import (
    SegmentationMeter,
    per_image_iou,
    scores_from_confusion,
)

# truth and prediction of one 2 x 4 image, 3 classes, one ignored pixel (255)
T = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 1]]])
P = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 0]]])


def test_hand_computed_case():
    meter = SegmentationMeter(3)
    meter.update(P, T)
    s = meter.compute()
    assert s.confusion.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 1]]
    assert s.iou.tolist() == pytest.approx([1 / 4, 2 / 4, 1 / 2])
    assert s.miou == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert s.dice.tolist() == pytest.approx([2 / 5, 4 / 6, 2 / 3])
    assert s.mean_dice == pytest.approx((0.4 + 4 / 6 + 2 / 3) / 3)
    assert s.pixel_accuracy == pytest.approx(4 / 7)  # the ignored pixel counts nowhere
    d = s.as_dict(["bg", "a", "b"])
    assert d["iou"]["a"] == pytest.approx(0.5) and d["miou"] == pytest.approx(s.miou)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    meter = SegmentationMeter(4)
    meter.update(P, T)
    s = meter.compute()
    assert math.isnan(s.iou[3]) and s.as_dict()["iou"]["3"] is None
    assert s.miou == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    empty = scores_from_confusion(torch.zeros(2, 2, dtype=torch.long))  # nothing scored
    assert math.isnan(empty.miou) and math.isnan(empty.pixel_accuracy)


def test_logits_and_streaming_match_torchmetrics():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, 9, 11, generator=g)
    target = torch.randint(0, 5, (6, 9, 11), generator=g)
    target[:, 0] = 255
    meter = SegmentationMeter(5)
    for i in range(0, 6, 2):  # batch by batch
        meter.update(logits[i:i + 2], target[i:i + 2])
    ref = MulticlassJaccardIndex(5, average=None, ignore_index=255)(logits.argmax(1), target)
    assert torch.allclose(meter.compute().iou.float(), ref, atol=1e-6)


def test_per_image_iou():
    perfect = torch.zeros(1, 2, 4, dtype=torch.long)  # only background, predicted right
    ignored = torch.full((1, 2, 4), 255)
    preds = torch.cat([P, perfect, perfect])
    target = torch.cat([T, perfect, ignored])
    iou = per_image_iou(preds, target, 3)
    assert iou[0].item() == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert iou[1].item() == 1.0 and math.isnan(iou[2].item())
    one_hot = torch.nn.functional.one_hot(P, 3).permute(0, 3, 1, 2).float()  # logits work too
    assert per_image_iou(one_hot, T, 3)[0].item() == pytest.approx(iou[0].item())


def test_paired_test_wilcoxon_and_bootstrap():
    exact = paired_iou_test(np.array([2, 3, 4, 5, 6.0]), np.array([1, 1, 1, 1, 1.0]))
    assert exact.p_value == pytest.approx(1 / 32) and exact.mean_delta == pytest.approx(3)
    rng = np.random.default_rng(0)
    champion = rng.uniform(0.5, 0.9, 40)
    better = champion + 0.05 + rng.normal(0, 0.02, 40)
    better[3] = np.nan  # an image the candidate cannot score is left out
    w = paired_iou_test(better, champion)
    assert w.n == 39 and w.p_value < 1e-4 and w.mean_delta == pytest.approx(0.05, abs=0.01)
    assert paired_iou_test(champion, np.nan_to_num(better)).p_value > 0.9
    assert paired_iou_test(champion, champion).p_value == 1.0
    b = paired_iou_test(better, champion, method="bootstrap", n_resamples=2000)
    assert b.p_value < 0.01 and b.ci_low < 0.05 < b.ci_high and b.ci_low > 0
    worse = paired_iou_test(champion, champion + 0.01, method="bootstrap", n_resamples=2000)
    assert worse.p_value > 0.9
    with pytest.raises(ValueError, match="same images"):
        paired_iou_test(champion, champion[:-1])
