"""Temperature scaling: the fitted T recovers a known miscalibration, never changes a
prediction, lowers the ECE, stops at the range's end for a model far too sure of itself, and
falls back to 1.0 with no val images (and matches confidence to accuracy with no mistake)."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from visionflow.model.calibration import fit_temperature


def _calibrated(n: int = 4000, classes: int = 5, seed: int = 0):
    """Logits whose softmax is the true label distribution (labels drawn from it)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 2
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("scale", [4.0, 0.25])
def test_recovers_a_known_temperature(scale: float):
    logits, labels = _calibrated()
    t = fit_temperature(logits * scale, labels)  # over- (4x) or under-confident (1/4)
    assert t == pytest.approx(scale, rel=0.15)
    scaled = logits * scale
    assert torch.equal((scaled / t).argmax(1), scaled.argmax(1))
    ece = [multiclass_calibration_error(x.softmax(1), labels, 5, n_bins=15).item()
           for x in (scaled, scaled / t)]
    assert ece[1] < ece[0] / 2


def test_nothing_to_fit():
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0


def test_val_images_all_right_match_confidence_to_the_rule_of_succession():
    """All val images right (the digits, 179 of 179; six photos): the likelihood only grows
    as T falls, and the fit ran to the range's end, 0.05, a 20-fold sharpening on six photos.
    T now makes the mean top probability (n + 1) / (n + 2), the accuracy the rule of
    succession expects after n right of n: sharper for a label-smoothed model's soft scores,
    softer for an overconfident one's."""
    from visionflow.model.calibration import unfittable

    logits = torch.tensor([[2.0, 0.5, 0.1]] * 3 + [[0.2, 1.5, 0.3]] * 3)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    t = fit_temperature(logits, labels)
    assert (logits / t).softmax(1).amax(1).mean().item() == pytest.approx(7 / 8, abs=1e-4)
    assert 0.05 < t < 1.0  # sharper than as trained, not to the end of the range
    assert unfittable(logits, labels) == "all 6 val images predicted right"
    sure = fit_temperature(logits * 50, labels)  # far too sure: softened to the same 7/8
    assert sure > 1.0 and sure == pytest.approx(t * 50, rel=1e-3)
    labels[5] = 2  # one mistake: the likelihood's own optimum
    assert unfittable(logits, labels) is None and fit_temperature(logits, labels) != 1.0


def test_a_model_far_too_sure_is_softened_past_twenty():
    """Always class 0 with a logit gap of 60, right on 5 of 13 val images: the likelihood is
    best where class 0 scores 5/13, at T = 60 / ln(1.25) = 268.9 (the range stopped at 20
    before, and a fit past it fell back to 1.0, every score 1.0); past the range's end, the
    end."""
    import math

    from visionflow.model.calibration import T_RANGE

    logits = torch.zeros(13, 3)
    logits[:, 0] = 60.0
    labels = torch.tensor([0, 1, 2] * 4 + [0])
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(60 / math.log(1.25), rel=1e-2)
    assert (logits / t).softmax(1)[0, 0].item() == pytest.approx(5 / 13, abs=1e-2)
    assert fit_temperature(logits * 100, labels) == T_RANGE[1]  # optimum past the end
