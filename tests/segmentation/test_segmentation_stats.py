"""Per-class pixel frequencies and their drift (#19's gate)."""

from __future__ import annotations

import numpy as np
import pytest

from visionflow.data.segmentation_layout import scan_segmentation
from visionflow.data.segmentation_masks import index_png_bytes
from visionflow.data.segmentation_stats import class_pixel_summary, pixel_frequency_drift
from visionflow.data.segmentation_synth import materialize_shapes


def _dataset(root, masks):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\na\nb\n")
    for i, m in enumerate(masks):
        (root / "masks" / f"{i}.png").write_bytes(index_png_bytes(np.asarray(m, np.uint8)))
        (root / "images" / f"{i}.png").write_bytes(
            index_png_bytes(np.full(np.shape(m), i, np.uint8)))  # distinct bytes per image


def test_counts_by_hand(tmp_path):
    _dataset(tmp_path, [[[0, 0, 1], [1, 255, 0]], [[2, 2, 2], [0, 0, 0]]])
    scan = scan_segmentation(tmp_path)
    s = class_pixel_summary(tmp_path, scan.pairs, scan.classes, split=None)
    assert s == {"pixels": {"background": 6, "a": 2, "b": 3},
                 "images": {"background": 2, "a": 1, "b": 1}, "ignored": 1, "masks": 2}


def test_drift_flags_a_changed_class_mix(tmp_path):
    same_a = materialize_shapes(tmp_path / "a", n_images=40, seed=0)
    same_b = materialize_shapes(tmp_path / "b", n_images=40, seed=1)
    summaries = []
    for root in (same_a, same_b):
        scan = scan_segmentation(root)
        summaries.append(class_pixel_summary(root, scan.pairs, scan.classes, split=None))
    steady = pixel_frequency_drift(summaries[1], summaries[0])
    assert not steady["drift"], steady["message"]
    shifted = {**summaries[1], "pixels": {**summaries[1]["pixels"], "circle": 0}}
    moved = pixel_frequency_drift(shifted, summaries[0])
    assert moved["drift"] and moved["class"] == "circle" and moved["psi"] > 0.1
    assert moved["max_change"] == pytest.approx(
        summaries[0]["pixels"]["circle"] / sum(summaries[0]["pixels"].values()), abs=0.05)
