"""The segmentation gate (#19) as pure logic: floor, delta and the paired per-image IoU
test on mIoU; too few images refused; a version of the other task refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import REPO

from visionflow.core.configfile import load_params
from visionflow.core.errors import ConfigError
from visionflow.mlops.gate import scored_set
from visionflow.mlops.segmentation_gate import check_task, decide_iou

RNG = np.random.default_rng(0)
BASE = RNG.uniform(0.6, 0.8, size=60)


def _params(*overrides: str):
    return load_params(REPO / "params.yaml", ["task=segmentation", *overrides])


def test_no_champion_promotes_over_the_floor_and_refuses_under_it():
    d = decide_iou(0.9, BASE, None, None, _params("segmentation.min_miou=0.8"))
    assert d.promote and d.reason == "no champion yet" and d.metric == "mIoU"
    low = decide_iou(0.7, BASE, None, None, _params("segmentation.min_miou=0.8"))
    assert not low.promote and "mIoU 0.7000 < min_miou 0.8000" in low.reason


def test_a_segmenter_no_better_than_the_commonest_class_everywhere_is_not_promoted():
    """All background, on masks 70% background in 3 classes: mIoU 0.7 / 3, and the first
    such model was champion (floor 0). `commonest_class_miou` is that score, read from the
    challenger's own confusion matrix; the gate wants more (`register.beat_majority`)."""
    import torch

    from visionflow.model.segmentation_metrics import commonest_class_miou, scores_from_confusion

    truth = torch.tensor([700, 200, 100])
    everything_background = torch.zeros(3, 3, dtype=torch.int64)
    everything_background[:, 0] = truth
    right = torch.diag(truth)  # the same pixels, all right: the same baseline
    baseline = commonest_class_miou(right)
    assert baseline == pytest.approx(0.7 / 3)
    assert baseline == pytest.approx(scores_from_confusion(everything_background).miou)
    d = decide_iou(0.2333, BASE, None, None, _params(), majority=baseline)
    assert not d.promote and d.reason == ("no champion yet, but mIoU 0.2333 <= 0.2333, what "
                                          "predicting the commonest class at every pixel scores")
    assert decide_iou(0.5, BASE, None, None, _params(), majority=baseline).promote
    off = decide_iou(0.2, BASE, None, None, _params("register.beat_majority=false"),
                     majority=baseline)
    assert off.promote and [c.name for c in off.checks] == ["floor", "majority"]


def test_a_clearly_better_challenger_is_promoted_and_a_worse_one_kept_out():
    better = decide_iou(0.85, BASE + 0.1, 0.75, BASE, _params(), "3")
    assert better.promote, better.reason
    assert [c.name for c in better.checks] == ["floor", "delta", "paired"]
    assert "beats champion v3" in better.reason and "wilcoxon p=" in better.reason
    worse = decide_iou(0.70, BASE - 0.05, 0.75, BASE, _params(), "3")
    assert not worse.promote and worse.reason.startswith("kept champion v3: gain -0.0500")
    report = worse.markdown("seg", "4")
    assert "mIoU 0.7000" in report and "champion v3, mIoU 0.7500" in report
    assert worse.tags()["gate_metric"] == "mIoU"
    # a registry reader sees the scores under their metric's name, not top-1's
    assert {"gate_challenger_miou", "gate_champion_miou"} <= set(worse.tags())
    assert not any("top1" in k for k in worse.tags())


def test_a_gain_the_paired_test_does_not_support_is_not_enough():
    mixed = BASE - 0.01
    mixed[:3] += 0.31  # a mean gain carried by three images, 57 slightly worse
    for method in ("wilcoxon", "bootstrap"):
        d = decide_iou(0.76, mixed, 0.75, BASE, _params(f"segmentation.paired_test={method}"),
                       "1")
        paired = next(c for c in d.checks if c.name == "paired")
        assert d.checks[1].passed and not paired.passed and not d.promote, d.reason
    relaxed = decide_iou(0.76, mixed, 0.75, BASE, _params("segmentation.paired_required=false"),
                         "1")
    assert relaxed.promote


def test_too_few_scored_images_are_refused():
    scored = scored_set([str(i) for i in range(12)], ["0", "1", "2"], None)
    d = decide_iou(0.99, BASE[:9], None, None, _params(), scored=scored)
    assert not d.promote and d.reason.startswith("refused: too few test images")


def test_a_version_of_the_other_task_is_a_one_line_error():
    check_task("m", "2", {"task": "segmentation"}, "segmentation")
    with pytest.raises(ConfigError) as err:
        check_task("m", "2", {}, "segmentation")  # no tag: registered as a classifier
    assert str(err.value).startswith("m v2 is a classification model; this project's task "
                                     "is segmentation") and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="m v5 is a segmentation model"):
        check_task("m", "5", {"task": "segmentation"}, "classification")
