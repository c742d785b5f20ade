"""Segmentation plots (matplotlib, Agg): per-class IoU and Dice bars, and overlays of the
worst test images (image, true mask, predicted mask in VOC colours, each with its IoU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionflow.model.plots import MAX_SIDE_IN, _pyplot, _save, lowest


def _palette(k: int) -> np.ndarray:
    """VOC's colours for indices 0..k-1 (the masks' own palette); 255 -> white."""
    out = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    out[255] = (255, 255, 255)
    return out


PALETTE = _palette(256)


def plot_iou_bars(path: Path, rows: list[dict[str, Any]], miou: float) -> list[str]:
    plt = _pyplot()
    every = len(rows)
    rows = lowest(rows, "iou")
    n = len(rows)
    fig, ax = plt.subplots(figsize=(min(2 * MAX_SIDE_IN, max(6, 0.6 * n + 2)), 4))
    x = np.arange(n)
    for i, (m, label) in enumerate((("iou", "IoU"), ("dice", "Dice (F1)"))):
        ax.bar(x + (i - 0.5) * 0.4, [r[m] or 0.0 for r in rows], width=0.4, label=label)
    ax.axhline(miou, color="k", ls="--", lw=1, label=f"mIoU {miou:.4f}")
    ax.set_xticks(x, [r["class"] for r in rows], rotation=90 if n > 12 else 0)
    ax.set_ylim(0, 1.05)
    ax.set_title("per-class IoU and Dice (test pixels)" if n == every else
                 f"the {n} classes of {every} with the lowest IoU (test pixels)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _save(fig, path)
    return [str(r["class"]) for r in rows]  # the classes it shows


def plot_worst(path: Path, items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float,
                                             str]]) -> None:
    """`items`: (C x H x W uint8 image, H x W truth, H x W prediction, IoU, name), worst
    first; one row each: image, truth overlaid, prediction overlaid."""
    plt = _pyplot()
    rows = max(1, len(items))
    fig, axes = plt.subplots(rows, 3, figsize=(6.6, 2.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not items:
        axes[0][0].text(0.5, 0.5, "no test images", ha="center", va="center")
    for (a, b, c), (image, truth, pred, iou, name) in zip(axes, items, strict=False):
        rgb = image.permute(1, 2, 0).numpy()
        a.imshow(rgb)
        a.set_title(name[-28:], fontsize=7)
        for ax, mask, title in ((b, truth, "true mask"), (c, pred, f"predicted, IoU {iou:.3f}")):
            ax.imshow(rgb)
            ax.imshow(PALETTE[mask.numpy().astype(np.uint8)], alpha=0.55,
                      interpolation="nearest")
            ax.set_title(title, fontsize=7)
    fig.suptitle("worst test images by IoU", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
