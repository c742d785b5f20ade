"""Temperature scaling: the fitted T recovers a known miscalibration, never changes a
prediction, lowers the ECE, stops at the range's end for a model far too sure of itself, and
falls back to 1.0 when there is nothing to fit."""

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


def test_a_model_far_too_sure_gets_the_ranges_end_not_one():
    """Always class 0 with a logit gap of 60, right on a third of 13 val images (as a model
    trained two epochs on 100 photos was): the optimum is beyond T_RANGE, so its end, which
    softens the scores, not 1.0, which leaves every score at 1.0."""
    from visionflow.model.calibration import T_RANGE

    logits = torch.zeros(13, 3)
    logits[:, 0] = 60.0
    labels = torch.tensor([0, 1, 2] * 4 + [0])
    t = fit_temperature(logits, labels)
    assert t == T_RANGE[1]
    assert (logits / t).softmax(1)[0, 0] < 0.999
