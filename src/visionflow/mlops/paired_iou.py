"""The paired test for segmentation's gate: does the candidate beat the champion on the
same test images? Per-image IoU differences, Wilcoxon signed-rank (scipy) or a bootstrap of
the mean difference; images either model cannot score (NaN) are left out of both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import wilcoxon

Method = Literal["wilcoxon", "bootstrap"]


@dataclass(frozen=True)
class PairedResult:
    method: str
    n: int  # images scored by both models
    mean_delta: float  # candidate - champion, mean per-image IoU
    p_value: float  # one-sided: H1 = the candidate is better
    ci_low: float | None = None  # bootstrap 95% interval of the mean delta
    ci_high: float | None = None


def paired_iou_test(candidate: np.ndarray, champion: np.ndarray, method: Method = "wilcoxon",
                    n_resamples: int = 9999, seed: int = 0) -> PairedResult:
    """One-sided paired test of per-image IoU (same images, same order)."""
    a, b = np.asarray(candidate, np.float64), np.asarray(champion, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"per-image IoU of the same images expected, got shapes "
                         f"{a.shape} and {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    d = a[keep] - b[keep]
    if d.size == 0:
        return PairedResult(method, 0, float("nan"), 1.0)
    mean = float(d.mean())
    if method == "wilcoxon":
        if not np.any(d != 0):
            return PairedResult(method, int(d.size), mean, 1.0)
        p = float(wilcoxon(d, alternative="greater", zero_method="wilcox").pvalue)
        return PairedResult(method, int(d.size), mean, p)
    if method != "bootstrap":
        raise ValueError(f"unknown paired test {method!r}: wilcoxon or bootstrap")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_resamples, d.size))
    means = d[idx].mean(axis=1)
    # p: how often a resample of the centred deltas (no true difference) reaches the mean
    p = float((1 + np.sum(means - mean >= mean)) / (1 + n_resamples))
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedResult(method, int(d.size), mean, p, float(low), float(high))
