"""Per-class pixel statistics of a segmentation dataset and their drift against a reference
(the champion's): what the gate's "drift on per-class pixel frequency" compares.

`class_pixel_summary` streams the masks of the chosen split one at a time (memory: one mask
and K counters). `pixel_frequency_drift` compares two summaries: PSI over the class pixel
fractions (`data.drift.psi`) and the largest change of one class's pixel fraction; a
chi-square test would flag any change at millions of pixels, so none is made.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.data.drift import psi
from visionflow.data.segmentation_layout import Pair, read_mask
from visionflow.data.segmentation_masks import IGNORE_INDEX


def class_pixel_summary(root: Path, pairs: Iterable[Pair], classes: list[str],
                        split: str | None = "train") -> dict[str, Any]:
    """{"pixels": {class: labelled pixels}, "images": {class: images containing it},
    "ignored": pixels labelled 255, "masks": masks read} over the pairs of `split` (all
    pairs when None). The pairs are checked ones (`scan_segmentation`)."""
    k = len(classes)
    pixels = np.zeros(k, dtype=np.int64)
    images = np.zeros(k, dtype=np.int64)
    ignored = masks = 0
    for pair in pairs:
        if split is not None and pair.split != split:
            continue
        values = read_mask(Path(root) / pair.mask).ravel()
        ignored += int((values == IGNORE_INDEX).sum())
        counts = np.bincount(values[values != IGNORE_INDEX], minlength=k)[:k]
        pixels += counts
        images += counts > 0
        masks += 1
    return {"pixels": dict(zip(classes, pixels.tolist(), strict=True)),
            "images": dict(zip(classes, images.tolist(), strict=True)),
            "ignored": ignored, "masks": masks}


def pixel_frequency_drift(current: dict[str, Any], reference: dict[str, Any],
                          max_psi: float = 0.1, max_change: float = 0.05) -> dict[str, Any]:
    """PSI of the class pixel fractions and the largest one-class change; `drift` when
    either exceeds its threshold."""
    cur, ref = current["pixels"], reference["pixels"]
    tc, tr = sum(cur.values()) or 1, sum(ref.values()) or 1
    changes = {c: cur.get(c, 0) / tc - ref.get(c, 0) / tr for c in sorted(set(cur) | set(ref))}
    worst = max(changes, key=lambda c: abs(changes[c]), default="")
    value = psi(cur, ref)
    change = abs(changes.get(worst, 0.0))
    return {"psi": value, "max_change": change, "class": worst,
            "drift": value > max_psi or change > max_change,
            "message": f"class pixel PSI {value:.3f} (max {max_psi}), largest change "
                       f"{change:.3f} in '{worst}' (max {max_change})"}
